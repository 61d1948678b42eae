"""The sync agent end to end: a real store (the embedded SQLite one and a real MLflow server), a
real edgewise server subprocess, a real agent subprocess, real requests, and faults injected for
real (a proxy that refuses, hangs or cuts connections; corrupted artifacts on disk; SIGKILL)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgewise.runtime.agent.state import StateFile
from edgewise.runtime.agent.sync import schema_changes
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.store import Store, open_store
from edgewise.runtime.store.mlflow_rest import MlflowStore
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401 (a fixture)
from tests.runtime.store.faultproxy import FaultProxy
from tests.runtime.store.helpers import (
    AgentProcess,
    Fatal,
    Traffic,
    copy_package,
    diabetes_big,
    diabetes_inputs,
    diabetes_v1,
    logreg_inputs,
    logreg_narrow,
    logreg_v1,
    logreg_v2,
    served_version,
    start_agent,
    start_empty_server,
    wait_for,
    with_batch_one_only,
    with_custom_op,
    with_wrong_golden,
)
from tests.servers import RunningServer

OK_POLLS = 'edgewise_agent_polls_total{result="ok"}'
REJECTED = 'edgewise_agent_deploys_total{result="rejected"}'


@dataclass(frozen=True)
class Packages:
    """Source packages (never registered as they are: each test copies what it needs)."""

    logreg_v1: Path
    logreg_v2: Path
    logreg_narrow: Path
    diabetes_v1: Path
    diabetes_big: Path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    root = tmp_path_factory.mktemp("packages")
    return Packages(
        logreg_v1=logreg_v1(root),
        logreg_v2=logreg_v2(root),
        logreg_narrow=logreg_narrow(root, "narrow"),
        diabetes_v1=diabetes_v1(root),
        diabetes_big=diabetes_big(root),
    )


@dataclass
class Edge:
    """One edge node: a repository folder and a server serving it."""

    repo: Path
    server: RunningServer


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    repo = tmp_path / "edge-repo"
    repo.mkdir()
    server = start_empty_server(repo, tmp_path / "server")
    yield Edge(repo, server)
    server.stop()


class Agents:
    """Starts agents for a test and stops them (before its server) at teardown."""

    def __init__(self, edge: Edge, workdir: Path) -> None:
        self.edge = edge
        self.workdir = workdir
        self.started: list[AgentProcess] = []

    def start(self, chosen: StoreUnderTest, name: str, *extra: str) -> AgentProcess:
        agent = start_agent(
            chosen.uri, name, self.edge.repo, self.edge.server, self.workdir, extra, chosen.env
        )
        self.started.append(agent)
        return agent

    def stop_all(self) -> None:
        for agent in self.started:
            agent.stop()


@pytest.fixture
def agents(edge: Edge, tmp_path: Path) -> Iterator[Agents]:
    started = Agents(edge, tmp_path / "work")
    yield started
    started.stop_all()


@dataclass
class StoreUnderTest:
    kind: str
    uri: str  # what the agent is given
    store: Store  # the publisher's side (in this process)
    env: dict[str, str]
    mlflow: MlflowServer | None = None


def _sqlite(tmp_path: Path) -> StoreUnderTest:
    path = tmp_path / "store" / "store.db"
    return StoreUnderTest("sqlite", f"sqlite:///{path}", SqliteStore(path), dict(os.environ))


def _mlflow(server: MlflowServer, url: str | None = None) -> StoreUnderTest:
    store = MlflowStore(server.url, server.username, server.password, timeout=10)
    return StoreUnderTest("mlflow", url or server.url, store, server.env(), server)


@pytest.fixture(params=["sqlite", "mlflow"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    if request.param == "sqlite":
        chosen = _sqlite(tmp_path)
    else:
        chosen = _mlflow(request.getfixturevalue("mlflow_server"))
    yield chosen
    chosen.store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[StoreUnderTest]:
    chosen = _sqlite(tmp_path)
    yield chosen
    chosen.store.close()


def unique(request: pytest.FixtureRequest, base: str) -> str:
    """A model name of its own per test (tests share one MLflow server)."""
    digest = abs(hash(request.node.nodeid)) % 10**8
    return f"{base}-{digest}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "work"


def deploy_v1(
    chosen: StoreUnderTest,
    agents: Agents,
    package: Path,
    inputs: dict[str, object],
    *extra: str,
) -> AgentProcess:
    """Publish ``package`` under alias production, start an agent, wait until it serves v1."""
    name = read_manifest(package).name
    record = register(chosen.store, package, alias="production").record
    assert record.version == 1
    agent = agents.start(chosen, name, *extra)

    def serving() -> bool:
        if not agent.alive():
            raise Fatal(f"the agent exited:\n{agent.log()}")
        return served_version(agents.edge.server, name, inputs) == "1"

    wait_for(serving, 60, "version 1 served")
    return agent


def state_of(edge: Edge, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(StateFile.for_repo(edge.repo, name).path.read_text())
    return data


# ---- the main flow -------------------------------------------------------------------------------


def test_publish_deploy_and_switch_under_load_without_failed_requests(
    any_store: StoreUnderTest,
    edge: Edge,
    agents: Agents,
    packages: Packages,
    workdir: Path,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    name = unique(request, "logreg")
    v1 = copy_package(packages.logreg_v1, workdir / "pkgs", name)
    v2 = copy_package(packages.logreg_v2, workdir / "pkgs", name)
    inputs = logreg_inputs(v1)
    agent = deploy_v1(any_store, agents, v1, inputs)

    traffic = Traffic(edge.server.target, name, inputs)
    traffic.start()
    try:
        wait_for(lambda: len(traffic.answers) >= 20, 30, "traffic on version 1")
        record = register(any_store.store, v2).record
        assert record.version == 2
        moved = time.monotonic()
        any_store.store.set_alias(name, "production", record.version)
        first_v2 = wait_for(lambda: traffic.first("2"), 60, "an answer from version 2")
        count = len(traffic.answers)
        wait_for(lambda: len(traffic.answers) >= count + 50, 30, "more traffic on version 2")
    finally:
        traffic.stop()
    seconds = first_v2 - moved
    record_property("alias_move_to_v2_serving_seconds", round(seconds, 3))
    print(f"\n[{any_store.kind}] alias move -> v2 serving: {seconds:.2f} s")

    assert traffic.failures == [], traffic.failures[:3]
    versions = traffic.versions()
    switch = versions.index("2")
    assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}

    wait_for(lambda: agent.metric("edgewise_agent_last_good_version") == 2, 30, "v2 the last good")
    config = json.loads((edge.repo / name / "config.json").read_text())
    assert config == {"version_policy": {"specific": [2]}, "default_version": 2}
    with edge.server.client() as client:
        served = {(s.version, s.state, s.is_default) for s in client.repository_index()}
    # Version 1 was unloaded after the watch, and stays on disk (keep 3) for a rollback.
    assert served == {("2", "READY", True), ("1", "UNAVAILABLE", False)}, served
    assert sorted(p.name for p in (edge.repo / name).iterdir()) == ["1", "2", "config.json"]

    reports = wait_for(
        lambda: [
            r for r in any_store.store.node_reports(name) if r.version == 2 and r.health == "ok"
        ],
        30,
        "a report of version 2",
    )
    assert reports[0].node == "edge-test-1" and reports[0].target_version == 2
    assert reports[0].sha256 == record.model_sha256

    # A restart resumes from the state file and downloads nothing it already has.
    downloaded = agent.metric("edgewise_agent_download_bytes_total")
    assert downloaded >= record.total_bytes
    assert agent.stop() == 0
    again = agents.start(any_store, name)
    try:
        wait_for(lambda: again.metric(OK_POLLS) >= 3, 30, "polls after the restart")
        assert again.metric("edgewise_agent_download_bytes_total") == 0
        assert again.metric("edgewise_agent_deployed_version") == 2
        assert served_version(edge.server, name, inputs) == "2"
    finally:
        assert again.stop() == 0
    assert "Traceback" not in agent.log() + again.log()


# ---- faults: the store ---------------------------------------------------------------------------


def _delays(log: str) -> list[tuple[int, float]]:
    found = re.findall(r"failure (\d+) in a row; next try in ([0-9.]+) s", log)
    return [(int(n), float(d)) for n, d in found]


def test_store_down_slow_or_failing_keeps_v1_serving_with_backoff(
    mlflow_server: MlflowServer,  # noqa: F811
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
    request: pytest.FixtureRequest,
) -> None:
    name = unique(request, "logreg")
    v1 = copy_package(packages.logreg_v1, workdir / "pkgs", name)
    v2 = copy_package(packages.logreg_v2, workdir / "pkgs", name)
    inputs = logreg_inputs(v1)
    with FaultProxy(("127.0.0.1", mlflow_server.port)) as proxy:
        chosen = _mlflow(mlflow_server, url=proxy.url)  # the agent goes through the proxy
        agent = deploy_v1(chosen, agents, v1, inputs)
        unavailable = 'edgewise_agent_polls_total{result="store_unavailable"}'

        proxy.down()  # connection refused
        register(chosen.store, v2, alias="production")  # straight to MLflow
        wait_for(lambda: agent.metric(unavailable) >= 3, 30, "failed polls while down")
        assert agent.metric("edgewise_agent_store_up") == 0
        assert served_version(edge.server, name, inputs) == "1"

        proxy.start()
        proxy.set_mode("hang")  # accepts, never answers: the agent's 2 s timeout
        before = agent.metric(unavailable)
        wait_for(lambda: agent.metric(unavailable) >= before + 2, 30, "timeouts while slow")
        proxy.set_mode("error")  # 503s
        before = agent.metric(unavailable)
        wait_for(lambda: agent.metric(unavailable) >= before + 2, 30, "failed polls on 503")
        assert served_version(edge.server, name, inputs) == "1"
        assert agent.alive()

        proxy.set_mode("pass")
        wait_for(lambda: served_version(edge.server, name, inputs) == "2", 60, "v2 after recovery")
        assert agent.metric("edgewise_agent_store_up") == 1

    log = agent.log()
    assert "cannot connect" in log and "timed out" in log and "HTTP 503" in log
    # Exponential backoff with jitter: failure n waits in [b/2, b] with b = min(1 * 2^(n-1), max).
    delays = _delays(log)
    assert delays, log
    for count, delay in delays:
        bound = min(1.0 * 2 ** (count - 1), 1.5)
        assert bound / 2 - 1e-6 <= delay <= bound + 1e-6, (count, delay)
    assert {count for count, _ in delays} >= {1, 2, 3}


def test_store_answering_garbage_resetting_or_slowly_never_stops_the_agent(
    mlflow_server: MlflowServer,  # noqa: F811
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
    request: pytest.FixtureRequest,
) -> None:
    name = unique(request, "logreg")
    v1 = copy_package(packages.logreg_v1, workdir / "pkgs", name)
    v2 = copy_package(packages.logreg_v2, workdir / "pkgs", name)
    inputs = logreg_inputs(v1)

    def failed_polls(agent: AgentProcess) -> float:
        return sum(
            value
            for key, value in agent.metrics().items()
            if key.startswith("edgewise_agent_polls_total") and 'result="ok"' not in key
        )

    with FaultProxy(("127.0.0.1", mlflow_server.port)) as proxy:
        chosen = _mlflow(mlflow_server, url=proxy.url)  # the agent goes through the proxy
        agent = deploy_v1(chosen, agents, v1, inputs)
        register(chosen.store, v2, alias="production")  # straight to MLflow
        # 200 answers that are not JSON, JSON of the wrong shape, or empty; then connections
        # reset without an answer. Each is a failed poll with backoff, never a dead agent.
        for mode, polls in (("garbage", 2 * len(proxy.state.garbage)), ("reset", 3)):
            before = failed_polls(agent)
            proxy.set_mode(mode)
            wait_for(lambda: failed_polls(agent) >= before + polls, 60, f"{mode} polls")  # noqa: B023
            assert agent.alive(), agent.log()
            assert served_version(edge.server, name, inputs) == "1"
        assert proxy.state.served_garbage >= 2 * len(proxy.state.garbage)
        assert any(e.fault == "reset" for e in proxy.requests())
        # Slow but within the agent's 2 s timeout: the deployment goes through.
        proxy.state.delay = 0.5
        proxy.set_mode("slow")
        wait_for(lambda: served_version(edge.server, name, inputs) == "2", 120, "v2, slowly")
        assert agent.alive()
    log = agent.log()
    assert "unexpected error in a poll" not in log, log  # garbage is a store error, not a bug
    for line in ("did not answer JSON", "not a JSON object", "unexpected answer"):
        assert line in log, line
    assert "closed connection without response" in log or "reset" in log.lower()


@pytest.mark.serial  # timing-bound: a download cut and resumed within the wait
def test_connection_dropped_mid_download_resumes_with_range(
    mlflow_server: MlflowServer,  # noqa: F811
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    name = unique(request, "diabetes")
    v1 = copy_package(packages.diabetes_v1, workdir / "pkgs", name)
    v2 = copy_package(packages.diabetes_big, workdir / "pkgs", name)
    size = (v2 / "model.onnx").stat().st_size
    inputs = diabetes_inputs(v1)
    with FaultProxy(("127.0.0.1", mlflow_server.port)) as proxy:
        chosen = _mlflow(mlflow_server, url=proxy.url)
        deploy_v1(chosen, agents, v1, inputs)
        traffic = Traffic(edge.server.target, name, inputs)
        traffic.start()
        try:
            cut_at = size // 3
            record = register(chosen.store, v2).record
            where = record.location.removeprefix("mlflow-artifacts:/")
            proxy.cut(f"{where}/model.onnx", after=cut_at, kind="drop")
            started = time.monotonic()
            chosen.store.set_alias(name, "production", record.version)
            wait_for(lambda: traffic.first("2"), 60, "v2 served after the resumed download")
            elapsed = time.monotonic() - started
        finally:
            traffic.stop()
        downloads = [r for r in proxy.requests(f"{where}/model.onnx") if r.method == "GET"]
    assert traffic.failures == []
    assert len(downloads) == 2, downloads
    first, second = downloads
    assert first.range is None and first.fault == "drop" and first.body_bytes == cut_at
    assert second.range is not None and second.range.startswith("bytes=")
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert resumed_at == cut_at  # what arrived before the cut is kept
    assert second.body_bytes == size - resumed_at  # and not fetched again
    record_property("big_model_bytes", size)
    record_property("register_to_v2_serving_seconds_with_one_drop", round(elapsed, 3))


def test_agent_killed_mid_download_resumes_after_restart(
    mlflow_server: MlflowServer,  # noqa: F811
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
    request: pytest.FixtureRequest,
) -> None:
    name = unique(request, "diabetes")
    v1 = copy_package(packages.diabetes_v1, workdir / "pkgs", name)
    v2 = copy_package(packages.diabetes_big, workdir / "pkgs", name)
    size = (v2 / "model.onnx").stat().st_size
    inputs = diabetes_inputs(v1)
    with FaultProxy(("127.0.0.1", mlflow_server.port)) as proxy:
        chosen = _mlflow(mlflow_server, url=proxy.url)
        agent = deploy_v1(chosen, agents, v1, inputs, "--store-timeout", "60")
        stall_at = size // 2
        record = register(chosen.store, v2).record
        where = record.location.removeprefix("mlflow-artifacts:/")
        proxy.cut(f"{where}/model.onnx", after=stall_at, kind="stall")
        chosen.store.set_alias(name, "production", record.version)
        incoming = edge.repo / name / f".incoming-2-{record.model_sha256[:12]}"
        part = incoming / "model.onnx.part"
        wait_for(lambda: part.exists() and part.stat().st_size > 0, 60, "a partial download")
        agent.kill()  # SIGKILL mid-download: no cleanup at all
        kept = part.stat().st_size
        assert 0 < kept <= stall_at
        assert served_version(edge.server, name, inputs) == "1"
        proxy.release()

        again = agents.start(chosen, name)
        wait_for(lambda: served_version(edge.server, name, inputs) == "2", 60, "v2 after restart")
        downloads = [r for r in proxy.requests(f"{where}/model.onnx") if r.method == "GET"]
    assert len(downloads) == 2, downloads
    assert downloads[-1].range == f"bytes={kept}-", downloads
    assert downloads[-1].body_bytes == size - kept
    assert "resumed at byte" in again.log()
    assert not incoming.exists()


# ---- faults: the package -------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for index in range(0, len(data), 97):
        data[index] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_corrupted_artifact_is_refused(
    any_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
    request: pytest.FixtureRequest,
) -> None:
    name = unique(request, "logreg")
    v1 = copy_package(packages.logreg_v1, workdir / "pkgs", name)
    v2 = copy_package(packages.logreg_v2, workdir / "pkgs", name)
    inputs = logreg_inputs(v1)
    agent = deploy_v1(any_store, agents, v1, inputs)
    record = register(any_store.store, v2).record
    if isinstance(any_store.store, SqliteStore):
        stored = any_store.store.artifact_path(record.model_sha256)
    else:
        assert any_store.mlflow is not None
        relative = record.location.removeprefix("mlflow-artifacts:/")
        stored = any_store.mlflow.artifacts / relative / "model.onnx"
    _corrupt(stored)  # the same size, other bytes: only the sha256 tells
    any_store.store.set_alias(name, "production", 2)

    wait_for(lambda: agent.metric(REJECTED) >= 1, 60, "the corrupted version refused")
    polls = agent.metric(OK_POLLS)
    wait_for(lambda: agent.metric(OK_POLLS) >= polls + 3, 30, "the agent polling on")
    assert served_version(edge.server, name, inputs) == "1"
    assert agent.metric("edgewise_agent_healthy") == 0  # degraded: the alias is not served
    state = state_of(edge, name)
    (rejected,) = state["rejected"]  # type: ignore[misc]
    assert rejected["version"] == 2 and "sha256" in rejected["reason"]
    assert rejected["retry_at"] is not None  # a corrupted download is tried again later
    assert not (edge.repo / name / "2").exists()
    assert not list((edge.repo / name).glob(".incoming-*/*.part"))
    report = wait_for(
        lambda: [r for r in any_store.store.node_reports(name) if r.health == "degraded"],
        30,
        "a degraded report",
    )[0]
    assert report.version == 1 and report.target_version == 2 and "sha256" in report.detail


@pytest.mark.parametrize("where", ["agent", "server"])
def test_model_that_fails_to_load_is_refused(
    where: str,
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
) -> None:
    v1 = packages.logreg_v1
    broken = with_custom_op(packages.logreg_v2, workdir / "pkgs")
    extra = ("--no-local-load",) if where == "server" else ()
    agent = deploy_v1(sqlite_store, agents, v1, logreg_inputs(v1), *extra)
    register(sqlite_store.store, broken, alias="production")
    wait_for(lambda: agent.metric(REJECTED) >= 1, 60, "the broken version refused")
    assert served_version(edge.server, "logreg", logreg_inputs(v1)) == "1"
    (rejected,) = state_of(edge, "logreg")["rejected"]  # type: ignore[misc]
    expected = "onnxruntime cannot load it" if where == "agent" else "server could not load it"
    assert expected in rejected["reason"], rejected
    assert "Mystery" in rejected["reason"]
    assert not (edge.repo / "logreg" / "2").exists()
    config = json.loads((edge.repo / "logreg" / "config.json").read_text())
    assert config["default_version"] == 1 and config["version_policy"] == {"specific": [1]}
    assert agent.alive()


@pytest.mark.parametrize("where", ["agent", "server"])
def test_golden_outputs_that_differ_are_refused(
    where: str,
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
) -> None:
    v1 = packages.logreg_v1
    wrong = with_wrong_golden(packages.logreg_v2, workdir / "pkgs")
    extra = ("--no-local-load",) if where == "server" else ()
    agent = deploy_v1(sqlite_store, agents, v1, logreg_inputs(v1), *extra)
    register(sqlite_store.store, wrong, alias="production")
    wait_for(lambda: agent.metric(REJECTED) >= 1, 60, "the version refused")
    (rejected,) = state_of(edge, "logreg")["rejected"]  # type: ignore[misc]
    assert "golden request 0" in rejected["reason"] and "differ" in rejected["reason"]
    if where == "server":
        assert "on the server" in rejected["reason"]
    assert served_version(edge.server, "logreg", logreg_inputs(v1)) == "1"
    with edge.server.client() as client:
        loaded = {s.version for s in client.repository_index() if s.state == "READY"}
    assert loaded == {"1"}  # the refused version was unloaded again


def test_incompatible_schema_is_refused_unless_the_package_allows_it(
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
) -> None:
    v1 = packages.logreg_v1
    narrow = copy_package(packages.logreg_narrow, workdir / "pkgs", "logreg")
    agent = deploy_v1(sqlite_store, agents, v1, logreg_inputs(v1))
    register(sqlite_store.store, narrow, alias="production")
    wait_for(lambda: agent.metric(REJECTED) >= 1, 60, "the incompatible version refused")
    (rejected,) = state_of(edge, "logreg")["rejected"]  # type: ignore[misc]
    assert "input schema is not compatible" in rejected["reason"]
    assert "input 'features' changed from FP32 [-1, 30] to FP32 [-1, 10]" in rejected["reason"]
    assert served_version(edge.server, "logreg", logreg_inputs(v1)) == "1"

    register(sqlite_store.store, narrow, alias="production", allow_schema_change=True)
    wait_for(
        lambda: served_version(edge.server, "logreg", logreg_inputs(narrow)) == "3",
        60,
        "the version that allows the change deployed",
    )


def test_error_rate_after_the_switch_rolls_back(
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
) -> None:
    v1 = packages.logreg_v1
    rows = [logreg_inputs(v1, 1, start) for start in (0, 50, 100)]
    fragile = with_batch_one_only(packages.logreg_v2, workdir / "pkgs", rows)
    agent = deploy_v1(
        sqlite_store, agents, v1, logreg_inputs(v1), "--watch-seconds", "20", "--min-requests", "10"
    )
    traffic = Traffic(edge.server.target, "logreg", logreg_inputs(v1, rows=4))
    traffic.start()
    try:
        wait_for(lambda: len(traffic.answers) >= 20, 30, "batch traffic on v1")
        register(sqlite_store.store, fragile, alias="production")
        wait_for(
            lambda: agent.metric('edgewise_agent_rollbacks_total{reason="error_rate"}') == 1,
            60,
            "a rollback on the error rate",
        )
        rolled_back = time.monotonic()
        back = wait_for(lambda: traffic.first("1", after=rolled_back), 30, "v1 answering again")
        count = len(traffic.answers)
        wait_for(lambda: len(traffic.answers) >= count + 20, 30, "traffic after the rollback")
    finally:
        traffic.stop()
    assert traffic.failures, "the fragile version should have failed batch requests"
    after = [a for a in traffic.answers if a.at >= back]
    assert len(after) >= 20 and all(a.version == "1" and not a.error for a in after)
    state = state_of(edge, "logreg")
    assert state["deployed"]["version"] == 1  # type: ignore[index]
    (rejected,) = state["rejected"]  # type: ignore[misc]
    assert rejected["version"] == 2 and "error rate" in rejected["reason"]
    config = json.loads((edge.repo / "logreg" / "config.json").read_text())
    assert config["default_version"] == 1


# ---- rollback by hand, path traversal, one agent per model ---------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_busy_metrics_port_is_one_line_naming_it(tmp_path: Path) -> None:
    """The agent refuses a busy metrics port as the server does (one line naming the address,
    exit 1), before it polls anything."""
    store = f"sqlite:///{tmp_path / 'store' / 'store.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli(
            "agent", "--model", "m", "--repo", str(tmp_path), "--store", store, "--once",
            "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"edgewise agent: error: cannot bind the metrics port 127.0.0.1:{port}: "
        "the address is already in use"
    ]


def test_rollback_by_hand(
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
) -> None:
    v1, v2 = packages.logreg_v1, packages.logreg_v2
    inputs = logreg_inputs(v1)
    agent = deploy_v1(sqlite_store, agents, v1, inputs)
    register(sqlite_store.store, v2, alias="production")
    wait_for(lambda: agent.metric("edgewise_agent_last_good_version") == 2, 60, "v2 deployed")

    done = _cli("rollback", "logreg", "--repo", str(edge.repo), "--server", edge.server.target)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "logreg: rolled back from version 2 to version 1"
    assert served_version(edge.server, "logreg", inputs) == "1"
    polls = agent.metric(OK_POLLS)
    wait_for(lambda: agent.metric(OK_POLLS) >= polls + 4, 30, "polls after the rollback")
    assert served_version(edge.server, "logreg", inputs) == "1"  # the agent keeps it there
    config = json.loads((edge.repo / "logreg" / "config.json").read_text())
    assert config["default_version"] == 1

    # Nothing earlier than version 1 to go back to: one line, no traceback.
    again = _cli("rollback", "logreg", "--repo", str(edge.repo), "--server", edge.server.target)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        "edgewise rollback: error: model 'logreg': no earlier good version to roll back to"
    ]

    # The alias moving on deploys again.
    register(sqlite_store.store, v2, alias="production")
    wait_for(lambda: served_version(edge.server, "logreg", inputs) == "3", 60, "v3 deployed")


def test_a_restarted_server_serves_the_pinned_version(
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    tmp_path: Path,
) -> None:
    v1, v2 = packages.logreg_v1, packages.logreg_v2
    inputs = logreg_inputs(v1)
    agent = deploy_v1(sqlite_store, agents, v1, inputs)
    register(sqlite_store.store, v2, alias="production")
    wait_for(lambda: agent.metric("edgewise_agent_last_good_version") == 2, 60, "v2 deployed")
    done = _cli("rollback", "logreg", "--repo", str(edge.repo), "--server", edge.server.target)
    assert done.returncode == 0, done.stderr
    assert agent.stop() == 0
    edge.server.stop()
    # Version 2 is on disk and is the highest, but version 1 is pinned: a new server serves it.
    assert sorted(p.name for p in (edge.repo / "logreg").iterdir()) == ["1", "2", "config.json"]
    restarted = start_empty_server(edge.repo, tmp_path / "restarted")
    try:
        with restarted.client() as client:
            wait_for(lambda: client.model_ready("logreg"), 60, "the model ready")
            served = {(s.version, s.state, s.is_default) for s in client.repository_index()}
        assert ("1", "READY", True) in served and ("2", "READY", False) not in served
        assert served_version(restarted, "logreg", inputs) == "1"
    finally:
        restarted.stop()


def test_path_traversal_and_links_are_refused(
    sqlite_store: StoreUnderTest,
    agents: Agents,
    edge: Edge,
    packages: Packages,
    workdir: Path,
    tmp_path: Path,
) -> None:
    for args in (
        ["agent", "--model", "../evil", "--repo", str(edge.repo), "--store", sqlite_store.uri],
        ["rollback", "../evil", "--repo", str(edge.repo)],
        ["models", "show", "a/../../b", "--store", sqlite_store.uri],
        [
            "register",
            str(packages.logreg_v1.parent.parent / ".." / "1"),
            "--store",
            sqlite_store.uri,
        ],
    ):
        done = _cli(*args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in done.stderr, lines

    v1 = packages.logreg_v1
    inputs = logreg_inputs(v1)
    agent = deploy_v1(sqlite_store, agents, v1, inputs)

    # A record whose file list leaves the package folder (a tampered store).
    record = register(sqlite_store.store, packages.logreg_v2).record
    files = [f.to_json() for f in record.files] + [
        {"path": "../../outside.txt", "sha256": record.model_sha256, "size": 10}
    ]
    database = sqlite3.connect(sqlite_store.uri.removeprefix("sqlite:///"))
    with database:
        database.execute(
            "UPDATE versions SET files = ? WHERE name = 'logreg' AND version = 2",
            (json.dumps(files),),
        )
    database.close()
    sqlite_store.store.set_alias("logreg", "production", 2)
    wait_for(lambda: "not a safe relative path" in agent.log(), 30, "the unsafe path refused")
    assert not (edge.repo.parent / "outside.txt").exists()
    assert not (edge.repo / "outside.txt").exists()
    assert served_version(edge.server, "logreg", inputs) == "1"

    # A symbolic link planted where the download would go.
    outside = tmp_path / "outside"
    outside.mkdir()
    record = register(sqlite_store.store, packages.logreg_v2).record
    link = edge.repo / "logreg" / f".incoming-3-{record.model_sha256[:12]}"
    link.symlink_to(outside, target_is_directory=True)
    sqlite_store.store.set_alias("logreg", "production", 3)
    wait_for(lambda: agent.metric(REJECTED) >= 1, 30, "the link refused")
    assert list(outside.iterdir()) == []
    (rejected,) = state_of(edge, "logreg")["rejected"]  # type: ignore[misc]
    assert "symbolic link" in rejected["reason"]
    assert served_version(edge.server, "logreg", inputs) == "1"


def test_a_second_agent_for_the_same_model_refuses_to_start(
    sqlite_store: StoreUnderTest, agents: Agents, edge: Edge, packages: Packages, tmp_path: Path
) -> None:
    agent = deploy_v1(sqlite_store, agents, packages.logreg_v1, logreg_inputs(packages.logreg_v1))
    # The same command line (argparse keeps the last of a repeated option): no metrics port.
    done = _cli(*agent.command[3:], "--metrics-port", "-1", "--port-file", str(tmp_path / "p"))
    assert done.returncode == 1
    assert "another agent already runs for model 'logreg'" in done.stderr
    assert agent.alive()


def test_a_version_over_the_download_cap_is_refused(
    sqlite_store: StoreUnderTest, agents: Agents, edge: Edge, packages: Packages
) -> None:
    record = register(sqlite_store.store, packages.logreg_v1, alias="production").record
    agent = agents.start(sqlite_store, "logreg", "--max-bytes", "50000")
    wait_for(lambda: agent.metric(REJECTED) >= 1, 60, "the version refused")
    (rejected,) = state_of(edge, "logreg")["rejected"]  # type: ignore[misc]
    assert rejected["reason"] == (
        f"logreg version 1 is {record.total_bytes} bytes, over the download cap of 50000 bytes"
    )
    assert agent.metric("edgewise_agent_download_bytes_total") == 0
    assert not (edge.repo / "logreg" / "1").exists()


# ---- units ---------------------------------------------------------------------------------------


def test_schema_changes(packages: Packages) -> None:
    v1 = read_manifest(packages.logreg_v1)
    assert schema_changes(v1, read_manifest(packages.logreg_v2)) == []
    problems = schema_changes(v1, read_manifest(packages.logreg_narrow))
    assert "input 'features' changed from FP32 [-1, 30] to FP32 [-1, 10]" in problems
    assert "feature 'worst symmetry' removed" in problems
    other = read_manifest(packages.diabetes_v1)
    assert "input 'features' changed from FP32 [-1, 30] to FP32 [-1, 10]" in schema_changes(
        v1, other
    )
    assert schema_changes(other, other) == []


def test_backoff_is_exponential_with_jitter_and_capped(tmp_path: Path) -> None:
    from edgewise.runtime.agent.sync import Agent, AgentSettings
    from edgewise.runtime.client.client import EdgewiseClient

    settings = AgentSettings(model="m", repo=tmp_path, backoff_initial=1.0, backoff_max=60.0)
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    with EdgewiseClient("127.0.0.1:1") as client:
        agent = Agent(settings, store, client, rng=random.Random(7))
        for failures in range(1, 12):
            agent.failures = failures
            bound = min(2.0 ** (failures - 1), 60.0)
            delays = [agent.backoff_delay() for _ in range(200)]
            assert all(bound / 2 <= d <= bound for d in delays)
            assert max(delays) - min(delays) > bound / 4  # jittered, not fixed
        polls = [agent.poll_delay() for _ in range(200)]
        assert all(24.0 <= d <= 36.0 for d in polls) and max(polls) - min(polls) > 5
    store.close()


def test_settings_are_validated(tmp_path: Path) -> None:
    from edgewise.runtime.agent.sync import AgentSettings
    from edgewise.runtime.errors import InvalidInput

    for bad in (
        {"model": "../x"},
        {"alias": "latest"},
        {"node_id": "a/b"},
        {"interval": 0},
        {"jitter": 1.5},
        {"keep": 0},
        {"max_error_rate": 2},
    ):
        with pytest.raises(InvalidInput):
            AgentSettings(**{"model": "m", "repo": tmp_path, **bad})  # type: ignore[arg-type]
