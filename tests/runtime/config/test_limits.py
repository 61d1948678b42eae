"""Limit detection (cgroup v1 and v2 fixture trees, the real machine) and the derivation rule."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edgewise.runtime.cli.main import main
from edgewise.runtime.config import limits as L
from edgewise.runtime.config.limits import (
    COMPUTE_THREAD_SLACK,
    ResourceLimits,
    derive_budget,
    detect_limits,
    parse_bytes,
    parse_cpu_list,
    prepare_process,
)
from edgewise.runtime.config.settings import ServerSettings
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.model import SessionSettings

MiB = 1 << 20
GiB = 1 << 30
V1_UNLIMITED = "9223372036854771712"

# mountinfo of this project's machines: v1 controllers plus a cgroup2 mount with only hugetlb.
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def host_files(cpus: str = "0-1", mem_kib: int = 24 * 1024 * 1024) -> dict[str, str]:
    return {
        "sys/devices/system/cpu/online": f"{cpus}\n",
        "proc/meminfo": f"MemTotal:       {mem_kib} kB\nMemFree:  1 kB\n",
    }


# ---- parsers ------------------------------------------------------------------------------------


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("") == frozenset()
    assert len(parse_cpu_list("0-63")) == 64
    with pytest.raises(InvalidInput):
        parse_cpu_list("3-1")
    with pytest.raises(InvalidInput):
        parse_cpu_list("a-b")


def test_parse_bytes_units_are_binary() -> None:
    assert parse_bytes("256MiB") == 256 * MiB
    assert parse_bytes("512M") == 512 * MiB
    assert parse_bytes("1GiB") == GiB
    assert parse_bytes("1.5G") == int(1.5 * GiB)
    assert parse_bytes("4096") == 4096
    assert parse_bytes(123) == 123
    for bad in ("lots", "12 parsecs", "-5M"):
        with pytest.raises(InvalidInput):
            parse_bytes(bad)


# ---- cgroup v1 fixture trees --------------------------------------------------------------------


def test_hybrid_v1_reads_v1_although_proc_cgroup_has_a_0_line(tmp_path: Path) -> None:
    """The project's machines: a ``0::/`` line and a cgroup2 mount, but cpu and memory on v1.
    The cgroup2 group even holds a cpu.max file, which must be ignored (cpu is not in its
    cgroup.controllers)."""
    root = write_tree(
        tmp_path,
        {
            **host_files(),
            "proc/self/mountinfo": HYBRID_MOUNTINFO,
            "proc/self/cgroup": (
                "4:memory:/process_api/abc/edgewise-run\n3:cpuset:/\n2:cpuacct:/\n"
                "1:cpu:/edgewise-run\n0::/\n"
            ),
            "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpu/edgewise-run/cpu.cfs_quota_us": "50000\n",
            "sys/fs/cgroup/cpu/edgewise-run/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpuset/cpuset.effective_cpus": "0-1\n",
            "sys/fs/cgroup/memory/process_api/abc/edgewise-run/memory.stat": (
                "cache 0\nrss 0\nhierarchical_memory_limit 268435456\n"
            ),
            "sys/fs/cgroup/memory/process_api/abc/edgewise-run/memory.limit_in_bytes": (
                "268435456\n"
            ),
            "sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n",
            "sys/fs/cgroup/unified/cpu.max": "10000 100000\n",
            "sys/fs/cgroup/unified/memory.max": "1048576\n",
        },
    )
    found = detect_limits(root)
    assert found.cpu_cgroup == "v1" and found.memory_cgroup == "v1"
    assert found.cpu_quota == 0.5
    assert found.memory_limit_bytes == 256 * MiB
    assert found.cpuset_cpus == 2
    assert found.host_cpus == 2 and found.host_memory_bytes == 24 * GiB
    assert found.cpu_budget == 0.5 and found.memory_bytes == 256 * MiB
    assert "cpu.cfs_quota_us 50000" in found.sources["cpu"]
    assert "edgewise-run" in found.sources["memory"]


def test_v1_quota_is_the_smallest_over_ancestors(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            **host_files("0-7"),
            "proc/self/mountinfo": HYBRID_MOUNTINFO,
            "proc/self/cgroup": "1:cpu:/outer/inner\n4:memory:/\n0::/\n",
            # inner asks for 2 cores with a 50 ms period; outer allows 1.5 cores.
            "sys/fs/cgroup/cpu/outer/cpu.cfs_quota_us": "150000\n",
            "sys/fs/cgroup/cpu/outer/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpu/outer/inner/cpu.cfs_quota_us": "100000\n",
            "sys/fs/cgroup/cpu/outer/inner/cpu.cfs_period_us": "50000\n",
            "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/memory/memory.stat": f"hierarchical_memory_limit {V1_UNLIMITED}\n",
        },
    )
    found = detect_limits(root)
    assert found.cpu_quota == 1.5
    assert "outer" in found.sources["cpu"] and "inner" not in found.sources["cpu"]
    assert found.memory_limit_bytes is None  # the v1 "unlimited" value
    assert found.cpu_budget == 1.5


def test_v1_memory_without_memory_stat_takes_the_smallest_ancestor_limit(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            **host_files(),
            "proc/self/mountinfo": HYBRID_MOUNTINFO,
            "proc/self/cgroup": "4:memory:/a/b\n1:cpu:/\n",
            "sys/fs/cgroup/memory/a/memory.limit_in_bytes": "536870912\n",
            "sys/fs/cgroup/memory/a/b/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
        },
    )
    found = detect_limits(root)
    assert found.memory_limit_bytes == 512 * MiB
    assert found.cpu_quota is None and found.cpu_cgroup == "v1"


def test_v1_inside_a_container_without_a_cgroup_namespace(tmp_path: Path) -> None:
    """Docker without cgroupns: the mount's root is the container's group, and
    /proc/self/cgroup shows the full path; the folder is the mount point itself."""
    mountinfo = (
        "100 90 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup "
        "rw,cpu,cpuacct\n"
        "101 90 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
    )
    root = write_tree(
        tmp_path,
        {
            **host_files("0-3"),
            "proc/self/mountinfo": mountinfo,
            "proc/self/cgroup": "5:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/memory/memory.stat": "hierarchical_memory_limit 1073741824\n",
        },
    )
    found = detect_limits(root)
    assert (found.cpu_quota, found.memory_limit_bytes) == (2.0, GiB)
    assert found.host_cpus == 4


def test_mount_points_with_escaped_spaces(tmp_path: Path) -> None:
    mountinfo = r"32 31 0:29 / /odd\040place/cpu rw - cgroup cgroup rw,cpu" + "\n"
    root = write_tree(
        tmp_path,
        {
            **host_files(),
            "proc/self/mountinfo": mountinfo,
            "proc/self/cgroup": "1:cpu:/\n",
            "odd place/cpu/cpu.cfs_quota_us": "25000\n",
            "odd place/cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert detect_limits(root).cpu_quota == 0.25


# ---- cgroup v2 fixture trees --------------------------------------------------------------------

V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_v2_nested_limits_take_the_smallest(tmp_path: Path) -> None:
    group = "sys/fs/cgroup/kubepods/pod1/ctr"
    root = write_tree(
        tmp_path,
        {
            **host_files("0-7", 64 * 1024 * 1024),
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
            "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
            "sys/fs/cgroup/kubepods/pod1/cgroup.controllers": "cpuset cpu memory pids\n",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000\n",
            "sys/fs/cgroup/kubepods/pod1/memory.max": "max\n",
            f"{group}/cgroup.controllers": "cpuset cpu memory pids\n",
            f"{group}/cpu.max": "max 100000\n",
            f"{group}/memory.max": "536870912\n",
            f"{group}/cpuset.cpus.effective": "0-2\n",
        },
    )
    found = detect_limits(root)
    assert found.cpu_cgroup == "v2" and found.memory_cgroup == "v2"
    assert found.cpu_quota == 1.5
    assert found.memory_limit_bytes == 512 * MiB
    assert found.cpuset_cpus == 3
    assert found.cpu_budget == 1.5
    assert "cpu.max 150000 100000" in found.sources["cpu"]


def test_v2_with_a_cgroup_namespace_reads_the_mount_point(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            **host_files("0-3"),
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
            "sys/fs/cgroup/cpu.max": "50000 100000\n",
            "sys/fs/cgroup/memory.max": "268435456\n",
        },
    )
    found = detect_limits(root)
    assert (found.cpu_quota, found.memory_limit_bytes) == (0.5, 256 * MiB)


def test_a_0_line_without_controllers_is_no_limit(tmp_path: Path) -> None:
    """``0::/`` and a cgroup2 mount whose group offers neither cpu nor memory: no limits, the
    host's figures."""
    root = write_tree(
        tmp_path,
        {
            **host_files("0-5", 8 * 1024 * 1024),
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "hugetlb\n",
            "sys/fs/cgroup/cpu.max": "10000 100000\n",
        },
    )
    found = detect_limits(root)
    assert found.cpu_cgroup == "none" and found.memory_cgroup == "none"
    assert found.cpu_quota is None and found.memory_limit_bytes is None
    assert found.cpu_budget == 6 and found.memory_bytes == 8 * GiB


