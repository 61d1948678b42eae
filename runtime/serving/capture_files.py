"""The capture folder: complete Parquet files only, the oldest removed past a size cap.

Every file is written whole or not at all (:func:`edgewise.runtime._fs.replacing`: a hidden
temporary name, fsync, rename, fsync of the folder), so a reader, and a server killed with
SIGKILL, never leaves a half-written ``.parquet`` behind: what a crash cuts short stays a hidden
``.tmp-`` file, removed when the folder is next opened. File names start with the write's time in
nanoseconds (zero-padded) and the writer's process id, so sorting by name is oldest first across
models and restarts.

Layout::

    DIR/<model>/<version>/<time_ns>-<pid>-<seq>.parquet     captured requests
    DIR/<model>/labels/<time_ns>-<pid>-<seq>.parquet         feedback labels (by request id)

pyarrow is imported only by :meth:`CaptureFolder.write` (it is the ``edgewise[data]`` extra): a
server without capture never loads it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import TEMP_PREFIX, replacing
from edgewise.runtime._process import pid_alive

__all__ = ["LABELS_FOLDER", "SUFFIX", "CaptureFolder", "StoredFile", "captured_files"]

log = logging.getLogger(__name__)

SUFFIX: Final = ".parquet"
#: The folder beside a model's versions that holds its feedback labels.
LABELS_FOLDER: Final = "labels"


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path
    size: int


def captured_files(root: Path) -> Iterator[Path]:
    """Every complete capture file under ``root``, oldest first (temporary files skipped)."""
    if not root.is_dir():
        return iter(())
    found = [
        path
        for path in root.rglob(f"*{SUFFIX}")
        if not path.name.startswith(".") and path.is_file()
    ]
    return iter(sorted(found, key=lambda path: path.name))


class CaptureFolder:
    """The files of one capture folder and its size cap. Not thread-safe: one writer thread
    owns it. ``on_change(files, bytes, removed)`` is called after every change with the folder's
    file count, its bytes and the files just removed by the cap (the caller's metrics)."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        on_change: Callable[[int, int, int], None] | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("the capture size cap must be at least 1 byte")
        self.root = root
        self.max_bytes = max_bytes
        self.on_change = on_change
        self._files: deque[StoredFile] = deque()
        self.bytes = 0
        self.removed = 0  # files removed by the cap since this folder was opened
        self._sequence = itertools.count()
        root.mkdir(parents=True, exist_ok=True)
        self._forget_temporary()
        for path in captured_files(root):
            with contextlib.suppress(FileNotFoundError):
                self._files.append(StoredFile(path, path.stat().st_size))
                self.bytes += self._files[-1].size
        self._enforce_cap()

    @property
    def files(self) -> list[StoredFile]:
        """The files this folder holds, oldest first."""
        return list(self._files)

    def _forget_temporary(self) -> None:
        """Remove what a write cut short by a crash left (hidden ``.tmp-`` files), unless the
        process that writes it still runs (a sibling of ``serve --processes N``)."""
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            if _writer_alive(path):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("capture: removed %s, left by a write that did not finish", path)

    def next_path(self, folder: str) -> Path:
        """A new file's path in ``DIR/<folder>/`` (named oldest-first, unique per process)."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):06d}{SUFFIX}"
        return self.root / folder / name

    def write(self, folder: str, table: Any) -> StoredFile:
        """Write ``table`` (a pyarrow Table) as one new complete Parquet file in
        ``DIR/<folder>/``, then remove the oldest files while the folder is over its cap (the
        new one too, if it alone is larger). An error leaves no file and changes nothing."""
        import pyarrow.parquet as pq

        path = self.next_path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as temporary:
            pq.write_table(
                table, temporary, compression="zstd", use_dictionary=["model", "version"]
            )
        stored = StoredFile(path, path.stat().st_size)
        self._files.append(stored)
        self.bytes += stored.size
        self._enforce_cap()
        return stored

    def _enforce_cap(self) -> None:
        removed = 0
        while self.bytes > self.max_bytes and self._files:
            oldest = self._files.popleft()
            with contextlib.suppress(FileNotFoundError):
                oldest.path.unlink()
            self.bytes -= oldest.size
            removed += 1
        self.removed += removed
        if self.on_change is not None:
            self.on_change(len(self._files), self.bytes, removed)


def _writer_alive(path: Path) -> bool:
    """Whether the process named in a temporary file's name (``...-<pid>-<seq>.parquet``, see
    :meth:`CaptureFolder.next_path`) is another one that still runs."""
    parts = path.name.removesuffix(SUFFIX).split("-")
    try:
        pid = int(parts[-2])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and pid_alive(pid)
