"""The serving process's side of the capture's writer process
(:mod:`~edgewise.runtime.serving.capture_writer`): it starts it, sends it frames, reads its
reports on a thread of its own (calling ``on_report`` with each) and stops it.

Each frame sent is remembered (its model and records) until the writer says it is done; a
frame the writer did not finish (it died: killed, out of memory) is handed to ``on_lost``, and
the records a finished frame did not report (written or failed) to ``on_lost`` too. A dead
writer is never waited on: :attr:`WriterProcess.dead` says so, and the owner starts another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgewise.runtime.serving.capture_writer import frame

__all__ = ["WriterProcess"]

log = logging.getLogger(__name__)


class WriterProcess:
    """One writer process on ``root`` with a size cap of ``max_bytes``. ``on_report(report)``:
    each JSON report but ``done`` (see the writer's module), on the reader thread, and
    ``{"cpu": seconds}``: the CPU time it spent since it last said;
    ``on_lost(model, records, reason)``: records sent that the writer will never report (reason
    ``writer_exited``, ``stopped`` after :meth:`abort`, or ``write_error`` for those a finished
    frame did not report)."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        on_report: Callable[[dict[str, Any]], None],
        on_lost: Callable[[str, int, str], None],
    ) -> None:
        self.on_report = on_report
        self.on_lost = on_lost
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgewise.runtime.serving.capture_writer", str(root),
             str(max_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches the server, which stops it
        )  # fmt: skip
        self._sent: deque[tuple[str, int]] = deque()  # frames not yet done: (model, records)
        self._lock = threading.Condition()
        self.dead = False
        self.finished = 0  # frames it finished (0: it never got to write)
        #: The reason the records it will never write are counted under: writer_exited (it
        #: died), stopped (the server stopped it: :meth:`abort`).
        self.reason = "writer_exited"
        self._cpu = 0.0  # the CPU seconds it reported so far
        self._reader = threading.Thread(
            target=self._read, name="edgewise-capture-reports", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exit_code(self) -> int | None:
        """Its exit status once :attr:`dead` (negative: the signal that killed it), else
        None."""
        return self.process.returncode

    def send(self, message: tuple[Any, ...], model: str, records: int) -> bool:
        """Send one frame (waits while the pipe is full: the writer is behind); False, and the
        records counted lost, if the writer is dead."""
        data = frame(message)
        with self._lock:
            if self.dead:
                lost = True
            else:
                lost = False
                self._sent.append((model, records))
        if lost:
            self.on_lost(model, records, self.reason)
            return False
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            stdin.flush()
        except (OSError, ValueError):  # it died (its reader counts what it had)
            return False
        return True

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until the writer is done with every frame sent (or is dead); False if
        ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._sent and not self.dead:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Close its stdin (it writes what it received, then exits) and wait for it; killed if
        it takes longer than ``timeout``."""
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):  # a frame it will not read: counted lost
                stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("capture: the writer process took over %gs to finish: killed", timeout)
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout)

    def abort(self, timeout: float = 10.0) -> None:
        """Kill it now (a server's stop that could not wait for it: a stalled disk, a hung
        write): what it was sent and had not written is counted lost as ``stopped``, and a
        thread blocked sending to it gets an error at once."""
        self.reason = "stopped"
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self._reader.join(timeout)

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            cpu = float(report.pop("cpu", 0.0))
            if cpu > self._cpu:
                self.on_report({"cpu": cpu - self._cpu})
                self._cpu = cpu
            if "done" in report:
                with self._lock:
                    self.finished += 1
                    model, records = self._sent.popleft()
                    self._lock.notify_all()
                if records > report["done"]:
                    self.on_lost(model, records - report["done"], "write_error")
            elif "ready" not in report:
                self.on_report(report)
        # Its output ended: it exits (it is reaped here, so that its exit status is known by
        # the time it is said to be dead).
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)
        with self._lock:  # the writer exited: what it had not finished is lost
            self.dead = True
            lost = list(self._sent)
            self._sent.clear()
            self._lock.notify_all()
        for model, records in lost:
            self.on_lost(model, records, self.reason)
