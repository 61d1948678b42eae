"""The agent's progressive rollout on a real server with a real SQLite store, under continuous
client traffic: bad candidates (inverted labels, many times slower, drifting inputs) are taken out
of traffic automatically with no failed client request, a good one is promoted, and every
decision is in the store with its evidence. Step durations are tiny (the policy sets them)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from edgewise.runtime.agent.policy import parse_policy, read_policy, write_policy
from edgewise.runtime.agent.progressive import read_decisions
from edgewise.runtime.cli.main import main
from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.store.sqlite import SqliteStore
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401 (a fixture)
from tests.runtime.rollout.helpers import add_version
from tests.runtime.store.agent_rig import Rig, gauge, served_default
from tests.runtime.store.helpers import frame_to_inputs, logreg_v1
from tests.servers import RunningServer

ANALYSIS = {
    "min_requests": 120,
    "max_error_rate": 0.0,
    "max_latency_ratio": 3.0,
    "latency_quantile": 0.5,  # the median: one hiccup of a shared test machine is no p99
    "min_agreement": 0.9,
    "fail_on_drift": True,
    "max_wait_seconds": 60,
}


def _policy(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"steps": list(steps), "analysis": ANALYSIS, "sticky_key": "request_id"}


SHADOW = {"mode": "shadow", "seconds": 0.3}
CANARY_25 = {"mode": "canary", "weight": 25, "seconds": 0.3}
CANARY_50 = {"mode": "canary", "weight": 50, "seconds": 0.3}
LABEL = {"mode": "label", "seconds": 0.3}


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    made = {"v1": logreg_v1(root / "v1")}
    for kind in ("good", "inverted", "slow", "drifting"):
        made[kind] = add_version(root / kind, kind, 1)
    return made


class Clients(threading.Thread):
    """Requests naming no version, rows of the real data in turn, each with an id, back to back;
    every failure kept."""

    def __init__(self, target: str, model: str, folder: Path, pin_every: int = 0) -> None:
        super().__init__(daemon=True)
        self.pin_every = pin_every  # every n-th request asks for the "canary" label
        self.target, self.model = target, model
        X = load_breast_cancer(as_frame=True).data
        manifest = read_manifest(folder)
        self.rows = [frame_to_inputs(manifest, X.iloc[i : i + 1]) for i in range(len(X))]
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with EdgewiseClient(self.target, timeout=10) as client:
            i = 0
            while not self._stop_event.is_set():
                inputs = {k: np.asarray(v) for k, v in self.rows[i % len(self.rows)].items()}
                try:
                    pinned = self.pin_every and i % self.pin_every == 0 and i > 0
                    version = "canary" if pinned else ""
                    answer = client.infer(self.model, inputs, version=version, request_id=f"c{i}")
                    self.versions.append(answer.model_version)
                except Exception as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                i += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


@pytest.fixture
def rig(
    edge: tuple[Path, RunningServer], candidates: dict[str, Path], tmp_path: Path
) -> Iterator[Rig]:
    repo, server = edge
    made = Rig(server, repo, tmp_path / "rig", (candidates["v1"],))
    yield made
    made.close()


def _roll(
    rig: Rig, candidates: dict[str, Path], kind: str, policy: dict[str, Any], pin_every: int = 0
) -> Clients:
    """Version 1 deployed, then ``kind`` registered under a policy, and one agent cycle (the
    whole rollout) under client traffic; the traffic's record."""
    from edgewise.runtime.store.register import register
    from tests.runtime.store.helpers import copy_package

    agent = rig.start_agent()
    rig.register(0)
    agent.run_once()
    assert served_default(rig.client, rig.name) == 1
    rig.client.set_version_label(rig.name, "canary", "1")  # where canary clients go meanwhile
    assert rig.publisher is not None
    write_policy(rig.publisher, rig.name, "production", parse_policy(policy))
    package = copy_package(candidates[kind], rig.root / "candidate", rig.name)
    assert register(rig.publisher, package, alias="production").record.version == 2
    traffic = Clients(rig.server.target, rig.name, rig.packages[0], pin_every)
    traffic.start()
    try:
        agent.cycle()
    finally:
        traffic.stop()
    assert traffic.failures == [], traffic.failures[:3]
    return traffic


def _decisions(rig: Rig) -> list[dict[str, Any]]:
    assert rig.publisher is not None
    return read_decisions(rig.publisher, rig.name)


