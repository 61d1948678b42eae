"""The agent's state as a hypothesis state machine: polls, the store going away and coming back
(or missing from the start), new versions registered, the agent killed and restarted (a new agent
over the same state folder), `edgewise rollback` by hand, the alias moved back to an earlier
version and the agent restarted with or without --allow-rollback (rollback protection), against a
small reference model of the deployed and last good versions, the highest version served, what
the server serves, and the gauges and refusal counts the agent publishes.

Real parts throughout: the embedded SQLite store, a real server, real model packages (built once
per module; each example is a model of its own on the one server)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from edgewise.runtime.agent.sync import rollback
from edgewise.runtime.errors import EdgewiseError
from tests.runtime.store.agent_rig import Rig, gauge, run_rig_machine, served_default
from tests.servers import RunningServer

NEVER, PRESENT, AWAY = "never", "present", "away"


@dataclass
class Expected:
    """What the agent's state should be (the reference model)."""

    store: str = NEVER
    alias: int | None = None
    deployed: int | None = None
    last_good: int | None = None
    good: list[int] = field(default_factory=list)
    refused: set[int] = field(default_factory=set)
    seen: bool = False  # the agent has read the state since it last changed behind its back
    healthy: bool = False  # as of the agent's last poll
    store_up: bool = False  # as of the agent's last poll
    registered: int = 0  # versions published
    highest: int | None = None  # the highest version ever made the default
    allow_rollback: bool = False  # the running agent's --allow-rollback
    rollback_refusals: int = 0  # the running agent's edgewise_agent_refusals{reason=rollback}
    refused_target: int | None = None  # the target it last counted

    def restarted(self, allow_rollback: bool) -> None:
        self.allow_rollback = allow_rollback
        self.rollback_refusals = 0
        self.refused_target = None

    def poll(self) -> None:
        """One poll of the agent (watch_seconds=0: a deployed version is the last good one)."""
        self.seen = True
        self.store_up = self.store == PRESENT
        if self.store != PRESENT or self.alias is None:
            self.healthy = False
            return
        if self.alias == self.deployed:
            self.healthy = True
            return
        if self.alias in self.refused:
            self.healthy = False
            return
        if self.highest is not None and self.alias < self.highest and not self.allow_rollback:
            self.healthy = False  # rollback protection: nothing changes
            if self.refused_target != self.alias:
                self.rollback_refusals += 1
                self.refused_target = self.alias
            return
        self.refused_target = None
        self.deployed = self.last_good = self.alias
        self.good = [v for v in self.good if v != self.alias] + [self.alias]
        self.highest = max(self.highest or 0, self.alias)
        self.healthy = True

    def previous(self) -> int | None:
        """The good version before the deployed one that was not refused (None: none)."""
        assert self.deployed is not None
        earlier = (
            self.good[: self.good.index(self.deployed)] if self.deployed in self.good else self.good
        )
        return next((v for v in reversed(earlier) if v not in self.refused), None)


class AgentMachine(RuleBasedStateMachine):
    rig_factory: ClassVar[Callable[[], Rig]]  # set by the test (the module's server, packages)

    def __init__(self) -> None:
        super().__init__()
        self.rig: Rig = self.rig_factory()
        self.expected = Expected()
        self.rig.start_agent().run_once()  # started while its store does not exist yet
        self.expected.poll()

    def teardown(self) -> None:
        self.rig.close()

    # ---- rules -------------------------------------------------------------------------------

    @rule()
    def poll(self) -> None:
        assert self.rig.agent is not None
        self.rig.agent.cycle()
        self.expected.poll()

    @rule(allow_rollback=st.booleans())
    def kill_and_restart(self, allow_rollback: bool) -> None:
        self.rig.start_agent(allow_rollback=allow_rollback).run_once()
        self.expected.restarted(allow_rollback)
        self.expected.poll()

    @precondition(lambda self: self.expected.store == PRESENT and self.expected.registered > 1)
    @rule(data=st.data())
    def alias_moved_back(self, data: st.DataObject) -> None:
        """A store writer points the alias at an earlier version."""
        version = data.draw(st.integers(1, self.expected.registered - 1))
        assert self.rig.publisher is not None
        self.rig.publisher.set_alias(self.rig.name, "production", version)
        self.expected.alias = version

    @precondition(lambda self: self.expected.store != AWAY)
    @rule(which=st.integers(0, 1))
    def register(self, which: int) -> None:
        version = self.rig.register(which)
        assert version == self.expected.registered + 1
        self.expected.registered = version
        self.expected.alias = version
        self.expected.store = PRESENT

    @precondition(lambda self: self.expected.store == PRESENT)
    @rule()
    def store_gone(self) -> None:
        self.rig.store_folder.rename(self.rig.root / "store-away")
        self.expected.store = AWAY

    @precondition(lambda self: self.expected.store == AWAY)
    @rule()
    def store_back(self) -> None:
        (self.rig.root / "store-away").rename(self.rig.store_folder)
        self.expected.store = PRESENT

    @rule()
    def rollback_by_hand(self) -> None:
        expected = self.expected
        before = self._state_bytes()
        target = expected.previous() if expected.deployed is not None else None
        if target is None:
            with pytest.raises(EdgewiseError):
                rollback(self.rig.repo, self.rig.name, self.rig.client)
            assert self._state_bytes() == before  # a refused rollback changes nothing
            return
        assert rollback(self.rig.repo, self.rig.name, self.rig.client) == (
            expected.deployed,
            target,
        )
        assert expected.deployed is not None
        expected.refused.add(expected.deployed)
        if expected.last_good in (None, expected.deployed):
            expected.last_good = target
        expected.deployed = target
        expected.seen = False

    # ---- invariants --------------------------------------------------------------------------

    def _state_bytes(self) -> bytes | None:
        path = self.rig.state_file.path
        return path.read_bytes() if path.exists() else None

    @invariant()
    def state_file_matches(self) -> None:
        state = self.rig.state()
        assert (state.deployed.version if state.deployed else None) == self.expected.deployed
        assert (state.last_good.version if state.last_good else None) == self.expected.last_good
        assert {r.version for r in state.rejected} == self.expected.refused
        assert state.served_floor == self.expected.highest

    @invariant()
    def server_serves_the_deployed_version(self) -> None:
        if self.expected.deployed is not None:
            assert served_default(self.rig.client, self.rig.name) == self.expected.deployed

    @invariant()
    def the_agent_never_creates_its_store(self) -> None:
        if self.expected.store != PRESENT:
            assert not self.rig.store_folder.exists()

    @invariant()
    def gauges_say_what_the_agent_saw(self) -> None:
        agent, expected = self.rig.agent, self.expected
        assert agent is not None
        if not expected.seen:
            return  # a rollback by hand since: published at the agent's next poll
        metrics = agent.metrics
        assert gauge(metrics, "edgewise_agent_deployed_version") == (expected.deployed or 0)
        assert gauge(metrics, "edgewise_agent_last_good_version") == (expected.last_good or 0)
        assert gauge(metrics, "edgewise_agent_healthy") == (1 if expected.healthy else 0)
        store_up = gauge(metrics, "edgewise_agent_store_up")
        assert store_up == (1 if expected.store_up else 0)
        refusals = gauge(metrics, "edgewise_agent_refusals_total", reason="rollback") or 0
        assert refusals == expected.rollback_refusals


def test_agent_state_machine(
    edge: tuple[Path, RunningServer], sources: tuple[Path, Path], tmp_path: Path
) -> None:
    run_rig_machine(AgentMachine, edge, sources, tmp_path, max_examples=25, steps=20)
