"""The drift history: each closed window's judged report, kept on disk, bounded.

A monitor judges a window that closed once more, at the timer's next tick (its last look, see
:mod:`edgewise.runtime.serving.monitor`), and publishes that judgement through its
:class:`~edgewise.runtime.serving.monitor.DriftPublisher`. :class:`RecordingPublisher` wraps the
server's publisher (the Prometheus gauges) and also appends every such closed-window report here,
so the monitor itself knows nothing of the disk. Every closed window: the monitor queues each
window that closes (at most ``monitoring.closed_windows``) and the next tick judges them all,
oldest first, so a process that closes several windows between two ticks records each; one
dropped from a full queue is counted in the reports' ``windows_dropped`` (and the
``edgewise_drift_windows_dropped`` gauge), so a gap in the history is never silent. Layout::

    HISTORY/MODEL/VERSION/<unix ns, 20 digits>-<writer>.json

one file per closed window, in format :data:`FORMAT` (strict JSON: a non-finite number is
``null``). Why a file per window and not one appended log: several server processes
(``serve --processes N``) record into the same folder at once, and whole files written by the
one atomic write (:mod:`edgewise.runtime._fs`) need neither a lock nor a torn-line rule: a reader
sees a window's file whole or not at all. A window closes every ``window_rows`` rows (10,000 by
default), so a file per window is cheap. The history is bounded: after each write the writer
removes the oldest files beyond ``max_windows`` per model version (with several writers the
count may briefly exceed it by one per writer).

Where: ``REPO/.edgewise-history`` by default (the repository skips hidden folders);
``EDGEWISE_DRIFT_HISTORY`` names another folder, or ``off``; ``EDGEWISE_DRIFT_HISTORY_WINDOWS``
the bound (default 1,000). Reading (:func:`read_history`) is pure and never creates a folder:
a history that does not exist reads as empty. A file that cannot be read as a report (damaged
by something other than this module) is skipped and named, never fatal.

With ``--processes N`` each worker records its own windows (``writer`` is its process id), so
the history holds every worker's traffic; a report merged across the workers' live windows is
:mod:`edgewise.runtime.serving.drift_merge`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import TEMP_PREFIX, write_text_atomic
from edgewise.runtime.config.values import count
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.monitor import DriftPublisher, DriftReport, FeatureReport

__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_WINDOWS",
    "ENV_DIR",
    "ENV_WINDOWS",
    "FORMAT",
    "DriftHistory",
    "HistoryEntry",
    "HistoryRead",
    "RecordingPublisher",
    "history_from_environment",
    "read_history",
    "report_from_json",
    "report_to_json",
]

log = logging.getLogger(__name__)

FORMAT: Final = "edgewise.drift-history/1"
DEFAULT_DIR: Final = ".edgewise-history"
ENV_DIR: Final = "EDGEWISE_DRIFT_HISTORY"
ENV_WINDOWS: Final = "EDGEWISE_DRIFT_HISTORY_WINDOWS"
DEFAULT_WINDOWS: Final = 1000

# A model name or version as one path segment (the repository's own folder names pass).
_SEGMENT: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_ENTRY: Final = re.compile(r"^(\d{20})-([A-Za-z0-9_.\-]{1,64})\.json$")


def _segment(what: str, text: str) -> str:
    if not isinstance(text, str) or not _SEGMENT.match(text) or text in (".", ".."):
        raise InvalidInput(f"{what} {text!r} is not a name the history can hold")
    return text


# ---- reports as JSON -------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _floats(values: Mapping[str, float]) -> dict[str, float | None]:
    return {key: _finite_or_none(value) for key, value in values.items()}


def report_to_json(report: DriftReport) -> dict[str, Any]:
    """``report`` as strict JSON values (non-finite numbers become ``null``)."""
    return {
        "model": report.model,
        "version": report.version,
        "window": report.window,
        "available": report.available,
        "reason": report.reason,
        "rows": report.rows,
        "reference_rows": report.reference_rows,
        "insufficient_data": report.insufficient_data,
        "drifting": report.drifting,
        "wrong_type": dict(report.wrong_type),
        "computed_at": report.computed_at,
        "thresholds": _floats(report.thresholds),
        "windows_dropped": report.windows_dropped,
        "features": [
            {
                "name": f.name,
                "kind": f.kind,
                "scores": _floats(f.scores),
                "drifting": f.drifting,
                "warning": f.warning,
                "reasons": list(f.reasons),
                "statistics": _floats(f.statistics),
            }
            for f in report.features
        ],
    }


def _field(where: str, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if isinstance(value, bool) and kind is not bool:
        raise InvalidInput(f"{where}.{key} must not be a boolean")
    if not isinstance(value, kind):
        raise InvalidInput(f"{where}.{key} is missing or of the wrong type: {value!r}")
    return value


def _number_map(where: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{where} must be an object, not {value!r}")
    result: dict[str, float] = {}
    for key, item in value.items():
        if item is None:
            result[str(key)] = math.nan
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise InvalidInput(f"{where}.{key} must be a number or null, not {item!r}")
        else:
            result[str(key)] = float(item)
    return result


def report_from_json(data: Any, where: str = "report") -> DriftReport:
    """A :class:`DriftReport` from :func:`report_to_json`'s form, every field checked
    (:class:`~edgewise.runtime.errors.InvalidInput` naming the first bad one)."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{where} must be an object")
    features = []
    for index, item in enumerate(_field(where, data, "features", list)):
        at = f"{where}.features[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidInput(f"{at} must be an object")
        reasons = _field(at, item, "reasons", list)
        if not all(isinstance(r, str) for r in reasons):
            raise InvalidInput(f"{at}.reasons must be a list of strings")
        features.append(
            FeatureReport(
                name=_field(at, item, "name", str),
                kind=_field(at, item, "kind", str),
                scores=_number_map(f"{at}.scores", item.get("scores")),
                drifting=_field(at, item, "drifting", bool),
                warning=_field(at, item, "warning", bool),
                reasons=list(reasons),
                statistics=_number_map(f"{at}.statistics", item.get("statistics")),
            )
        )
    wrong_type = _field(where, data, "wrong_type", dict)
    return DriftReport(
        model=_field(where, data, "model", str),
        version=_field(where, data, "version", str),
        window=_field(where, data, "window", str),
        available=_field(where, data, "available", bool),
        reason=_field(where, data, "reason", str),
        rows=count(f"{where}.rows", data.get("rows")),
        reference_rows=count(f"{where}.reference_rows", data.get("reference_rows")),
        insufficient_data=_field(where, data, "insufficient_data", bool),
        drifting=_field(where, data, "drifting", bool),
        features=features,
        wrong_type={str(k): count(f"{where}.wrong_type.{k}", v) for k, v in wrong_type.items()},
        computed_at=float(_field(where, data, "computed_at", (int, float))),
        thresholds=_number_map(f"{where}.thresholds", data.get("thresholds")),
        # Absent in files written before the closed windows were queued: none dropped then known.
        windows_dropped=count(f"{where}.windows_dropped", data.get("windows_dropped", 0)),
    )