@pytest.mark.parametrize(
    ("kind", "steps", "reason"),
    [
        ("inverted", (SHADOW, CANARY_25), "agreement with stable"),
        ("drifting", (SHADOW, CANARY_25), "drift"),
        ("slow", (CANARY_25, CANARY_50), "latency (quantile 0.5)"),
        ("slow", (LABEL,), "latency (quantile 0.5)"),
    ],
)
def test_a_bad_candidate_is_taken_out_with_no_failed_request(
    rig: Rig, candidates: dict[str, Path], kind: str, steps: tuple[dict[str, Any], ...], reason: str
) -> None:
    traffic = _roll(rig, candidates, kind, _policy(*steps), pin_every=3)
    assert served_default(rig.client, rig.name) == 1
    decisions = _decisions(rig)
    # Judged step by step: the first step that fails ends the rollout (a latency histogram's
    # coarse buckets may let a first small share pass).
    verdicts = [d["verdict"] for d in decisions]
    assert verdicts[-1] == "fail" and set(verdicts[:-1]) <= {"pass"}, decisions
    failed = decisions[-1]
    assert reason in failed["reasons"][0]
    assert failed["candidate"] == 2 and failed["node"] == "edge-1"
    assert failed["evidence"]  # the figures it judged on
    rollout = rig.client.get_rollout(rig.name)
    assert not rollout.weights and not rollout.shadow_version  # out of traffic
    assert dict(rollout.labels) == {"stable": "1", "canary": "1"}  # canary clients get 1
    assert {
        s.version
        for s in rig.client.repository_index()
        if s.name == rig.name and s.state == "READY"
    } == {"1"}
    state = rig.state()
    assert state.deployed is not None and state.deployed.version == 1
    assert state.rejected and state.rejected[-1].version == 2
    assert reason in state.rejected[-1].reason
    if steps[0]["mode"] in ("canary", "label"):
        assert "2" in traffic.versions  # the canary answered some clients before it was judged
    assert rig.agent is not None
    assert gauge(rig.agent.metrics, "edgewise_agent_rollout_decisions_total", verdict="fail") == 1


def test_a_good_candidate_is_promoted_through_every_step(
    rig: Rig, candidates: dict[str, Path]
) -> None:
    traffic = _roll(rig, candidates, "good", _policy(SHADOW, LABEL, CANARY_25, CANARY_50), 3)
    assert served_default(rig.client, rig.name) == 2
    decisions = _decisions(rig)
    assert [d["verdict"] for d in decisions] == ["pass", "pass", "pass", "pass", "promote"]
    shadow = decisions[0]["evidence"]
    assert shadow["copies"] >= ANALYSIS["min_requests"] and shadow["agreement"] >= 0.9
    assert decisions[1]["evidence"]["requests"] >= ANALYSIS["min_requests"]
    assert {"1", "2"} <= set(traffic.versions)
    rollout = rig.client.get_rollout(rig.name)
    assert not rollout.weights and not rollout.shadow_version
    assert dict(rollout.labels) == {"stable": "2", "canary": "2"}
    assert rig.agent is not None
    assert gauge(rig.agent.metrics, "edgewise_agent_rollout_decisions_total", verdict="pass") == 4
    # `edgewise models show` lists the policy and the decisions.
    assert rig.publisher is not None
    store_uri = f"sqlite:///{rig.store_folder / 'store.db'}"
    assert main(["models", "show", rig.name, "--store", store_uri, "--json"]) == 0


