"""Which version a model answers when none is named: ``repository load --make-default`` is kept
in the model's ``config.json`` (a restarted server serves it too), a refused call writes nothing,
and the server, ``edgewise batch`` and ``evaluate``/``gate`` follow one rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgewise.runtime.errors import ModelNotFound, PackageError
from edgewise.runtime.evaluate import ModelRef, resolve_version
from edgewise.runtime.repository import ModelRepository, default_version
from tests import models
from tests.runtime.batch.helpers import batch, cancer_frame
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import start_server

NAME = "logreg"


@pytest.fixture
def two_versions(fresh_repo: Path) -> Path:
    """A writable repository whose ``logreg`` has versions 1 and 2."""
    models.convert_model(NAME, fresh_repo)  # version 2
    return fresh_repo


def _config(repo: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo / NAME / "config.json").read_text())
    return data


def _answering_version(server: Any, repo: Path) -> str:
    with server.client() as client:
        result = client.infer(NAME, logreg_inputs(repo / NAME / "1"))
        return str(result.model_version)


def test_make_default_survives_a_restart(two_versions: Path, tmp_path: Path) -> None:
    server = start_server(two_versions, tmp_path / "first")
    try:
        assert _answering_version(server, two_versions) == "2"
        with server.client() as client:
            client.load_model(NAME, "1", make_default=True)
        assert _answering_version(server, two_versions) == "1"
    finally:
        server.stop()
    assert _config(two_versions)["default_version"] == 1
    again = start_server(two_versions, tmp_path / "second")
    try:
        assert _answering_version(again, two_versions) == "1"
    finally:
        again.stop()


def test_make_default_keeps_the_configs_other_settings(two_versions: Path) -> None:
    config = {"version_policy": {"all": True}, "batching": {"max_batch_size": 8}}
    (two_versions / NAME / "config.json").write_text(json.dumps(config))
    repository = ModelRepository(two_versions)
    repository.load(NAME, 1, make_default=True)
    assert _config(two_versions) == {**config, "default_version": 1}
    assert repository.get(NAME).version == 1
    assert not [p.name for p in (two_versions / NAME).iterdir() if p.name.startswith(".")]


def test_a_refused_make_default_changes_nothing(two_versions: Path) -> None:
    repository = ModelRepository(two_versions)
    repository.load_all()
    model_dir = two_versions / NAME
    with pytest.raises(ModelNotFound):
        repository.load(NAME, 7, make_default=True)
    assert not (model_dir / "config.json").exists(), "a refused call wrote config.json"
    broken = b'{"version_policy": {"latest": 0}}'
    (model_dir / "config.json").write_bytes(broken)
    with pytest.raises(PackageError, match="invalid model config"):
        repository.load(NAME, 1, make_default=True)
    assert (model_dir / "config.json").read_bytes() == broken
    assert repository.get(NAME).version == 2
    assert repository.served_versions(NAME) == [2]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, 2),
        ({"default_version": 1}, 1),
        ({"version_policy": {"specific": [1]}}, 1),
        ({"version_policy": {"all": True}, "default_version": 3}, 2),  # 3 is not on disk
    ],
)
def test_one_rule_for_the_default_version(
    two_versions: Path,
    tmp_path: Path,
    config: dict[str, Any] | None,
    expected: int,
) -> None:
    if config is not None:
        (two_versions / NAME / "config.json").write_text(json.dumps(config))
    repository = ModelRepository(two_versions)
    repository.load_all()
    server = repository.get(NAME).version
    rows = tmp_path / "rows.parquet"
    cancer_frame(1).to_parquet(rows, index=False)
    scored = batch(two_versions, NAME, rows, tmp_path / "out")
    evaluated = resolve_version(two_versions, ModelRef(NAME))
    assert (default_version(two_versions / NAME), server, scored.version, evaluated) == (
        expected,
        expected,
        expected,
        expected,
    )