def test_limits_above_the_host_are_capped_by_it(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            **host_files("0-1", 1024 * 1024),
            "proc/self/mountinfo": V2_MOUNTINFO,
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu memory cpuset\n",
            "sys/fs/cgroup/cpu.max": "800000 100000\n",
            "sys/fs/cgroup/memory.max": str(4 * GiB),
        },
    )
    found = detect_limits(root)
    assert found.cpu_quota == 8.0 and found.cpu_budget == 2
    assert found.memory_limit_bytes == 4 * GiB and found.memory_bytes == GiB


# ---- the real machine ---------------------------------------------------------------------------


def test_real_machine_matches_independent_reads() -> None:
    found = detect_limits()
    online = Path("/sys/devices/system/cpu/online").read_text()
    assert found.host_cpus == len(parse_cpu_list(online))
    mem_total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert found.host_memory_bytes == mem_total
    assert 0 < found.cpu_budget <= found.host_cpus
    assert found.memory_bytes <= found.host_memory_bytes
    assert found.cpuset_cpus is not None and found.cpuset_cpus <= len(os.sched_getaffinity(0))
    # Where a v1 hierarchy carries a controller, that is where it was read (hybrid hosts also
    # have a cgroup2 mount and a 0:: line).
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    v1 = {
        option
        for line in mountinfo
        if " - cgroup " in line
        for option in line.split(" - ")[1].split()[2].split(",")
    }
    if "cpu" in v1:
        assert found.cpu_cgroup == "v1"
    if "memory" in v1:
        assert found.memory_cgroup == "v1"