def test_models_show_and_policy_cli(
    rig: Rig, candidates: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rig.register(0)
    uri = f"sqlite:///{rig.store_folder / 'store.db'}"
    good = tmp_path / "policy.json"
    good.write_text(json.dumps(_policy(SHADOW, CANARY_25)))
    assert (
        main(["models", "policy", rig.name, "production", "--file", str(good), "--store", uri]) == 0
    )
    store = SqliteStore(rig.store_folder / "store.db", create=False)
    try:
        stored = read_policy(store, rig.name, "production")
        assert stored is not None and [s.mode for s in stored.steps] == ["shadow", "canary"]
        capsys.readouterr()
        bad_cases = [
            ({**_policy(SHADOW), "speed": 2}, "unknown key(s) 'speed'"),
            ({"steps": [{"mode": "canary", "weight": 100, "seconds": 1}]}, "steps[0].weight"),
            ({"steps": [SHADOW], "analysis": {"min_agreement": 1.5}}, "analysis.min_agreement"),
            ({"steps": [SHADOW], "analysis": {"max_latency_ratio": 0.5}}, "max_latency_ratio"),
            ({"steps": [SHADOW], "analysis": {"latency_quantile": 1}}, "latency_quantile"),
            ({"steps": [{"mode": "label", "seconds": 1, "rate": 0.5}]}, "steps[0].rate"),
            ({"steps": [CANARY_50, CANARY_25]}, "weights must increase"),
            ({"steps": [{"mode": "shadow", "seconds": 0}]}, "steps[0].seconds"),
        ]
        for document, field in bad_cases:
            bad = tmp_path / "bad.json"
            bad.write_text(json.dumps(document))
            code = main(
                ["models", "policy", rig.name, "production", "--file", str(bad), "--store", uri]
            )
            err = capsys.readouterr().err
            assert code != 0 and field in err and len(err.strip().splitlines()) == 1, err
            with pytest.raises(InvalidInput, match="rollout policy"):
                parse_policy(document)
            assert read_policy(store, rig.name, "production") == stored  # untouched
        assert main(["models", "show", rig.name, "--store", uri]) == 0
        assert "rollout policy of alias production" in capsys.readouterr().out
    finally:
        store.close()


def test_the_mlflow_store_keeps_policies_and_decisions(
    mlflow_server: MlflowServer,  # noqa: F811
    candidates: dict[str, Path],
    tmp_path: Path,
) -> None:
    from edgewise.runtime.store.mlflow_rest import MlflowStore
    from edgewise.runtime.store.register import register
    from tests.runtime.store.helpers import copy_package

    store = MlflowStore(mlflow_server.url, mlflow_server.username, mlflow_server.password)
    try:
        package = copy_package(candidates["v1"], tmp_path / "p", "rolled")
        register(store, package, alias="production")
        policy = parse_policy(_policy(SHADOW, CANARY_25))
        write_policy(store, "rolled", "production", policy)
        assert read_policy(store, "rolled", "production") == policy
        decision = {"at": "2026-01-01T00:00:00Z", "step": 0, "verdict": "fail", "reasons": ["x"]}
        store.set_model_tag("rolled", "edgewise.rollout.decision.n1.2.00", json.dumps(decision))
        assert read_decisions(store, "rolled") == [decision]
        write_policy(store, "rolled", "production", None)
        assert read_policy(store, "rolled", "production") is None
        write_policy(store, "rolled", "production", None)  # deleting a missing one: no error
    finally:
        store.close()


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    from edgewise.runtime.agent.progressive import histogram_quantile

    rng = np.random.default_rng(0)
    samples = rng.uniform(0.002, 0.004, 10_000)  # all inside the (0.0025, 0.005] bucket or below
    bounds = [0.001, 0.0025, 0.005, 0.01, float("inf")]
    before = {b: 0.0 for b in bounds}
    after = {b: float(np.sum(samples <= b)) for b in bounds}
    # Uniform within each bucket, as the interpolation assumes: the estimate is exact up to the
    # sample's own spread where the bucket is filled uniformly (here the (0.0025, 0.005] bucket
    # holds uniform values up to 0.004 only: the estimate may be above the sample quantile by at
    # most the bucket's width).
    estimate = histogram_quantile(before, after, 0.99)
    assert 0.0025 <= estimate <= 0.005
    assert abs(estimate - np.quantile(samples, 0.99)) <= 0.005 - 0.0025
    assert np.isnan(histogram_quantile(before, before, 0.99))
    past = {**before, float("inf"): 5.0}
    assert histogram_quantile(before, past, 0.5) == 0.01  # past the last finite bound


def test_a_failure_between_the_steps_and_the_switch_leaves_no_canary_route(
    rig: Rig, candidates: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgewise.runtime.agent.sync import Agent

    baseline = Agent._baseline
    calls: list[int] = []

    def fails_at_the_candidate(agent: Agent) -> tuple[tuple[float, float] | None, str]:
        calls.append(1)
        if len(calls) > 1:  # the first deploy (version 1) switches; the candidate's fails
            raise RuntimeError("the switch failed")
        return baseline(agent)

    monkeypatch.setattr(Agent, "_baseline", fails_at_the_candidate)
    _roll(rig, candidates, "good", _policy(CANARY_25))
    # The step passed; the rollout then ended with no verdict: recorded as withdrawn.
    decisions = _decisions(rig)
    assert [d["verdict"] for d in decisions] == ["pass", "withdrawn"]
    assert decisions[-1]["reasons"] == ["RuntimeError: the switch failed"]
    rollout = rig.client.get_rollout(rig.name)
    assert not rollout.weights and not rollout.shadow_version
    assert dict(rollout.labels)["canary"] == "1"
    assert served_default(rig.client, rig.name) == 1
