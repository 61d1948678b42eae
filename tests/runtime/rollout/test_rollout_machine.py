"""The agent and its rollout as a hypothesis state machine: a real agent runs its loop in a
thread (as its process does) over a real server and a real SQLite store, while the test
registers versions (each goes through a label step judged on the requests that ask for
"canary"), sends requests, reads the state, restarts the agent mid-rollout and runs
`edgewise rollback`, during a rollout (the candidate is aborted) or not (the deployed version
goes back), and kills the agent mid-step then aborts its rollout from where the server cannot be
reached (the next agent takes the candidate out of traffic, then unloads it), against a small
reference model.

What it holds at every step: the server's default is the expected version (a rollout never
moves it before its last step passed); the state file records the deployed and refused versions
expected and the rollout under way; the state lock is free while a rollout waits (a reader never
waits for a rollout); no client request fails; and each abort is in the store and the agent's
metrics."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from edgewise.runtime.agent.policy import parse_policy, write_policy
from edgewise.runtime.agent.progressive import read_decisions
from edgewise.runtime.agent.sync import rollback
from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.errors import EdgewiseError
from tests.runtime.rollout.conftest import AgentThread
from tests.runtime.rollout.helpers import rows
from tests.runtime.store.agent_rig import Rig, gauge, run_rig_machine, served_default
from tests.runtime.store.helpers import wait_for
from tests.servers import RunningServer

MIN_REQUESTS = 3
POLICY = {
    "steps": [{"mode": "label", "seconds": 0.2}],
    "analysis": {
        "min_requests": MIN_REQUESTS,
        "max_error_rate": 0.0,
        "max_latency_ratio": None,
        "min_agreement": None,
        "fail_on_drift": False,
        "max_wait_seconds": 600,
    },
}
TIMEOUT = 60.0


@dataclass
class Expected:
    deployed: int | None = None
    good: list[int] = field(default_factory=list)
    refused: set[int] = field(default_factory=set)
    rolling: int | None = None  # the candidate in its step
    canary_requests: int = 0  # answered by the candidate in this attempt of its step
    aborts: int = 0  # edgewise_agent_rollbacks{reason="manual"} of the running agent

    def previous(self) -> int | None:
        assert self.deployed is not None
        earlier = self.good[: self.good.index(self.deployed)]
        return next((v for v in reversed(earlier) if v not in self.refused), None)


class RolloutAgentMachine(RuleBasedStateMachine):
    rig_factory: ClassVar[Callable[[], Rig]]

    def __init__(self) -> None:
        super().__init__()
        self.rig = self.rig_factory()
        self.expected = Expected()
        self.inputs = {k: np.asarray(v) for k, v in rows(self.rig.packages[0], 1).items()}
        self.rig.register(0)  # version 1, deployed at once (nothing served before)
        self.running = AgentThread(self.rig)
        wait_for(lambda: self.rig.state().deployed, TIMEOUT, "version 1 deployed")
        self.expected.deployed = 1
        self.expected.good = [1]
        self.rig.client.set_version_label(self.rig.name, "canary", "1")
        assert self.rig.publisher is not None
        write_policy(self.rig.publisher, self.rig.name, "production", parse_policy(POLICY))

    def teardown(self) -> None:
        self.running.stop()
        self.rig.close()

    # ---- helpers -----------------------------------------------------------------------------

    def _metric(self, name: str, **labels: str) -> float:
        return gauge(self.running.agent.metrics, name, **labels) or 0.0

    def _in_step(self, version: int) -> bool:
        labels = dict(self.rig.client.get_rollout(self.rig.name).labels)
        return (
            self._metric("edgewise_agent_rollout_step") == 1
            and labels.get("canary") == str(version)
            and self.rig.agent is not None
            and self.rig.agent.progressive.reached is not None
        )

    def _wait_in_step(self, version: int) -> None:
        wait_for(lambda: self._in_step(version), TIMEOUT, f"version {version} in its step")
        self.expected.rolling = version
        self.expected.canary_requests = 0

    def _ask(self, version: str) -> str:
        answer = self.rig.client.infer(self.rig.name, self.inputs, version=version)
        return answer.model_version

    # ---- rules -------------------------------------------------------------------------------

    @precondition(lambda self: self.expected.rolling is None)
    @rule()
    def register(self) -> None:
        version = self.rig.register(self.rig.registered % 2)
        self._wait_in_step(version)

    @precondition(lambda self: self.expected.rolling is not None)
    @rule()
    def canary_request(self) -> None:
        expected = self.expected
        assert expected.rolling is not None
        assert self._ask("canary") == str(expected.rolling)
        expected.canary_requests += 1
        if expected.canary_requests < MIN_REQUESTS:
            return
        # Enough for the step (a request before the step's first scrape is not counted: keep
        # asking until the agent promotes it).
        version = expected.rolling

        def promoted() -> bool:
            state = self.rig.state()
            if state.deployed is not None and state.deployed.version == version:
                return True
            self._ask("canary")
            return False

        wait_for(promoted, TIMEOUT, f"version {version} promoted")
        expected.deployed = version
        expected.good = [v for v in expected.good if v != version] + [version]
        expected.rolling = None

    @rule()
    def plain_request(self) -> None:
        assert self._ask("") == str(self.expected.deployed)

    @precondition(lambda self: self.expected.rolling is not None)
    @rule()
    def restart_agent(self) -> None:
        """SIGTERM mid-step: no verdict, nothing refused; the new agent starts the steps over."""
        expected = self.expected
        assert expected.rolling is not None
        self.running.stop()
        assert self.rig.state().rollout is None  # the stopping agent cleared it
        assert served_default(self.rig.client, self.rig.name) == expected.deployed
        self.running = AgentThread(self.rig)
        expected.aborts = 0  # a new process: new metrics
        self._wait_in_step(expected.rolling)

    @precondition(lambda self: self.expected.rolling is not None)
    @rule()
    def abort_unreached_after_the_agent_died(self) -> None:
        """The agent dies mid-step (its rollout record and the canary label stay); `edgewise
        rollback` aborts the rollout but cannot reach the server; the next agent takes the
        candidate out of traffic, then unloads it (a "canary" request never fails)."""
        expected, rig = self.expected, self.rig
        candidate = expected.rolling
        assert candidate is not None
        left = rig.state().rollout
        assert left is not None and left.version == candidate
        self.running.stop()  # a clean stop clears what SIGKILL leaves: put it back
        rig.state_file.write(replace(rig.state(), rollout=left))
        rig.client.set_version_label(rig.name, "canary", str(candidate))
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            unreachable = EdgewiseClient(f"127.0.0.1:{probe.getsockname()[1]}", timeout=2.0)
        try:
            with pytest.raises(EdgewiseError, match="the agent does at its next check"):
                rollback(rig.repo, rig.name, unreachable)
        finally:
            unreachable.close()
        aborted = rig.state().rollout
        assert aborted is not None and aborted.aborted == "manual"
        assert self._ask("canary") == str(candidate)  # nobody took it out of traffic yet
        self.running = AgentThread(rig)
        wait_for(lambda: rig.state().rollout is None, TIMEOUT, "the next agent ending the abort")
        assert dict(rig.client.get_rollout(rig.name).labels)["canary"] == str(expected.deployed)
        assert self._ask("canary") == str(expected.deployed)
        ready = {
            s.version
            for s in rig.client.repository_index()
            if s.name == rig.name and s.state == "READY"
        }
        assert str(candidate) not in ready
        expected.refused.add(candidate)
        expected.rolling = None
        expected.aborts = 1  # a new process: new metrics, this abort
        assert rig.publisher is not None
        assert any(
            d["verdict"] == "abort" and d["candidate"] == candidate
            for d in read_decisions(rig.publisher, rig.name)
        )

    @rule()
    def rollback_by_hand(self) -> None:
        expected = self.expected
        rig = self.rig
        assert expected.deployed is not None
        if expected.rolling is not None:
            candidate = expected.rolling
            assert rollback(rig.repo, rig.name, rig.client) == (candidate, expected.deployed)
            # Out of traffic at once.
            rollout = rig.client.get_rollout(rig.name)
            assert not rollout.weights and not rollout.shadow_version
            assert dict(rollout.labels)["canary"] == str(expected.deployed)
            assert self._ask("canary") == str(expected.deployed)
            wait_for(lambda: rig.state().rollout is None, TIMEOUT, "the abort ended")
            expected.refused.add(candidate)
            expected.rolling = None
            expected.aborts += 1
            assert rig.publisher is not None
            decision = [
                d
                for d in read_decisions(rig.publisher, rig.name)
                if d["verdict"] == "abort" and d["candidate"] == candidate
            ][-1]
            assert decision["reasons"] == ["manual"] and decision["evidence"]["step"] == 1
            assert rig.state().rejected[-1].reason == "manual"
            return
        target = expected.previous()
        if target is None:
            before = rig.state_file.path.read_bytes()
            with pytest.raises(EdgewiseError):
                rollback(rig.repo, rig.name, rig.client)
            assert rig.state_file.path.read_bytes() == before
            return
        assert rollback(rig.repo, rig.name, rig.client) == (expected.deployed, target)
        expected.refused.add(expected.deployed)
        expected.deployed = target

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def the_default_is_the_expected_version(self) -> None:
        assert served_default(self.rig.client, self.rig.name) == self.expected.deployed

    @invariant()
    def the_state_says_what_is_expected(self) -> None:
        state = self.rig.state()
        assert state.deployed is not None and state.deployed.version == self.expected.deployed
        assert {r.version for r in state.rejected} == self.expected.refused
        rolling = state.rollout.version if state.rollout is not None else None
        assert rolling == self.expected.rolling

    @invariant()
    def the_state_lock_is_free_while_a_rollout_waits(self) -> None:
        with self.rig.state_file.locked(timeout=10.0):
            pass

    @invariant()
    def aborts_are_counted(self) -> None:
        manual = self._metric("edgewise_agent_rollbacks_total", reason="manual")
        assert manual == self.expected.aborts
        assert self._metric("edgewise_agent_rollout_version") == (self.expected.rolling or 0)


def test_rollout_agent_state_machine(
    edge: tuple[Path, RunningServer], sources: tuple[Path, Path], tmp_path: Path
) -> None:
    run_rig_machine(RolloutAgentMachine, edge, sources, tmp_path, max_examples=8, steps=10)