# ---- the derivation rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "memory", "expected"),
    [
        # cpus, memory -> intra, workers, compute, inflight, message MiB, budget MiB, arena
        (0.5, 256 * MiB, (1, 1, 2, 13, 4, 204.8, False)),
        (1.0, 512 * MiB, (1, 1, 2, 18, 8, 409.6, False)),
        (2.0, 1 * GiB, (1, 2, 3, 22, 16, 819.2, True)),
        (8.0, 8 * GiB, (4, 2, 9, 50, 64, 6553.6, True)),
        (1.5, 2 * GiB, (1, 2, 3, 24, 32, 1638.4, True)),
    ],
)
def test_derived_split_of_reference_limits(
    cpus: float, memory: int, expected: tuple[int, int, int, int, int, float, bool]
) -> None:
    budget = derive_budget(ResourceLimits.simulated(cpus, memory))
    intra, workers, compute, inflight, message_mib, budget_mib, arena = expected
    assert budget.cores == math.ceil(cpus)
    assert budget.intra_op_threads == intra and budget.inter_op_threads == 1
    assert budget.numba_threads == intra
    assert budget.worker_threads == workers
    assert budget.compute_threads == compute
    assert budget.max_inflight == inflight
    assert budget.queue_depth == inflight - workers - 1
    assert budget.max_message_bytes == message_mib * MiB
    assert budget.memory_budget_bytes == int(budget_mib * MiB)
    assert budget.memory_arena is arena


@settings(max_examples=300, deadline=None)
@given(
    cpus=st.floats(min_value=0.01, max_value=256, allow_nan=False),
    memory=st.integers(min_value=128 * MiB, max_value=1 << 40),
    cpuset=st.one_of(st.none(), st.integers(min_value=1, max_value=256)),
)
def test_derivation_invariants(cpus: float, memory: int, cpuset: int | None) -> None:
    limits = ResourceLimits(
        host_cpus=256, host_memory_bytes=1 << 41, cpu_quota=cpus, cpuset_cpus=cpuset,
        memory_limit_bytes=memory,
    )  # fmt: skip
    budget = derive_budget(limits)
    cores = math.ceil(round(min(cpus, cpuset or 256), 6))
    assert budget.cores == max(1, cores)
    # The rule the issue asks for: compute threads never exceed the CPU budget rounded up plus
    # the documented constant.
    assert budget.compute_threads <= budget.cores + COMPUTE_THREAD_SLACK
    assert min(budget.intra_op_threads, budget.numba_threads, budget.worker_threads) >= 1
    assert budget.max_inflight >= budget.worker_threads + 1
    message = budget.max_message_bytes
    assert 1 * MiB <= message <= 64 * MiB and message & (message - 1) == 0
    assert budget.memory_budget_bytes <= memory
    assert budget.memory_arena is (memory >= GiB)
    if budget.max_inflight > budget.worker_threads + 1:  # bounded by memory, not by the floor
        held = budget.max_inflight * 2 * message
        assert held <= budget.memory_budget_bytes - L.BASELINE_RSS_BYTES


