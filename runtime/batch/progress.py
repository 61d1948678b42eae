"""Progress of a batch job: a bar with rows/s and ETA on a terminal, plain log lines otherwise.

The fraction done is counted in rows when every input's row count is known (Parquet, ``.npy``),
else in bytes of input read. Rows finished by an earlier run of a resumed job count as done from
the start; rows/s and the ETA are measured on this run's rows only.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Final, TextIO

from edgewise.runtime.batch.options import ProgressMode

__all__ = ["Progress", "ProgressMode", "format_count", "format_duration"]

log = logging.getLogger("edgewise.runtime.batch")

_BAR_WIDTH: Final = 28


def format_count(value: float) -> str:
    """``1234567`` -> ``1.23M``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Thread-safe progress counter and display.

    ``file_rows`` / ``file_bytes`` describe the inputs (a row count may be None: then progress
    is measured in bytes). Call :meth:`already_done` for rows earlier runs finished,
    :meth:`advance` per chunk scored, :meth:`tick` from one thread now and then, and
    :meth:`finish` at the end.
    """

    def __init__(
        self,
        file_rows: Sequence[int | None],
        file_bytes: Sequence[int],
        mode: ProgressMode = "auto",
        stream: TextIO | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "log"
        self.mode = mode
        self.log_interval = log_interval
        self.by_rows = all(r is not None for r in file_rows)
        self.total_rows = sum(r or 0 for r in file_rows) if self.by_rows else None
        self.file_bytes = list(file_bytes)
        self.total_bytes = max(1, sum(self.file_bytes))
        self._read = [0] * len(self.file_bytes)
        self._lock = threading.Lock()
        self.rows = 0  # rows finished, earlier runs included
        self.rows_this_run = 0
        self.started = time.monotonic()
        self._start_fraction = 0.0
        self._last_log = self.started
        self._drawn = False

    def fraction(self) -> float:
        if self.total_rows is not None:
            return 1.0 if self.total_rows == 0 else min(1.0, self.rows / self.total_rows)
        return min(1.0, sum(self._read) / self.total_bytes)

    def already_done(self, rows: int) -> None:
        """Rows earlier runs of the job finished (not counted in this run's rate)."""
        with self._lock:
            self.rows += rows
            self._start_fraction = self.fraction()

    def advance(self, rows: int, file: int, bytes_read: int) -> None:
        """A chunk was scored and written."""
        with self._lock:
            self.rows += rows
            self.rows_this_run += rows
            self._read[file] = max(self._read[file], bytes_read)

    def seen(self, file: int, bytes_read: int) -> None:
        """A chunk an earlier run finished was read again (for the report): only the position
        in the input moves."""
        with self._lock:
            self._read[file] = max(self._read[file], bytes_read)

    def file_done(self, file: int) -> None:
        with self._lock:
            self._read[file] = self.file_bytes[file]

    def _line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = self.rows_this_run / elapsed
        fraction = self.fraction()
        gained = fraction - self._start_fraction
        if self.total_rows is None:
            gained = fraction  # bytes: re-read chunks of earlier runs move it too
        eta = elapsed * (1.0 - fraction) / gained if gained > 0 else None
        eta_text = format_duration(eta) if eta is not None else "?"
        total = f"/{format_count(self.total_rows)}" if self.total_rows is not None else ""
        return (
            f"{fraction * 100:5.1f}% {format_count(self.rows)}{total} rows, "
            f"{format_count(rate)} rows/s, elapsed {format_duration(elapsed)}, ETA {eta_text}"
        )

    def tick(self, force: bool = False) -> None:
        """Redraw the bar, or log a line when the interval has passed."""
        if self.mode == "off":
            return
        with self._lock:
            line = self._line()
            fraction = self.fraction()
        if self.mode == "bar":
            filled = round(fraction * _BAR_WIDTH)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {line}\x1b[K")
            self.stream.flush()
            self._drawn = True
            return
        now = time.monotonic()
        if force or now - self._last_log >= self.log_interval:
            self._last_log = now
            log.info("batch: %s", line)

    def finish(self) -> None:
        """Draw the final state (and end the bar's line)."""
        self.tick(force=True)
        if self.mode == "bar" and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
