"""What a signature covers (the model name, the version number, every file, config.json), key
expiry and the revocation list, and the refusal of old-format signatures: each refusal names its
reason, by the loader, the CLI and a real server (counted in its metrics); the allowed case of
each loads. Real ed25519 keys, real packages."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.model_config import (
    ModelConfig,
    VersionPolicy,
    read_model_config,
    write_model_config,
)
from edgewise.runtime.package.signing import (
    CONFIG_SECTIONS,
    KEYS_FILE,
    LEGACY_FORMAT,
    REVOCATION_FILE,
    SIGNATURE_FILE,
    Signature,
    SignatureError,
    Statement,
    TrustedKeys,
    config_digest,
    generate_keypair,
    load_private_key,
    read_signature,
    sign_package,
    verify_package,
)
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from edgewise.runtime.store.transfer import fetch_file
from tests.runtime.store.helpers import copy_package, logreg_inputs, served_version
from tests.servers import start_server


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, str]:
    """``(private key, trusted folder, key id)``: a folder of its own per test, so each test
    writes its own keys.json and revoked.json."""
    private, public, kid = generate_keypair(tmp_path / "ours", "release")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / "release.pub")
    return private, trusted, kid


def package(model_repo: Path, repo: Path, key: Path, version: int | None = None) -> Path:
    """logreg version 1 copied to ``repo/logreg/<next>`` and signed (as ``version`` when given,
    else as the number of its folder)."""
    folder = copy_package(model_repo / "logreg" / "1", repo)
    sign_package(folder, key, version=version)
    return folder


def load(folder: Path, trusted: TrustedKeys) -> object:
    return load_model("logreg", int(folder.name), folder, SessionSettings(), trusted=trusted)


def refused(folder: Path, trusted: TrustedKeys) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        load(folder, trusted)
    return info.value


def test_the_statement_names_the_model_version_files_config_and_key(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, kid = keys
    folder = package(model_repo, tmp_path / "repo", private)
    statement = read_signature(folder).statement
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (statement.model, statement.version, statement.key_id) == ("logreg", 1, kid)
    raw = (folder / "manifest.json").read_bytes()
    assert statement.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert statement.files == {f["path"]: f["sha256"] for f in manifest["files"]}
    assert {"model.onnx", "profile.json", "golden.json"} <= set(statement.files)
    assert statement.config_sha256 == hashlib.sha256(b"{}").hexdigest()  # no config.json
    # The signed bytes are the statement's canonical JSON, checked here with cryptography itself.
    data = json.loads((folder / SIGNATURE_FILE).read_text())
    canonical = json.dumps(data["statement"], sort_keys=True, separators=(",", ":")).encode()
    public = load_private_key(private).public_key()
    public.verify(base64.b64decode(data["signature"]), canonical)  # raises if it does not
    assert verify_package(folder, TrustedKeys.load(trusted_dir), name="logreg", version=1)


def test_a_package_signed_as_one_version_is_refused_under_another(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """The attack the first format let through: a correctly signed old package placed as a new
    version number."""
    private, trusted_dir, _ = keys
    trusted = TrustedKeys.load(trusted_dir)
    repo = tmp_path / "repo"
    v1 = package(model_repo, repo, private)
    load(v1, trusted)  # the allowed case
    planted = repo / "logreg" / "5"
    shutil.copytree(v1, planted)
    error = refused(planted, trusted)
    assert error.reason == "version_mismatch"
    assert "signed as version 1" in error.message and "placed as version 5" in error.message
    # Editing the statement's version to match is a signature that no longer verifies.
    data = json.loads((planted / SIGNATURE_FILE).read_text())
    data["statement"]["version"] = 5
    (planted / SIGNATURE_FILE).write_text(json.dumps(data))
    assert refused(planted, trusted).reason == "bad_signature"
    # Signed for that number by the key holder: loads.
    sign_package(planted, private)
    load(planted, trusted)
    # Another model's name is refused the same way.
    other = load_model  # (name is an argument of the loader, as the folder layout gives it)
    with pytest.raises(SignatureError) as info:
        other("churn", 5, planted, SessionSettings(), trusted=trusted)
    assert info.value.reason == "model_mismatch"


def test_config_json_sections_are_signed_and_the_version_pins_are_not(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, _ = keys
    trusted = TrustedKeys.load(trusted_dir)
    repo = tmp_path / "repo"
    config = repo / "logreg" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"monitoring": {"window": 500}, "capture": {"rate": 0.1}}))
    folder = package(model_repo, repo, private)
    load(folder, trusted)
    # The pins the agent and LoadModel make_default write are not covered: still loads.
    config.write_text(
        json.dumps(
            {
                "capture": {"rate": 0.1},
                "monitoring": {"window": 500},
                "version_policy": {"specific": [1]},
                "default_version": 1,
            },
            indent=4,
        )
    )
    load(folder, trusted)
    for changed in (
        {"monitoring": {"window": 50}, "capture": {"rate": 0.1}},  # a value
        {"monitoring": {"window": 500}},  # a section removed
        {"monitoring": {"window": 500}, "capture": {"rate": 0.1}, "quality": {}},  # one added
    ):
        config.write_text(json.dumps(changed))
        error = refused(folder, trusted)
        assert error.reason == "config_changed"
        assert "config.json: changed after version 1 was signed" in error.message
    # What the server itself writes (LoadModel make_default: ModelConfig.to_json, which drops
    # keys it does not read and re-lays the file out) keeps the signed sections.
    config.write_text(
        json.dumps({"monitoring": {"window": 500}, "capture": {"rate": 0.1}, "note": "x"})
    )
    load(folder, trusted)
    model_config = read_model_config(config.parent, VersionPolicy())
    write_model_config(config.parent, dataclasses.replace(model_config, default_version=1))
    assert "note" not in json.loads(config.read_text())
    load(folder, trusted)
    config.unlink()  # no file at all is not the signed sections either
    assert refused(folder, trusted).reason == "config_changed"
    config.write_text("[1, 2]")
    with pytest.raises(Exception, match="expected a JSON object"):
        config_digest(config.parent)


def test_every_section_the_server_reads_but_the_pins_is_signed() -> None:
    """A section added to config.json's schema and not to CONFIG_SECTIONS would go unsigned."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(CONFIG_SECTIONS) == fields - {"version_policy", "default_version"}


