"""The limits this process runs under, and the one rule that splits them into a runtime budget.

onnxruntime, OpenBLAS, numba and ``os.cpu_count()`` all size themselves to the host, not to the
cgroup a container or ``edgewise run`` puts the process in. :func:`detect_limits` finds the real
limits; :func:`derive_budget` turns them into every thread count, queue and memory figure the
server uses. Nothing else in edgewise sizes a pool.

Detection
    Each controller (cpu, cpuset, memory) is located on its own: a controller mounted on a cgroup
    v1 hierarchy (``/proc/self/mountinfo``, fstype ``cgroup`` with the controller in its super
    options) is read there; otherwise it is read on the cgroup2 mount, but only when the
    controller is listed in the group's ``cgroup.controllers``. A ``0::/`` line in
    ``/proc/self/cgroup`` therefore does not mean v2: hybrid hosts show it while cpu and memory
    live on v1. The process's folder is the mount point plus its path from ``/proc/self/cgroup``
    relative to the mount's root.

    * CPU quota: v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``; the smallest over
      the group and its ancestors up to the mount point.
    * CPU set: v2 ``cpuset.cpus.effective``, v1 ``cpuset.effective_cpus`` (or ``cpuset.cpus``),
      and the process's affinity mask.
    * Memory: v2 ``memory.max`` (smallest over ancestors), v1 ``hierarchical_memory_limit`` from
      ``memory.stat`` (else the smallest ``memory.limit_in_bytes`` over ancestors).
    * Host: online CPUs and ``MemTotal``, which also cap every limit.

Derivation (:func:`derive_budget`), with ``cores = ceil(cpu budget)``::

    intra_op_threads  = 1 below 4 cores, else min(4, cores // 2)
    inter_op_threads  = 1              (sequential execution: the inter-op pool stays unused)
    numba_threads     = intra_op_threads
    per_worker        = max(intra_op_threads + inter_op_threads - 1, numba_threads)
    worker_threads    = max(1, cores // per_worker)
    compute threads   = worker_threads * per_worker + COMPUTE_THREAD_SLACK
                        <= cores + COMPUTE_THREAD_SLACK           (checked, overrides included)
    memory            = min(memory limit, host memory)
    memory_budget     = MEMORY_BUDGET_FRACTION * memory
    max_message_bytes = memory / 64, rounded down to a power of two, within [1 MiB, 64 MiB]
    queue_depth       = QUEUE_DEPTH_PER_CORE * cores
    max_inflight      = min(worker_threads + 1 + queue_depth,
                            (memory_budget - BASELINE_RSS_BYTES) // (2 * max_message_bytes)),
                        at least worker_threads + 1
    memory_arena      = memory >= ARENA_MIN_MEMORY_BYTES

``COMPUTE_THREAD_SLACK`` (1) is the asyncio event-loop thread: it runs small requests inline, so it
computes, but it is one thread whatever the budget. BLAS libraries get one thread
(:data:`NATIVE_THREAD_ENV`): the server does no BLAS work worth a pool. The in-flight limit
bounds the memory gRPC holds for received messages before any handler (and so before memory
admission) sees them: each in-flight call may hold its serialized and its parsed message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.errors import InvalidInput

__all__ = [
    "ARENA_MIN_MEMORY_BYTES",
    "BASELINE_RSS_BYTES",
    "COMPUTE_THREAD_SLACK",
    "MEMORY_BUDGET_FRACTION",
    "NATIVE_THREAD_ENV",
    "OVERRIDABLE",
    "PROCESS_MEMORY_BYTES",
    "QUEUE_DEPTH_PER_CORE",
    "CgroupMount",
    "ResourceLimits",
    "RuntimeBudget",
    "auto_processes",
    "derive_budget",
    "detect_limits",
    "format_bytes",
    "group_folder",
    "inflight_by_memory",
    "parse_bytes",
    "parse_cpu_list",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "prepare_process",
    "process_inflight_limit",
]

MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: Compute threads allowed on top of ``ceil(cpu budget)``: the event-loop thread.
COMPUTE_THREAD_SLACK: Final = 1
#: Share of the memory limit the process may fill before memory admission refuses requests; the
#: rest is room for the page cache, kernel memory and allocator slack the cgroup also counts.
MEMORY_BUDGET_FRACTION: Final = 0.8
#: Resident memory of an idle server (Python, numpy, onnxruntime, grpc, a few small models):
#: measured 92 MiB. Only used to size the in-flight limit; admission measures the real figure.
BASELINE_RSS_BYTES: Final = 96 * MiB
#: Memory one server process needs to start and idle with monitoring on and a few small models
#: (measured 209 MiB with one; see benchmarks/memory.py), with room for requests: what
#: ``--processes auto`` sets aside for each process it starts.
PROCESS_MEMORY_BYTES: Final = 384 * MiB
#: Queued requests allowed per core, on top of those running.
QUEUE_DEPTH_PER_CORE: Final = 16
#: Below this much memory, onnxruntime's CPU arena and memory patterns are off: the arena grows
#: in doublings and never gives memory back.
ARENA_MIN_MEMORY_BYTES: Final = 1 * GiB
MIN_MESSAGE_BYTES: Final = 1 * MiB
MAX_MESSAGE_BYTES: Final = 64 * MiB

#: Variables native libraries read once, when they are loaded: BLAS pools get one thread.
NATIVE_THREAD_ENV: Final = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: What a profile (or an explicit setting) may override, and the type each takes.
OVERRIDABLE: Final[dict[str, type]] = {
    "intra_op_threads": int,
    "inter_op_threads": int,
    "numba_threads": int,
    "worker_threads": int,
    "max_inflight": int,
    "max_message_bytes": int,
    "memory_budget_bytes": int,
    "memory_arena": bool,
}

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages).
_UNLIMITED: Final = 1 << 60


# ---- small parsers --------------------------------------------------------------------------


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-3,8,10-11"`` -> the CPU numbers; an empty string is an empty set."""
    cpus: set[int] = set()
    for chunk in text.strip().split(","):
        part = chunk.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise InvalidInput(f"{text.strip()!r} is not a CPU list") from None
        if last < first:
            raise InvalidInput(f"{text.strip()!r} is not a CPU list")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


