"""``edgewise run --profile NAME -- ARGS``: run an edgewise command under a profile's limits on a
host without a container engine.

It creates a cgroup (v2 when the cpu and memory controllers are available on the cgroup2 mount,
else one v1 group per controller), writes the profile's CPU quota and memory limit, starts
``edgewise ARGS`` with the process already inside the group (it joins between fork and exec, so
every thread and every page is accounted from the start), forwards SIGTERM, SIGINT, SIGHUP and
SIGQUIT to it, and removes the group when it exits, killing anything left inside first. Its exit
status is the command's, or 128 + the signal that killed it (137 after an OOM kill, which it also
reports on stderr).

New groups are children of the caller's own group for each controller, so the limits nest under
whatever already limits the caller. On cgroup v2 the cpu and memory controllers it had to enable
in the parent's ``cgroup.subtree_control`` are disabled again when its group is removed (after a
failure too), unless another group below the parent is there by then. Creating them needs root,
or on cgroup v2 a delegated subtree; without the rights the error says so in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from edgewise.runtime.config.limits import (
    CgroupMount,
    format_bytes,
    group_folder,
    parse_mountinfo,
    parse_proc_cgroup,
)
from edgewise.runtime.errors import EdgewiseError
from edgewise.runtime.resources.container_profiles import Profile, load_profile

__all__ = [
    "CFS_PERIOD_US",
    "CgroupError",
    "CgroupPlan",
    "CgroupSession",
    "add_run",
    "plan_cgroup",
    "run",
]

#: The CFS period written with the quota (the kernel's default period).
CFS_PERIOD_US: Final = 100_000
_FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_NO_RIGHTS: Final = (
    "`edgewise run` needs root, or a cgroup v2 subtree delegated to this user with the cpu and "
    "memory controllers enabled"
)


class CgroupError(EdgewiseError):
    """A cgroup could not be found, created, configured or removed."""


@dataclass(frozen=True)
class CgroupPlan:
    """What :class:`CgroupSession` creates and writes."""

    version: int
    folders: tuple[Path, ...]  # to create, one per v1 controller hierarchy, or the v2 group
    writes: tuple[tuple[Path, str], ...]  # in order; a missing optional file is skipped
    optional: frozenset[Path] = field(default_factory=frozenset)
    memory_folder: Path | None = None  # where OOM kills are counted

    def describe(self) -> str:
        return f"cgroup v{self.version} " + ", ".join(str(f) for f in self.folders)


def _v2_candidate(
    mounts: Sequence[CgroupMount], v2_path: str | None, root: Path
) -> tuple[Path, Path] | None:
    """(parent group, cgroup.controllers path) when cpu and memory are available on cgroup2."""
    if v2_path is None:
        return None
    for mount in mounts:
        if mount.version != 2:
            continue
        parent = group_folder(mount, v2_path, root)
        try:
            available = (parent / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "cpu" in available and "memory" in available:
            return parent, parent / "cgroup.controllers"
    return None


def plan_cgroup(profile: Profile, name: str, root: Path = Path("/")) -> CgroupPlan:
    """Where the group for ``profile`` goes and what is written (``root`` re-roots paths)."""
    try:
        mounts = parse_mountinfo((root / "proc/self/mountinfo").read_text())
        v1_paths, v2_path = parse_proc_cgroup((root / "proc/self/cgroup").read_text())
    except OSError as exc:
        raise CgroupError(f"cannot read this process's cgroups: {exc}") from None
    quota = max(1000, round(profile.cpus * CFS_PERIOD_US))
    memory = str(profile.memory_bytes)
    v1_cpu = next((m for m in mounts if m.version == 1 and "cpu" in m.controllers), None)
    v1_memory = next((m for m in mounts if m.version == 1 and "memory" in m.controllers), None)
    v2 = _v2_candidate(mounts, v2_path, root)
    if v1_cpu is None and v1_memory is None and v2 is not None:
        parent, _ = v2
        group = parent / name
        writes: tuple[tuple[Path, str], ...] = (
            (parent / "cgroup.subtree_control", "+cpu +memory"),
            (group / "cpu.max", f"{quota} {CFS_PERIOD_US}"),
            (group / "memory.max", memory),
            (group / "memory.swap.max", "0"),
            (group / "memory.oom.group", "1"),
        )
        return CgroupPlan(
            2,
            (group,),
            writes,
            frozenset({group / "memory.swap.max", group / "memory.oom.group"}),
            group,
        )
    if v1_cpu is None or v1_memory is None:
        missing = "cpu" if v1_cpu is None else "memory"
        raise CgroupError(
            f"no usable {missing} controller: it is neither mounted as cgroup v1 nor available "
            "on the cgroup2 mount (see /proc/self/mountinfo)"
        )
    cpu_folder = group_folder(v1_cpu, v1_paths.get("cpu", "/"), root) / name
    memory_folder = group_folder(v1_memory, v1_paths.get("memory", "/"), root) / name
    folders = (cpu_folder,) if cpu_folder == memory_folder else (cpu_folder, memory_folder)
    v1_writes = (
        (cpu_folder / "cpu.cfs_period_us", str(CFS_PERIOD_US)),
        (cpu_folder / "cpu.cfs_quota_us", str(quota)),
        (memory_folder / "memory.limit_in_bytes", memory),
        (memory_folder / "memory.memsw.limit_in_bytes", memory),
    )
    optional = frozenset({memory_folder / "memory.memsw.limit_in_bytes"})
    return CgroupPlan(1, folders, v1_writes, optional, memory_folder)


def _rights_error(action: str, path: Path, exc: OSError) -> CgroupError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CgroupError(f"cannot {action} {path}: {exc.strerror}; {_NO_RIGHTS}")
    return CgroupError(f"cannot {action} {path}: {exc.strerror}")


def _pids(folder: Path) -> list[int]:
    try:
        return [int(line) for line in (folder / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


class CgroupSession:
    """Creates the planned groups on enter and removes them on exit (killing what is left)."""

    def __init__(self, plan: CgroupPlan) -> None:
        self.plan = plan
        self._created: list[Path] = []
        # (cgroup.subtree_control, the controllers this session enabled there): disabled again
        # by remove(), so that a run leaves the parent group as it found it.
        self._enabled_here: list[tuple[Path, list[str]]] = []

    def __enter__(self) -> CgroupSession:
        try:
            for folder in self.plan.folders:
                try:
                    folder.mkdir()
                except FileExistsError:
                    raise CgroupError(f"cgroup {folder} already exists") from None
                except OSError as exc:
                    raise _rights_error("create cgroup", folder, exc) from None
                self._created.append(folder)
            for path, value in self.plan.writes:
                if path in self.plan.optional and not path.exists():
                    continue
                if path.name == "cgroup.subtree_control":
                    self._enable_controllers(path, value)
                    continue
                try:
                    path.write_text(value)
                except OSError as exc:
                    if path in self.plan.optional:
                        continue
                    raise _rights_error(f"write {value!r} to", path, exc) from None
        except BaseException:
            self.remove()
            raise
        return self

    def _enable_controllers(self, path: Path, value: str) -> None:
        """Enable the controllers of ``value`` not enabled yet, remembering which."""
        missing = self._missing(path, value)
        if not missing:
            return
        wanted = " ".join(f"+{c}" for c in missing)
        try:
            path.write_text(wanted)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(
                    f"cannot enable cpu and memory in {path}: the group has processes of "
                    "its own (cgroup v2 allows controllers only below groups without "
                    "processes); start edgewise run from a leaf of a delegated subtree"
                ) from None
            raise _rights_error(f"write {wanted!r} to", path, exc) from None
        self._enabled_here.append((path, missing))

    @staticmethod
    def _missing(path: Path, value: str) -> list[str]:
        """The controllers of ``value`` (``+cpu +memory``) not enabled in ``path`` yet."""
        try:
            enabled = set(path.read_text().split())
        except OSError:
            enabled = set()
        return [item.lstrip("+") for item in value.split() if item.lstrip("+") not in enabled]

    def _restore_subtree_control(self) -> None:
        """Disable the controllers this session enabled, unless another group below the same
        parent is there (it may be another run's, relying on them)."""
        while self._enabled_here:
            path, controllers = self._enabled_here[-1]
            with contextlib.suppress(OSError):
                if any(child.is_dir() for child in path.parent.iterdir()):
                    self._enabled_here.pop()
                    continue
            value = " ".join(f"-{c}" for c in controllers)
            try:
                path.write_text(value)
            except OSError as exc:
                raise _rights_error(f"write {value!r} to", path, exc) from None
            self._enabled_here.pop()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def join(self) -> None:
        """Move the calling process into every group (called in the child before exec)."""
        pid = str(os.getpid())
        for folder in self.plan.folders:
            (folder / "cgroup.procs").write_text(pid)

    def oom_kills(self) -> int:
        """OOM kills counted in the memory group so far."""
        folder = self.plan.memory_folder
        if folder is None:
            return 0
        name = "memory.oom_control" if self.plan.version == 1 else "memory.events"
        try:
            text = (folder / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left in the groups, then remove them (children of the caller), and
        disable the controllers this session enabled in the parent."""
        deadline = time.monotonic() + timeout
        for folder in reversed(self._created):
            kill_file = folder / "cgroup.kill"
            while True:
                pids = _pids(folder)
                if not pids:
                    try:
                        folder.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                            raise CgroupError(
                                f"cannot remove cgroup {folder}: {exc.strerror}"
                            ) from None
                elif kill_file.exists():
                    with contextlib.suppress(OSError):
                        kill_file.write_text("1")
                else:
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot empty cgroup {folder}: pids {pids} remain")
                time.sleep(0.02)
        self._created.clear()
        self._restore_subtree_control()


def _remove_stale(plan: CgroupPlan, prefix: str) -> None:
    """Remove empty groups of earlier runs whose process is gone (a run killed with SIGKILL)."""
    for parent in {folder.parent for folder in plan.folders}:
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                owner = child.name.rpartition("-")[2]
                if not (child.name.startswith(prefix) and owner.isdigit()):
                    continue
                if Path(f"/proc/{owner}").exists():
                    continue
                with contextlib.suppress(OSError):
                    child.rmdir()


@contextlib.contextmanager
def _forward_signals(target: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        for process in target:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(
    profile: Profile,
    command: Sequence[str],
    *,
    name: str | None = None,
    root: Path = Path("/"),
) -> int:
    """Run ``command`` inside a new cgroup with ``profile``'s limits; its exit status."""
    group_name = name or f"edgewise-{profile.name}-{os.getpid()}"
    plan = plan_cgroup(profile, group_name, root)
    if name is None:
        _remove_stale(plan, "edgewise-")
    env = {**os.environ, **profile.environment()}
    children: list[subprocess.Popen[bytes]] = []
    with _forward_signals(children), CgroupSession(plan) as session:
        print(
            f"edgewise run: profile {profile.name} ({profile.summary()}) in {plan.describe()}",
            file=sys.stderr,
            flush=True,
        )
        try:
            # The wrapper runs no threads, so joining the group between fork and exec is safe.
            process = subprocess.Popen(command, env=env, preexec_fn=session.join)  # noqa: PLW1509
        except subprocess.SubprocessError as exc:
            raise CgroupError(
                f"cannot start {command[0]} inside {plan.describe()}: {exc}"
            ) from None
        except OSError as exc:
            raise CgroupError(f"cannot start {command[0]}: {exc.strerror}") from None
        children.append(process)
        code = process.wait()
        killed = session.oom_kills()
    if code < 0:
        if code == -signal.SIGKILL and killed:
            print(
                f"edgewise run: the command was killed by the kernel's OOM killer (memory limit "
                f"{format_bytes(profile.memory_bytes)})",
                file=sys.stderr,
            )
        return 128 - code
    return code


# ---- command line --------------------------------------------------------------------------


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run an edgewise command inside a cgroup with a profile's limits",
        description="Create a cgroup with the CPU quota and memory limit of a profile "
        "(containers/profiles/NAME.toml), run `edgewise ARGS...` inside it with the profile's "
        "overrides in its environment, and remove the cgroup when it exits. Needs root (or a "
        "delegated cgroup v2 subtree). Example: edgewise run --profile edge-small -- serve "
        "--repo model-repo",
    )
    p.add_argument("--profile", required=True, help="profile name, or the path of a .toml file")
    p.add_argument(
        "--profiles-dir",
        type=Path,
        help="folder of profiles (default: ./containers/profiles, then the installed ones)",
    )
    p.add_argument("--cgroup-name", help="name of the group (default edgewise-PROFILE-PID)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the edgewise command to run")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise CgroupError("nothing to run: give the edgewise command after --, e.g. -- serve")
    dirs = [args.profiles_dir] if args.profiles_dir else None
    profile = load_profile(args.profile, dirs)
    command = [sys.executable, "-m", "edgewise.runtime.cli", *rest]
    return run(profile, command, name=args.cgroup_name)