def test_overrides_and_what_follows_from_them() -> None:
    limits = ResourceLimits.simulated(8.0, 8 * GiB)
    budget = derive_budget(limits, {"intra_op_threads": 2})
    assert (budget.intra_op_threads, budget.numba_threads, budget.worker_threads) == (2, 2, 4)
    assert budget.overridden == {"intra_op_threads"}
    budget = derive_budget(limits, {"memory_arena": False, "max_message_bytes": 8 * MiB})
    assert budget.memory_arena is False and budget.max_message_bytes == 8 * MiB
    assert derive_budget(limits, {"max_inflight": 7}).max_inflight == 7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"worker_threads": 3}, "compute threads"),
        ({"intra_op_threads": 2}, "compute threads"),
        ({"threads": 2}, "unknown override"),
        ({"worker_threads": 0}, "positive integer"),
        ({"memory_arena": 1}, "true or false"),
        ({"memory_budget_bytes": 2 * GiB}, "above the memory limit"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, int | bool], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        derive_budget(ResourceLimits.simulated(1.0, 512 * MiB), overrides)


def test_prepare_process_sets_only_what_is_unset() -> None:
    env: dict[str, str] = {"OPENBLAS_NUM_THREADS": "3"}
    budget = prepare_process(env, ResourceLimits.simulated(8.0, 8 * GiB))
    assert env["NUMBA_NUM_THREADS"] == "4" == str(budget.numba_threads)
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == "3"
    env = {"NUMBA_NUM_THREADS": "2"}
    assert prepare_process(env, ResourceLimits.simulated(8.0, 8 * GiB)).numba_threads == 2
    with pytest.raises(InvalidInput, match="NUMBA_NUM_THREADS"):
        prepare_process({"NUMBA_NUM_THREADS": "many"}, ResourceLimits.simulated(1, GiB))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2+ cores to see a BLAS pool")