def test_every_file_and_the_manifest_are_covered(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, _ = keys
    trusted = TrustedKeys.load(trusted_dir)
    folder = package(model_repo, tmp_path / "repo", private)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["parity"] = {"max_abs_diff": {"label": 0.0}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert refused(folder, trusted).reason == "manifest_changed"


def test_an_expired_key_is_refused_and_a_current_one_loads(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, kid = keys
    folder = package(model_repo, tmp_path / "repo", private)
    soon = datetime.now(UTC) + timedelta(days=30)
    (trusted_dir / KEYS_FILE).write_text(
        json.dumps({kid: {"not_after": soon.strftime("%Y-%m-%dT%H:%M:%SZ")}})
    )
    trusted = TrustedKeys.load(trusted_dir)
    load(folder, trusted)  # before its expiry
    later = soon + timedelta(seconds=1)
    with pytest.raises(SignatureError) as info:
        verify_package(folder, trusted, name="logreg", version=1, now=later)
    assert info.value.reason == "expired_key" and "expired at" in info.value.message
    (trusted_dir / KEYS_FILE).write_text(json.dumps({kid: {"not_after": "2020-01-01T00:00:00Z"}}))
    error = refused(folder, TrustedKeys.load(trusted_dir))
    assert error.reason == "expired_key" and "2020-01-01T00:00:00Z" in error.message
    # The file is checked when the keys are loaded: a field, a time or a key id that is wrong.
    for bad, message in (
        ({kid: {"not_after": "next week"}}, "not an ISO-8601 time"),
        ({kid: {"not_after": "2030-01-01T00:00:00"}}, "has no time zone"),
        ({kid: {"expires": "2030-01-01T00:00:00Z"}}, "expected"),
        ({"0123456789abcdef": {"not_after": "2030-01-01T00:00:00Z"}}, "not among the trusted"),
    ):
        (trusted_dir / KEYS_FILE).write_text(json.dumps(bad))
        with pytest.raises(InvalidInput, match=message):
            TrustedKeys.load(trusted_dir)


def test_revoked_keys_and_packages_are_refused_without_reloading_the_keys(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, kid = keys
    trusted = TrustedKeys.load(trusted_dir)  # loaded once, as a running server has them
    repo = tmp_path / "repo"
    revoked_one = package(model_repo, repo, private)
    kept = package(model_repo, repo, private)
    load(revoked_one, trusted)
    digest = hashlib.sha256((revoked_one / "manifest.json").read_bytes()).hexdigest()
    # The two copies have the same manifest: revoke by digest after changing one of them.
    manifest = json.loads((kept / "manifest.json").read_text())
    manifest["source"] = {**manifest.get("source", {}), "note": "rebuilt"}
    (kept / "manifest.json").write_text(json.dumps(manifest))
    sign_package(kept, private)
    listing = trusted_dir / REVOCATION_FILE
    listing.write_text(json.dumps({"packages": [digest]}))
    error = refused(revoked_one, trusted)
    assert error.reason == "revoked_package" and digest[:12] in error.message
    load(kept, trusted)  # another package by the same key still loads
    listing.write_text(json.dumps({"keys": [kid], "comment": "laptop stolen 2026-12-01"}))
    error = refused(kept, trusted)
    assert error.reason == "revoked_key" and kid in error.message
    listing.write_text("{not json")  # a list that cannot be read refuses everything
    assert refused(kept, trusted).reason == "revocation_list"
    with pytest.raises(InvalidInput, match="not valid JSON"):
        TrustedKeys.load(trusted_dir)  # and stops a start
    listing.write_text(json.dumps({"keys": ["short"]}))
    with pytest.raises(InvalidInput, match="16-hex-digit key ids"):
        TrustedKeys.load(trusted_dir)
    listing.unlink()
    load(kept, trusted)
    # Mounted as a link (a Kubernetes ConfigMap): followed; a dangling one refuses everything.
    mounted = tmp_path / "configmap" / REVOCATION_FILE
    mounted.parent.mkdir()
    mounted.write_text(json.dumps({"keys": [kid]}))
    listing.symlink_to(mounted)
    assert refused(kept, trusted).reason == "revoked_key"
    mounted.unlink()
    assert refused(kept, trusted).reason == "revocation_list"


def test_old_format_signatures_are_refused_with_how_to_re_sign(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, kid = keys
    folder = copy_package(model_repo / "logreg" / "1", tmp_path / "repo")
    raw = (folder / "manifest.json").read_bytes()
    key = load_private_key(private)
    (folder / SIGNATURE_FILE).write_text(  # exactly what the first format wrote
        json.dumps(
            {
                "format": LEGACY_FORMAT,
                "algorithm": "ed25519",
                "key_id": kid,
                "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                "signature": base64.b64encode(key.sign(raw)).decode(),
            }
        )
    )
    error = refused(folder, TrustedKeys.load(trusted_dir))
    assert error.reason == "legacy_format"
    assert "edgewise keys sign REPO/NAME/VERSION --key KEY" in error.message


def test_the_cli_signs_as_the_folder_version_and_says_why_it_refuses(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, _ = keys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "keys", *args],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    repo = tmp_path / "repo"
    first = copy_package(model_repo / "logreg" / "1", repo)
    second = copy_package(model_repo / "logreg" / "1", repo)
    assert run("sign", str(second), "--key", str(private)).returncode == 0
    assert read_signature(second).statement.version == 2
    ok = run("verify", str(second), "--trusted-keys", str(trusted_dir))
    assert ok.returncode == 0 and "version 2" in ok.stdout, ok.stderr
    shutil.copy(second / SIGNATURE_FILE, first / SIGNATURE_FILE)  # v2's signature under 1
    bad = run("verify", str(first), "--trusted-keys", str(trusted_dir))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "signed as version 2" in bad.stderr and "Traceback" not in bad.stderr
    (repo / "logreg" / "config.json").write_text('{"capture": {"rate": 0.5}}')
    bad = run("verify", str(second), "--trusted-keys", str(trusted_dir))
    assert bad.returncode == 1 and "config.json: changed after" in bad.stderr
    loose = tmp_path / "loose"
    shutil.copytree(second, loose)
    bad = run("sign", str(loose), "--key", str(private))
    assert bad.returncode == 1 and "REPO/NAME/VERSION" in bad.stderr


def test_register_signs_the_number_the_store_gives(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, _ = keys
    trusted = TrustedKeys.load(trusted_dir)
    store = SqliteStore(tmp_path / "store.db")
    try:
        source = package(model_repo, tmp_path / "src", private)  # signed as version 1
        assert SIGNATURE_FILE in [f.path for f in register(store, source).record.files]
        again = register(store, source).record  # version 2: the carried signature says 1
        assert again.version == 2 and SIGNATURE_FILE not in [f.path for f in again.files]
        signed = register(store, source, sign_key=private).record
        assert signed.version == 3 and SIGNATURE_FILE in [f.path for f in signed.files]
        folder = tmp_path / "fetched" / "logreg" / "3"
        for entry in signed.files:
            fetch_file(store, signed, entry, folder)
        assert verify_package(folder, trusted, name="logreg", version=3)
        with pytest.raises(SignatureError, match="signed as version 3"):
            verify_package(folder, trusted, name="logreg", version=4)
    finally:
        store.close()


def _metric(url: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_real_server_refuses_a_planted_version_and_a_revoked_key(
    model_repo: Path, keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    private, trusted_dir, kid = keys
    repo = tmp_path / "repo"
    v1 = package(model_repo, repo, private)
    server = start_server(
        repo,
        tmp_path / "server",
        ["--monitoring", "off", "--version-policy", "all", "--trusted-keys", str(trusted_dir)],
    )
    try:
        inputs = logreg_inputs(v1)
        assert served_version(server, "logreg", inputs) == "1"
        planted = repo / "logreg" / "2"
        shutil.copytree(v1, planted)  # version 1's files and signature, as version 2
        with server.client() as client:
            with pytest.raises(ServerError) as info:
                client.load_model("logreg", "2")
            assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
            assert "signed as version 1" in info.value.details
            events = {"model": "logreg", "version": "2", "event": "signature_version_mismatch"}
            assert _metric(server.metrics_url, "edgewise_model_events_total", events) == 1
            sign_package(planted, private)  # signed for its number: loads
            client.load_model("logreg", "2")
            third = package(model_repo, repo, private)  # version 3, signed for its number
            (trusted_dir / REVOCATION_FILE).write_text(json.dumps({"keys": [kid]}))
            with pytest.raises(ServerError) as info:  # read at the next load, no restart
                client.load_model("logreg", third.name)
            assert "revoked" in info.value.details
            events = {"model": "logreg", "version": "3", "event": "signature_revoked_key"}
            assert _metric(server.metrics_url, "edgewise_model_events_total", events) == 1
            states = {s.version: s.state for s in client.repository_index() if s.name == "logreg"}
            assert states == {"1": "READY", "2": "READY", "3": "FAILED"}  # loaded ones serve on
    finally:
        assert server.stop() == 0, server.log()


# ---- properties ----------------------------------------------------------------------------------

_hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_statements = st.builds(
    Statement,
    model=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
    version=st.integers(1, 10**12),
    manifest_sha256=_hex64,
    files=st.dictionaries(st.from_regex(r"[a-z]{1,8}\.[a-z]{2,4}", fullmatch=True), _hex64),
    config_sha256=_hex64,
    signed_at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ).map(lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")),
    key_id=st.text("0123456789abcdef", min_size=16, max_size=16),
)


@settings(max_examples=150, deadline=None)
@given(statement=_statements, field=st.sampled_from(sorted(Statement.__dataclass_fields__)))
def test_any_change_to_a_signed_statement_breaks_its_signature(
    statement: Statement, field: str
) -> None:
    """The file round-trips to the signed bytes, and a change to any one field (what an
    attacker with the file but not the key can do) no longer verifies."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    signed = Signature(statement, key.sign(statement.canonical()))
    again = Signature.from_json(json.loads(json.dumps(signed.to_json())))
    assert again.statement.canonical() == statement.canonical()
    key.public_key().verify(again.signature, again.statement.canonical())
    value = getattr(statement, field)
    if field == "version":
        changed: object = value + 1
    elif field == "files":
        changed = {**value, "extra.bin": "0" * 64}
    elif field == "signed_at":
        changed = "1999-01-01T00:00:00Z"
    elif field == "model":
        changed = value + "x"
    else:
        changed = ("0" if value[0] != "0" else "1") + value[1:]
    forged = dataclasses.replace(statement, **{field: changed})
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signed.signature, forged.canonical())
