"""The agent in the test's process (a real SQLite store, a real server, real packages): a store
missing at start-up, a rollback by hand seen by the running agent, and a watch that cannot see the
server's metrics."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edgewise.runtime.agent.state import AgentState, StateFile
from edgewise.runtime.agent.sync import AgentSettings, rollback
from edgewise.runtime.errors import EdgewiseError
from tests.runtime.store.agent_rig import Rig, gauge, served_default
from tests.runtime.store.helpers import wait_for


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_an_agent_started_without_its_store_waits_for_it_and_never_creates_it(rig: Rig) -> None:
    agent = rig.start_agent()
    assert not agent.run_once()
    assert _tree(rig.store_folder) == []  # the folder is not there, and nothing made it
    assert gauge(agent.metrics, "edgewise_agent_store_up") == 0
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 0
    assert "does not exist" in agent.detail
    agent.cycle()
    assert not rig.store_folder.exists()

    assert rig.register(0) == 1  # the store appears (its publisher creates it)
    agent.cycle()
    assert gauge(agent.metrics, "edgewise_agent_store_up") == 1
    assert gauge(agent.metrics, "edgewise_agent_deployed_version") == 1
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 1
    assert served_default(rig.client, rig.name) == 1


def test_the_running_agent_publishes_a_rollback_by_hand(rig: Rig) -> None:
    agent = rig.start_agent()
    rig.register(0)
    agent.run_once()
    rig.register(1)
    agent.cycle()
    assert gauge(agent.metrics, "edgewise_agent_last_good_version") == 2
    assert served_default(rig.client, rig.name) == 2

    assert rollback(rig.repo, rig.name, rig.client) == (2, 1)  # what `edgewise rollback` does
    agent.cycle()
    assert gauge(agent.metrics, "edgewise_agent_deployed_version") == 1
    assert gauge(agent.metrics, "edgewise_agent_last_good_version") == 1
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 0  # the alias names a refused one
    assert served_default(rig.client, rig.name) == 1


def test_a_refused_rollback_creates_no_state_folder(rig: Rig) -> None:
    state_dir = rig.root / "state"
    with pytest.raises(EdgewiseError, match="records no deployed version"):
        rollback(rig.repo, rig.name, rig.client, state_dir=state_dir)
    assert not state_dir.exists()


def test_the_default_server_metrics_port_is_the_servers_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = AgentSettings(model="m", repo=tmp_path, server="edge.example:9001")
    monkeypatch.delenv("EDGEWISE_METRICS_PORT", raising=False)
    assert settings.metrics_url == "http://edge.example:8002/metrics"
    monkeypatch.setenv("EDGEWISE_METRICS_PORT", "9102")
    assert settings.metrics_url == "http://edge.example:9102/metrics"
    for off in ("0", "-1"):  # a free port or none: nothing the agent can derive
        monkeypatch.setenv("EDGEWISE_METRICS_PORT", off)
        assert settings.metrics_url is None
    explicit = AgentSettings(model="m", repo=tmp_path, server_metrics="http://x:1/metrics")
    assert explicit.metrics_url == "http://x:1/metrics"


def _watched_past_its_end(rig: Rig) -> None:
    """Poll until the watch's time is over and one more poll has judged it."""
    assert rig.agent is not None
    watch = rig.state().watch
    assert watch is not None
    seconds = rig.agent.settings.watch_seconds

    def over() -> bool:
        assert rig.agent is not None
        rig.agent.cycle()
        now = rig.state().watch
        return now is None or now.since + seconds < time.time()

    wait_for(over, 30, "the watch's time to pass")
    rig.agent.cycle()


def test_a_watch_that_cannot_see_does_not_promote(rig: Rig, tmp_path: Path) -> None:
    blind = "http://127.0.0.1:9/metrics"  # the discard port: nothing answers HTTP there
    agent = rig.start_agent(watch_seconds=0.3, server_metrics=blind)
    rig.register(0)
    agent.run_once()  # the first version has nothing to compare with: no watch
    assert rig.state().last_good is not None
    rig.register(1)
    agent.cycle()
    watch = rig.state().watch
    assert watch is not None and watch.version == 2 and watch.baseline_total is None
    _watched_past_its_end(rig)

    state = rig.state()
    assert state.last_good is not None and state.last_good.version == 1  # not promoted
    assert state.deployed is not None and state.deployed.version == 2
    assert state.watch is not None and state.watch.version == 2
    assert gauge(agent.metrics, "edgewise_agent_last_good_version") == 1
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 0
    assert agent.health == "degraded" and "cannot see" in agent.detail
    config = json.loads((rig.repo / rig.name / "config.json").read_text())
    assert config["default_version"] == 1  # a restarted server serves the last good version
    report = {r.node: r for r in rig.publisher.node_reports(rig.name)}  # type: ignore[union-attr]
    assert report["edge-1"].health == "degraded"

    # Restarted with the server's real metrics: the watch starts when it can see, then promotes.
    agent = rig.start_agent(watch_seconds=0.3)
    agent.run_once()
    watch = rig.state().watch
    assert watch is not None and watch.baseline_total is not None
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 1  # watching, and seeing
    _watched_past_its_end(rig)
    state = rig.state()
    assert state.watch is None and state.last_good is not None and state.last_good.version == 2
    assert gauge(agent.metrics, "edgewise_agent_last_good_version") == 2
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 1
    assert os.path.exists(rig.repo / rig.name / "2")


def test_state_file_reads_create_nothing(tmp_path: Path) -> None:
    state = StateFile.for_repo(tmp_path / "repo", "m").read()
    assert state.deployed is None and not (tmp_path / "repo").exists()


def test_an_agent_never_creates_the_servers_repository(tmp_path: Path) -> None:
    from edgewise.runtime.agent.sync import Agent
    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.store import open_store

    repo = tmp_path / "mnt" / "repo"  # a typo, or a volume not mounted yet
    settings = AgentSettings(model="m", repo=repo, server_metrics="http://127.0.0.1:9/metrics")
    store = open_store(f"sqlite:///{tmp_path / 'store' / 'store.db'}")
    with EdgewiseClient("127.0.0.1:9") as client:
        agent = Agent(settings, store, client)
        with pytest.raises(EdgewiseError, match="does not exist"):
            agent.run_once()
    store.close()
    assert _tree(tmp_path) == []


class _Killed(BaseException):
    """The agent's process killed at this point (no handler of the agent catches it)."""


def test_an_agent_killed_right_after_a_switch_leaves_the_last_good_version_pinned(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent switches the server to a version it is going to watch without the server
    pinning it in config.json (the agent pins a version once it is its last good one): killed
    between the switch and saving the watch, a restarted server serves the last good version."""
    agent = rig.start_agent(watch_seconds=60.0)
    rig.register(0)
    agent.run_once()
    rig.register(1)
    save = agent._save

    def killed_once_watching(state: AgentState) -> AgentState:
        if state.watch is not None:
            raise _Killed
        return save(state)

    monkeypatch.setattr(agent, "_save", killed_once_watching)
    with pytest.raises(_Killed):
        agent.cycle()
    assert served_default(rig.client, rig.name) == 2  # switched
    config = json.loads((rig.repo / rig.name / "config.json").read_text())
    assert config["default_version"] == 1
