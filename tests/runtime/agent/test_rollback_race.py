"""`edgewise rollback --to X` racing an agent that begins a rollout: the check that ``X`` is the
rollout's stable version is made again under the state lock, so a rollout recorded between
rollback's first read and its lock refuses the rollback (nothing changes) instead of rolling
back the version the rollout's split still routes to. On a real server and a real store."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from edgewise.runtime.agent.state import Rollout, StateFile
from edgewise.runtime.agent.sync import rollback
from edgewise.runtime.errors import EdgewiseError
from tests.runtime.store.agent_rig import Rig, ready_versions, served_default


def test_a_rollout_recorded_after_the_first_read_refuses_a_rollback_to_another_version(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.register(0)
    agent = rig.start_agent()
    agent.run_once()
    rig.register(1)
    agent.run_once()
    assert served_default(rig.client, rig.name) == 2
    versions = ready_versions(rig)
    state_file = rig.state_file

    # The agent records its rollout of a version 3 (stable: 2) just before rollback takes the
    # lock (rollback's first read saw none).
    real_locked = StateFile.locked

    @contextlib.contextmanager
    def locked(self: StateFile, timeout: float = 60.0) -> Iterator[None]:
        with real_locked(self, timeout):
            if self.path == state_file.path and self.read().rollout is None:
                rollout = Rollout(3, "c" * 64, 2, time.time())
                self.write(replace(self.read(), rollout=rollout))
            yield

    monkeypatch.setattr(StateFile, "locked", locked)
    with pytest.raises(EdgewiseError, match=r"being rolled out.*--to 1 is another"):
        rollback(rig.repo, rig.name, rig.client, to=1)
    monkeypatch.undo()

    # Refused: nothing changed (the state is the agent's, the server as it was).
    state = state_file.read()
    assert state.rollout is not None and state.rollout.version == 3
    assert state.deployed is not None and state.deployed.version == 2
    assert state.rejected == ()
    assert served_default(rig.client, rig.name) == 2
    assert ready_versions(rig) == versions
