"""The rollout's state in one process, on a real repository: a full shadow queue drops and counts
(the answer stands), and a hypothesis state machine of splits, shadows and labels (validate,
then commit; the file always says what runs; a fresh reader restores the same)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from prometheus_client import CollectorRegistry

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import encode_inputs
from edgewise.runtime.serving.dataplane import DataPlane
from edgewise.runtime.serving.repository import ModelRepository
from edgewise.runtime.serving.rollout import ROLLOUT_FILE, ModelRoutes, Rollouts, read_routes
from edgewise.runtime.serving.shadow import Shadow
from tests.runtime.rollout.helpers import NAME, rows, two_version_repo


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_version_repo(model_repo, tmp_path_factory.mktemp("rollout") / "repo", "good")


def _served(repo: Path) -> ModelRepository:
    repository = ModelRepository(repo)
    repository.load(NAME, 1)
    repository.load(NAME, 2)
    return repository


def test_a_full_shadow_queue_drops_and_counts(repo: Path) -> None:
    repository = _served(repo)
    registry = CollectorRegistry()
    shadow = Shadow(repository, registry, queue_size=3)
    dataplane = DataPlane(repository)
    request = pb.ModelInferRequest(model_name=NAME, model_version="1", id="x")
    encode_inputs(request, rows(repo / NAME / "1", 2), raw=True)
    prepared = dataplane.prepare(request)
    response = dataplane.execute(prepared)
    # Hold the worker before it takes a copy (it takes this condition to pop one): the queue
    # fills, and every copy past its size is dropped and counted, the offer never waiting.
    with shadow._idle:
        for _ in range(10):
            shadow.offer(2, prepared, response)
        assert shadow.stats(NAME, 2).dropped == 7
    assert shadow.drain(10)
    stats = shadow.stats(NAME, 2)
    assert (stats.requests, stats.errors, stats.dropped) == (3, 0, 7)
    assert stats.labelled_rows == 6
    assert registry.get_sample_value("edgewise_shadow_dropped_total", {"model": NAME}) == 7
    shadow.close()


_VERSIONS = st.sampled_from(["1", "2", "3", "stable", "canary", "nosuch", ""])
_LABELS = st.sampled_from(["stable", "canary", "blue", "7up", "a b"])


class RolloutMachine(RuleBasedStateMachine):
    """Random control calls against a model with versions 1 and 2 served (3 is not): each one
    is committed whole or refused with InvalidInput and nothing changed."""

    repo: Path
    repository: ModelRepository

    def __init__(self) -> None:
        super().__init__()
        (self.repo / NAME / ROLLOUT_FILE).unlink(missing_ok=True)
        registry = CollectorRegistry()
        self.rollouts = Rollouts(
            self.repository, registry, lambda: Shadow(self.repository, registry)
        )

    def teardown(self) -> None:
        if self.rollouts.shadow is not None:
            self.rollouts.shadow.close()

    def _call(self, work: object) -> None:
        before = self.rollouts.routes(NAME)
        path = self.repo / NAME / ROLLOUT_FILE
        saved = path.read_bytes() if path.exists() else None
        try:
            assert callable(work)
            work()
        except InvalidInput as exc:
            assert exc.message
            assert self.rollouts.routes(NAME) == before
            assert (path.read_bytes() if path.exists() else None) == saved

    @rule(
        weights=st.lists(st.tuples(_VERSIONS, st.integers(-5, 105)), max_size=3),
        sticky=st.sampled_from(["", "request_id", "user", "bad key"]),
    )
    def split(self, weights: list[tuple[str, int]], sticky: str) -> None:
        self._call(lambda: self.rollouts.set_split(NAME, weights, sticky))

    @rule(label=_LABELS, version=_VERSIONS)
    def label(self, label: str, version: str) -> None:
        self._call(lambda: self.rollouts.set_label(NAME, label, version))

    @rule(version=_VERSIONS, rate=st.sampled_from([0.0, 0.1, 1.0, 2.0, float("nan")]))
    def shadow(self, version: str, rate: float) -> None:
        self._call(lambda: self.rollouts.set_shadow(NAME, version, rate))

    @invariant()
    def state_is_valid_and_saved(self) -> None:
        routes = self.rollouts.routes(NAME)
        served = {1, 2}
        if routes.split is not None:
            assert sum(w for _, w in routes.split.weights) == 100
            assert {v for v, _ in routes.split.weights} <= served
        assert set(routes.labels.values()) <= served
        if routes.shadow is not None:
            assert routes.shadow.version in served and 0 < routes.shadow.rate <= 1
        saved = read_routes(self.repo / NAME)
        assert (saved or ModelRoutes()) == routes
        restored = Rollouts(self.repository, CollectorRegistry())
        restored.restore()
        assert restored.routes(NAME) == routes
        if routes.labels:
            for label, version in routes.labels.items():
                assert self.repository.get(NAME, str(version)).version == version
                assert (
                    json.loads((self.repo / NAME / ROLLOUT_FILE).read_text())["labels"][label]
                    == version
                )


def test_rollout_state_machine(repo: Path) -> None:
    RolloutMachine.repo = repo
    RolloutMachine.repository = _served(repo)
    RolloutMachine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    RolloutMachine.TestCase().runTest()


def test_a_shadow_whose_file_cannot_be_written_changes_nothing(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgewise.runtime.serving.rollout as rollout_module
    from edgewise.runtime.errors import EdgewiseError, ErrorCode

    (repo / NAME / ROLLOUT_FILE).unlink(missing_ok=True)
    repository = _served(repo)
    registry = CollectorRegistry()
    made: list[Shadow] = []

    def make() -> Shadow:
        made.append(Shadow(repository, registry))
        return made[-1]

    rollouts = Rollouts(repository, registry, make)

    def full_disk(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rollout_module, "write_text_atomic", full_disk)
    with pytest.raises(EdgewiseError, match="cannot write") as caught:
        rollouts.set_shadow(NAME, "2", 0.5)
    assert caught.value.code == ErrorCode.INTERNAL  # the server's disk, not the caller's input
    assert made == [] and rollouts.shadow is None  # no worker started, no figures reset
    assert rollouts.routes(NAME) == ModelRoutes()
    assert not (repo / NAME / ROLLOUT_FILE).exists()


def test_unicode_digits_are_refused_naming_the_field(repo: Path) -> None:
    """``"²".isdigit()`` is True but ``int("²")`` raises: each is InvalidInput, never a crash."""
    from edgewise.runtime.cli.rollout import parse_weights
    from edgewise.runtime.serving.rollout import routes_from_json

    with pytest.raises(InvalidInput, match=r"labels\.stable"):
        routes_from_json({"labels": {"stable": "²"}}, "rollout.json")
    with pytest.raises(InvalidInput, match=r"split\.weights"):
        routes_from_json({"split": {"weights": {"²": 100}}}, "rollout.json")
    rollouts = Rollouts(_served(repo), CollectorRegistry())
    with pytest.raises(InvalidInput, match="version '²'"):
        rollouts.resolve(NAME, "²")
    with pytest.raises(InvalidInput, match="weights"):
        parse_weights(["2=²"])


def test_the_request_path_skips_the_rollout_while_there_is_none(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``active`` is true only while a split, shadow or label exists; a split's pick checks the
    served versions (no repository.get, whose failure path lists the model's folder)."""
    (repo / NAME / ROLLOUT_FILE).unlink(missing_ok=True)
    repository = _served(repo)
    rollouts = Rollouts(repository, CollectorRegistry())
    assert rollouts.active is False
    rollouts.set_label(NAME, "stable", "1")
    assert rollouts.active is True
    rollouts.set_label(NAME, "stable", "")
    assert rollouts.active is False
    rollouts.set_split(NAME, [("1", 0), ("2", 100)])
    assert rollouts.active is True
    repository.unload(NAME, 2)
    lookups: list[str] = []
    get = repository.get

    def counted(name: str, version: str = "") -> Any:
        lookups.append(version)
        return get(name, version)

    monkeypatch.setattr(repository, "get", counted)
    request = pb.ModelInferRequest(model_name=NAME, id="r")
    assert rollouts.pick(request) == ""  # version 2 is not served: the default answers
    assert lookups == []
    rollouts.set_split(NAME, [])
    assert rollouts.active is False
    (repo / NAME / ROLLOUT_FILE).unlink(missing_ok=True)


