"""Both stores against the same contract (a real SQLite file; a real MLflow server with basic
auth), then what only MLflow has: lineage in version tags and run data, credentials, a dead
server, versions made by someone else."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.runtime.errors import InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.package.manifest import FileEntry, read_manifest
from edgewise.runtime.store import (
    Lineage,
    NodeReport,
    Store,
    StoreAuthError,
    StoreUnavailable,
    open_store,
)
from edgewise.runtime.store.mlflow_rest import MlflowStore
from edgewise.runtime.store.register import package_files
from edgewise.runtime.store.sqlite import SqliteStore
from edgewise.runtime.store.transfer import fetch_file, part_path
from tests.mlflow_server import MlflowServer
from tests.runtime.store.helpers import copy_package, logreg_v1, strip_golden

LINEAGE = Lineage(
    code_version="0123456789abcdef0123456789abcdef01234567",
    code_dirty=False,
    code_origin="https://example.com/team/training.git",
    params={"C": "1.0", "max_iter": "1000"},
    metrics={"auc": 0.991, "log_loss": 0.07},
    data_fingerprint="sha256:" + "ab" * 32,
    data_sources=("train.parquet",),
    created_at="2026-01-02T03:04:05Z",
    author="tester",
    package_created_at="2026-01-01T00:00:00Z",
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return logreg_v1(tmp_path_factory.mktemp("source"))


@pytest.fixture(params=["sqlite", "mlflow"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    chosen: Store
    if request.param == "sqlite":
        chosen = SqliteStore(tmp_path / "store.db")
    else:
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        chosen = MlflowStore(server.url, server.username, server.password, timeout=10)
    yield chosen
    chosen.close()


_names = iter(range(10**6))


def package(source: Path, tmp_path: Path) -> tuple[str, Path, tuple[FileEntry, ...]]:
    """A copy of the source package under a name of its own (tests share one MLflow server)."""
    name = f"m{int(time.time() * 1000) % 10**9}-{next(_names)}"
    folder = copy_package(source, tmp_path / "pkgs", name)
    return name, folder, package_files(folder, read_manifest(folder))


# ---- the contract --------------------------------------------------------------------------------


def test_publish_get_and_list(store: Store, source: Path, tmp_path: Path) -> None:
    name, folder, files = package(source, tmp_path)
    first = store.publish(name, folder, files, LINEAGE, description="first")
    second = store.publish(name, folder, files, LINEAGE)
    assert (first.version, second.version) == (1, 2)
    assert first.files == files and first.lineage == LINEAGE
    assert first.model_sha256 == read_manifest(folder).model_sha256
    assert first.total_bytes == sum(f.size for f in files)

    fetched = store.get_version(name, 1)
    assert (fetched.name, fetched.version, fetched.files, fetched.lineage) == (
        name,
        1,
        files,
        LINEAGE,
    )
    assert fetched.description == "first"
    assert [r.version for r in store.list_versions(name)] == [2, 1]
    summary = {s.name: s for s in store.list_models()}[name]
    assert summary.latest_version == 2 and dict(summary.aliases) == {}

    with pytest.raises(ModelNotFound):
        store.get_version(name, 3)
    with pytest.raises(ModelNotFound, match=f"has no model '{name}-missing'$"):
        store.list_versions(name + "-missing")  # the same words from every store, no HTTP text


def test_aliases(store: Store, source: Path, tmp_path: Path) -> None:
    name, folder, files = package(source, tmp_path)
    for _ in range(2):
        store.publish(name, folder, files, LINEAGE)
    with pytest.raises(ModelNotFound):
        store.resolve_alias(name, "production")
    store.set_alias(name, "production", 1)
    assert store.resolve_alias(name, "production").version == 1
    store.set_alias(name, "production", 2)
    store.set_alias(name, "canary", 2)
    resolved = store.resolve_alias(name, "production")
    assert resolved.version == 2 and set(resolved.aliases) == {"production", "canary"}
    assert store.get_version(name, 1).aliases == ()
    summary = {s.name: s for s in store.list_models()}[name]
    assert dict(summary.aliases) == {"production": 2, "canary": 2}

    store.delete_alias(name, "canary")
    with pytest.raises(ModelNotFound):
        store.resolve_alias(name, "canary")
    with pytest.raises(ModelNotFound):
        store.delete_alias(name, "canary")
    with pytest.raises(ModelNotFound):
        store.set_alias(name, "production", 9)
    for bad in ("", "latest", "v3", "a/b", "../x", "x" * 65):
        with pytest.raises(InvalidInput):
            store.set_alias(name, bad, 1)


def test_open_file_streams_from_an_offset(store: Store, source: Path, tmp_path: Path) -> None:
    name, folder, files = package(source, tmp_path)
    record = store.publish(name, folder, files, LINEAGE)
    for entry in record.files:
        data = (folder / entry.path).read_bytes()
        for offset in (0, 1, len(data) // 2, len(data) - 1):
            stream = store.open_file(record, entry, offset)
            try:
                chunks = []
                while chunk := stream.read(4096):
                    chunks.append(chunk)
            finally:
                stream.close()
            assert stream.offset == offset
            assert b"".join(chunks) == data[offset:], (entry.path, offset)
        stream = store.open_file(record, entry, len(data) + 10)  # past the end: from the start
        assert stream.offset == 0
        stream.close()


def test_fetch_file_resumes_and_verifies(store: Store, source: Path, tmp_path: Path) -> None:
    name, folder, files = package(source, tmp_path)
    record = store.publish(name, folder, files, LINEAGE)
    entry = max(record.files, key=lambda f: f.size)
    target = tmp_path / "download"
    target.mkdir()
    data = (folder / entry.path).read_bytes()
    part = part_path(target / entry.path)
    part.write_bytes(data[:1000])  # what an interrupted transfer left
    result = fetch_file(store, record, entry, target)
    assert (result.resumed_from, result.transferred) == (1000, len(data) - 1000)
    assert (target / entry.path).read_bytes() == data and not part.exists()
    again = fetch_file(store, record, entry, target)
    assert again.already_there and again.transferred == 0

    part.write_bytes(b"x" * 1000)  # garbage where the start should be: caught by the sha256
    (target / entry.path).unlink()
    from edgewise.runtime.store.base import ArtifactCorrupt

    with pytest.raises(ArtifactCorrupt, match="sha256"):
        fetch_file(store, record, entry, target)
    assert not part.exists()  # never resumed from garbage again
    assert fetch_file(store, record, entry, target).resumed_from == 0


def test_node_reports(store: Store, source: Path, tmp_path: Path) -> None:
    name, folder, files = package(source, tmp_path)
    store.publish(name, folder, files, LINEAGE)
    first = NodeReport("edge-a", name, 1, "s" * 64, "ok", "idle", "", 1, "2026-01-01T00:00:00Z")
    store.report_node(first)
    store.report_node(NodeReport("edge-b", name, None, health="failing", detail="x" * 900))
    updated = NodeReport("edge-a", name, 1, "s" * 64, "degraded", "idle", "v2 refused", 2, "t")
    store.report_node(updated)
    reports = store.node_reports(name)
    assert [r.node for r in reports] == ["edge-a", "edge-b"]
    assert reports[0] == updated
    assert reports[1].version is None and len(reports[1].detail) == 500
    with pytest.raises(InvalidInput):
        store.report_node(NodeReport("../x", name, 1))


def test_unsafe_names_and_paths_are_refused(store: Store, source: Path, tmp_path: Path) -> None:
    name, folder, files = package(source, tmp_path)
    for bad_name in ("../x", "a/b", "/abs", ".."):
        with pytest.raises(InvalidInput):
            store.publish(bad_name, folder, files, LINEAGE)
    for bad_path in ("../model.onnx", "/etc/passwd", "a/../../b", "a\\b", "", "./x"):
        crafted = (*files, FileEntry(bad_path, files[0].sha256, files[0].size))
        with pytest.raises(PackageError, match="not a safe relative path"):
            store.publish(name, folder, crafted, LINEAGE)
    link = folder / "linked.bin"
    link.symlink_to(folder / "model.onnx")
    entry = FileEntry("linked.bin", files[0].sha256, files[0].size)
    with pytest.raises(PackageError, match="symbolic link"):
        store.publish(name, folder, (*files, entry), LINEAGE)
    with pytest.raises(ModelNotFound):
        store.get_version(name, 1)  # nothing half-published


def test_concurrent_publishers_get_distinct_versions(
    store: Store, source: Path, tmp_path: Path
) -> None:
    name, folder, files = package(source, tmp_path)
    if isinstance(store, SqliteStore):
        factory = lambda: SqliteStore(store.path)  # noqa: E731  (one connection per writer)
    else:
        assert isinstance(store, MlflowStore)
        factory = lambda: MlflowStore(  # noqa: E731
            store.http.base_url, *_credentials(store), timeout=30
        )

    def publish(_: int) -> int:
        own = factory()
        try:
            return own.publish(name, folder, files, LINEAGE).version
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(publish, range(8)))
    assert versions == list(range(1, 9))
    assert [r.version for r in store.list_versions(name)] == list(range(8, 0, -1))


def _credentials(store: MlflowStore) -> tuple[str, str]:
    header = store.http._headers["Authorization"].removeprefix("Basic ")
    user, _, password = base64.b64decode(header).decode().partition(":")
    return user, password


# ---- MLflow only ---------------------------------------------------------------------------------


def _raw(server: MlflowServer, endpoint: str, **params: Any) -> dict[str, Any]:
    query = urllib.parse.urlencode(params)
    request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{endpoint}?{query}")
    token = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _post(server: MlflowServer, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.url}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    token = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def test_mlflow_keeps_lineage_in_version_tags_and_the_run(
    mlflow_server: MlflowServer, source: Path, tmp_path: Path
) -> None:
    store = MlflowStore(mlflow_server.url, mlflow_server.username, mlflow_server.password)
    name, folder, files = package(source, tmp_path)
    record = store.publish(name, folder, files, LINEAGE)
    version = _raw(mlflow_server, "model-versions/get", name=name, version=record.version)
    tags = {t["key"]: t["value"] for t in version["model_version"]["tags"]}
    # MLflow keeps no checksum: every file's sha256 and size are in a tag.
    assert json.loads(tags["edgewise.files"]) == [f.to_json() for f in files]
    assert tags["edgewise.model_sha256"] == record.model_sha256
    assert Lineage.from_json(json.loads(tags["edgewise.lineage"])) == LINEAGE
    assert tags["edgewise.code_version"] == LINEAGE.code_version
    assert tags["edgewise.data_fingerprint"] == LINEAGE.data_fingerprint
    assert tags["edgewise.author"] == "tester"
    run = _raw(mlflow_server, "runs/get", run_id=version["model_version"]["run_id"])["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert params == dict(LINEAGE.params) and metrics == dict(LINEAGE.metrics)
    assert run_tags["mlflow.source.git.commit"] == LINEAGE.code_version
    # The files are where the version's source says, with the recorded sizes.
    source_dir = version["model_version"]["source"].removeprefix("mlflow-artifacts:/")
    for entry in files:
        stored = mlflow_server.artifacts / source_dir / entry.path
        assert stored.stat().st_size == entry.size
    store.report_node(NodeReport("edge-1", name, 1, record.model_sha256, "ok"))
    model = _raw(mlflow_server, "registered-models/get", name=name)["registered_model"]
    node_tags = {t["key"]: t["value"] for t in model["tags"]}
    assert json.loads(node_tags["edgewise.node.edge-1"])["version"] == 1


def test_mlflow_credentials_are_required(mlflow_server: MlflowServer) -> None:
    for user, password in ((None, None), (mlflow_server.username, "wrong-password-123")):
        store = MlflowStore(mlflow_server.url, user, password, timeout=10)
        with pytest.raises(StoreAuthError, match="401"):
            store.list_models()
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "models", "list", "--store",
         f"http://{mlflow_server.username}:nope@127.0.0.1:{mlflow_server.port}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 401" in lines[0] and "credentials" in lines[0], lines
    assert "nope" not in done.stderr  # the password is never echoed


def test_mlflow_unreachable_or_not_mlflow_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        open_store("mlflow://127.0.0.1:1", timeout=2).list_models()
    # No retry loop (MLflow's own client retried for four minutes): a store that never answers
    # is tried once, and the call ends with its timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        with pytest.raises(StoreUnavailable, match="timed out"):
            open_store(f"mlflow://127.0.0.1:{silent.getsockname()[1]}", timeout=2).list_models()
        assert len(queued_connections(silent)) == 1


def queued_connections(listener: socket.socket) -> list[socket.socket]:
    """The connections waiting in ``listener``'s backlog (accepted here and closed)."""
    listener.setblocking(False)
    connections = []
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return connections
        connection.close()
        connections.append(connection)


