"""The Ray engine's reaper: when the driver (``edgewise batch --engine ray``) dies without
shutting Ray down (SIGKILL, OOM kill), the processes the local Ray it started leave behind (the
dashboard agent outlives the raylet and GCS) are killed.

The driver starts ``python -m edgewise.runtime.batch.reaper PID`` (its own session, so a Ctrl-C
of the driver's process group does not reach it) before ``ray.init``, with a pipe on its
standard input. While the driver lives, the reaper notes every descendant of it (pid and start
time, from ``/proc``) a few times a second; when the pipe reaches end of file without the
driver having written ``done`` (the driver is gone), it sends SIGKILL to each noted process that
still exists with the same start time (never to a reused pid), then exits. A driver that shuts
Ray down writes ``done`` and the reaper exits without killing anything. Linux only (``/proc``);
elsewhere the driver runs without one.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final, TextIO

__all__ = ["Reaper", "descendants"]

_POLL: Final = 0.2
_PROC: Final = Path("/proc")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        found = _stat(int(entry.name))
        if found is not None:
            children.setdefault(found[0], []).append(int(entry.name))
            starts[int(entry.name)] = found[1]
    result: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid in result or pid not in starts:
            continue
        result[pid] = starts[pid]
        stack.extend(children.get(pid, []))
    return result


def _watch(driver: int, pipe: TextIO) -> int:
    me = os.getpid()
    noted: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([pipe], [], [], _POLL)
        if ready:
            line = pipe.readline()
            if line.strip() == "done":
                return 0
            if not line:
                break  # end of file: the driver is gone
        noted.update({p: s for p, s in descendants(driver).items() if p != me})
    for pid, start in noted.items():
        found = _stat(pid)
        if found is not None and found[1] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return 0


class Reaper:
    """The driver's side: start the reaper, then :meth:`release` it after ``ray.shutdown``."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        if not _PROC.is_dir():
            return
        self._process = subprocess.Popen(
            [sys.executable, "-m", "edgewise.runtime.batch.reaper", str(os.getpid())],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def release(self) -> None:
        """Ray was shut down: the reaper exits without killing anything."""
        process = self._process
        if process is None or process.stdin is None:
            return
        self._process = None
        try:
            process.stdin.write("done\n")
            process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), sys.stdin))
