"""An agent in the test's own process over a real store, a real server and real packages: each
test (or each example of a state machine) gets a model name of its own on one shared server, so
only the packages and the server are built once per module."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from edgewise.runtime.agent.state import AgentState, StateFile
from edgewise.runtime.agent.sync import Agent, AgentMetrics, AgentSettings
from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.store import Store, open_store
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.store.helpers import copy_package, logreg_v1, logreg_v2, start_empty_server
from tests.servers import RunningServer

_names = itertools.count(1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The two packages a rig's model is published from (version 1, then 2)."""
    root = tmp_path_factory.mktemp("sources")
    return logreg_v1(root), logreg_v2(root)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, RunningServer]]:
    """The edge node: an empty model repository and the server over it, one per test module."""
    repo = tmp_path_factory.mktemp("edge-repo")
    server = start_empty_server(repo, tmp_path_factory.mktemp("server"))
    yield repo, server
    server.stop()


def ready_versions(rig: Rig) -> list[str]:
    """The versions of the rig's model the server reports READY, sorted."""
    return sorted(
        s.version
        for s in rig.client.repository_index()
        if s.name == rig.name and s.state == "READY"
    )


def gauge(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def served_default(client: EdgewiseClient, model: str) -> int | None:
    """The version the server answers a request without a version with (None: none ready)."""
    for status in client.repository_index():
        if status.name == model and status.is_default and status.state == "READY":
            return int(status.version)
    return None


@dataclass
class Rig:
    """One model on the shared server: its store folder, its packages, the agent of the moment."""

    server: RunningServer
    repo: Path
    root: Path
    sources: tuple[Path, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    name: str = field(default_factory=lambda: f"m{next(_names)}")
    publisher: SqliteStore | None = None
    agent: Agent | None = None
    reader: Store | None = None
    registered: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        packages = self.root / "packages"
        # Renamed copies of the sources (one folder per source: copy_package numbers them).
        self.packages = [
            copy_package(source, packages / str(index), self.name)
            for index, source in enumerate(self.sources)
        ]
        self.client = EdgewiseClient(self.server.target)

    @property
    def store_folder(self) -> Path:
        return self.root / "store"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.store_folder / 'store.db'}"

    @property
    def state_file(self) -> StateFile:
        return StateFile.for_repo(self.repo, self.name)

    def state(self) -> AgentState:
        return self.state_file.read()

    def register(self, which: int) -> int:
        """Publish package ``which`` under alias production (creating the store if needed)."""
        if self.publisher is None:
            self.publisher = SqliteStore(self.store_folder / "store.db")
        record = register(self.publisher, self.packages[which], alias="production").record
        self.registered = record.version
        return record.version

    def start_agent(self, **overrides: Any) -> Agent:
        """A new agent (a restarted process: its own store connection and metrics)."""
        self.stop_agent()
        settings = AgentSettings(
            model=self.name,
            repo=self.repo,
            server=self.server.target,
            server_metrics=self.server.metrics_url,
            node_id="edge-1",
            interval=0.1,
            backoff_initial=0.01,
            backoff_max=0.05,
            keep=100,
            watch_seconds=0.0,
            local_load=False,
            load_timeout=30.0,
        )
        settings = replace(settings, **{**self.settings, **overrides})
        self.reader = open_store(self.store_uri)
        self.agent = Agent(settings, self.reader, self.client, AgentMetrics())
        return self.agent

    def stop_agent(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.agent = self.reader = None

    def close(self) -> None:
        self.stop_agent()
        if self.publisher is not None:
            self.publisher.close()
        for status in self.client.repository_index():
            if status.name == self.name and status.state == "READY":
                self.client.unload_model(self.name, status.version)
        self.client.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def rig(
    edge: tuple[Path, RunningServer], sources: tuple[Path, Path], tmp_path: Path
) -> Iterator[Rig]:
    """A rig on the module's edge node, its model published from ``sources``; closed after."""
    repo, server = edge
    made = Rig(server, repo, tmp_path / "rig", sources)
    yield made
    made.close()


def run_rig_machine(
    machine: Any,
    edge: tuple[Path, RunningServer],
    sources: tuple[Path, Path],
    tmp_path: Path,
    *,
    max_examples: int,
    steps: int,
) -> None:
    """Run a hypothesis state machine whose examples each get a rig of their own (its
    ``rig_factory``) on the module's edge node."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    repo, server = edge
    count = itertools.count()

    def make() -> Rig:
        return Rig(server, repo, tmp_path / f"example-{next(count)}", sources)

    machine.rig_factory = staticmethod(make)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
