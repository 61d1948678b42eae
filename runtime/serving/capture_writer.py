"""The capture's writer process: Arrow and Parquet out of the serving process's GIL.

A server that captures (``serve --capture-dir``) starts one (:mod:`~edgewise.runtime.serving.
capture_process`) and feeds it, through a pipe on its stdin, frames of captured requests
already turned into plain columns (:func:`~edgewise.runtime.serving.capture_tables.encode`) and
of feedback labels. For each frame it builds the Arrow table, writes it as one complete Parquet
file (:class:`~edgewise.runtime.serving.capture_files.CaptureFolder`: temporary name, fsync,
rename; oldest files removed past the size cap) and reports on its stdout, one JSON line each:
what it wrote (or failed to write), the folder's size, and that the frame is done (with its
own CPU time so far: the server publishes it, as its own CPU time does not hold a child's).

It runs at a lower priority (nice 10) than the server, ignores SIGINT and SIGTERM (in its own
session: a terminal's Ctrl-C or a stop of the server's process group does not cut a write
short) and ends when its stdin closes: when the server stops (after it sent what was queued) or
dies (SIGKILL included); it writes every frame it received first. A server that died leaves it
reporting to nobody: it goes on writing.

Frames: 8 bytes (little-endian length) then a pickle (protocol 5) of ``("records", Batch)`` or
``("labels", model, [(time_ns, [(request_id, row, label), ...]), ...])``. Only the server that
started this process writes to its stdin (a pipe it created), so the frames are trusted.

    python -m edgewise.runtime.serving.capture_writer FOLDER MAX_BYTES
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct
import sys
import time
from pathlib import Path
from typing import IO, Any, Final

__all__ = ["HEADER", "frame", "main"]

#: A frame's header: the length of the pickle that follows.
HEADER: Final = struct.Struct("<Q")


def frame(message: tuple[Any, ...]) -> bytes:
    """One frame of a message (see the module's docstring)."""
    body = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(body)) + body


def _read(source: IO[bytes]) -> tuple[Any, ...] | None:
    """The next message, or None at the end of the stream (a frame cut short included: its
    sender died while writing it)."""
    header = source.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    body = source.read(size)
    if len(body) < size:
        return None
    message: tuple[Any, ...] = pickle.loads(body)  # from the server that started us
    return message


class _Reports:
    """The JSON lines to the server; once it is gone (a broken pipe), writes go on unreported."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.gone = False

    def __call__(self, **report: Any) -> None:
        if self.gone:
            return
        try:
            self.sink.write(json.dumps(report).encode() + b"\n")
            self.sink.flush()
        except OSError:  # the server died: the files still matter
            self.gone = True


def _oversize(stored: Any, folder: Any) -> dict[str, int]:
    """``{"oversize": cap}`` if a file just written was removed at once (alone larger than the
    folder's size cap), else nothing."""
    return {} if stored.path.exists() else {"oversize": folder.max_bytes}


def _handle(message: tuple[Any, ...], folder: Any, report: _Reports) -> int:
    """Write one frame's file(s); the records it reported (written or failed)."""
    from edgewise.runtime.serving.capture_files import LABELS_FOLDER
    from edgewise.runtime.serving.capture_tables import labels_table, tables

    kind = message[0]
    if kind == "records":
        batch = message[1]
        name, version = batch["model"], batch["version"]
        try:
            built = tables(batch)
        except Exception as exc:  # a record that cannot be turned into Arrow
            report(failed=name, records=batch["records"], error=str(exc))
            return int(batch["records"])
        for table, count in built:
            try:
                stored = folder.write(f"{name}/{version}", table)
            except Exception as exc:
                report(failed=name, records=count, error=str(exc))
                continue
            report(written=name, records=count, bytes=stored.size, **_oversize(stored, folder))
        return sum(count for _, count in built)
    if kind == "labels":
        name, batches = message[1], message[2]
        count = sum(len(labels) for _, labels in batches)
        try:
            stored = folder.write(f"{name}/{LABELS_FOLDER}", labels_table(batches))
        except Exception as exc:
            report(failed=name, records=count, error=str(exc))
            return count
        report(labels=name, records=count, bytes=stored.size, **_oversize(stored, folder))
        return count
    report(fatal=f"unknown frame {kind!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root, max_bytes = Path(args[0]), int(args[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(10)
    # The reports get stdout's pipe to themselves: whatever a library prints goes to stderr.
    sink = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    report = _Reports(sink)
    try:
        # Everything a frame needs, loaded now (pyarrow loads pandas at its first conversion
        # of a numpy array): the first frame costs what the others do.
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet

        import edgewise.runtime.serving.capture_tables  # noqa: F401
        from edgewise.runtime.serving.capture_files import CaptureFolder

        pa.array(np.zeros(1))

        folder = CaptureFolder(
            root,
            max_bytes,
            lambda files, size, removed: report(folder=[files, size, removed]),
        )
    except Exception as exc:
        # With its CPU (the imports': a writer that cannot start costs that much each time).
        report(fatal=f"cannot open the capture folder {root}: {exc}", cpu=time.process_time())
        return 1
    report(ready=True, cpu=time.process_time())  # start-up's CPU (imports, the folder's scan)
    source = sys.stdin.buffer
    while (message := _read(source)) is not None:
        reported = 0
        try:
            reported = _handle(message, folder, report)
        except Exception as exc:  # whatever it was, the next frame is written
            report(fatal=f"a capture frame failed: {exc}")
        # The frame is done: the server counts what was not reported as lost to a write error.
        report(done=reported, cpu=time.process_time())
    return 0


if __name__ == "__main__":
    sys.exit(main())