# ---- writing ---------------------------------------------------------------------------------


class DriftHistory:
    """The history folder ``root`` as one writer sees it: :meth:`record` appends a closed
    window's report (creating the folders it needs) and removes the oldest beyond
    ``max_windows`` per model version. ``writer`` tells this writer's files apart from other
    processes' (default: the process id)."""

    def __init__(self, root: Path, max_windows: int = DEFAULT_WINDOWS, writer: str = "") -> None:
        if max_windows < 1:
            raise InvalidInput(f"the drift history must keep at least 1 window, not {max_windows}")
        self.root = root
        self.max_windows = max_windows
        self.writer = _segment("history writer", writer or str(os.getpid()))
        self._lock = threading.Lock()
        self._last_ns = 0

    def folder(self, model: str, version: str) -> Path:
        return self.root / _segment("model", model) / _segment("version", version)

    def record(self, report: DriftReport) -> Path:
        """Append ``report`` (whole, atomically) and prune; returns its file."""
        folder = self.folder(report.model, report.version)
        text = json.dumps(
            {"format": FORMAT, "writer": self.writer, "report": report_to_json(report)},
            allow_nan=False,
            separators=(",", ":"),
        )
        with self._lock:
            # Ordered by time across writers, unique and increasing within one.
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            path = folder / f"{self._last_ns:020d}-{self.writer}.json"
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
            self._prune(folder)
        return path

    def _prune(self, folder: Path) -> None:
        entries = sorted(p for p in folder.iterdir() if _ENTRY.match(p.name))
        for old in entries[: max(0, len(entries) - self.max_windows)]:
            with contextlib.suppress(FileNotFoundError):  # another writer pruned it first
                old.unlink()