def test_prepare_process_keeps_numpy_from_sizing_its_pool_to_the_host() -> None:
    """numpy's OpenBLAS starts one thread per host core at import; after prepare_process it
    starts none. Measured in fresh interpreters, with and without it."""
    script = (
        "import os, sys\n"
        "if sys.argv[1] == 'yes':\n"
        "    from edgewise.runtime.config.limits import ResourceLimits, prepare_process\n"
        "    prepare_process(limits=ResourceLimits.simulated(1.0, 1 << 30))\n"
        "import numpy\n"
        "print(len(os.listdir('/proc/self/task')))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in L.NATIVE_THREAD_ENV}

    def threads(flag: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, flag],
            check=False,
            env=clean,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert threads("yes") == 1
    assert threads("no") > 1


def test_publish_budget_as_metrics() -> None:
    registry = CollectorRegistry()
    limits = ResourceLimits.simulated(0.5, 256 * MiB)
    budget = derive_budget(limits)
    L.publish_budget(registry, limits, budget.split())
    value = registry.get_sample_value
    assert value("edgewise_resource_limit", {"resource": "cpu_cores"}) == 0.5
    assert value("edgewise_resource_limit", {"resource": "memory_bytes"}) == 256 * MiB
    assert value("edgewise_runtime_split", {"setting": "worker_threads"}) == 1
    assert value("edgewise_runtime_split", {"setting": "compute_threads"}) == 2
    assert value("edgewise_runtime_split", {"setting": "memory_arena"}) == 0
    assert value("edgewise_cgroup_info", {"cpu": "profile", "memory": "profile"}) == 1


# ---- settings take their defaults from the budget -----------------------------------------------


def test_settings_defaults_come_from_the_budget() -> None:
    tiny = ResourceLimits.simulated(0.5, 256 * MiB)
    s = ServerSettings.from_sources({}, environ={}, limits=tiny)
    assert (s.worker_threads, s.intra_op_threads, s.inter_op_threads) == (1, 1, 1)
    assert (s.max_inflight, s.max_message_bytes) == (13, 4 * MiB)
    assert s.memory_budget_bytes == int(0.8 * 256 * MiB) and s.memory_arena is False
    assert SessionSettings.of(s).memory_arena is False
    assert s.budget is not None and s.budget.compute_threads == 2
    # Explicit values win, and the rest follows them.
    big = ResourceLimits.simulated(8, 8 * GiB)
    s = ServerSettings.from_sources(
        {"intra_op_threads": 2}, environ={"EDGEWISE_MEMORY_ARENA": "off"}, limits=big
    )
    assert (s.intra_op_threads, s.worker_threads, s.memory_arena) == (2, 4, False)


def test_settings_refuse_more_compute_threads_than_the_budget() -> None:
    with pytest.raises(InvalidInput, match="compute threads"):
        ServerSettings.from_sources(
            {"worker_threads": 4}, environ={}, limits=ResourceLimits.simulated(0.5, GiB)
        )
    with pytest.raises(InvalidInput, match="admission"):
        ServerSettings.from_sources(
            {}, environ={"EDGEWISE_ADMISSION": "maybe"}, limits=ResourceLimits.simulated(1, GiB)
        )
    with pytest.raises(InvalidInput, match="EDGEWISE_MEMORY_ARENA"):
        ServerSettings.from_sources(
            {},
            environ={"EDGEWISE_MEMORY_ARENA": "sometimes"},
            limits=ResourceLimits.simulated(1, GiB),
        )


# ---- edgewise limits ----------------------------------------------------------------------------


def test_cli_limits_prints_what_it_found_and_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limits"]) == 0
    out = capsys.readouterr().out
    for text in ("FOUND", "cpu quota", "memory limit", "BUDGET", "worker_threads", "RULE"):
        assert text in out
    assert f"compute threads {derive_budget(detect_limits()).compute_threads}" in out


def test_cli_limits_json_and_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limits", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["limits"]["host_cpus"] == detect_limits().host_cpus
    assert data["split"]["worker_threads"] >= 1
    assert main(["limits", "--profile", "edge-tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["limits"]["cpu_quota"] == 0.5
    assert data["split"]["max_message_bytes"] == 4 * MiB
    assert main(["limits", "--profile", "edge-tiny"]) == 0
    assert "profile edge-tiny" in capsys.readouterr().out


def test_cli_limits_unknown_profile_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limits", "--profile", "no-such-profile"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no profile named 'no-such-profile'" in err
    assert "edge-tiny" in err  # lists the known ones


# ---- the in-flight limit of each of several server processes -----------------------------------


def test_each_process_admits_the_whole_in_flight_limit_when_memory_allows() -> None:
    """Clients keep their connection to one process: a share of the limit would shed calls a
    single process takes (the load need not be even)."""
    assert L.process_inflight_limit(35, 2, 16 * L.GiB, 64 * L.MiB) == 35
    assert L.process_inflight_limit(35, 8, 64 * L.GiB, 64 * L.MiB) == 35


def test_a_process_in_flight_limit_stays_within_its_share_of_memory() -> None:
    budget, message = 2 * L.GiB, 16 * L.MiB
    per_process = L.inflight_by_memory(budget // 4, message)
    assert per_process == (budget // 4 - L.BASELINE_RSS_BYTES) // (2 * message)
    assert L.process_inflight_limit(1000, 4, budget, message) == per_process < 1000
    assert L.process_inflight_limit(1000, 64, budget, message) == 1  # never below one call


def test_no_in_flight_limit_stays_none_in_every_process() -> None:
    assert L.process_inflight_limit(0, 4, 16 * L.GiB, 64 * L.MiB) == 0


# ---- --processes auto ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "memory", "expected"),
    [
        (4, 16 * L.GiB, 4),  # one per core
        (4, 1 * L.GiB, 2),  # 0.8 GiB of budget holds two processes of 384 MiB
        (0.5, 256 * MiB, 1),  # never fewer than one
        (8.0, 64 * L.GiB, 8),
    ],
)
def test_auto_processes_follow_cores_within_memory(cpus: float, memory: int, expected: int) -> None:
    limits = ResourceLimits.simulated(cpus, memory)
    assert L.auto_processes(derive_budget(limits)) == expected
    from_flag = ServerSettings.from_sources({"processes": "auto"}, environ={}, limits=limits)
    from_env = ServerSettings.from_sources(
        {}, environ={"EDGEWISE_PROCESSES": "auto"}, limits=limits
    )
    assert from_flag.processes == from_env.processes == expected


def test_the_processes_flag_takes_a_count_or_auto() -> None:
    from edgewise.runtime.cli.main import _processes

    assert _processes("3") == 3
    assert _processes("AUTO") == "auto"
    for bad in ("0", "-2", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1 or 'auto'"):
            _processes(bad)