def test_mlflow_versions_not_made_by_edgewise_or_with_unsafe_paths(
    mlflow_server: MlflowServer, source: Path, tmp_path: Path
) -> None:
    store = MlflowStore(mlflow_server.url, mlflow_server.username, mlflow_server.password)
    name, folder, files = package(source, tmp_path)
    good = store.publish(name, folder, files, LINEAGE)
    run_id = _raw(mlflow_server, "model-versions/get", name=name, version=1)["model_version"][
        "run_id"
    ]
    source_uri = good.location
    foreign = _post(
        mlflow_server,
        "model-versions/create",
        {"name": name, "source": source_uri, "run_id": run_id},
    )["model_version"]
    with pytest.raises(PackageError, match="not registered by edgewise"):
        store.get_version(name, int(foreign["version"]))
    evil_files = [
        *(f.to_json() for f in files),
        {"path": "../../evil", "sha256": "0" * 64, "size": 1},
    ]
    evil = _post(
        mlflow_server,
        "model-versions/create",
        {
            "name": name,
            "source": source_uri,
            "run_id": run_id,
            "tags": [
                {"key": "edgewise.files", "value": json.dumps(evil_files)},
                {"key": "edgewise.model_sha256", "value": good.model_sha256},
            ],
        },
    )["model_version"]
    with pytest.raises(PackageError, match="not a safe relative path"):
        store.get_version(name, int(evil["version"]))
    store.set_alias(name, "production", int(evil["version"]))
    with pytest.raises(PackageError, match="not a safe relative path"):
        store.resolve_alias(name, "production")
    assert [r.version for r in store.list_versions(name)] == [1]  # only edgewise's own


