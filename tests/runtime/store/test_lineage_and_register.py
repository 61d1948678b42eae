"""Store URIs, lineage (a real git work tree, real data files) and ``register`` on the embedded
store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.package.golden import GOLDEN_FILE, read_golden
from edgewise.runtime.package.manifest import read_manifest, verify_files, write_manifest
from edgewise.runtime.store import parse_store_uri
from edgewise.runtime.store.lineage import (
    collect_lineage,
    data_fingerprint,
    git_info,
    parse_key_values,
)
from edgewise.runtime.store.register import ALLOW_SCHEMA_CHANGE, register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.store.helpers import copy_package, logreg_v1


@pytest.mark.parametrize(
    ("text", "kind", "path", "url", "user", "password"),
    [
        ("sqlite:///rel/store.db", "sqlite", "rel/store.db", "", None, None),
        ("sqlite:////abs/store.db", "sqlite", "/abs/store.db", "", None, None),
        ("/plain/path.db", "sqlite", "/plain/path.db", "", None, None),
        ("mlflow://mlflow.local:5000", "mlflow", None, "http://mlflow.local:5000", None, None),
        ("mlflow+https://r.example/ml/", "mlflow", None, "https://r.example/ml", None, None),
        ("http://u:p%40ss@10.0.0.5:5000", "mlflow", None, "http://10.0.0.5:5000", "u", "p@ss"),
        ("https://[::1]:8443", "mlflow", None, "https://[::1]:8443", None, None),
    ],
)  # fmt: skip
def test_store_uris(
    text: str, kind: str, path: str | None, url: str, user: str | None, password: str | None
) -> None:
    parsed = parse_store_uri(text)
    assert parsed.kind == kind
    assert (str(parsed.path) if parsed.path else None) == path
    assert parsed.base_url == url
    assert (parsed.username, parsed.password) == (user, password)
    assert "p@ss" not in str(parsed)  # printable without the password


def test_store_uri_defaults_and_errors(tmp_path: Path) -> None:
    assert parse_store_uri(None, tmp_path / "d.db").path == tmp_path / "d.db"
    with_env = parse_store_uri("mlflow://h:1").with_credentials("alice", "secret")
    assert (with_env.username, with_env.password) == ("alice", "secret")
    in_uri = parse_store_uri("http://bob:pw@h:1").with_credentials("alice", "secret")
    assert in_uri.username == "bob"  # the URI's own credentials win
    for bad in (
        "ftp://h",
        "sqlite://x.db",
        "sqlite:///",
        "http://",
        "http://h:1?x=1",
        "http://h:x",
    ):
        with pytest.raises(InvalidInput):
            parse_store_uri(bad)


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=T", "-c", "user.email=t@e.x", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_git_info_from_a_real_work_tree(tmp_path: Path) -> None:
    assert git_info(tmp_path) == ("unknown", None, "")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "train.py").write_text("x = 1\n")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    _git(tmp_path, "remote", "add", "origin", "https://user:token@git.example.com/t/train.git")
    commit, dirty, origin = git_info(tmp_path)
    assert commit == _git(tmp_path, "rev-parse", "HEAD") and dirty is False
    assert origin == "https://git.example.com/t/train.git"  # credentials stripped
    (tmp_path / "train.py").write_text("x = 2\n")
    assert git_info(tmp_path)[1] is True


def test_data_fingerprint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "part").mkdir(parents=True)
    (data / "a.csv").write_text("a\n1\n")
    (data / "part" / "b.csv").write_text("b\n2\n")
    first = data_fingerprint([data])
    assert first.startswith("sha256:") and len(first) == 7 + 64
    moved = tmp_path / "renamed"
    shutil.copytree(data, moved)
    assert data_fingerprint([moved]) == first  # the top folder's name does not matter
    (moved / "part" / "b.csv").write_text("b\n3\n")
    assert data_fingerprint([moved]) != first
    (data / "part" / "b.csv").rename(data / "part" / "c.csv")
    assert data_fingerprint([data]) != first
    with pytest.raises(InvalidInput, match="no such file"):
        data_fingerprint([tmp_path / "missing"])


def test_key_values_and_metrics(tmp_path: Path) -> None:
    assert parse_key_values(["a=1", "b=x=y"], "param") == {"a": "1", "b": "x=y"}
    with pytest.raises(InvalidInput, match="KEY=VALUE"):
        parse_key_values(["nokey"], "param")
    manifest = read_manifest(logreg_v1(tmp_path))
    with pytest.raises(InvalidInput, match="not a number"):
        collect_lineage(manifest, metrics={"auc": "high"})
    with pytest.raises(InvalidInput, match="finite"):
        collect_lineage(manifest, metrics={"auc": "nan"})
    lineage = collect_lineage(manifest, code_dir=tmp_path, code_version="v1.2", author="me")
    assert (lineage.code_version, lineage.author) == ("v1.2", "me")
    assert lineage.package_created_at == manifest.created_at


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _without_golden(package: Path) -> Path:
    """A package as made before convert recorded golden requests."""
    manifest = read_manifest(package)
    (package / GOLDEN_FILE).unlink()
    files = tuple(f for f in manifest.files if f.path != GOLDEN_FILE)
    write_manifest(package, dataclasses.replace(manifest, files=files))
    return package


def test_register_adds_golden_requests_and_leaves_the_package_alone(tmp_path: Path) -> None:
    package = _without_golden(logreg_v1(tmp_path / "repo"))
    before = _tree_digest(package)
    store = SqliteStore(tmp_path / "s.db")
    result = register(store, package, alias="production", params={"C": 1}, metrics={"auc": 0.9})
    assert _tree_digest(package) == before
    assert result.golden_added and result.record.version == 1
    assert store.resolve_alias("logreg", "production").version == 1
    paths = [f.path for f in result.record.files]
    assert GOLDEN_FILE in paths and "manifest.json" in paths
    # What was published is a consistent package: rebuild it from the store and check it.
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    for entry in result.record.files:
        shutil.copyfile(store.artifact_path(entry.sha256), rebuilt / entry.path)
    manifest = read_manifest(rebuilt)
    verify_files(rebuilt, manifest)
    golden = read_golden(rebuilt)
    assert golden is not None and golden.model_sha256 == manifest.model_sha256
    assert ALLOW_SCHEMA_CHANGE not in manifest.config

    allowed = register(store, package, allow_schema_change=True, golden=False)
    assert GOLDEN_FILE not in [f.path for f in allowed.record.files]
    manifest_entry = allowed.record.file("manifest.json")
    data = json.loads(store.artifact_path(manifest_entry.sha256).read_text())
    assert data["config"][ALLOW_SCHEMA_CHANGE] is True
    store.close()


def test_register_refuses_bad_packages(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    package = logreg_v1(tmp_path / "repo")
    renamed = tmp_path / "other" / "wrongname" / "1"
    renamed.parent.mkdir(parents=True)
    shutil.copytree(package, renamed)
    with pytest.raises(PackageError, match="manifest names model 'logreg'"):
        register(store, renamed)
    tampered = copy_package(package, tmp_path / "repo")
    (tampered / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(PackageError, match=r"size|sha256"):
        register(store, tampered)
    link = tmp_path / "repo" / "logreg" / "9"
    link.symlink_to(package, target_is_directory=True)
    with pytest.raises(InvalidInput, match="symbolic link"):
        register(store, link)
    with pytest.raises(InvalidInput, match="integer VERSION"):
        register(store, package.parent)
    with pytest.raises(InvalidInput, match="alias"):
        register(store, package, alias="v1")
    assert store.list_models() == []
    store.close()
