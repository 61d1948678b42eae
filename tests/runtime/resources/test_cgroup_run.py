"""``edgewise run --profile``: the plan on v1 and v2 fixture trees, the error without rights, and
real enforcement with real cgroups as root: a 0.5 CPU server stays under its quota and runs no
more compute threads than the split, and under 256 MiB memory admission keeps alive a server that
the same load OOM-kills without it."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.resources.cgroup_run import (
    CFS_PERIOD_US,
    CgroupError,
    CgroupSession,
    plan_cgroup,
)
from edgewise.runtime.resources.container_profiles import Profile, load_profile
from tests.prerequisites import requires
from tests.runtime.config.test_limits import HYBRID_MOUNTINFO, V2_MOUNTINFO, write_tree

MiB = 1 << 20
EDGE_TINY = load_profile("edge-tiny")
PYTHON = [sys.executable, "-m", "edgewise.runtime.cli"]


# ---- the plan, on fixture trees -----------------------------------------------------------------


def test_plan_v1_on_a_hybrid_host(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proc/self/mountinfo": HYBRID_MOUNTINFO,
            "proc/self/cgroup": "4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
            "sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n",
        },
    )
    plan = plan_cgroup(EDGE_TINY, "g", root)
    cpu = root / "sys/fs/cgroup/cpu/g"
    memory = root / "sys/fs/cgroup/memory/process_api/abc/g"
    assert plan.version == 1 and plan.folders == (cpu, memory)
    writes = dict(plan.writes)
    assert writes[cpu / "cpu.cfs_period_us"] == str(CFS_PERIOD_US)
    assert writes[cpu / "cpu.cfs_quota_us"] == "50000"
    assert writes[memory / "memory.limit_in_bytes"] == str(256 * MiB)
    assert plan.memory_folder == memory
    assert memory / "memory.memsw.limit_in_bytes" in plan.optional


def test_plan_v2_when_its_controllers_are_available(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/user.slice/me\n",
            "sys/fs/cgroup/user.slice/me/cgroup.controllers": "cpu memory pids\n",
        },
    )
    profile = Profile("p", "p", 1.5, 512 * MiB)
    plan = plan_cgroup(profile, "g", root)
    parent = root / "sys/fs/cgroup/user.slice/me"
    assert plan.version == 2 and plan.folders == (parent / "g",)
    writes = dict(plan.writes)
    assert writes[parent / "cgroup.subtree_control"] == "+cpu +memory"
    assert writes[parent / "g/cpu.max"] == f"150000 {CFS_PERIOD_US}"
    assert writes[parent / "g/memory.max"] == str(512 * MiB)
    assert writes[parent / "g/memory.swap.max"] == "0"


def test_plan_without_usable_controllers_is_an_error(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "hugetlb pids\n",
        },
    )
    with pytest.raises(CgroupError, match="no usable cpu controller"):
        plan_cgroup(EDGE_TINY, "g", root)


@pytest.fixture
def kernel_subtree_control(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes to a fixture tree's ``cgroup.subtree_control`` act as on cgroupfs: ``+c``/``-c``
    enable or disable controller ``c``; reading gives the enabled ones."""
    write_text = Path.write_text

    def write(path: Path, data: str, *args: object, **kwargs: object) -> int:
        if path.name != "cgroup.subtree_control":
            return write_text(path, data, *args, **kwargs)  # type: ignore[arg-type]
        enabled = set(path.read_text().split()) if path.exists() else set()
        for token in data.split():
            assert token[0] in "+-", f"cgroupfs refuses {token!r}"
            (enabled.add if token[0] == "+" else enabled.discard)(token[1:])
        write_text(path, " ".join(sorted(enabled)))
        return len(data)

    monkeypatch.setattr(Path, "write_text", write)