def test_mlflow_cli_register_and_models(
    mlflow_server: MlflowServer, source: Path, tmp_path: Path
) -> None:
    name, folder, _ = package(source, tmp_path)
    strip_golden(folder)
    code = tmp_path / "training"
    code.mkdir()
    (code / "train.py").write_text("print('train')\n")
    git = ["git", "-C", str(code), "-c", "user.name=Trainer", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(code)], check=True)
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "train"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    store = f"mlflow://127.0.0.1:{mlflow_server.port}"

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", *args],
            capture_output=True, text=True, timeout=120, check=False, env=mlflow_server.env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = cli(
        "register", str(folder), "--store", store, "--alias", "production",
        "--param", "C=0.5", "--metric", "auc=0.97", "--data", str(data),
        "--code-dir", str(code), "--author", "Trainer", "--description", "first cut",
    )  # fmt: skip
    assert out.startswith(f"registered {name} version 1 in http://127.0.0.1:")
    assert "alias production -> 1" in out and "golden requests recorded" in out
    shown = cli("models", "show", name, "--alias", "production", "--store", store)
    assert f"code            {commit}" in shown
    assert "param           C = 0.5" in shown and "metric          auc = 0.97" in shown
    assert "golden.json" in shown and "by Trainer" in shown
    assert not (folder / "golden.json").exists()  # the source package is left as it was
    cli("models", "alias", name, "staging", "1", "--store", store)
    listed = cli("models", "list", "--store", store)
    line = next(row for row in listed.splitlines() if row.startswith(name))
    assert "production->1" in line and "staging->1" in line
    as_json = json.loads(cli("models", "show", name, "--json", "--store", store))
    assert as_json["versions"][0]["lineage"]["code_version"] == commit
    cli("models", "alias", name, "staging", "--delete", "--store", store)
    assert "staging" not in cli("models", "list", "--store", store)
