"""Signed model packages: keys, signatures over the manifest, and refusal of anything unsigned
or tampered with, by the loader, a real server (the last good version keeps serving) and a real
agent fed by a real store."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.package.signing import (
    SIGNATURE_FILE,
    SignatureError,
    TrustedKeys,
    generate_keypair,
    read_signature,
    sign_package,
    verify_package,
)
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.certs import make_certificates
from tests.runtime.store.helpers import (
    copy_package,
    logreg_inputs,
    logreg_v2,
    served_version,
    start_agent,
    wait_for,
)
from tests.servers import RunningServer, start_server

TOKEN = "agent-token-0123456789abcdef"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(private key, trusted public keys folder, an untrusted private key)``."""
    root = tmp_path_factory.mktemp("keys")
    private, public, _ = generate_keypair(root / "ours", "release")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / "release.pub")
    other, _, _ = generate_keypair(root / "theirs", "mallory")
    return private, trusted, other


def signed_copy(model_repo: Path, target_repo: Path, key: Path | None) -> Path:
    folder = copy_package(model_repo / "logreg" / "1", target_repo)
    if key is not None:
        sign_package(folder, key)
    return folder


def load(folder: Path, trusted: TrustedKeys) -> object:
    return load_model("logreg", int(folder.name), folder, SessionSettings(), trusted=trusted)


def test_keys_are_written_safely(tmp_path: Path) -> None:
    private, public, kid = generate_keypair(tmp_path, "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert list(TrustedKeys.load(public)) == [kid]
    with pytest.raises(InvalidInput, match="already exists"):
        generate_keypair(tmp_path, "k")
    with pytest.raises(InvalidInput):
        generate_keypair(tmp_path, "../escape")
    with pytest.raises(InvalidInput, match="not a PEM public key"):
        TrustedKeys.load(private)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=r"no \*\.pub"):
        TrustedKeys.load(empty)


def test_generate_refuses_when_either_file_exists_and_writes_nothing(tmp_path: Path) -> None:
    public = tmp_path / "k.pub"
    public.write_bytes(b"the operator's trusted key\n")
    with pytest.raises(InvalidInput, match=r"k\.pub already exists"):
        generate_keypair(tmp_path, "k")
    assert public.read_bytes() == b"the operator's trusted key\n"
    assert not (tmp_path / "k.key").exists()
    (tmp_path / "d.pub").symlink_to(tmp_path / "nowhere")  # a dangling link counts as there
    with pytest.raises(InvalidInput, match="already exists"):
        generate_keypair(tmp_path, "d")
    assert not (tmp_path / "d.key").exists() and not (tmp_path / "nowhere").exists()


def test_a_failed_public_key_write_leaves_no_private_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def disk_full_for_public_keys(path: object, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".pub"):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", disk_full_for_public_keys)
    with pytest.raises(InvalidInput, match="No space left"):
        generate_keypair(tmp_path, "k")
    assert list(tmp_path.iterdir()) == []


