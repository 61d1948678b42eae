"""Fast checks of the agent's rollout edges with a recording client (no server): a stop in the
middle of a step, the routes left after a failure past the steps, the labels after a rollback."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgewise.runtime.agent.policy import parse_policy
from edgewise.runtime.agent.progressive import Progressive, RolloutStopped


class Recorder:
    """Stands for the server's client and the store: records the rollout calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.tags: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **_: Any) -> None:
            self.calls.append((name, args))

        return call

    def set_model_tag(self, model: str, key: str, value: str) -> None:
        self.tags[key] = value


def _policy() -> Any:
    return parse_policy({"steps": [{"mode": "shadow", "seconds": 30}]})


def test_a_stop_in_a_step_records_no_verdict_and_withdraws() -> None:
    recorder = Recorder()
    stop = threading.Event()
    stop.set()
    progressive = Progressive(
        recorder,  # type: ignore[arg-type]
        recorder,  # type: ignore[arg-type]
        "m",
        "production",
        "node",
        lambda: None,
        CollectorRegistry(),
        stop.wait,
    )
    with pytest.raises(RolloutStopped):
        progressive.run(_policy(), 1, 2)
    assert recorder.tags == {}  # no verdict
    assert recorder.calls[-3:] == [
        ("set_traffic_split", ("m", [])),
        ("set_shadow", ("m", "")),
        ("set_version_label", ("m", "canary", "1")),
    ]


def test_the_agent_hands_progressive_the_event_run_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgewise.runtime.agent.sync import Agent, AgentSettings
    from edgewise.runtime.store import open_store

    repo = tmp_path / "repo"
    repo.mkdir()
    settings = AgentSettings(model="m", repo=repo, state_dir=tmp_path / "state")
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    agent = Agent(settings, store, Recorder())  # type: ignore[arg-type]
    monkeypatch.setattr(agent, "_startup", lambda: None)
    stop = threading.Event()
    stop.set()  # SIGTERM in the CLI
    agent.run(stop)
    assert agent.progressive.wait(0.0) is True
    store.close()


class Served(Recorder):
    """A recording client whose rollout has the labels ``finish`` leaves (both on version 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = {"stable": "2", "canary": "2", "beta": "2"}

    def get_rollout(self, model: str) -> Any:
        return type("Rollout", (), {"labels": dict(self.labels)})()

    def set_version_label(self, model: str, label: str, version: str) -> None:
        self.labels[label] = version


def test_a_rollback_points_stable_and_canary_at_the_version_it_went_back_to(
    tmp_path: Path,
) -> None:
    from edgewise.runtime.agent.state import AgentState, Deployed, StateFile
    from edgewise.runtime.agent.sync import rollback_locked

    client = Served()
    state_file = StateFile.for_repo(tmp_path / "repo", "m", tmp_path / "state")
    state = AgentState(
        model="m",
        deployed=Deployed(2, "b", "t"),
        good=(Deployed(1, "a", "t"), Deployed(2, "b", "t")),
    )
    with state_file.locked():
        after = rollback_locked(
            client,  # type: ignore[arg-type]
            state_file,
            tmp_path / "repo" / "m",
            state,
            2,
            1,
            "watched",
        )
    assert after.deployed is not None and after.deployed.version == 1
    assert ("unload_model", ("m", "2")) in client.calls
    assert client.labels == {"stable": "1", "canary": "1", "beta": "2"}
