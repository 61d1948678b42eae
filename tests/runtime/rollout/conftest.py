"""The rollout tests' rig (version 1 deployed from the module's packages, a good candidate at
hand), the agent's loop in a thread, and a rollout left in its long canary step."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgewise.runtime.agent.policy import parse_policy, write_policy
from edgewise.runtime.store.base import VersionRecord
from edgewise.runtime.store.register import register
from tests.runtime.rollout.helpers import add_version
from tests.runtime.store.agent_rig import Rig, gauge
from tests.runtime.store.helpers import copy_package, logreg_v1, wait_for
from tests.servers import RunningServer

# A canary step that lasts until it is aborted (the test's rollback ends it).
LONG_CANARY = {
    "steps": [{"mode": "canary", "weight": 50, "seconds": 600}],
    "analysis": {"min_requests": 1, "max_wait_seconds": 600, "fail_on_drift": False},
}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {"v1": logreg_v1(root / "v1"), "good": add_version(root / "good", "good", 1)}


@pytest.fixture
def rig(
    edge: tuple[Path, RunningServer], packages: dict[str, Path], tmp_path: Path
) -> Iterator[Rig]:
    repo, server = edge
    made = Rig(server, repo, tmp_path / "rig", (packages["v1"],))
    yield made
    made.close()


class AgentThread:
    """The agent's loop in a thread (its process's main loop), stopped as SIGTERM does."""

    def __init__(self, rig: Rig) -> None:
        self.agent = rig.start_agent()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,))
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def metric(rig: Rig, name: str, **labels: str) -> float:
    assert rig.agent is not None
    return gauge(rig.agent.metrics, name, **labels) or 0.0


def candidate_with_long_canary(rig: Rig, packages: dict[str, Path]) -> VersionRecord:
    """Version 1 deployed, version 2 registered with a long canary step (not yet run).
    Returns version 2's record."""
    rig.register(0)
    rig.start_agent().run_once()
    assert rig.publisher is not None
    write_policy(rig.publisher, rig.name, "production", parse_policy(LONG_CANARY))
    candidate = copy_package(packages["good"], rig.root / "candidate", rig.name)
    return register(rig.publisher, candidate, alias="production").record


def in_canary_step(rig: Rig, packages: dict[str, Path]) -> VersionRecord:
    """Version 1 deployed, version 2 registered with a long canary step; the agent (a thread)
    runs it and is stopped in the step as SIGTERM does. Returns version 2's record."""
    record = candidate_with_long_canary(rig, packages)
    running = AgentThread(rig)
    wait_for(lambda: metric(rig, "edgewise_agent_rollout_step") == 1, 60, "the step")
    running.stop()
    return record
