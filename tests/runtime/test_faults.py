"""Faults, for real: a server killed with SIGKILL comes back with the same models; a model
repository that turns read-only or fills up leaves the server serving what it has, and an agent
that cannot write there keeps trying (and succeeds once space is back).

The read-only and full filesystems are small tmpfs mounts in a private mount namespace
(``unshare -m``), entered with ``nsenter``: the host's mounts are untouched. They need root;
without it those tests are skipped with that reason (and fail under CI: tests/prerequisites.py).
(The agent against a slow, garbage-answering or connection-resetting store is in test_agent.py,
beside its MLflow server.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.package.model_config import ModelConfig, VersionPolicy, write_model_config
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.prerequisites import requires
from tests.runtime.store.helpers import (
    AgentProcess,
    logreg_inputs,
    logreg_v2,
    served_version,
    start_agent,
    wait_for,
)
from tests.servers import RunningServer, start_server

NEEDS_NAMESPACES = requires(  # skipped with the reason; failed under CI
    "mounting a read-only or full filesystem needs root and util-linux unshare/nsenter"
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter")
    else None
)


def state(server: RunningServer) -> dict[tuple[str, str], tuple[str, bool]]:
    with server.client() as client:
        return {(s.name, s.version): (s.state, s.is_default) for s in client.repository_index()}


def answers(server: RunningServer, repo: Path) -> dict[str, list[float]]:
    inputs = {k: np.asarray(v) for k, v in logreg_inputs(repo / "logreg" / "1", rows=3).items()}
    with server.client() as client:
        return {
            version: client.infer("logreg", inputs, version=version)
            .outputs["probabilities"]
            .ravel()
            .tolist()
            for version in ("", "1", "2")
        }


# ---- SIGKILL -------------------------------------------------------------------------------------


def test_a_server_killed_with_sigkill_comes_back_with_the_same_models(
    model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    shutil.copytree(model_repo / "forest", repo / "forest")
    logreg_v2(tmp_path / "sources")
    shutil.copytree(tmp_path / "sources" / "logreg" / "1", repo / "logreg" / "2")
    # Pinned as an agent pins it: both versions served, version 1 the default.
    write_model_config(repo / "logreg", ModelConfig(VersionPolicy(latest=None, specific=(1, 2)), 1))
    server = start_server(repo, tmp_path / "first", ["--monitoring", "off"])
    before_state, before_answers = state(server), answers(server, repo)
    assert before_state[("logreg", "1")] == ("READY", True)
    assert before_state[("logreg", "2")] == ("READY", False)
    server.process.send_signal(signal.SIGKILL)
    assert server.process.wait(timeout=30) == -signal.SIGKILL
    # What a crash mid-work leaves behind: a half-written package being staged, a half
    # downloaded one, a temporary config file.
    staging = repo / "logreg" / ".staging-0123456789abcdef"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"\x08\x07half")
    (repo / "logreg" / ".incoming-3-0123456789ab").mkdir()
    (repo / "logreg" / ".config.json.1234.tmp").write_text("{")
    restarted = start_server(repo, tmp_path / "second", ["--monitoring", "off"])
    try:
        assert state(restarted) == before_state
        assert answers(restarted, repo) == before_answers
    finally:
        assert restarted.stop() == 0, restarted.log()


# ---- read-only and full filesystems --------------------------------------------------------------


class MountNamespace:
    """A private mount namespace, held open by a sleeping process; commands enter it."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "900"]
        )
        ours = os.readlink("/proc/self/ns/mnt")
        wait_for(
            lambda: os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != ours, 10, "the namespace"
        )
        self.prefix = ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *command], check=check, capture_output=True, text=True, timeout=60
        )

    def tmpfs(self, where: Path, size: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def namespace() -> Iterator[MountNamespace]:
    space = MountNamespace()
    yield space
    space.close()


def agent_against(
    namespace: MountNamespace, store_path: Path, repo: Path, server: RunningServer, work: Path
) -> AgentProcess:
    """An agent in the namespace (it writes the repository), its state outside it."""
    return start_agent(
        f"sqlite:///{store_path}", "logreg", repo, server, work / "agent",
        ["--state-dir", str(work / "agent-state"), "--watch-seconds", "0"],
        prefix=namespace.prefix,
    )  # fmt: skip


def answers_v1(server: RunningServer, model_repo: Path) -> list[float]:
    inputs = logreg_inputs(model_repo / "logreg" / "1", rows=3)
    with server.client() as client:
        result = client.infer("logreg", {k: np.asarray(v) for k, v in inputs.items()})
    assert result.model_version == "1"
    return [float(v) for v in result.outputs["probabilities"].ravel()]


def failed_polls(agent: AgentProcess) -> float:
    return sum(
        value
        for key, value in agent.metrics().items()
        if key.startswith("edgewise_agent_polls_total") and 'result="ok"' not in key
    )


@NEEDS_NAMESPACES
def test_a_read_only_repository_keeps_serving_and_restarts(
    namespace: MountNamespace, model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "ro-repo"
    namespace.tmpfs(repo, "64m")
    namespace.run("cp", "-a", str(model_repo / "logreg"), str(repo))
    server = start_server(repo, tmp_path / "s1", ["--monitoring", "off"], prefix=namespace.prefix)
    store_path = tmp_path / "store" / "store.db"
    store = SqliteStore(store_path)
    agent = None
    try:
        first = answers_v1(server, model_repo)
        namespace.run("mount", "-o", "remount,ro", str(repo))
        probe = namespace.run("touch", str(repo / "logreg" / "probe"), check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr
        with server.client() as client:
            client.load_model("logreg")  # a reload only reads
            assert [s.state for s in client.repository_index()] == ["READY"]
        assert answers_v1(server, model_repo) == first
        # An agent told to deploy another version into it cannot write, says so, keeps polling.
        register(store, model_repo / "logreg" / "1")  # store version 1: what the repo holds
        register(store, logreg_v2(tmp_path / "sources"), alias="production")  # version 2
        agent = agent_against(namespace, store_path, repo, server, tmp_path)
        wait_for(lambda: failed_polls(agent) >= 2, 60, "failed polls")
        assert "Read-only file system" in agent.log()
        assert agent.alive() and answers_v1(server, model_repo) == first
        agent.stop()
        agent = None
        # A server (re)started on the read-only repository serves it.
        assert server.stop() == 0, server.log()
        server = start_server(
            repo, tmp_path / "s2", ["--monitoring", "off"], prefix=namespace.prefix
        )
        assert answers_v1(server, model_repo) == first
    finally:
        if agent is not None:
            agent.stop()
        assert server.stop() == 0, server.log()
        store.close()


@NEEDS_NAMESPACES
def test_a_full_repository_keeps_serving_and_recovers_when_space_returns(
    namespace: MountNamespace, model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "full-repo"
    namespace.tmpfs(repo, "2m")
    namespace.run("cp", "-a", str(model_repo / "logreg"), str(repo))
    server = start_server(repo, tmp_path / "s1", ["--monitoring", "off"], prefix=namespace.prefix)
    store_path = tmp_path / "store" / "store.db"
    store = SqliteStore(store_path)
    sources = tmp_path / "sources"
    v2 = logreg_v2(sources)
    agent = None
    try:
        first = answers_v1(server, model_repo)
        filler = repo / "filler"
        fill = namespace.run("dd", "if=/dev/zero", f"of={filler}", "bs=64k", check=False)
        assert "No space left on device" in fill.stderr
        # A copy that runs out of space half-way: refused at load, version 1 serves on.
        copy = namespace.run("cp", "-a", str(v2), str(repo / "logreg" / "2"), check=False)
        assert copy.returncode != 0 and "No space left" in copy.stderr
        with server.client() as client:
            with pytest.raises(ServerError) as info:
                client.load_model("logreg", "2")
            assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
            client.load_model("logreg")  # a reload of what is there still works
        assert answers_v1(server, model_repo) == first
        namespace.run("rm", "-rf", str(repo / "logreg" / "2"))
        # The agent's download of version 2 fails for want of space, again and again...
        register(store, model_repo / "logreg" / "1")  # store version 1: what the repository holds
        register(store, v2, alias="production")  # store version 2
        agent = agent_against(namespace, store_path, repo, server, tmp_path)
        wait_for(lambda: failed_polls(agent) >= 2, 60, "failed polls on a full disk")
        assert "No space left on device" in agent.log()
        assert agent.alive() and answers_v1(server, model_repo) == first
        # ...until there is room: then it deploys it.
        namespace.run("rm", str(filler))
        inputs = logreg_inputs(model_repo / "logreg" / "1")
        wait_for(lambda: served_version(server, "logreg", inputs) == "2", 90, "version 2")
    finally:
        if agent is not None:
            agent.stop()
        assert server.stop() == 0, server.log()
        store.close()
