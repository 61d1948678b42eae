"""How the agent ends a rollout nobody is running any more, and a rollout with two outcomes at
once, on a real server with a real agent:

- an abort written by `edgewise rollback` that could not reach the server (the agent that ran
  the rollout is dead): the next agent takes the candidate out of traffic before it unloads it,
  so no client request meets an unloaded version;
- a rollout that ended with no verdict (the agent stopped or died): the candidate is unloaded
  unless the alias names it, unpinned from config.json, and a ``withdrawn`` decision is
  recorded and counted; it is not refused;
- a step failing at the moment of an abort: one outcome only (counted once, one decision)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgewise.runtime.agent.policy import parse_policy, write_policy
from edgewise.runtime.agent.progressive import Progressive, read_decisions
from edgewise.runtime.agent.state import AgentState, Rejection, Rollout, StateFile
from edgewise.runtime.agent.sync import abort_rollout_locked
from edgewise.runtime.errors import PackageError
from edgewise.runtime.store.register import register
from tests.runtime.rollout.conftest import (
    LONG_CANARY,
    AgentThread,
    candidate_with_long_canary,
    in_canary_step,
    metric,
)
from tests.runtime.rollout.test_rollout_agent import Clients
from tests.runtime.store.agent_rig import Rig, ready_versions, served_default
from tests.runtime.store.helpers import copy_package, wait_for


def _pins(rig: Rig) -> Any:
    return json.loads((rig.repo / rig.name / "config.json").read_text())["version_policy"]


def test_an_abort_that_could_not_reach_the_server_is_withdrawn_before_the_unload(
    rig: Rig, packages: dict[str, Path]
) -> None:
    record = in_canary_step(rig, packages)
    # What a dead agent leaves (its rollout, its split) and what abort_rollout_locked wrote
    # before its server calls failed (the server unreachable from where it ran).
    state = rig.state().reject(Rejection(2, record.model_sha256, "manual", "t", None))
    rig.state_file.write(replace(state, rollout=Rollout(2, record.model_sha256, 1, 0.0, "manual")))
    rig.client.set_traffic_split(rig.name, [("1", 50), ("2", 50)])
    rig.client.set_version_label(rig.name, "canary", "2")

    rig.start_agent().run_once()
    rollout = rig.client.get_rollout(rig.name)
    assert not rollout.weights and not rollout.shadow_version
    assert dict(rollout.labels)["canary"] == "1"
    assert ready_versions(rig) == ["1"]
    assert rig.state().rollout is None
    assert metric(rig, "edgewise_agent_rollbacks_total", reason="manual") == 1
    assert rig.publisher is not None
    verdicts = [
        d["verdict"] for d in read_decisions(rig.publisher, rig.name) if d["candidate"] == 2
    ]
    assert "abort" in verdicts
    # Clients (some asking for "canary") meet version 1 only, none fails.
    clients = Clients(rig.server.target, rig.name, packages["v1"], pin_every=5)
    clients.start()
    try:
        wait_for(lambda: len(clients.versions) + len(clients.failures) >= 40, 60, "requests")
    finally:
        clients.stop()
    assert clients.failures == [], clients.failures[:3]
    assert set(clients.versions) == {"1"}


def test_a_rollout_left_with_no_verdict_is_unloaded_unpinned_and_recorded(
    rig: Rig, packages: dict[str, Path]
) -> None:
    record = in_canary_step(rig, packages)
    # A clean stop: the alias still names the candidate, which stays loaded and pinned for the
    # next start; the stop is recorded as withdrawn.
    assert rig.state().rollout is None
    assert ready_versions(rig) == ["1", "2"] and _pins(rig) == {"specific": [1, 2]}
    assert metric(rig, "edgewise_agent_rollout_decisions_total", verdict="withdrawn") == 1
    assert rig.publisher is not None
    withdrawn = [d for d in read_decisions(rig.publisher, rig.name) if d["verdict"] == "withdrawn"]
    assert len(withdrawn) == 1 and withdrawn[0]["reasons"] == ["the agent stopped"]
    assert withdrawn[0]["evidence"]["step"] == 1 and withdrawn[0]["evidence"]["unloaded"] is False

    # A dead agent's rollout and split, the alias moved back to version 1 meanwhile.
    rig.state_file.write(replace(rig.state(), rollout=Rollout(2, record.model_sha256, 1, 0.0)))
    rig.client.set_traffic_split(rig.name, [("1", 50), ("2", 50)])
    rig.publisher.set_alias(rig.name, "production", 1)
    rig.start_agent().run_once()
    assert rig.state().rollout is None
    assert served_default(rig.client, rig.name) == 1
    assert not rig.client.get_rollout(rig.name).weights
    assert ready_versions(rig) == ["1"]
    assert _pins(rig) == {"specific": [1]}
    assert metric(rig, "edgewise_agent_rollout_decisions_total", verdict="withdrawn") == 1
    decision = next(
        d for d in read_decisions(rig.publisher, rig.name) if d["verdict"] == "withdrawn"
    )
    assert decision["reasons"] == ["left by an agent that stopped or died"]
    assert decision["evidence"]["unloaded"] is True
    assert rig.state().rejection(2, record.model_sha256) is None  # not refused


def _failing_step_with_abort(
    rig: Rig, packages: dict[str, Path], abort_after_verdict: bool
) -> None:
    """Version 2's step is judged failed while `edgewise rollback` aborts it: before the
    verdict is recorded, or just after."""
    rig.register(0)
    agent = rig.start_agent()
    agent.run_once()
    assert rig.publisher is not None
    write_policy(rig.publisher, rig.name, "production", parse_policy(LONG_CANARY))
    candidate = copy_package(packages["good"], rig.root / "candidate", rig.name)
    register(rig.publisher, candidate, alias="production")
    progressive: Progressive = agent.progressive

    def abort() -> None:
        with rig.state_file.locked():
            abort_rollout_locked(rig.client, rig.state_file, rig.state(), "manual")

    def step(*args: Any) -> tuple[list[str], dict[str, Any]]:  # the step judged at once
        if not abort_after_verdict:
            abort()
        return ["judged failed"], {}

    record = progressive._record

    def record_then_abort(*args: Any, **kwargs: Any) -> bool:
        done = record(*args, **kwargs)
        if abort_after_verdict and args[5] == "fail":
            abort()
        return done

    progressive._step = step  # type: ignore[method-assign]
    progressive._record = record_then_abort  # type: ignore[method-assign]
    agent.run_once()
    assert rig.state().rollout is None
    assert ready_versions(rig) == ["1"] and served_default(rig.client, rig.name) == 1
    assert not rig.client.get_rollout(rig.name).weights


def _verdicts(rig: Rig) -> list[str]:
    assert rig.publisher is not None
    return [d["verdict"] for d in read_decisions(rig.publisher, rig.name)]


def test_an_abort_before_a_failing_verdict_is_the_one_outcome(
    rig: Rig, packages: dict[str, Path]
) -> None:
    _failing_step_with_abort(rig, packages, abort_after_verdict=False)
    verdicts = _verdicts(rig)
    assert verdicts.count("abort") == 1 and "fail" not in verdicts
    assert metric(rig, "edgewise_agent_rollbacks_total", reason="manual") == 1
    assert metric(rig, "edgewise_agent_rollbacks_total", reason="rollout") == 0
    assert metric(rig, "edgewise_agent_deploys_total", result="rolled_back") == 1
    assert metric(rig, "edgewise_agent_deploys_total", result="rejected") == 0
    state = rig.state()
    assert [(r.version, r.reason) for r in state.rejected] == [(2, "manual")]


def test_a_failing_verdict_before_an_abort_is_the_one_outcome(
    rig: Rig, packages: dict[str, Path]
) -> None:
    _failing_step_with_abort(rig, packages, abort_after_verdict=True)
    verdicts = _verdicts(rig)
    assert verdicts.count("fail") == 1 and "abort" not in verdicts
    assert metric(rig, "edgewise_agent_rollbacks_total", reason="manual") == 0
    assert metric(rig, "edgewise_agent_rollbacks_total", reason="rollout") == 1
    assert metric(rig, "edgewise_agent_deploys_total", result="rolled_back") == 0
    assert metric(rig, "edgewise_agent_deploys_total", result="rejected") == 1
    state = rig.state()
    assert len(state.rejected) == 1 and state.rejected[0].version == 2
    assert state.rejected[0].reason.startswith("rollout step 1")


def test_a_state_file_unreadable_during_a_step_fails_the_poll_not_the_candidate(
    rig: Rig, packages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state file cannot be read once while the step waits (an operator's editor saving
    it, say): the rollout stops with the poll failed; the candidate is not refused as an
    invalid package, and the next poll starts its rollout again."""
    record = candidate_with_long_canary(rig, packages)
    real_read = StateFile.read
    armed = threading.Event()

    def read(self: StateFile) -> AgentState:
        if armed.is_set():
            armed.clear()
            raise PackageError(f"{self.path}: not valid JSON: (a torn edit)")
        return real_read(self)

    monkeypatch.setattr(StateFile, "read", read)
    running = AgentThread(rig)
    try:
        wait_for(lambda: metric(rig, "edgewise_agent_rollout_step") == 1, 60, "the step")
        armed.set()  # the next read is the waiting step's
        wait_for(
            lambda: metric(rig, "edgewise_agent_polls_total", result="error") >= 1,
            60,
            "the poll failing",
        )
        assert metric(rig, "edgewise_agent_deploys_total", result="rejected") == 0
        # Not refused: the next poll runs the rollout again.
        wait_for(lambda: metric(rig, "edgewise_agent_rollout_step") == 1, 60, "the step again")
        assert rig.state().rejection(2, record.model_sha256) is None
    finally:
        running.stop()