@pytest.mark.parametrize("outcome", ["fails", "succeeds"])
def test_a_v2_run_leaves_the_parents_subtree_control_as_it_was(
    tmp_path: Path, kernel_subtree_control: None, outcome: str
) -> None:
    root = write_tree(
        tmp_path,
        {
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/user.slice/me\n",
            "sys/fs/cgroup/user.slice/me/cgroup.controllers": "cpu memory pids\n",
        },
    )
    parent = root / "sys/fs/cgroup/user.slice/me"
    control = parent / "cgroup.subtree_control"
    control.write_text("+pids")
    plan = plan_cgroup(EDGE_TINY, "g", root)
    assert plan.writes[0][0] == control
    # Only the subtree write and, to fail, one the kernel refuses (a fixture tree's group folder
    # cannot be removed once limit files are written in it, as cgroupfs's can).
    failing = ((parent / "g" / "no-such-folder" / "cpu.max", "1"),) if outcome == "fails" else ()
    plan = replace(plan, writes=(plan.writes[0], *failing))

    def run_session() -> None:
        with contextlib.ExitStack() as stack:
            if failing:
                stack.enter_context(pytest.raises(CgroupError, match="no-such-folder"))
            with CgroupSession(plan):
                assert control.read_text() == "cpu memory pids"

    run_session()
    assert control.read_text() == "pids" and not (parent / "g").exists()
    control.write_text("+cpu")  # cpu was enabled before: only memory is enabled and disabled
    run_session()
    assert control.read_text() == "cpu pids"
    (parent / "other-run").mkdir()  # a group that may rely on the controllers: left enabled
    control.write_text("-cpu")
    run_session()
    assert control.read_text() == "cpu memory pids"


def run_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,  # type: ignore[call-overload]
    )


def test_nothing_to_run_is_one_line() -> None:
    done = run_cli("run", "--profile", "edge-tiny")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "nothing to run" in done.stderr


@requires(
    "as root, needs unshare(1) to take the rights away in a private mount namespace"
    if os.geteuid() == 0 and shutil.which("unshare") is None
    else None
)
def test_without_rights_one_readable_line() -> None:
    """Without the right to create groups, one line says what is needed. Root has every right,
    so as root the cgroup filesystems are remounted read-only in a private mount namespace."""
    command = shlex.join([*PYTHON, "run", "--profile", "edge-tiny", "--", "limits"])
    if os.geteuid() == 0:
        script = (
            "set -e; mount --make-rprivate /; "
            "for m in $(awk '$9 ~ /^cgroup/ {print $5}' /proc/self/mountinfo); do "
            'mount -o remount,bind,ro "$m"; done; exec ' + command
        )
        argv = ["unshare", "--mount", "sh", "-c", script]
    else:
        argv = shlex.split(command)
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("edgewise run: error: cannot create cgroup")
    assert "needs root" in lines[0]


# ---- real cgroups -------------------------------------------------------------------------------


def _controllers_available() -> str | None:
    """Why real cgroup tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    try:
        plan = plan_cgroup(EDGE_TINY, "probe")
    except CgroupError as exc:
        return f"no usable cgroup controllers: {exc.message}"
    for folder in plan.folders:
        if not os.access(folder.parent, os.W_OK):
            return f"cannot write {folder.parent}"
    return None


REAL_SKIP = _controllers_available()
real_cgroups = requires(REAL_SKIP)  # skipped with the reason; failed under CI


def group_name() -> str:
    return f"edgewise-test-{uuid.uuid4().hex[:10]}-g"


def leftover_groups(name: str) -> list[str]:
    return [
        str(path)
        for path in Path("/sys/fs/cgroup").glob(f"**/{name}")
        if path.is_dir() and "libpod" not in str(path)
    ]


@contextlib.contextmanager
def no_leftovers(name: str) -> Iterator[None]:
    try:
        yield
    finally:
        for path in leftover_groups(name):  # only if the code under test failed to clean up
            with contextlib.suppress(OSError):
                for pid in Path(path, "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
                os.rmdir(path)
    assert leftover_groups(name) == []


@real_cgroups
@pytest.mark.serial
def test_limits_inside_the_group_and_removal(tmp_path: Path) -> None:
    name = group_name()
    with no_leftovers(name):
        done = run_cli(
            "run", "--profile", "edge-tiny", "--cgroup-name", name, "--", "limits", "--json"
        )
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["limits"]["cpu_quota"] == 0.5
        assert data["limits"]["memory_limit_bytes"] == 256 * MiB
        assert name in data["limits"]["sources"]["cpu"]
        assert data["split"]["worker_threads"] == 1
        assert "profile edge-tiny (0.5 CPU, 256.0 MiB) in cgroup v" in done.stderr
        assert leftover_groups(name) == []  # removed on exit, before the assertion block ends
        # The command's exit status comes back (2: argparse usage error inside the group).
        done = run_cli(
            "run", "--profile", "edge-tiny", "--cgroup-name", name, "--", "serve", "--port", "x"
        )
        assert done.returncode == 2


@dataclass
class CgroupServer:
    wrapper: subprocess.Popen[bytes]
    server: psutil.Process
    port: int
    metrics_port: int
    log_path: Path

    def cgroup_dir(self, controller: str) -> Path:
        for line in Path(f"/proc/{self.server.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return Path(f"/sys/fs/cgroup/{controller}{path}")
        raise AssertionError(f"server is in no {controller} group")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as response:
            return str(response.read().decode())


@contextlib.contextmanager
def server_in_cgroup(
    profile: str, repo: Path, workdir: Path, name: str, env: dict[str, str] | None = None
) -> Iterator[CgroupServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"ports-{name}"
    log_path = workdir / f"{name}.log"
    command = [
        *PYTHON, "run", "--profile", profile, "--cgroup-name", name, "--",
        "serve", "--repo", str(repo), "--host", "127.0.0.1", "--port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--port-file", str(port_file),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        wrapper = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists():
            assert wrapper.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port, metrics_port = (int(x) for x in port_file.read_text().split())
        with EdgewiseClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=60)
        (server,) = psutil.Process(wrapper.pid).children()
        yield CgroupServer(wrapper, server, port, metrics_port, log_path)
    finally:
        if wrapper.poll() is None:
            wrapper.send_signal(signal.SIGTERM)
            try:
                wrapper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                wrapper.kill()
                wrapper.wait()


def thread_cpu(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (name, CPU ticks) of every thread of ``pid``."""
    out: dict[int, tuple[str, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return out


# Threads grpc's C core starts and names itself: I/O polling and timers, never model work.
GRPC_THREAD_NAMES = ("event_engine", "grpc_global_tim", "lifeguard", "default-executo", "resolver")


def busy_threads(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], share: float = 0.03
) -> set[int]:
    """Threads (not grpc's named ones) that used at least ``share`` of the CPU in the window."""
    deltas = {tid: ticks - before.get(tid, (name, 0))[1] for tid, (name, ticks) in after.items()}
    total = sum(deltas.values()) or 1
    return {
        tid
        for tid, delta in deltas.items()
        if delta / total >= share and not after[tid][0].startswith(GRPC_THREAD_NAMES)
    }


def load(port: int, payload: dict[str, np.ndarray], seconds: float, clients: int) -> int:
    stop = time.monotonic() + seconds
    done = [0] * clients

    def one(index: int) -> None:
        with EdgewiseClient(f"127.0.0.1:{port}") as client:
            while time.monotonic() < stop:
                client.infer("logreg", payload)
                done[index] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done)


