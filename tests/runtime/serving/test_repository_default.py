"""Which version a model answers when none is named: ``repository load --make-default`` is kept
in the model's ``config.json`` (a restarted server serves it too), a refused call writes nothing,
and the server, ``edgewise batch`` and ``evaluate``/``gate`` follow one rule."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.errors import InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.evaluation.evaluate import ModelRef, resolve_version
from edgewise.runtime.package import model_config as model_config_module
from edgewise.runtime.serving.repository import ModelRepository, default_version
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


def test_make_default_without_a_version_is_refused(two_versions: Path) -> None:
    repository = ModelRepository(two_versions)
    repository.load_all()
    (two_versions / NAME / "2").rename(two_versions / NAME / "2.moved")  # a reload would show
    with pytest.raises(InvalidInput, match="make_default needs a version"):
        repository.load(NAME, None, make_default=True)
    assert repository.served_versions(NAME) == [2]
    assert repository.get(NAME).version == 2
    assert not (two_versions / NAME / "config.json").exists(), "a refused call wrote config.json"


def test_the_server_refuses_make_default_without_a_version(
    two_versions: Path, tmp_path: Path
) -> None:
    server = start_server(two_versions, tmp_path)
    try:
        with server.client() as client:
            with pytest.raises(ServerError) as refused:
                client.load_model(NAME, "", make_default=True)
            states = client.repository_index()
    finally:
        server.stop()
    assert refused.value.status is grpc.StatusCode.INVALID_ARGUMENT
    assert "make_default needs a version" in refused.value.details
    assert [(s.version, s.state, s.is_default) for s in states if s.name == NAME] == [
        ("1", "UNAVAILABLE", False),
        ("2", "READY", True),
    ]
    assert not (two_versions / NAME / "config.json").exists()


def test_a_transient_default_is_not_kept_in_the_config(two_versions: Path, tmp_path: Path) -> None:
    """``transient_default`` (the agent's switch while it watches a version): the default of
    the running server only; config.json is not written, so a restart serves what it says.
    Without make_default it is refused, nothing changed."""
    server = start_server(two_versions, tmp_path / "first")
    try:
        with server.client() as client:
            with pytest.raises(ServerError) as refused:
                client.load_model(NAME, "1", transient_default=True)
            assert _answering_version(server, two_versions) == "2"
            client.load_model(NAME, "1", make_default=True, transient_default=True)
        assert _answering_version(server, two_versions) == "1"
    finally:
        server.stop()
    assert refused.value.status is grpc.StatusCode.INVALID_ARGUMENT
    assert "transient_default needs make_default" in refused.value.details
    assert not (two_versions / NAME / "config.json").exists()
    again = start_server(two_versions, tmp_path / "second")
    try:
        assert _answering_version(again, two_versions) == "2"
    finally:
        again.stop()


@pytest.fixture
def three_versions(two_versions: Path) -> Path:
    models.convert_model(NAME, two_versions)  # version 3
    return two_versions


def test_unloading_a_version_follows_the_one_rule(three_versions: Path) -> None:
    """Policy ``specific: [1]``, versions 2 and 3 loaded by name: the default stays 1 when 3 is
    unloaded (it was the highest one left), and is 1 again, as a restart would pick, when
    the default itself was unloaded and loaded again."""
    (three_versions / NAME / "config.json").write_text('{"version_policy": {"specific": [1]}}')
    repository = ModelRepository(three_versions)
    repository.load_all()
    repository.load(NAME, 2)
    repository.load(NAME, 3)
    assert repository.get(NAME).version == 1
    repository.unload(NAME, 3)
    assert repository.get(NAME).version == 1
    assert repository.get(NAME).version == default_version(three_versions / NAME)


def test_a_new_default_after_unload_is_the_policys_pick(three_versions: Path) -> None:
    """Policy ``specific: [1, 3]``, version 2 loaded by name, the default (3) unloaded: the new
    default is what :func:`pick_default` says over what is left (the policy selects 1), not the
    highest version left (2)."""
    (three_versions / NAME / "config.json").write_text('{"version_policy": {"specific": [1, 3]}}')
    repository = ModelRepository(three_versions)
    repository.load_all()
    repository.load(NAME, 2)
    assert repository.served_versions(NAME) == [1, 2, 3]
    assert repository.get(NAME).version == 3
    repository.unload(NAME, 3)
    assert repository.get(NAME).version == 1  # the policy selects 1 of [1, 2]


def test_unloading_the_pinned_default_unpins_it(two_versions: Path, tmp_path: Path) -> None:
    config = {"version_policy": {"all": True}, "batching": {"max_batch_size": 8}}
    (two_versions / NAME / "config.json").write_text(json.dumps(config))
    repository = ModelRepository(two_versions)
    repository.load_all()
    repository.load(NAME, 1, make_default=True)
    assert _config(two_versions)["default_version"] == 1
    repository.unload(NAME, 1)
    assert _config(two_versions) == config, "the pin of an unloaded version was kept"
    assert repository.get(NAME).version == 2
    restarted = ModelRepository(two_versions)
    restarted.load_all()
    assert restarted.get(NAME).version == 2
    assert restarted.served_versions(NAME) == [1, 2]
    assert not [p.name for p in (two_versions / NAME).iterdir() if p.name.startswith(".")]


def test_unloading_the_whole_model_keeps_its_pin(two_versions: Path) -> None:
    """The model's settings stay with the model: loading it again serves the pinned version."""
    repository = ModelRepository(two_versions)
    repository.load_all()
    repository.load(NAME, 1, make_default=True)
    repository.unload(NAME)
    assert _config(two_versions)["default_version"] == 1
    repository.load(NAME)
    assert repository.get(NAME).version == 1


def test_an_unload_that_cannot_unpin_changes_nothing(
    two_versions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = ModelRepository(two_versions)
    repository.load_all()
    repository.load(NAME, 1, make_default=True)
    before = (two_versions / NAME / "config.json").read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_config_module, "write_text_atomic", full_disk)
    with pytest.raises(PackageError, match="cannot write"):
        repository.unload(NAME, 1)
    assert (two_versions / NAME / "config.json").read_bytes() == before
    assert repository.served_versions(NAME) == [1, 2]
    assert repository.get(NAME).version == 1


def test_unloading_a_version_with_a_broken_config_goes_on(two_versions: Path) -> None:
    """A named version can be unloaded whatever config.json says (as it can be loaded); the
    broken file is left as it is."""
    repository = ModelRepository(two_versions)
    repository.load_all()
    repository.load(NAME, 1)
    broken = b'{"version_policy": {"latest": 0}}'
    (two_versions / NAME / "config.json").write_bytes(broken)
    repository.unload(NAME, 2)
    assert repository.get(NAME).version == 1
    assert (two_versions / NAME / "config.json").read_bytes() == broken
