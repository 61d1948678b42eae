"""One drift report over several processes' windows: the counts are summed, then judged once.

With ``serve --processes N`` every worker process has its own monitor and sees only the
connections the kernel handed it, so a report of one process's window describes a share of the
traffic. A window's statistics (:class:`~edgewise.runtime.serving.monitor.WindowStats`: the binned
counts, moments, category counts) are mergeable: the counts add, the moments combine exactly
(Chan et al.), so the sum of the workers' windows is the window one process would have had over
all their rows. :func:`merged_report` folds them into a scratch monitor of the same reference
profile and settings (no row or time limit, so nothing rolls) and asks it for its report: the
scores and the verdict are the monitor's own, never recomputed here.

What does not merge: the exact tests (each process keeps a reservoir of its own rows) and the
decayed view (counts without statistics); those reports stay one process's
(:data:`MERGED_WINDOWS`). The timer's published judgement (the gauges) stays per process too.

:func:`encode_window` / :func:`decode_window` carry one process's window between sibling
processes (pickle, the form WindowStats is built for), decoded by an unpickler that builds only
the monitor's and the kernels' classes and numpy arrays, nothing else.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.monitor import DriftReport, ModelMonitor, WindowStats

__all__ = [
    "MERGED_WINDOWS",
    "WorkerWindow",
    "decode_window",
    "encode_window",
    "local_window",
    "merged_report",
]

#: The windows whose reports are merged across processes (they have statistics to sum).
MERGED_WINDOWS: Final = ("current", "previous", "lifetime")


@dataclass
class WorkerWindow:
    """One process's share of a window: its statistics (None: a ``previous`` window that has
    not completed there yet), its count of requests refused for a wrong datatype and of closed
    windows its drift history dropped."""

    stats: WindowStats | None
    wrong_type: dict[str, int] = field(default_factory=dict)
    windows_dropped: int = 0


def local_window(monitor: ModelMonitor, window: str) -> WorkerWindow:
    """This process's share of ``window`` (a copy: the monitor is not changed). Pure."""
    if window not in MERGED_WINDOWS:
        raise InvalidInput(
            f"window {window!r} is not merged across processes (one of {', '.join(MERGED_WINDOWS)})"
        )
    stats = monitor.snapshot(window)
    return WorkerWindow(stats, dict(monitor.wrong_type), monitor.windows_dropped)


def merged_report(
    monitor: ModelMonitor, window: str, shares: Sequence[WorkerWindow], scores: bool = True
) -> DriftReport:
    """The report of ``window`` over every process's share (``shares``, this process's among
    them), judged once at the monitor's full rates, as :meth:`ModelMonitor.report` judges one
    process's window. ``monitor`` gives the reference profile and the settings. Pure."""
    config = replace(monitor.config, window_rows=0, window_seconds=0.0, reservoir_rows=0)
    scratch = ModelMonitor(monitor.model, monitor.version, monitor.reference, config)
    present = [share.stats for share in shares if share.stats is not None]
    for stats in present:
        scratch.fold(stats)
    report = scratch.report("current", exact=False, scores=scores)
    report.window = window
    wrong_type: dict[str, int] = {}
    for share in shares:
        for name, refused in share.wrong_type.items():
            wrong_type[name] = wrong_type.get(name, 0) + refused
    report.wrong_type = wrong_type
    report.windows_dropped = sum(share.windows_dropped for share in shares)
    if window == "previous" and not present:
        report.reason = "no window has completed yet"
    return report


# ---- between sibling processes -----------------------------------------------------------------

_NUMPY_GLOBALS: Final = frozenset(
    {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "scalar"),
    }
)
_CLASS_MODULES: Final = ("edgewise.kernels.", "edgewise.runtime.serving.monitor")


class _WindowUnpickler(pickle.Unpickler):
    """Builds numpy arrays and the classes of the monitor and the kernels only."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_CLASS_MODULES):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"a window may not hold {module}.{name}")


def encode_window(share: WorkerWindow) -> bytes:
    return pickle.dumps(
        (share.stats, share.wrong_type, share.windows_dropped), protocol=pickle.HIGHEST_PROTOCOL
    )


def decode_window(data: bytes) -> WorkerWindow:
    """A sibling's :func:`encode_window`; :class:`InvalidInput` for anything else."""
    try:
        stats, wrong_type, windows_dropped = _WindowUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"a sibling process's window cannot be read: {exc}") from None
    if stats is not None and not isinstance(stats, WindowStats):
        raise InvalidInput("a sibling process's window is not a window")
    if not isinstance(wrong_type, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in wrong_type.items()
    ):
        raise InvalidInput("a sibling process's wrong-type counts are not counts")
    if type(windows_dropped) is not int or windows_dropped < 0:
        raise InvalidInput("a sibling process's dropped-window count is not a count")
    return WorkerWindow(stats, wrong_type, windows_dropped)