def test_every_tampering_is_refused(
    model_repo: Path, keys: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    private, trusted_dir, other = keys
    trusted = TrustedKeys.load(trusted_dir)
    good = signed_copy(model_repo, tmp_path, private)
    assert verify_package(good, trusted, name="logreg", version=1).key_id in trusted.keys
    assert read_signature(good).manifest_sha256
    load(good, trusted)  # loads

    def tampered(edit: str) -> Path:
        folder = signed_copy(model_repo, tmp_path, private)
        if edit == "model":
            with (folder / "model.onnx").open("ab") as handle:
                handle.write(b"\0")
        elif edit == "manifest":
            data = json.loads((folder / "manifest.json").read_text())
            data["parity"] = {"max_abs_diff": {"label": 0.0}}
            (folder / "manifest.json").write_text(json.dumps(data))
        elif edit == "profile":
            data = json.loads((folder / "profile.json").read_text())
            data["rows"] = 1
            (folder / "profile.json").write_text(json.dumps(data))
        elif edit == "golden":
            (folder / "golden.json").write_text("{}")
        elif edit == "unsigned":
            (folder / SIGNATURE_FILE).unlink()
        elif edit == "other key":
            sign_package(folder, other)
        elif edit == "garbage signature":
            (folder / SIGNATURE_FILE).write_text('{"format": "edgewise.signature/1"')
        elif edit == "forged signature":
            data = json.loads((folder / SIGNATURE_FILE).read_text())
            raw = bytearray(base64.b64decode(data["signature"]))
            raw[10] ^= 0xFF
            data["signature"] = base64.b64encode(bytes(raw)).decode()
            (folder / SIGNATURE_FILE).write_text(json.dumps(data))
        elif edit == "linked signature":
            outside = tmp_path / "elsewhere.sig"
            shutil.move(folder / SIGNATURE_FILE, outside)
            (folder / SIGNATURE_FILE).symlink_to(outside)
        return folder

    expected = {
        "model": "differs from the manifest",
        "manifest": "changed after signing",
        "profile": "differs from the manifest",
        "golden": "differs from the manifest",
        "unsigned": "not signed",
        "other key": "not trusted",
        "garbage signature": "not valid JSON",
        "forged signature": "does not verify",
        "linked signature": "symbolic link",
    }
    for edit, message in expected.items():
        folder = tampered(edit)
        with pytest.raises(PackageError, match=message):
            load(folder, trusted)
    assert issubclass(SignatureError, PackageError)


def test_the_cli_makes_keys_signs_and_verifies(model_repo: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "keys", *args],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    made = run("generate", "--out", str(tmp_path / "k"), "--name", "ops")
    assert made.returncode == 0 and "keep it secret" in made.stdout, made.stderr
    package = copy_package(model_repo / "logreg" / "1", tmp_path / "repo")
    signed = run("sign", str(package), "--key", str(tmp_path / "k" / "ops.key"))
    assert signed.returncode == 0, signed.stderr
    ok = run("verify", str(package), "--trusted-keys", str(tmp_path / "k" / "ops.pub"))
    assert ok.returncode == 0 and "verifies" in ok.stdout, ok.stderr
    (package / "manifest.json").write_text((package / "manifest.json").read_text() + " ")
    bad = run("verify", str(package), "--trusted-keys", str(tmp_path / "k" / "ops.pub"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "changed after signing" in bad.stderr
    again = run("generate", "--out", str(tmp_path / "k"), "--name", "ops")
    assert again.returncode == 1 and "already exists" in again.stderr
    (tmp_path / "k" / "ops.key").unlink()  # only the public key left: still not overwritten
    trusted = (tmp_path / "k" / "ops.pub").read_bytes()
    half = run("generate", "--out", str(tmp_path / "k"), "--name", "ops")
    assert half.returncode == 1 and half.stderr.count("\n") == 1, half.stderr
    assert "ops.pub already exists" in half.stderr
    assert (tmp_path / "k" / "ops.pub").read_bytes() == trusted
    assert not (tmp_path / "k" / "ops.key").exists()
    # A server told to trust keys that are not there does not start, and says why in a line.
    serve = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "serve", "--repo", str(tmp_path / "repo"),
         "--port", "0", "--metrics-port", "-1", "--trusted-keys", str(tmp_path / "nowhere")],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert serve.returncode == 1 and "Traceback" not in serve.stderr
    assert serve.stderr.strip().splitlines()[-1].endswith("is neither a file nor a folder")


# ---- a real server ------------------------------------------------------------------------------


@pytest.fixture
def strict_server(
    model_repo: Path, keys: tuple[Path, Path, Path], tmp_path: Path
) -> Iterator[tuple[RunningServer, Path]]:
    private, trusted_dir, _ = keys
    repo = tmp_path / "repo"
    signed_copy(model_repo, repo, private)  # logreg version 1, signed
    unsigned = copy_package(model_repo / "forest" / "1", repo)  # forest version 1: unsigned
    assert not (unsigned / SIGNATURE_FILE).exists()
    server = start_server(
        repo,
        tmp_path / "server",
        ["--monitoring", "off", "--version-policy", "all", "--trusted-keys", str(trusted_dir)],
    )
    yield server, repo
    assert server.stop() == 0, server.log()


def test_the_server_refuses_unsigned_and_tampered_versions_and_keeps_serving(
    strict_server: tuple[RunningServer, Path],
    model_repo: Path,
    keys: tuple[Path, Path, Path],
) -> None:
    server, repo = strict_server
    private, _, other = keys
    inputs = logreg_inputs(repo / "logreg" / "1")
    assert served_version(server, "logreg", inputs) == "1"
    assert "forest" in server.log() and "not signed" in server.log()
    with server.client() as client:
        states = {(s.name, s.version): s.state for s in client.repository_index()}
        assert states[("logreg", "1")] == "READY" and states[("forest", "1")] == "FAILED"
        for key, edit, message in (
            (None, None, "not signed"),
            (other, None, "not trusted"),
            (private, "model", "differs from the manifest"),
        ):
            folder = signed_copy(model_repo, repo, key)
            if edit == "model":
                with (folder / "model.onnx").open("r+b") as handle:
                    handle.seek(200)
                    handle.write(b"\x01\x02")
            with pytest.raises(ServerError) as info:
                client.load_model("logreg", folder.name)
            assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
            assert message in info.value.details, info.value.details
            assert f"model logreg version {folder.name} failed to load" in server.log()
            assert served_version(server, "logreg", inputs) == "1"
        # The served version's manifest is tampered with on disk, then the model is reloaded:
        # the reload is refused and the copy loaded earlier serves on.
        manifest = repo / "logreg" / "1" / "manifest.json"
        data = json.loads(manifest.read_text())
        data["files"][0]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(data))
        client.load_model("logreg", "1")
        states = {(s.name, s.version): s for s in client.repository_index()}
        assert states[("logreg", "1")].state == "READY"
        assert "a reload failed" in states[("logreg", "1")].reason
        result = client.infer("logreg", {k: np.asarray(v) for k, v in inputs.items()})
        assert result.model_version == "1"
    assert server.process.poll() is None


# ---- a real agent --------------------------------------------------------------------------------


def test_the_agent_deploys_signed_versions_and_refuses_unsigned_ones(
    model_repo: Path, keys: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Over mutual TLS with a token, as on a locked-down node."""
    private, trusted_dir, _ = keys
    certs = make_certificates(tmp_path / "certs")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    sources = tmp_path / "sources"
    v1 = copy_package(model_repo / "logreg" / "1", sources)
    v2 = logreg_v2(sources)
    store_path = tmp_path / "store" / "store.db"
    store = SqliteStore(store_path)
    edge = tmp_path / "edge"
    edge.mkdir()
    server = start_server(
        edge,
        tmp_path / "server",
        ["--trusted-keys", str(trusted_dir), "--tls-cert", str(certs.server_cert),
         "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca),
         "--tokens-file", str(token_file)],
        wait_serving=False,
        security=ClientSecurity(
            tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=TOKEN
        ),
    )  # fmt: skip
    agent = None
    try:
        register(store, v1, alias="production", sign_key=private)
        agent = start_agent(
            f"sqlite:///{store_path}", "logreg", edge, server, tmp_path / "agent",
            ["--trusted-keys", str(trusted_dir), "--tls-ca", str(certs.ca),
             "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key),
             "--token-file", str(token_file)],
        )  # fmt: skip
        inputs = logreg_inputs(v1)

        def serving(version: str) -> bool:
            try:
                return served_version(server, "logreg", inputs) == version
            except Exception:
                return False

        wait_for(lambda: serving("1"), 90, "signed version 1 deployed")
        assert (edge / "logreg" / "1" / SIGNATURE_FILE).is_file()
        register(store, v2, alias="production")  # unsigned
        wait_for(lambda: "version 2 refused" in agent.log(), 60, "the unsigned version 2 refused")
        assert "not signed" in agent.log()
        assert serving("1") and agent.alive()
        assert not (edge / "logreg" / "2").exists()
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        store.close()


def test_register_carries_a_signature_only_while_it_verifies(
    model_repo: Path, keys: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    private, trusted_dir, _ = keys
    trusted = TrustedKeys.load(trusted_dir)
    store = SqliteStore(tmp_path / "store.db")
    try:
        package = copy_package(model_repo / "logreg" / "1", tmp_path / "src")
        sign_package(package, private)
        # The package has golden requests, so register publishes its manifest unchanged.
        record = register(store, package).record
        assert SIGNATURE_FILE in [f.path for f in record.files]
        # --allow-schema-change rewrites the manifest: the old signature would not verify.
        changed = register(store, package, allow_schema_change=True).record
        assert SIGNATURE_FILE not in [f.path for f in changed.files]
        signed = register(store, package, allow_schema_change=True, sign_key=private).record
        assert SIGNATURE_FILE in [f.path for f in signed.files]
        folder = tmp_path / "fetched"
        folder.mkdir()
        from edgewise.runtime.store.transfer import fetch_file

        for entry in signed.files:
            fetch_file(store, signed, entry, folder)
        assert verify_package(folder, trusted, name="logreg", version=signed.version)
    finally:
        store.close()
    assert os.environ.get("EDGEWISE_TRUSTED_KEYS") is None