def cpu_stat(folder: Path) -> dict[str, int]:
    return {
        k: int(v)
        for k, v in (line.split() for line in (folder / "cpu.stat").read_text().splitlines())
    }


@real_cgroups
@pytest.mark.serial
def test_half_a_cpu_holds_and_compute_threads_follow_the_split(
    model_repo: Path, tmp_path: Path
) -> None:
    name = group_name()
    small = {"features": np.zeros((1, 30), np.float32)}  # inline, on the event loop
    large = {"features": np.zeros((1000, 30), np.float32)}  # 120 kB: on a worker thread
    # No drift timer: its periodic work on the worker pool would blur phase A below. The
    # grpcio front end: the split of inline (event loop) and worker-thread work is its own (the
    # native front end runs models on gRPC's callback threads).
    quiet = {"EDGEWISE_DRIFT_INTERVAL_SECONDS": "0", "EDGEWISE_FRONT_END": "grpcio"}
    with (
        no_leftovers(name),
        server_in_cgroup("edge-tiny", model_repo, tmp_path, name, env=quiet) as srv,
    ):
        pid = srv.server.pid
        cpu_dir = srv.cgroup_dir("cpu")
        assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "50000"
        text = srv.metrics()
        assert 'edgewise_runtime_split{setting="compute_threads"} 2.0' in text
        assert 'edgewise_resource_limit{resource="cpu_cores"} 0.5' in text

        # Phase A: small requests only, all inline: the loop computes, and grpc's Python-level
        # completion-queue poller (an unnamed thread) moves events: the busiest other thread.
        before = thread_cpu(pid)
        load(srv.port, small, 1.5, 2)
        after = thread_cpu(pid)
        inline_busy = busy_threads(before, after)
        assert pid in inline_busy
        others = sorted(
            inline_busy - {pid}, key=lambda tid: after[tid][1] - before.get(tid, ("", 0))[1]
        )
        assert others, (inline_busy, after)
        pollers = {others[-1]}

        # Phase B: four clients, half sending requests that go to the worker pool.
        before_threads = thread_cpu(pid)
        before_stat = cpu_stat(cpu_dir)
        before_cpu = sum(srv.server.cpu_times()[:2])
        started = time.monotonic()
        stop = time.monotonic() + 4
        workers = [
            threading.Thread(target=load, args=(srv.port, payload, stop - time.monotonic(), 1))
            for payload in (small, small, large, large)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.monotonic() - started
        cpu_seconds = sum(srv.server.cpu_times()[:2]) - before_cpu
        stat = cpu_stat(cpu_dir)
        compute = busy_threads(before_threads, thread_cpu(pid)) - pollers
        periods = stat["nr_periods"] - before_stat["nr_periods"]
        throttled = stat["nr_throttled"] - before_stat["nr_throttled"]
        print(
            f"\n0.5 CPU profile: used {cpu_seconds / wall:.3f} CPU over {wall:.1f} s; throttled "
            f"in {throttled} of {periods} periods; compute threads busy: {len(compute)} (split: 2)"
        )
    # The quota held, by the kernel's own count (not the wall clock, which CPU contention
    # stretches): the group was throttled, and used no more than its 50 ms in each of the
    # 100 ms periods it ran in (10 % for accounting granularity).
    assert throttled > 0
    assert cpu_seconds <= 0.050 * periods * 1.10, (cpu_seconds, periods)
    # The loop and one worker computed; no other pool (onnxruntime, BLAS, numba) did.
    assert pid in compute
    assert 2 <= len(compute) <= 2, compute


def write_profile(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


# 256 MiB like edge-tiny, with 32 MiB messages allowed: requests big enough to hurt now reach the
# server, and only memory admission stands between them and the OOM killer.
BIG_MESSAGES = """\
description = "edge-tiny's 256 MiB with 32 MiB messages"
cpus = 1
memory = "256MiB"
[overrides]
max_message_bytes = "32MiB"
"""


def mixed(rows: int) -> dict[str, np.ndarray]:
    return {
        "features": np.zeros((rows, 13), np.float32),
        "alcohol_level": np.array([[b"low"]] * rows, dtype=object),
        "color_band": np.array([[b"mid"]] * rows, dtype=object),
    }


def memory_stat(folder: Path) -> dict[str, int]:
    values = {}
    for name in ("memory.max_usage_in_bytes", "memory.failcnt", "memory.limit_in_bytes"):
        with contextlib.suppress(FileNotFoundError):
            values[name] = int((folder / name).read_text())
    for line in (folder / "memory.oom_control").read_text().splitlines():
        key, value = line.split()
        values[key] = int(value)
    return values


@real_cgroups
@pytest.mark.serial
def test_memory_admission_keeps_the_server_alive_where_it_is_otherwise_oom_killed(
    model_repo: Path, tmp_path: Path
) -> None:
    profile = write_profile(tmp_path / "profiles", "tiny-big-messages", BIG_MESSAGES)
    big = mixed(400_000)  # 26 MB on the wire; decoded, its 800 000 strings take ~300 MiB
    name = group_name()
    with no_leftovers(name), server_in_cgroup(str(profile), model_repo, tmp_path, name) as srv:
        if not (srv.cgroup_dir("memory") / "memory.oom_control").exists():
            pytest.skip("the memory group is not cgroup v1: OOM accounting differs")
        with EdgewiseClient(f"127.0.0.1:{srv.port}") as client:
            assert client.infer("mixed", mixed(5_000)).outputs["label"].shape == (5_000,)
            with pytest.raises(ServerError) as info:
                client.infer("mixed", big)
            assert info.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "memory admission" in info.value.details
            refusal = info.value.details
            # The server survives and serves.
            assert client.infer("mixed", mixed(5_000)).outputs["label"].shape == (5_000,)
            stats = memory_stat(srv.cgroup_dir("memory"))
        assert srv.wrapper.poll() is None
    assert stats["oom_kill"] == 0
    assert stats["memory.max_usage_in_bytes"] < 256 * MiB
    peak = stats["memory.max_usage_in_bytes"] / MiB
    print(f"\n256 MiB with admission: {refusal}; peak usage {peak:.0f} MiB")

    # The same load without admission control: the kernel kills the server (exit 137).
    name = group_name()
    with (
        no_leftovers(name),
        server_in_cgroup(
            str(profile), model_repo, tmp_path, name, env={"EDGEWISE_ADMISSION": "off"}
        ) as srv,
    ):
        with EdgewiseClient(f"127.0.0.1:{srv.port}") as client:
            assert client.infer("mixed", mixed(5_000)).outputs["label"].shape == (5_000,)
            with pytest.raises(ServerError) as info:
                client.infer("mixed", big)
            assert info.value.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        code = srv.wrapper.wait(timeout=60)
        log = srv.log_path.read_text()
    assert code == 137, log
    assert "killed by the kernel's OOM killer" in log
    print(f"256 MiB without admission: edgewise run exited {code}")