# ---- a shadow's figures between processes ------------------------------------------------------


def test_shadow_figures_merge_and_travel_between_processes() -> None:
    from edgewise.runtime.serving.shadow import (
        ShadowStats,
        decode_stats,
        encode_stats,
        merged_stats,
    )

    first = ShadowStats(
        requests=3, errors=1, dropped=2, compared_rows=5, equal_labels=4, labelled_rows=5,
        score_difference_sum=0.5, score_values=10, latency_sum=0.2, latencies=(0.1, 0.1),
    )  # fmt: skip
    second = ShadowStats(
        requests=2, compared_rows=2, equal_labels=0, labelled_rows=2,
        score_difference_sum=1.0, score_values=4, latency_sum=0.6, latencies=(0.3, 0.3),
    )  # fmt: skip
    merged = merged_stats([decode_stats(encode_stats(s)) for s in (first, second)])
    assert (merged.requests, merged.errors, merged.dropped) == (5, 1, 2)
    assert merged.agreement == 4 / 7
    assert merged.mean_abs_difference == 1.5 / 14
    assert merged.mean_latency == 0.8 / 4  # over the copies that ran without an error
    assert sorted(merged.latencies) == [0.1, 0.1, 0.3, 0.3]
    assert merged_stats([]) == ShadowStats()
    good = json.loads(encode_stats(first))
    for field, bad in (
        ("requests", -1), ("requests", 1.5), ("requests", True), ("latency_sum", float("nan")),
        ("latency_sum", "1"), ("latencies", [0.1, -1]), ("latencies", "0.1"),
    ):  # fmt: skip
        document = {**good, field: bad}
        with pytest.raises(InvalidInput, match=field):
            decode_stats(json.dumps(document).encode())
    with pytest.raises(InvalidInput, match="expected fields"):
        decode_stats(json.dumps({**good, "extra": 1}).encode())
    with pytest.raises(InvalidInput, match="not JSON"):
        decode_stats(b"\x80")


def test_a_nan_score_is_left_out_of_the_shadow_difference() -> None:
    from edgewise.runtime.serving.shadow import ShadowStats, compare, decode_stats, encode_stats

    stable = {"label": np.array([0, 1]), "probabilities": np.array([[0.2, 0.8], [np.nan, np.nan]])}
    candidate = {"label": np.array([0, 0]), "probabilities": np.array([[0.4, 0.6], [0.5, 0.5]])}
    labelled, equal, difference, values = compare(stable, candidate)
    assert (labelled, equal, values) == (2, 1, 2)
    assert difference == pytest.approx(0.4)
    # The figures stay finite, so a sibling's hand-over of them is accepted.
    stats = ShadowStats(requests=1, score_difference_sum=difference, score_values=values)
    assert decode_stats(encode_stats(stats)) == stats


def test_the_sibling_calls_need_the_read_scope() -> None:
    from edgewise.runtime.frontends.peer_windows import SERVICE
    from edgewise.runtime.frontends.scopes import scope_of

    assert scope_of(f"/{SERVICE}/WindowShare") == "read"
    assert scope_of(f"/{SERVICE}/ShadowShare") == "read"