def history_from_environment(
    repo: Path, environ: Mapping[str, str] | None = None
) -> DriftHistory | None:
    """The history a server writes: ``REPO/.edgewise-history`` unless ``EDGEWISE_DRIFT_HISTORY``
    names another folder or ``off`` (None), bounded by ``EDGEWISE_DRIFT_HISTORY_WINDOWS``.
    Checked here, before the server starts; nothing is created until a window closes."""
    env = os.environ if environ is None else environ
    where = env.get(ENV_DIR, "").strip()
    if where.lower() == "off":
        return None
    raw = env.get(ENV_WINDOWS, "").strip()
    windows = DEFAULT_WINDOWS
    if raw:
        if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
            raise InvalidInput(f"{ENV_WINDOWS}={raw!r} must be a whole number >= 1")
        windows = int(raw)
    return DriftHistory(Path(where) if where else repo / DEFAULT_DIR, windows)


class RecordingPublisher:
    """A :class:`~edgewise.runtime.serving.monitor.DriftPublisher` that hands every judgement to
    ``inner`` (the gauges) and also records each closed window's judgement (a report of the
    ``previous`` window: the monitor's last look at a window that closed) in ``history``.
    A failed write (a full disk, a read-only repository) never stops the gauges or the monitor;
    it is logged as a warning once per model version until a write succeeds again."""

    def __init__(self, inner: DriftPublisher | None, history: DriftHistory) -> None:
        self.inner = inner
        self.history = history
        self._failing: set[tuple[str, str]] = set()  # versions whose last write failed

    def publish_drift(self, report: DriftReport) -> None:
        if self.inner is not None:
            self.inner.publish_drift(report)
        if report.window == "previous" and report.available and report.rows > 0:
            key = (report.model, report.version)
            try:
                self.history.record(report)
            except (OSError, InvalidInput) as exc:
                if key not in self._failing:
                    self._failing.add(key)
                    log.warning(
                        "drift history: cannot record the closed windows of model %s version "
                        "%s (%s); the gauges are unaffected (EDGEWISE_DRIFT_HISTORY=DIR|off)",
                        report.model,
                        report.version,
                        exc,
                    )
            else:
                self._failing.discard(key)

    def forget_drift(self, model: str, version: str) -> None:
        if self.inner is not None:
            self.inner.forget_drift(model, version)


# ---- reading (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One closed window: its report, which writer (process) recorded it, and when."""

    report: DriftReport
    writer: str
    recorded_ns: int
    path: Path


@dataclass
class HistoryRead:
    """What :func:`read_history` found: the windows, oldest first, per version, and the files
    it skipped (damaged: name -> why)."""

    entries: list[HistoryEntry] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def versions(self) -> list[str]:
        return sorted({e.report.version for e in self.entries}, key=_version_key)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (1 << 62, version)


def read_history(root: Path, model: str, version: str | None = None) -> HistoryRead:
    """The recorded windows of ``model`` (every version, or ``version``), oldest first. Pure:
    reads files, creates and changes nothing; a missing folder is an empty history."""
    base = root / _segment("model", model)
    if version:
        folders = [base / _segment("version", version)]
    else:
        folders = (
            sorted(
                (p for p in base.iterdir() if p.is_dir() and _SEGMENT.match(p.name)),
                key=lambda p: _version_key(p.name),
            )
            if base.is_dir()
            else []
        )
    result = HistoryRead()
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(TEMP_PREFIX):
                continue  # a write cut short by a crash: never a window
            match = _ENTRY.match(path.name)
            if match is None:
                continue
            try:
                entry = _read_entry(path, int(match.group(1)))
            except (OSError, ValueError, InvalidInput) as exc:
                result.skipped[str(path)] = str(exc)
                continue
            if entry.report.model != model or entry.report.version != folder.name:
                result.skipped[str(path)] = "holds another model version's report"
                continue
            result.entries.append(entry)
    result.entries.sort(key=lambda e: (_version_key(e.report.version), e.recorded_ns))
    return result


def _read_entry(path: Path, recorded_ns: int) -> HistoryEntry:
    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise InvalidInput(f"not a {FORMAT} file")
    writer = data.get("writer")
    if not isinstance(writer, str):
        raise InvalidInput("writer is missing")
    return HistoryEntry(report_from_json(data.get("report")), writer, recorded_ns, path)


def _refuse_constant(name: str) -> Any:
    raise InvalidInput(f"{name} is not JSON")
