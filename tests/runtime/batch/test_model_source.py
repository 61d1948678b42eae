"""Models by URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) from a real SQLite store and a
real MLflow server: downloaded, verified (sha256, signature), recorded in the job, and a resume
with another version refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgewise.runtime.errors import InvalidInput, ModelNotFound
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.signing import SignatureError, generate_keypair, sign_package
from edgewise.runtime.store import Store
from edgewise.runtime.store.base import Lineage
from edgewise.runtime.store.mlflow_rest import MlflowStore
from edgewise.runtime.store.register import package_files
from edgewise.runtime.store.sqlite import SqliteStore
from tests.mlflow_server import MlflowServer, mlflow_server
from tests.runtime.batch.helpers import (
    Inputs,
    assert_scores_equal,
    batch,
    edgewise,
    expected_scores,
    output_arrays,
    read_output,
)
from tests.runtime.store.helpers import logreg_v2

__all__ = ["mlflow_server"]  # one real MLflow server for this module

LINEAGE = Lineage(
    code_version="0" * 40,
    code_dirty=False,
    code_origin="",
    params={},
    metrics={},
    data_fingerprint="sha256:" + "ab" * 32,
    data_sources=(),
    created_at="2026-01-02T03:04:05Z",
    author="tester",
    package_created_at="2026-01-01T00:00:00Z",
)


def _publish(store: Store, folder: Path, name: str) -> int:
    return store.publish(
        name, folder, package_files(folder, read_manifest(folder)), LINEAGE
    ).version


def _renamed(source: Path, target: Path, name: str) -> Path:
    """A copy of a package under another model name (tests share one MLflow server)."""
    shutil.copytree(source, target)
    manifest_path = target / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["name"] = name
    manifest_path.write_text(json.dumps(data))
    return target


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[tuple[str, SqliteStore]]:
    path = tmp_path / "store.db"
    store = SqliteStore(path, create=True)
    yield f"sqlite:///{path}", store
    store.close()


def test_alias_from_sqlite_scores_like_the_repository_and_records_the_version(
    model_repo: Path, inputs: Inputs, tmp_path: Path, sqlite_store: tuple[str, SqliteStore]
) -> None:
    uri, store = sqlite_store
    version = _publish(store, model_repo / "logreg" / "1", "logreg")
    store.set_alias("logreg", "production", version)
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    summary = batch(
        None, "models:/logreg@production", inputs.cancer_parquet, out,
        store=uri, model_cache=cache,
    )  # fmt: skip
    sha = read_manifest(model_repo / "logreg" / "1").model_sha256
    assert (summary.version, summary.sha256, summary.source) == (
        version,
        sha,
        "models:/logreg@production",
    )
    job = json.loads((out / "_job.json").read_text())
    assert job["model"] == {
        "name": "logreg",
        "version": version,
        "sha256": sha,
        "source": "models:/logreg@production",
    }
    expected = expected_scores(model_repo, "logreg", inputs.cancer, 1000)
    assert_scores_equal(output_arrays(read_output(out)), expected)
    # The download is a verified copy of the store's files, laid out as a repository.
    cached = list(cache.glob("*/*/logreg/1/model.onnx"))
    assert len(cached) == 1
    assert cached[0].read_bytes() == (model_repo / "logreg" / "1" / "model.onnx").read_bytes()


def test_moved_alias_refuses_to_resume_in_one_line(
    model_repo: Path, inputs: Inputs, tmp_path: Path, sqlite_store: tuple[str, SqliteStore]
) -> None:
    uri, store = sqlite_store
    first = _publish(store, model_repo / "logreg" / "1", "logreg")
    second = _publish(store, logreg_v2(tmp_path / "v2"), "logreg")
    store.set_alias("logreg", "production", first)
    out = tmp_path / "out"
    cache = str(tmp_path / "cache")
    common = ["--input", str(inputs.cancer_parquet), "--output", str(out), "--store", uri,
              "--model-cache", cache, "--progress", "off", "--chunk-rows", "1000"]  # fmt: skip
    done = edgewise("batch", "--model", "models:/logreg@production", *common)
    assert done.returncode == 0, done.stderr
    store.set_alias("logreg", "production", second)
    refused = edgewise("batch", "--model", "models:/logreg@production", "--resume", *common)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert f"now names version {second}" in lines[0]
    assert f"models:/logreg/{first}" in lines[0]
    # The version the job scored with finishes it (here: it is already complete).
    again = edgewise("batch", "--model", f"models:/logreg/{first}", "--resume", *common)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout


def test_store_errors_are_clear(
    model_repo: Path, inputs: Inputs, tmp_path: Path, sqlite_store: tuple[str, SqliteStore]
) -> None:
    uri, store = sqlite_store
    _publish(store, model_repo / "logreg" / "1", "logreg")
    out = tmp_path / "out"
    with pytest.raises(ModelNotFound):
        batch(None, "models:/logreg@nope", inputs.cancer_parquet, out, store=uri)
    with pytest.raises(ModelNotFound):
        batch(None, "models:/logreg/7", inputs.cancer_parquet, out, store=uri)
    with pytest.raises(InvalidInput, match="positive integer"):
        batch(None, "models:/logreg/x", inputs.cancer_parquet, out, store=uri)
    with pytest.raises(InvalidInput, match="drop --repo"):
        batch(model_repo, "models:/logreg/1", inputs.cancer_parquet, out, store=uri)
    with pytest.raises(InvalidInput, match="give --repo"):
        batch(None, "logreg", inputs.cancer_parquet, out)
    assert not out.exists()  # refused jobs write nothing


def test_version_from_mlflow_with_signature(
    mlflow_server: MlflowServer, model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    name = f"batch-{tmp_path.name[-12:].replace('_', '-')}"
    package = _renamed(model_repo / "logreg" / "1", tmp_path / "pkg" / name / "1", name)
    private, public, _kid = generate_keypair(tmp_path / "keys")
    sign_package(package, private)
    _other_private, other_public, _ = generate_keypair(tmp_path / "other", "other")
    store = MlflowStore(mlflow_server.url, mlflow_server.username, mlflow_server.password)
    try:
        version = _publish(store, package, name)
    finally:
        store.close()
    server_uri = mlflow_server.url.replace(
        "://", f"://{mlflow_server.username}:{mlflow_server.password}@"
    )
    refused = tmp_path / "refused"
    with pytest.raises(SignatureError):
        batch(None, f"models:/{name}/{version}", inputs.cancer_parquet, refused,
              store=server_uri, model_cache=tmp_path / "c", trusted_keys=other_public)  # fmt: skip
    assert not refused.exists()
    out = tmp_path / "out"
    summary = batch(
        None, f"models:/{name}/{version}", inputs.cancer_parquet, out,
        store=server_uri, model_cache=tmp_path / "cache", trusted_keys=public,
    )  # fmt: skip
    assert (summary.model, summary.version) == (name, version)
    expected = expected_scores(model_repo, "logreg", inputs.cancer, 1000)
    assert_scores_equal(output_arrays(read_output(out)), expected)


def test_a_tampered_cached_file_is_downloaded_again(
    model_repo: Path, inputs: Inputs, tmp_path: Path, sqlite_store: tuple[str, SqliteStore]
) -> None:
    uri, store = sqlite_store
    _publish(store, model_repo / "logreg" / "1", "logreg")
    cache = tmp_path / "cache"
    batch(None, "models:/logreg/1", inputs.cancer_parquet, tmp_path / "a",
          store=uri, model_cache=cache)  # fmt: skip
    (cached,) = cache.glob("*/*/logreg/1/model.onnx")
    cached.write_bytes(b"not a model")
    summary = batch(None, "models:/logreg/1", inputs.cancer_parquet, tmp_path / "b",
                    store=uri, model_cache=cache)  # fmt: skip
    assert summary.rows == len(inputs.cancer)
    assert cached.read_bytes() == (model_repo / "logreg" / "1" / "model.onnx").read_bytes()