_BYTES_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: str | int) -> int:
    """``"256MiB"``, ``"1GiB"``, ``"512M"``, ``"1.5G"`` or a plain number of bytes. Units are
    binary (``M`` and ``MiB`` both mean 2**20), as container engines use them."""
    if isinstance(value, bool):
        raise InvalidInput(f"{value!r} is not a size")
    if isinstance(value, int):
        return value
    match = _BYTES_RE.match(value)
    if match is None:
        raise InvalidInput(f"{value!r} is not a size (examples: 256MiB, 1GiB, 536870912)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "")[:1].upper()])


def format_bytes(value: int) -> str:
    """Bytes as the largest binary unit that keeps a number of at least 1 (``256.0 MiB``)."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


# ---- locating the process's cgroups -------------------------------------------------------


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem from ``/proc/self/mountinfo``."""

    mount_point: str
    root: str  # the part of the hierarchy mounted there ("/" unless bind-mounted or namespaced)
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: from the super options; v2: empty (read per group)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_left = left.split()
        fields_right = right.split()
        if len(fields_left) < 5 or len(fields_right) < 3:
            continue
        fstype = fields_right[0]
        root, mount_point = _unescape(fields_left[3]), _unescape(fields_left[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(mount_point, root, 2, frozenset()))
        elif fstype == "cgroup":
            options = set(fields_right[2].split(","))
            mounts.append(CgroupMount(mount_point, root, 1, frozenset(options)))
    return mounts


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``/proc/self/cgroup`` -> (v1 controller -> path, the v2 path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


@dataclass(frozen=True)
class _Group:
    version: int
    folder: Path  # the process's group, as seen under ``root``
    top: Path  # the mount point: ancestors are walked up to here


def group_folder(mount: CgroupMount, path: str, root: Path) -> Path:
    mount_root = mount.root.rstrip("/")
    if mount_root and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root) :]
    return root / mount.mount_point.lstrip("/") / path.lstrip("/")


def _locate(
    controller: str,
    mounts: list[CgroupMount],
    v1_paths: Mapping[str, str],
    v2_path: str | None,
    root: Path,
) -> _Group | None:
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers and controller in v1_paths:
            top = root / mount.mount_point.lstrip("/")
            return _Group(1, group_folder(mount, v1_paths[controller], root), top)
    if v2_path is None:
        return None
    for mount in mounts:
        if mount.version != 2:
            continue
        folder = group_folder(mount, v2_path, root)
        available = (_read(folder / "cgroup.controllers") or "").split()
        if controller in available:
            return _Group(2, folder, root / mount.mount_point.lstrip("/"))
    return None


def _ancestors(group: _Group) -> Iterator[Path]:
    """The group's folder, then each parent up to and including the mount point."""
    folder = group.folder
    while True:
        yield folder
        if folder == group.top or group.top not in folder.parents:
            return
        folder = folder.parent


# ---- reading each limit ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    value: float | int | None
    source: str


def _cpu_quota(group: _Group) -> _Found:
    best: float | None = None
    source = f"no quota (cgroup v{group.version} cpu controller)"
    for folder in _ancestors(group):
        if group.version == 1:
            quota = _read_int(folder / "cpu.cfs_quota_us")
            period = _read_int(folder / "cpu.cfs_period_us")
            if quota is None or period is None or quota <= 0 or period <= 0:
                continue
            detail = f"cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period}"
        else:
            text = _read(folder / "cpu.max")
            if text is None:
                continue
            parts = text.split()
            if len(parts) != 2 or parts[0] == "max":
                continue
            try:
                quota, period = int(parts[0]), int(parts[1])
            except ValueError:
                continue
            if quota <= 0 or period <= 0:
                continue
            detail = f"cpu.max {quota} {period}"
        cores = quota / period
        if best is None or cores < best:
            best = cores
            source = f"cgroup v{group.version} {detail} in {folder}"
    return _Found(best, source)


def _cpuset(group: _Group) -> _Found:
    names = (
        ("cpuset.cpus.effective",)
        if group.version == 2
        else ("cpuset.effective_cpus", "cpuset.cpus")
    )
    for name in names:
        text = _read(group.folder / name)
        if text is not None and text.strip():
            cpus = parse_cpu_list(text)
            return _Found(len(cpus), f"cgroup v{group.version} {name} {text.strip()}")
    return _Found(None, "no cpuset")


def _memory_limit(group: _Group) -> _Found:
    if group.version == 1:
        stat = _read(group.folder / "memory.stat") or ""
        for line in stat.splitlines():
            key, _, value = line.partition(" ")
            if key == "hierarchical_memory_limit" and value.strip().isdigit():
                limit = int(value)
                if limit < _UNLIMITED:
                    return _Found(
                        limit,
                        f"cgroup v1 memory.stat hierarchical_memory_limit in {group.folder}",
                    )
                return _Found(None, "no limit (cgroup v1 memory controller)")
    best: int | None = None
    source = f"no limit (cgroup v{group.version} memory controller)"
    name = "memory.limit_in_bytes" if group.version == 1 else "memory.max"
    for folder in _ancestors(group):
        text = _read(folder / name)
        if text is None or text.strip() == "max":
            continue
        try:
            limit = int(text.strip())
        except ValueError:
            continue
        if limit < _UNLIMITED and (best is None or limit < best):
            best = limit
            source = f"cgroup v{group.version} {name} in {folder}"
    return _Found(best, source)


def _host_cpus(root: Path) -> int:
    text = _read(root / "sys/devices/system/cpu/online")
    if text is not None and text.strip():
        return max(1, len(parse_cpu_list(text)))
    return os.cpu_count() or 1


def _host_memory(root: Path) -> int:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            return int(parts[1]) * 1024
    if root == Path("/"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise InvalidInput(f"{root / 'proc/meminfo'} has no MemTotal line")


# ---- the limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceLimits:
    """What this process may use. ``None`` means no limit of that kind."""

    host_cpus: int
    host_memory_bytes: int
    cpu_quota: float | None = None  # cores, from the CFS quota or cpu.max
    cpuset_cpus: int | None = None  # CPUs in the effective cpuset or the affinity mask
    memory_limit_bytes: int | None = None
    cpu_cgroup: str = "none"  # "v1", "v2" or "none": where the cpu controller was read
    memory_cgroup: str = "none"
    sources: Mapping[str, str] = field(default_factory=dict)  # what each figure was read from

    @property
    def cpu_budget(self) -> float:
        """Cores this process can use: the smallest of quota, cpuset and host CPUs."""
        candidates: list[float] = [float(self.host_cpus)]
        if self.cpu_quota is not None:
            candidates.append(self.cpu_quota)
        if self.cpuset_cpus is not None:
            candidates.append(float(self.cpuset_cpus))
        return min(candidates)

    @property
    def memory_bytes(self) -> int:
        """Memory this process can use: the cgroup limit, capped by the host's memory."""
        if self.memory_limit_bytes is None:
            return self.host_memory_bytes
        return min(self.memory_limit_bytes, self.host_memory_bytes)

    @classmethod
    def simulated(
        cls, cpus: float, memory_bytes: int, host_cpus: int | None = None
    ) -> ResourceLimits:
        """The limits a process would see under a quota of ``cpus`` and ``memory_bytes`` (a
        profile's): the host is assumed large enough for both."""
        host = host_cpus if host_cpus is not None else max(1, math.ceil(cpus))
        return cls(
            host_cpus=host,
            host_memory_bytes=memory_bytes,
            cpu_quota=cpus,
            memory_limit_bytes=memory_bytes,
            cpu_cgroup="profile",
            memory_cgroup="profile",
            sources={"cpu": "profile", "memory": "profile"},
        )


def detect_limits(root: Path = Path("/")) -> ResourceLimits:
    """Read the limits of the calling process (``root`` re-roots every path, for tests)."""
    mountinfo = _read(root / "proc/self/mountinfo") or ""
    proc_cgroup = _read(root / "proc/self/cgroup") or ""
    mounts = parse_mountinfo(mountinfo)
    v1_paths, v2_path = parse_proc_cgroup(proc_cgroup)
    host_cpus = _host_cpus(root)
    sources: dict[str, str] = {}

    cpu_group = _locate("cpu", mounts, v1_paths, v2_path, root)
    quota = _cpu_quota(cpu_group) if cpu_group else _Found(None, "no cpu controller")
    sources["cpu"] = quota.source

    cpuset_group = _locate("cpuset", mounts, v1_paths, v2_path, root)
    cpuset = _cpuset(cpuset_group) if cpuset_group else _Found(None, "no cpuset controller")
    cpuset_count = None if cpuset.value is None else int(cpuset.value)
    cpuset_source = cpuset.source
    if root == Path("/") and hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
        if cpuset_count is None or affinity < cpuset_count:
            cpuset_count, cpuset_source = affinity, f"affinity mask ({affinity} CPUs)"
    if cpuset_count is not None and cpuset_count >= host_cpus:
        cpuset_source += " (all host CPUs)"
    sources["cpuset"] = cpuset_source

    memory_group = _locate("memory", mounts, v1_paths, v2_path, root)
    memory = _memory_limit(memory_group) if memory_group else _Found(None, "no memory controller")
    sources["memory"] = memory.source

    return ResourceLimits(
        host_cpus=host_cpus,
        host_memory_bytes=_host_memory(root),
        cpu_quota=None if quota.value is None else float(quota.value),
        cpuset_cpus=cpuset_count,
        memory_limit_bytes=None if memory.value is None else int(memory.value),
        cpu_cgroup=f"v{cpu_group.version}" if cpu_group else "none",
        memory_cgroup=f"v{memory_group.version}" if memory_group else "none",
        sources=sources,
    )


# ---- the budget ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeBudget:
    """How the limits are split. Built only by :func:`derive_budget`."""

    cpu_budget: float  # cores, as found
    cores: int  # ceil(cpu_budget), at least 1
    memory_bytes: int  # the memory limit used (capped by the host's)
    intra_op_threads: int
    inter_op_threads: int
    numba_threads: int
    worker_threads: int
    queue_depth: int
    max_inflight: int
    max_message_bytes: int
    memory_budget_bytes: int
    memory_arena: bool
    overridden: frozenset[str] = frozenset()

    @property
    def threads_per_worker(self) -> int:
        return max(self.intra_op_threads + self.inter_op_threads - 1, self.numba_threads)

    @property
    def compute_threads(self) -> int:
        """Threads that may compute at once: every worker at full width, plus the event loop."""
        return self.worker_threads * self.threads_per_worker + COMPUTE_THREAD_SLACK

    @property
    def compute_thread_limit(self) -> int:
        return self.cores + COMPUTE_THREAD_SLACK

    def split(self) -> dict[str, int | bool]:
        """The derived settings, by name (what ``edgewise limits`` prints and the metric holds)."""
        return {
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "numba_threads": self.numba_threads,
            "worker_threads": self.worker_threads,
            "compute_threads": self.compute_threads,
            "queue_depth": self.queue_depth,
            "max_inflight": self.max_inflight,
            "max_message_bytes": self.max_message_bytes,
            "memory_budget_bytes": self.memory_budget_bytes,
            "memory_arena": self.memory_arena,
        }

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overridden"] = sorted(self.overridden)
        data["compute_threads"] = self.compute_threads
        data["compute_thread_limit"] = self.compute_thread_limit
        return data


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{name} must be a positive integer, not {value!r}")
    return value


def inflight_by_memory(memory_budget_bytes: int, max_message_bytes: int) -> int:
    """In-flight calls a memory budget holds when each may hold its serialized and its parsed
    message of the largest size, above an idle server's own memory."""
    return (memory_budget_bytes - BASELINE_RSS_BYTES) // (2 * max_message_bytes)


def auto_processes(budget: RuntimeBudget) -> int:
    """``--processes auto``: one server process per core of the CPU budget (a Python process
    serves one request at a time), as many as the memory budget holds at
    :data:`PROCESS_MEMORY_BYTES` each, at least one."""
    by_memory = budget.memory_budget_bytes // PROCESS_MEMORY_BYTES
    return max(1, min(budget.cores, by_memory))


def process_inflight_limit(
    max_inflight: int, processes: int, memory_budget_bytes: int, max_message_bytes: int
) -> int:
    """The in-flight limit of each of ``processes`` server processes sharing one port: the
    whole server's ``max_inflight`` (0: none), within what the process's share of the memory
    budget holds (at least 1).

    Not a share of the limit: an HTTP/2 client keeps its connection, and so all its calls, on
    the one process the kernel gave it, so one process may get most of the load while another
    idles. Shedding there at a fraction of the limit would only fail calls a single process
    would have taken: a retry comes back over the same connection to the same process."""
    if max_inflight == 0:
        return 0
    by_memory = inflight_by_memory(memory_budget_bytes // processes, max_message_bytes)
    return max(1, min(max_inflight, by_memory))


def derive_budget(
    limits: ResourceLimits, overrides: Mapping[str, int | bool] | None = None
) -> RuntimeBudget:
    """Split ``limits`` by the rule in this module's docstring. ``overrides`` (keys of
    :data:`OVERRIDABLE`) replace derived values, and the values derived from them follow (an
    explicit ``intra_op_threads`` of 2 halves the workers). Raises :class:`InvalidInput` for an
    unknown key, a bad value, or overrides whose compute threads exceed ``cores + slack``."""
    given = dict(overrides or {})
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise InvalidInput(
            f"unknown override(s) {', '.join(unknown)} (known: {', '.join(OVERRIDABLE)})"
        )
    for name, value in given.items():
        if OVERRIDABLE[name] is bool:
            if not isinstance(value, bool):
                raise InvalidInput(f"{name} must be true or false, not {value!r}")
        else:
            _positive_int(name, value)

    cpu_budget = limits.cpu_budget
    if cpu_budget <= 0:
        raise InvalidInput(f"the CPU budget must be positive, not {cpu_budget}")
    cores = max(1, math.ceil(round(cpu_budget, 6)))
    memory = limits.memory_bytes

    intra = int(given.get("intra_op_threads", 1 if cores < 4 else min(4, cores // 2)))
    inter = int(given.get("inter_op_threads", 1))
    numba = int(given.get("numba_threads", intra))
    per_worker = max(intra + inter - 1, numba)
    workers = int(given.get("worker_threads", max(1, cores // per_worker)))
    compute = workers * per_worker + COMPUTE_THREAD_SLACK
    if compute > cores + COMPUTE_THREAD_SLACK:
        raise InvalidInput(
            f"{workers} worker thread(s) x {per_worker} compute thread(s) each + "
            f"{COMPUTE_THREAD_SLACK} = {compute} compute threads, more than the CPU budget of "
            f"{cpu_budget:g} core(s) allows ({cores} + {COMPUTE_THREAD_SLACK})"
        )

    memory_budget = int(given.get("memory_budget_bytes", int(memory * MEMORY_BUDGET_FRACTION)))
    if memory_budget > memory:
        raise InvalidInput(
            f"memory_budget_bytes {format_bytes(memory_budget)} is above the memory limit of "
            f"{format_bytes(memory)}"
        )
    if "max_message_bytes" in given:
        max_message = int(given["max_message_bytes"])
    else:
        target = max(1, memory // 64)
        max_message = min(MAX_MESSAGE_BYTES, max(MIN_MESSAGE_BYTES, 1 << (target.bit_length() - 1)))
    queue_depth = QUEUE_DEPTH_PER_CORE * cores
    if "max_inflight" in given:
        inflight = int(given["max_inflight"])
    else:
        by_memory = inflight_by_memory(memory_budget, max_message)
        inflight = max(workers + 1, min(workers + 1 + queue_depth, by_memory))
    arena = bool(given.get("memory_arena", memory >= ARENA_MIN_MEMORY_BYTES))
    return RuntimeBudget(
        cpu_budget=cpu_budget,
        cores=cores,
        memory_bytes=memory,
        intra_op_threads=intra,
        inter_op_threads=inter,
        numba_threads=numba,
        worker_threads=workers,
        queue_depth=max(0, inflight - workers - 1),
        max_inflight=inflight,
        max_message_bytes=max_message,
        memory_budget_bytes=memory_budget,
        memory_arena=arena,
        overridden=frozenset(given),
    )


def numba_override(environ: Mapping[str, str]) -> dict[str, int]:
    """``NUMBA_NUM_THREADS`` (numba's own variable) as an override, when set."""
    raw = environ.get("NUMBA_NUM_THREADS", "").strip()
    if not raw:
        return {}
    try:
        return {"numba_threads": _positive_int("NUMBA_NUM_THREADS", int(raw))}
    except ValueError:
        raise InvalidInput(f"NUMBA_NUM_THREADS={raw!r} is not a positive integer") from None


def prepare_process(
    environ: MutableMapping[str, str] | None = None, limits: ResourceLimits | None = None
) -> RuntimeBudget:
    """Size the native libraries' pools before they are loaded: call it before numpy, numba or
    onnxruntime is imported. Sets ``NUMBA_NUM_THREADS`` to the derived numba threads and the BLAS
    variables of :data:`NATIVE_THREAD_ENV` to 1, leaving any variable already set alone."""
    env = os.environ if environ is None else environ
    budget = derive_budget(limits or detect_limits(), numba_override(env))
    env.setdefault("NUMBA_NUM_THREADS", str(budget.numba_threads))
    for name in NATIVE_THREAD_ENV:
        env.setdefault(name, "1")
    return budget


def describe_split(limits: ResourceLimits, split: Mapping[str, int | bool]) -> str:
    """One log line: what was found and how it was split."""
    parts = [f"{key}={int(value)}" for key, value in split.items()]
    return (
        f"limits: {limits.cpu_budget:g} CPU (cgroup {limits.cpu_cgroup}), "
        f"{format_bytes(limits.memory_bytes)} memory (cgroup {limits.memory_cgroup}); "
        f"split: {' '.join(parts)}"
    )


def publish_budget(registry: Any, limits: ResourceLimits, split: Mapping[str, int | bool]) -> None:
    """The limits and the split as gauges in ``registry`` (a prometheus CollectorRegistry):
    ``edgewise_resource_limit{resource}``, ``edgewise_runtime_split{setting}`` and
    ``edgewise_cgroup_info{cpu,memory}``."""
    from prometheus_client import Gauge

    found = Gauge(
        "edgewise_resource_limit",
        "Limits the server found: cpu_cores (quota, cpuset and host CPUs combined), "
        "memory_bytes (cgroup limit capped by host memory), host_cpus, host_memory_bytes.",
        ["resource"],
        registry=registry,
    )
    found.labels("cpu_cores").set(limits.cpu_budget)
    found.labels("memory_bytes").set(limits.memory_bytes)
    found.labels("host_cpus").set(limits.host_cpus)
    found.labels("host_memory_bytes").set(limits.host_memory_bytes)
    settings = Gauge(
        "edgewise_runtime_split",
        "How the limits were split into threads, queues and memory (booleans as 0/1).",
        ["setting"],
        registry=registry,
    )
    for key, value in split.items():
        settings.labels(key).set(int(value))
    info = Gauge(
        "edgewise_cgroup_info",
        "Where the cpu and memory limits were read: v1, v2 or none.",
        ["cpu", "memory"],
        registry=registry,
    )
    info.labels(limits.cpu_cgroup, limits.memory_cgroup).set(1)


# ---- command line ---------------------------------------------------------------------------

_RULES: Final[dict[str, str]] = {
    "intra_op_threads": "1 below 4 cores, else min(4, cores // 2)",
    "inter_op_threads": "1 (sequential execution)",
    "numba_threads": "= intra_op_threads",
    "worker_threads": "cores // max(intra + inter - 1, numba)",
    "compute_threads": f"workers x per-worker + {COMPUTE_THREAD_SLACK} (event loop)",
    "queue_depth": "max_inflight - workers - 1",
    "max_inflight": f"min(workers + 1 + {QUEUE_DEPTH_PER_CORE} x cores, "
    f"(budget - {BASELINE_RSS_BYTES >> 20} MiB) / (2 x message))",
    "max_message_bytes": "memory / 64 as a power of two, 1 MiB to 64 MiB",
    "memory_budget_bytes": f"{MEMORY_BUDGET_FRACTION:g} x memory",
    "memory_arena": f"on from {format_bytes(ARENA_MIN_MEMORY_BYTES)} of memory",
}


def _format_value(key: str, value: int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if key.endswith("_bytes"):
        return format_bytes(value)
    return str(value)


def format_report(
    limits: ResourceLimits,
    budget: RuntimeBudget,
    split: Mapping[str, int | bool],
    title: str,
    explicit: frozenset[str] = frozenset(),
) -> str:
    """The readable table ``edgewise limits`` prints."""
    quota = "none" if limits.cpu_quota is None else f"{limits.cpu_quota:g} cores"
    cpuset = "all" if limits.cpuset_cpus is None else f"{limits.cpuset_cpus} CPUs"
    memory = (
        "none" if limits.memory_limit_bytes is None else format_bytes(limits.memory_limit_bytes)
    )
    rows = [
        ("cpu quota", quota, limits.sources.get("cpu", "")),
        ("cpuset", cpuset, limits.sources.get("cpuset", "")),
        ("memory limit", memory, limits.sources.get("memory", "")),
        ("host", f"{limits.host_cpus} CPUs", format_bytes(limits.host_memory_bytes)),
    ]
    lines = [title, "", "FOUND"]
    lines += [f"  {a:<14} {b:<12} {c}" for a, b, c in rows]
    lines += [
        "",
        f"BUDGET  {budget.cpu_budget:g} CPU -> {budget.cores} core(s) rounded up; "
        f"{format_bytes(budget.memory_bytes)} memory",
        "",
        f"  {'SETTING':<20} {'VALUE':<11} RULE",
    ]
    for key, value in split.items():
        rule = _RULES.get(key, "")
        if key in explicit:
            rule = "set explicitly"
        elif key in budget.overridden:
            rule = "profile override"
        lines.append(f"  {key:<20} {_format_value(key, value):<11} {rule}")
    lines.append(
        f"\ncompute threads {budget.compute_threads} <= cores {budget.cores} + "
        f"{COMPUTE_THREAD_SLACK} (event loop)"
    )
    return "\n".join(lines)
