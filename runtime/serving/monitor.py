"""Per model-version monitoring: live feature statistics, schema skew and drift scores against the
reference profile. The only caller of :mod:`edgewise.kernels` in the server.

Request path (:meth:`ModelMonitor.observe`): one fused kernel call (moments + reference-binned
histogram) for the packed numeric tensor, one for the categorical codes, one for the PCA
reconstruction error of the numeric tensor (multivariate drift: count, sum and sum of squares of
the rows' errors), one fused call for the model's output columns (prediction drift: the same
binned statistics as a numeric feature), and a slice copy into the current window's reservoir (a
ring buffer of its most recent rows, for the exact tests). Numeric schema skew needs no extra
work: values outside the reference ``[min, max]`` are exactly the histogram's underflow and
overflow columns, and NaN/inf are counted by the moments.

A report's ``features`` are one family of tests judged together (:func:`judge`): the input
features, then the model's output columns (kind ``prediction``), then the multivariate
reconstruction error (kind ``multivariate``); the Holm correction runs over all of them, so the
family-wise false-alarm rate of the model's verdict stays ``alpha`` with the new detectors.

Windows: a *current* window, tumbling by row count and/or time; the *previous* complete window; an
exponentially *decayed* view updated on each timer tick; and *lifetime* totals. The current and the
previous window each have their reservoir: the exact tests of a report cover the rows of the window
it names, never rows of another one.

State changes only in its transitions: :meth:`ModelMonitor.observe` and ``fold`` (the request
path and the batch scorer), ``evaluate`` (the timer: tick, judge, log, publish), ``reset`` and
``close`` (the version is unloaded). ``evaluate`` and ``reset`` publish the judged window to the
monitor's :class:`DriftPublisher` (the Prometheus gauges) before they return, ``close`` has it
forget the version, so the gauges never show a window that is gone. ``evaluate`` judges a
window only at its planned looks (the doublings of ``min_rows``, and once when it closes), with
the rates split across them, so the false-alarm rate holds per window, not per tick (rule:
:mod:`edgewise.runtime.serving.monitor_config`); between looks the published judgement stays.
Reports (``report``, ``snapshot``) are pure: any number of readers, any number of times. Drift is
computed on demand and on the timer, never per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from edgewise.kernels import (
    CategoricalState,
    FeatureProfile,
    ReconstructionState,
    drift_scores,
    holm,
    ks_2samp,
    open_ended,
    wasserstein_samples,
)
from edgewise.runtime.errors import InvalidInput, ModelNotFound
from edgewise.runtime.package.reference_profile import MultivariateProfile, ReferenceProfile
from edgewise.runtime.serving.monitor_config import (
    DEFAULT_THRESHOLDS,
    MIN_EXPECTED,
    PSI_SMOOTHING,
    MonitorConfig,
    look_alpha_share,
    look_level,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "EXACT_WINDOWS",
    "MULTIVARIATE_NAME",
    "WINDOWS",
    "DriftPublisher",
    "DriftReport",
    "FeatureReport",
    "Judgement",
    "ModelMonitor",
    "MonitorConfig",
    "WindowStats",
    "judge",
    "reconstruction_test",
]

log = logging.getLogger(__name__)

WINDOWS: Final = ("current", "previous", "decayed", "lifetime")
#: The windows that keep a reservoir of their rows, hence the windows the exact tests can cover.
EXACT_WINDOWS: Final = ("current", "previous")

#: Called ``(kind, details)`` when something worth an alert happens (the server's AlertHook.fire).
AlertHook = Callable[[str, Mapping[str, Any]], object]


#: The name of the multivariate detector's entry in a report's features.
MULTIVARIATE_NAME: Final = "pca_reconstruction"


@dataclass
class FeatureReport:
    """One test of a report: an input feature (kind ``numeric`` / ``categorical``), a column of
    the model's outputs (``prediction``) or the multivariate reconstruction error
    (``multivariate``)."""

    name: str
    kind: str
    scores: dict[str, float]
    drifting: bool
    warning: bool
    reasons: list[str]
    statistics: dict[str, float]


@dataclass
class DriftReport:
    model: str
    version: str
    window: str
    available: bool
    reason: str = ""
    rows: int = 0
    reference_rows: int = 0
    insufficient_data: bool = False
    drifting: bool = False
    features: list[FeatureReport] = field(default_factory=list)
    wrong_type: dict[str, int] = field(default_factory=dict)
    computed_at: float = 0.0
    thresholds: dict[str, float] = field(default_factory=dict)
    #: detector ("prediction", "multivariate") -> why the report has no entry of it.
    unavailable: dict[str, str] = field(default_factory=dict)
    #: Closed windows of the version dropped unjudged so far (more closed between two ticks
    #: than ``MonitorConfig.closed_windows``): the history misses exactly these.
    windows_dropped: int = 0


class DriftPublisher(Protocol):
    """Where a monitor publishes its judged window (the server's Prometheus gauges)."""

    def publish_drift(self, report: DriftReport) -> None:
        """Show ``report`` as the model version's state, replacing everything shown before."""

    def forget_drift(self, model: str, version: str) -> None:
        """Show nothing more for a model version (it is unloaded)."""


class Judgement(NamedTuple):
    """What a transition judged: the report of the judged window, and whether the model version
    started drifting with it."""

    report: DriftReport
    started_drifting: bool


class _Closed(NamedTuple):
    """A closed window waiting for its last look: its number (windows opened before it) and
    its statistics (never changed after the roll, so the timer reads them without the lock)."""

    number: int
    stats: WindowStats


class Reservoir:
    """The most recent rows of one window's numeric tensor, for the exact tests."""

    __slots__ = ("_filled", "_position", "_rows")

    def __init__(self, capacity: int, features: int) -> None:
        self._rows = np.full((capacity, features), np.nan, dtype=np.float64)
        self._position = 0
        self._filled = 0

    def clear(self) -> None:
        self._position = 0
        self._filled = 0

    def rows(self) -> npt.NDArray[np.float64]:
        """A copy of the rows held (in ring order: the exact tests do not depend on order)."""
        return self._rows[: self._filled].copy()

    def add(self, batch: npt.NDArray[Any]) -> None:
        ring = self._rows
        size = ring.shape[0]
        if size == 0:
            return
        rows = batch.shape[0]
        if rows >= size:
            ring[:] = batch[-size:]
            self._position = 0
            self._filled = size
            return
        start = self._position
        end = start + rows
        if end <= size:
            ring[start:end] = batch
        else:
            first = size - start
            ring[start:] = batch[:first]
            ring[: rows - first] = batch[first:]
        self._position = end % size
        self._filled = min(size, self._filled + rows)


@dataclass
class _WindowView:
    """A consistent copy of what a report reads, taken under the monitor's lock."""

    stats: WindowStats | None
    numeric: npt.NDArray[Any] | None
    categorical: npt.NDArray[Any] | None
    rows: float
    recent: npt.NDArray[np.float64] | None
    wrong_type: dict[str, int]


class WindowStats:
    """Statistics of one span of traffic: numeric profile, categorical counts, missing counts.

    The monitor's windows are ``WindowStats``; so are the statistics a caller collects on its own
    (:meth:`ModelMonitor.new_window`, :meth:`ModelMonitor.observe_window`) and folds in later
    (:meth:`ModelMonitor.fold`), e.g. the batch scorer's per-chunk statistics. Picklable (numpy
    arrays and the kernels' states), so statistics can be collected on another machine.
    """

    __slots__ = (
        "categorical",
        "missing",
        "numeric",
        "outputs",
        "reconstruction",
        "rows",
        "started",
    )

    def __init__(self, reference: ReferenceProfile) -> None:
        ref = reference
        self.numeric = FeatureProfile(ref.numeric.edges) if ref.numeric is not None else None
        #: The model's output columns (prediction drift); rows seen: ``outputs.moments``.
        self.outputs = FeatureProfile(ref.outputs.values.edges) if ref.outputs is not None else None
        mv = ref.multivariate
        self.reconstruction = (
            ReconstructionState(
                len(ref.numeric.names), mv.columns, mv.mean, mv.scale, mv.components
            )
            if mv is not None and ref.numeric is not None
            else None
        )
        self.categorical = (
            CategoricalState([len(c.categories) for c in ref.categorical])
            if ref.categorical
            else None
        )
        self.missing = np.zeros(len(ref.categorical), dtype=np.int64)
        self.rows = 0
        self.started = time.monotonic()

    def merge(self, other: WindowStats) -> None:
        if self.numeric is not None and other.numeric is not None:
            self.numeric.merge(other.numeric)
        if self.categorical is not None and other.categorical is not None:
            self.categorical.merge(other.categorical)
        if self.outputs is not None and other.outputs is not None:
            self.outputs.merge(other.outputs)
        if self.reconstruction is not None and other.reconstruction is not None:
            self.reconstruction.merge(other.reconstruction)
        self.missing += other.missing
        self.rows += other.rows

    def copy(self, reference: ReferenceProfile) -> WindowStats:
        new = WindowStats(reference)
        new.merge(self)
        new.started = self.started
        return new


class ModelMonitor:
    """Live statistics and drift of one model version against its reference profile.

    ``publisher`` (optional) receives the judged window after each :meth:`evaluate` and
    :meth:`reset`, and is told to forget the version at :meth:`close`; ``on_alert`` (optional)
    is called ``("data_drift", details)`` when a judgement finds the version newly drifting.
    """

    def __init__(
        self,
        model: str,
        version: str,
        reference: ReferenceProfile,
        config: MonitorConfig,
        publisher: DriftPublisher | None = None,
        on_alert: AlertHook | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.reference = reference
        self.config = config
        self._publisher = publisher
        self._on_alert = on_alert
        # _lock guards the windows (the request path takes it); _judging orders the transitions
        # that judge and publish, so that two of them never publish out of order.
        self._lock = threading.Lock()
        self._judging = threading.Lock()
        self._closed = False
        self._numeric_input = reference.numeric.input if reference.numeric is not None else None
        # The reference's counts with open outer bins, as each window's are compared: a
        # reference's +-inf rows sit in its underflow/overflow columns (its edges come from its
        # finite values), and only folding both tables the same way keeps them comparable.
        self._reference_numeric_counts = (
            open_ended(reference.numeric.counts, reference.numeric.edges)
            if reference.numeric is not None
            else None
        )
        self._categorical_inputs = [c.input for c in reference.categorical]
        outputs = reference.outputs
        #: The model output the monitor reads (prediction drift), None without one: a front end
        #: passes it to :meth:`observe` (and asks the model for it when a request does not).
        self.prediction_output = outputs.output if outputs is not None else None
        self._output_columns = outputs.columns if outputs is not None else ()
        self._reference_output_counts = (
            open_ended(outputs.values.counts, outputs.values.edges) if outputs is not None else None
        )
        self._codes = [c.codes() for c in reference.categorical]
        self._unseen = [len(c.categories) for c in reference.categorical]
        self.current = WindowStats(self.reference)
        self.previous: WindowStats | None = None
        self.lifetime = WindowStats(self.reference)
        n_features = len(reference.numeric.names) if reference.numeric is not None else 0
        self._current_rows = Reservoir(config.reservoir_rows, n_features)
        self._previous_rows = Reservoir(config.reservoir_rows, n_features)
        self.wrong_type: dict[str, int] = {}
        # Decayed view: float counts, updated at each tick from the lifetime totals' growth.
        self._decayed_numeric: npt.NDArray[np.float64] | None = None
        self._decayed_categorical: npt.NDArray[np.float64] | None = None
        self._decayed_rows = 0.0
        self._last_tick = time.monotonic()
        self._last_totals = self._totals()
        self.drifting = False
        self.drifting_features: set[str] = set()
        # Looks (``_judging`` held): the windows opened so far (a roll or a reset opens one;
        # counted under _lock), the window the looks below belong to, the level of its last
        # look (-1: none yet), and the last judgement published.
        self._window_number = 0
        self._looked_window = 0
        self._looked_level = -1
        self._last: Judgement | None = None
        # Windows closed since the timer's last drain (under _lock: the request path rolls), the
        # oldest dropped beyond config.closed_windows, and how many were dropped so far.
        self._closed_windows: deque[_Closed] = deque(maxlen=max(config.closed_windows, 1))
        self._windows_dropped = 0
        # The timer's last look at a current window: (that window's number, its report), and
        # whether a timer judges this monitor at all (evaluate was called).
        self._look_of_current: tuple[int, DriftReport] | None = None
        self._timer = False

    # ---- the request path ----------------------------------------------------------------------

    def observe(
        self,
        feeds: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> None:
        """Add one request's inputs (already validated against the model's schema) and, for
        prediction drift, the model's ``outputs`` for them (read: :attr:`prediction_output`;
        without it the window's prediction statistics do not grow)."""
        with self._lock:
            self._observe(self.current, feeds, outputs)
            if self._numeric_input is not None:
                self._current_rows.add(feeds[self._numeric_input])
            self._maybe_roll()

    def _observe(
        self,
        window: WindowStats,
        feeds: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]] | None,
    ) -> None:
        # Everything that can refuse the input runs before the window changes.
        numeric = feeds[self._numeric_input] if self._numeric_input is not None else None
        categorical = self._categorical_codes(feeds) if self._categorical_inputs else None
        rows_in = numeric.shape[0] if numeric is not None else None
        predicted = self._output_block(outputs, rows_in) if outputs is not None else None
        rows = 0
        if numeric is not None:
            assert window.numeric is not None
            window.numeric.update(numeric)
            if window.reconstruction is not None:
                window.reconstruction.update(numeric)
            rows = numeric.shape[0]
        if predicted is not None and window.outputs is not None:
            window.outputs.update(predicted)
        if categorical is not None:
            codes, missing = categorical
            assert window.categorical is not None
            window.categorical.update(codes)
            window.missing += missing
            rows = codes.shape[0]
        window.rows += rows

    def _output_block(
        self, outputs: Mapping[str, npt.NDArray[Any]], rows: int | None
    ) -> npt.NDArray[Any] | None:
        """The profiled columns of the model's prediction output, ``[rows, columns]``, or None
        when ``outputs`` lacks it (a request whose answer did not compute it)."""
        name = self.prediction_output
        if name is None or name not in outputs:
            return None
        values = np.asarray(outputs[name])
        if values.ndim != 2:
            values = values.reshape(values.shape[0] if values.ndim else 1, -1)
        columns = self._output_columns
        if values.shape[1] <= columns[-1] or values.dtype.kind not in "iuf":
            raise InvalidInput(
                f"model output {name!r}: {values.shape[1]} column(s) of {values.dtype}; the "
                f"reference profile reads numeric column(s) {list(columns)}"
            )
        if rows is not None and values.shape[0] != rows:
            raise InvalidInput(
                f"model output {name!r}: {values.shape[0]} row(s) for {rows} input row(s)"
            )
        if values.shape[1] == len(columns):  # every column, in order
            block = values
        else:
            # One C-ordered copy (the kernel's layout): a binary classifier's positive column.
            block = (
                np.ascontiguousarray(values[:, columns[0] : columns[0] + 1])
                if len(columns) == 1
                else values[:, list(columns)]
            )
        return block if block.dtype.kind == "f" else block.astype(np.float64)

    def _maybe_roll(self) -> None:
        """Close the current window once it is full (lock held)."""
        config = self.config
        window = self.current
        if (config.window_rows and window.rows >= config.window_rows) or (
            config.window_seconds and time.monotonic() - window.started >= config.window_seconds
        ):
            self._roll()

    # ---- statistics collected elsewhere ----------------------------------------------------------

    def new_window(self) -> WindowStats:
        """Empty statistics shaped for this monitor's reference profile, owned by the caller."""
        return WindowStats(self.reference)

    def observe_window(
        self,
        window: WindowStats,
        feeds: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> None:
        """Add inputs (and the model's ``outputs``) to a caller-owned ``window`` (from
        :meth:`new_window`), as :meth:`observe` adds them to the current one; the monitor's own
        state (windows, reservoir) is untouched, so different windows can be observed on
        different threads at once."""
        self._observe(window, feeds, outputs)

    def fold(self, window: WindowStats) -> None:
        """Merge statistics collected elsewhere into the current window (its rows count towards
        the window's size, which then rolls as usual). The reservoir is not fed: exact tests
        see only rows given to :meth:`observe`."""
        with self._lock:
            self.current.merge(window)
            self._maybe_roll()

    def snapshot(self, window: str = "current") -> WindowStats | None:
        """A copy of the statistics of a named window (``current``, ``previous`` or
        ``lifetime``), or None for a ``previous`` window that has not completed yet."""
        if window == "decayed":
            raise InvalidInput("the decayed window holds counts only, no statistics")
        return self._view(window, exact=False).stats

    def _categorical_codes(
        self, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(codes, one column per categorical input; missing values per input) of a request."""
        columns = []
        missing = np.zeros(len(self._categorical_inputs), dtype=np.int64)
        for index, name in enumerate(self._categorical_inputs):
            values = feeds[name].reshape(-1)
            table = self._codes[index]
            unseen = self._unseen[index]
            codes = np.empty(values.shape[0], dtype=np.int64)
            for row, value in enumerate(values):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                if not text:
                    missing[index] += 1
                codes[row] = table.get(text, unseen)
            columns.append(codes)
        return np.ascontiguousarray(np.stack(columns, axis=1)), missing

    @property
    def windows_dropped(self) -> int:
        """Closed windows dropped from the full queue to the drift history, since load."""
        return self._windows_dropped

    def count_wrong_type(self, input_name: str) -> None:
        with self._lock:
            self.wrong_type[input_name] = self.wrong_type.get(input_name, 0) + 1

    # ---- transitions -----------------------------------------------------------------------------

    def _roll(self) -> None:
        """Close the current window, its reservoir with it, and queue it for the timer's last
        look (lock held: no I/O, one append; a full queue drops its oldest, counted)."""
        closed = self.current
        self.lifetime.merge(closed)
        self.previous = closed
        queue = self._closed_windows
        if len(queue) == queue.maxlen:
            self._windows_dropped += 1
        queue.append(_Closed(self._window_number, closed))
        self.current = WindowStats(self.reference)
        self._previous_rows, self._current_rows = self._current_rows, self._previous_rows
        self._current_rows.clear()
        self._window_number += 1

    def reset(self) -> Judgement:
        """Start over: drop the current and the previous window (their rows stay in the
        lifetime totals) and both reservoirs, then judge and publish as :meth:`evaluate` does, so
        that nothing from before the reset is judged or shown any more (a model that drifted is
        not still judged on the pre-reset window until the fresh one reaches ``min_rows``)."""
        with self._judging:
            self._refuse_if_closed()
            with self._lock:
                self.lifetime.merge(self.current)
                self.current = WindowStats(self.reference)
                self.previous = None
                self._closed_windows.clear()  # never judged: nothing before a reset is
                self._current_rows.clear()
                self._previous_rows.clear()
                self._window_number += 1
                self._looked_window, self._looked_level = self._window_number, -1
            return self._judge("current", self.config)

    def evaluate(self) -> Judgement | None:
        """The timer's transition: roll a time-limited window, fold new traffic into the decayed
        view, then take the looks that are due (:meth:`due_looks`: the last look of each window
        that closed since the last tick, oldest first, then the current window's look at a new
        doubling of ``min_rows``), each judged at its share of the rates, logged and published in
        that order. With no look due the published judgement stays and is returned
        (``started_drifting`` False), unless nothing judged is shown yet: then the current
        window is published unjudged (too few rows). None once the monitor is closed."""
        with self._judging:
            if self._closed:
                return None
            self._timer = True
            self._tick()
            with self._lock:
                closed = list(self._closed_windows)
                self._closed_windows.clear()
            judgements = [self._last_look(window) for window in closed]
            judgements += [self._look(window, level) for window, level in self._current_look()]
            if judgements:
                return Judgement(judgements[-1].report, any(j.started_drifting for j in judgements))
            last = self._last
            if last is None or last.report.insufficient_data:
                # Nothing judged to keep showing: the current window, unjudged below min_rows
                # (a look at level 0 if it reached min_rows in the meantime).
                return self._look("current", 0)
            return Judgement(last.report, False)

    def due_looks(self) -> list[tuple[str, int]]:
        """The looks the timer takes now, in order, as (window, level): the last look of each
        window that closed since the last tick (``previous``, oldest first, each at the level
        after its last one), and the current window's if its rows reached a level above its
        last look's. Pure."""
        with self._lock:
            closed = [window.number for window in self._closed_windows]
        looks = []
        for number in closed:
            # Its looks so far are known if it is the window the looks belong to, else it had
            # none (it closed before the timer saw it).
            last = self._looked_level if self._looked_window == number else -1
            looks.append(("previous", last + 1))
        return looks + self._current_look()

    def _current_look(self) -> list[tuple[str, int]]:
        """The current window's look if one is due, as ``due_looks`` lists it."""
        with self._lock:
            number, rows = self._window_number, self.current.rows
        level = look_level(rows, self.config.min_rows)
        last = self._looked_level if self._looked_window == number else -1
        if rows >= self.config.min_rows and level > last:
            return [("current", level)]
        return []

    def _look_config(self, level: int) -> MonitorConfig:
        """The config of one look: the rates at the look's share."""
        share = look_alpha_share(self.config, level)
        return replace(
            self.config,
            alpha=self.config.alpha * share,
            warning_alpha=self.config.warning_alpha * share,
        )

    def _last_look(self, closed: _Closed) -> Judgement:
        """A closed window's last look, reported as the ``previous`` window (``_judging``
        held); the looks then belong to the window opened after it."""
        last = self._looked_level if self._looked_window == closed.number else -1
        config = self._look_config(last + 1)
        with self._lock:
            wrong_type = dict(self.wrong_type)
        stats = closed.stats
        view = _WindowView(
            stats,
            stats.numeric.histogram.counts if stats.numeric is not None else None,
            stats.categorical.counts if stats.categorical is not None else None,
            float(stats.rows),
            None,
            wrong_type,
        )
        judgement = self._publish(self._report_of("previous", view, True, config))
        self._looked_window, self._looked_level = closed.number + 1, -1
        return judgement

    def _look(self, window: str, level: int) -> Judgement:
        """Judge one look of the current window at its share of the rates and remember it
        (``_judging`` held)."""
        with self._lock:
            number = self._window_number
        judgement = self._judge(window, self._look_config(level))
        if not judgement.report.insufficient_data:  # a window too small to judge: no look
            self._looked_window, self._looked_level = number, level
            self._look_of_current = (number, judgement.report)
        return judgement

    def close(self) -> None:
        """The version is unloaded: publish no more, and have the publisher forget it."""
        with self._judging:
            self._closed = True
            with self._lock:
                self._closed_windows.clear()
            if self._publisher is not None:
                self._publisher.forget_drift(self.model, self.version)

    def tick(self) -> None:
        """Timer work: roll a time-limited window, fold new traffic into the decayed view."""
        with self._judging:
            self._tick()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ModelNotFound(
                f"model {self.model!r} version {self.version} is not served (unloaded)"
            )

    @property
    def last_judgement(self) -> Judgement | None:
        """The judgement published last (by :meth:`evaluate` or :meth:`reset`), None before the
        first. Pure."""
        return self._last

    def _judge(self, window: str, config: MonitorConfig) -> Judgement:
        """Judge ``window`` with ``config``'s rates, log and publish (``_judging`` held)."""
        return self._publish(self._report(window, False, True, config))

    def _publish(self, report: DriftReport) -> Judgement:
        """Log, publish and alert a judged ``report``; it becomes the last judgement
        (``_judging`` held)."""
        started = report.drifting and not self.drifting
        self._log_transition(report)
        if self._publisher is not None:
            self._publisher.publish_drift(report)
        if started and self._on_alert is not None:
            self._on_alert("data_drift", _alert_details(report))
        self._last = Judgement(report, started)
        return self._last

    def _totals(self) -> tuple[npt.NDArray[np.float64] | None, npt.NDArray[np.float64] | None, int]:
        numeric = categorical = None
        total = self.lifetime.copy(self.reference)
        total.merge(self.current)
        if total.numeric is not None:
            numeric = total.numeric.histogram.counts.astype(np.float64)
        if total.categorical is not None:
            categorical = total.categorical.counts.astype(np.float64)
        return numeric, categorical, total.rows

    def _tick(self) -> None:
        """Roll a time-limited window, fold new traffic into the decayed view (``_judging``
        held)."""
        with self._lock:
            now = time.monotonic()
            config = self.config
            if config.window_seconds and now - self.current.started >= config.window_seconds:
                self._roll()
            totals = self._totals()
        elapsed = now - self._last_tick
        factor = 0.5 ** (elapsed / config.decay_half_life_seconds)
        previous = self._last_totals

        def fold(
            decayed: npt.NDArray[np.float64] | None,
            new: npt.NDArray[np.float64] | None,
            old: npt.NDArray[np.float64] | None,
        ) -> npt.NDArray[np.float64] | None:
            if new is None:
                return None
            delta = new - (old if old is not None else 0.0)
            return delta if decayed is None else decayed * factor + delta

        numeric = fold(self._decayed_numeric, totals[0], previous[0])
        categorical = fold(self._decayed_categorical, totals[1], previous[1])
        rows = self._decayed_rows * factor + (totals[2] - previous[2])
        with self._lock:  # readers see the three together
            self._decayed_numeric, self._decayed_categorical = numeric, categorical
            self._decayed_rows = rows
        self._last_totals = totals
        self._last_tick = now

    # ---- reports (pure) --------------------------------------------------------------------------

    def _view(self, window: str, exact: bool) -> _WindowView:
        """What a report of ``window`` reads, copied under one hold of the lock."""
        if window not in WINDOWS:
            raise InvalidInput(f"window {window!r} is not one of {', '.join(WINDOWS)}")
        if exact and window not in EXACT_WINDOWS:
            raise InvalidInput(
                f"the exact tests cover the {' and '.join(EXACT_WINDOWS)} windows only "
                f"(their reservoirs of rows), not {window!r}"
            )
        with self._lock:
            wrong_type = dict(self.wrong_type)
            if window == "decayed":
                return _WindowView(
                    None,
                    self._decayed_numeric,
                    self._decayed_categorical,
                    self._decayed_rows,
                    None,
                    wrong_type,
                )
            chosen = self._copy_of(window)
            reservoir = self._current_rows if window == "current" else self._previous_rows
            recent = reservoir.rows() if exact and chosen is not None else None
        if chosen is None:
            return _WindowView(None, None, None, 0.0, None, wrong_type)
        numeric = chosen.numeric.histogram.counts if chosen.numeric is not None else None
        categorical = chosen.categorical.counts if chosen.categorical is not None else None
        return _WindowView(chosen, numeric, categorical, float(chosen.rows), recent, wrong_type)

    def _copy_of(self, window: str) -> WindowStats | None:
        """A copy of a named window's statistics (lock held)."""
        if window == "current":
            return self.current.copy(self.reference)
        if window == "previous":
            return self.previous.copy(self.reference) if self.previous is not None else None
        chosen = self.lifetime.copy(self.reference)
        chosen.merge(self.current)
        return chosen

    def report(
        self, window: str = "current", exact: bool = False, scores: bool = True
    ) -> DriftReport:
        """The statistics (and with ``scores`` the drift) of a named window; ``exact`` adds the
        exact tests on the window's reservoir (``current`` and ``previous`` only). Its verdict
        is one judgement at the full ``alpha`` / ``warning_alpha`` (the timer's looks use their
        share: :meth:`last_judgement`). Pure."""
        return self._report(window, exact, scores, self.config)

    def served_report(
        self, window: str = "current", exact: bool = False, scores: bool = True
    ) -> DriftReport:
        """What the server answers a drift report (GetDriftReport): :meth:`report`, except for
        the current window without the exact tests once a timer judges this monitor. Judging
        the growing window afresh at the full rates on every call would be a look of its own
        each time (ask often enough and a window without drift is flagged), and would disagree
        with the gauges and the alerts. So the verdict and the scores are the timer's last look
        at the current window (its ``rows``, ``computed_at`` and ``thresholds``: when, on how
        many rows, at which share of ``alpha``), and each feature's ``statistics`` are live,
        the ``reason`` saying both; before the timer's first look at the window, the live scores
        unjudged (``reason``: not judged yet). ``exact`` still judges on demand, at the full
        rates. Pure."""
        if window != "current" or exact or not scores or not self._timer:
            return self.report(window, exact, scores)
        live = self.report(window, False, False)
        with self._lock:
            number = self._window_number
        look = self._look_of_current
        if look is None or look[0] != number:
            if live.insufficient_data:
                return self.report(window, False, True)  # too few rows: nothing to judge
            report = self._report_of(window, self._view(window, False), True, self.config, False)
            report.reason = (
                f"not judged yet: the drift timer's first look at this window ({report.rows} "
                "rows) is due at its next tick; the scores are live, without a verdict "
                "(--exact judges now, at the full rates)"
            )
            return report
        judged = look[1]
        statistics = {(f.name, f.kind): f.statistics for f in live.features}
        when = time.strftime("%H:%M:%S", time.gmtime(judged.computed_at))
        return replace(
            judged,
            features=[
                replace(f, statistics=statistics.get((f.name, f.kind), f.statistics))
                for f in judged.features
            ],
            wrong_type=live.wrong_type,
            reason=(
                f"verdict and scores: the drift timer's last look, at {judged.rows} rows "
                f"({when} UTC, alpha {judged.thresholds.get('alpha', math.nan):.3g}); "
                f"statistics: live, {live.rows} rows now"
            ),
        )

    def _report(self, window: str, exact: bool, scores: bool, config: MonitorConfig) -> DriftReport:
        return self._report_of(window, self._view(window, exact and scores), scores, config)

    def _report_of(
        self,
        window: str,
        view: _WindowView,
        scores: bool,
        config: MonitorConfig,
        verdict: bool = True,
    ) -> DriftReport:
        """The report of ``view`` (the statistics of ``window``), judged with ``config`` (with
        ``verdict``)."""
        rows = view.rows
        thresholds = verdict_thresholds(config)
        report = DriftReport(
            model=self.model,
            version=self.version,
            window=window,
            available=True,
            rows=round(rows),
            reference_rows=self.reference.rows,
            insufficient_data=rows < self.config.min_rows,
            wrong_type=view.wrong_type,
            computed_at=time.time(),
            thresholds=thresholds,
            windows_dropped=self._windows_dropped,
        )
        if window == "previous" and view.stats is None:
            report.reason = "no window has completed yet"
        self._numeric_features(report, view, scores)
        self._categorical_features(report, view, scores)
        self._prediction_features(report, view, scores)
        self._multivariate_feature(report, view, scores)
        if verdict and not report.insufficient_data:
            judge(report.features, config)
            report.drifting = any(f.drifting for f in report.features)
        return report

    def _numeric_features(self, report: DriftReport, view: _WindowView, scores: bool) -> None:
        numeric = self.reference.numeric
        if numeric is None:
            return
        table = None
        if scores and view.numeric is not None and view.rows > 0:
            assert self._reference_numeric_counts is not None
            table = _score_table(self._reference_numeric_counts, view.numeric, numeric.edges)
        for index, name in enumerate(numeric.names):
            feature = FeatureReport(name, "numeric", {}, False, False, [], {})
            if table is not None:
                feature.scores = _binned_scores(table, index)
            if view.stats is not None and view.stats.numeric is not None:
                feature.statistics = _numeric_statistics(
                    view.stats.numeric, index, numeric.edges.overflow_column
                )
            report.features.append(feature)
        if view.recent is not None:
            self._exact_tests(report, view.recent)

    def _categorical_features(self, report: DriftReport, view: _WindowView, scores: bool) -> None:
        for index, cat in enumerate(self.reference.categorical):
            feature = FeatureReport(cat.name, "categorical", {}, False, False, [], {})
            if scores and view.categorical is not None and view.rows > 0:
                # Counts rows are [categories..., padding..., unseen]: keep this feature's own.
                row = view.categorical[index]
                current = np.concatenate([row[: len(cat.categories)], row[-1:]])
                table = drift_scores(
                    cat.counts[None, :],
                    current[None, :],
                    smoothing=PSI_SMOOTHING,
                    min_expected=MIN_EXPECTED,
                )
                feature.scores = {
                    "psi": float(table.psi[0]),
                    "jensenshannon": float(table.jensenshannon[0]),
                    "chi2": float(table.chi2[0]),
                    "chi2_pvalue": float(table.chi2_pvalue[0]),
                    "linf": float(table.linf[0]),
                }
            if view.stats is not None and view.stats.categorical is not None:
                counts = view.stats.categorical.counts[index]
                feature.statistics = {
                    "count": float(counts.sum()),
                    "missing": float(view.stats.missing[index]),
                    "unseen": float(counts[-1] - view.stats.missing[index]),
                }
            report.features.append(feature)

    def _prediction_features(self, report: DriftReport, view: _WindowView, scores: bool) -> None:
        """The model's output columns, scored and reported as numeric features are (kind
        ``prediction``); none when the profile has no outputs or the view keeps no statistics."""
        outputs = self.reference.outputs
        if outputs is None:
            report.unavailable["prediction"] = "prediction drift unavailable: " + (
                self.reference.unavailable.get("prediction", "the profile has no model outputs")
            )
            return
        stats = view.stats
        if stats is None or stats.outputs is None:
            if report.window == "decayed":
                report.unavailable["prediction"] = (
                    "prediction drift unavailable: the decayed view keeps input counts only"
                )
            return
        values = outputs.values
        seen = int(stats.outputs.moments.count.max()) + int(stats.outputs.moments.nan_count.max())
        if seen == 0:
            if view.rows > 0:
                report.unavailable["prediction"] = (
                    f"prediction drift unavailable: no model outputs ({outputs.output!r}) were "
                    "observed in this window"
                )
            return
        table = None
        # Judged like the inputs: only once the outputs seen reach min_rows (they can lag the
        # inputs, e.g. rows folded in without outputs).
        if scores and seen >= max(self.config.min_rows, 1):
            assert self._reference_output_counts is not None
            table = _score_table(
                self._reference_output_counts, stats.outputs.histogram.counts, values.edges
            )
        for index, name in enumerate(values.names):
            feature = FeatureReport(name, "prediction", {}, False, False, [], {})
            if table is not None:
                feature.scores = _binned_scores(table, index)
            feature.statistics = _numeric_statistics(
                stats.outputs, index, values.edges.overflow_column
            )
            feature.statistics["reference_mean"] = float(values.moments[1][index])
            report.features.append(feature)

    def _multivariate_feature(self, report: DriftReport, view: _WindowView, scores: bool) -> None:
        """The PCA reconstruction error of the window against the reference's (kind
        ``multivariate``): its mean, and the one-sided test of :func:`reconstruction_test`."""
        model = self.reference.multivariate
        if model is None:
            report.unavailable["multivariate"] = "multivariate drift unavailable: " + (
                self.reference.unavailable.get("multivariate", "the profile has no PCA")
            )
            return
        stats = view.stats
        if stats is None or stats.reconstruction is None:
            if report.window == "decayed":
                report.unavailable["multivariate"] = (
                    "multivariate drift unavailable: the decayed view keeps input counts only"
                )
            return
        state = stats.reconstruction
        feature = FeatureReport(MULTIVARIATE_NAME, "multivariate", {}, False, False, [], {})
        feature.statistics = {
            "count": float(state.count),
            "mean": state.mean,
            "std": math.sqrt(state.variance) if state.count > 1 else math.nan,
            "reference_mean": model.error_mean,
            "reference_std": math.sqrt(model.error_variance),
            "components": float(model.components.shape[0]),
            "explained_variance": model.explained_variance,
        }
        if scores and state.count >= max(self.config.min_rows, 2):
            feature.scores = reconstruction_test(state.mean, state.variance, state.count, model)
        report.features.append(feature)

    def _exact_tests(self, report: DriftReport, recent: npt.NDArray[np.float64]) -> None:
        numeric = self.reference.numeric
        assert numeric is not None
        if recent.shape[0] == 0 or numeric.sample.shape[0] == 0:
            return
        for index, feature in enumerate(report.features[: len(numeric.names)]):
            reference = numeric.sample[:, index]
            live = recent[:, index]
            reference = reference[np.isfinite(reference)]
            live = live[np.isfinite(live)]
            if reference.size == 0 or live.size == 0:
                continue
            result = ks_2samp(reference, live)
            feature.scores["ks_exact"] = float(result.statistic)
            feature.scores["ks_exact_pvalue"] = float(result.pvalue)
            feature.scores["wasserstein_exact"] = float(wasserstein_samples(reference, live))

    def _log_transition(self, report: DriftReport) -> None:
        """Log once per change of the model's or a feature's drift state (``_judging`` held)."""
        drifting_now = {f.name for f in report.features if f.drifting}
        for name in sorted(drifting_now - self.drifting_features):
            feature = next(f for f in report.features if f.name == name)
            log.warning(
                "drift: model %s version %s feature %r is drifting (%s)",
                self.model,
                self.version,
                name,
                ", ".join(feature.reasons),
            )
        for name in sorted(self.drifting_features - drifting_now):
            log.info(
                "drift: model %s version %s feature %r is back within thresholds",
                self.model,
                self.version,
                name,
            )
        if report.drifting != self.drifting:
            log.warning(
                "drift: model %s version %s is %s",
                self.model,
                self.version,
                "DRIFTING" if report.drifting else "no longer drifting",
            )
        self.drifting_features = drifting_now
        self.drifting = report.drifting


def _alert_details(report: DriftReport) -> dict[str, Any]:
    return {
        "model": report.model,
        "version": report.version,
        "window": report.window,
        "rows": report.rows,
        "features": {
            feature.name: {"reasons": feature.reasons, "scores": feature.scores}
            for feature in report.features
            if feature.drifting
        },
    }


def _score_table(reference: Any, window: Any, edges: Any) -> Any:
    """The binned scores of a window's counts against the reference's (open outer bins, PSI
    smoothing, sparse bins merged for the chi-square test): the same for inputs and outputs."""
    return drift_scores(
        reference,
        open_ended(window, edges),
        edges,
        smoothing=PSI_SMOOTHING,
        min_expected=MIN_EXPECTED,
    )


def _binned_scores(table: Any, index: int) -> dict[str, float]:
    """Row ``index`` of a score table as a report's scores."""
    return {
        "psi": float(table.psi[index]),
        "jensenshannon": float(table.jensenshannon[index]),
        "wasserstein": float(table.wasserstein[index]),
        "ks": float(table.ks[index]),
        "chi2": float(table.chi2[index]),
        "chi2_pvalue": float(table.chi2_pvalue[index]),
    }


def _numeric_statistics(profile: FeatureProfile, index: int, overflow: int) -> dict[str, float]:
    moments = profile.moments
    counts = profile.histogram.counts[index]
    count = int(moments.count[index])
    return {
        "count": float(count),
        "mean": float(moments.mean[index]),
        "std": float(moments.std()[index]) if count else math.nan,
        "min": float(moments.min[index]),
        "max": float(moments.max[index]),
        "missing": float(moments.nan_count[index]),
        "infinite": float(moments.inf_count[index]),
        # Underflow and overflow columns: values outside the reference [min, max] (inf included).
        "out_of_range": float(counts[0] + counts[overflow]),
    }


def reconstruction_test(
    mean: float, variance: float, count: int, model: MultivariateProfile
) -> dict[str, float]:
    """The multivariate scores of a window whose ``count`` rows have reconstruction errors of
    ``mean`` and sample ``variance``, against the reference's cross-fitted errors.

    The reference's chunk-to-chunk distribution of the mean error at ``count`` rows is that of
    a mean of ``count`` rows: centred on the reference's mean error with variance
    ``error_variance / count``. The test is Welch's, one-sided (a shift away from the
    reference's correlation structure raises the error), with the normal approximation (the
    window has at least ``min_rows`` rows): ``z = (mean - reference) / sqrt(variance / count +
    error_variance / error_rows)``, so it follows the window's and the reference's sizes as the
    chi-square tests do, and its false-alarm rate is the p-value's level. The p-value joins the
    features' Holm family. ``reconstruction_error_change`` (the relative rise of the mean error)
    is its minimum effect."""
    spread = math.sqrt(variance / count + model.error_variance / model.error_rows)
    difference = mean - model.error_mean
    z = difference / spread if spread > 0 else (math.inf if difference > 0 else 0.0)
    return {
        "reconstruction_error": mean,
        "reconstruction_error_reference": model.error_mean,
        "reconstruction_error_change": difference / model.error_mean
        if model.error_mean > 0
        else math.nan,
        "reconstruction_error_z": z,
        "reconstruction_error_pvalue": 0.5 * math.erfc(z / math.sqrt(2.0)),
    }


def verdict_thresholds(config: MonitorConfig) -> dict[str, float]:
    """What a report shows as its thresholds: the minimum effects (statistic -> value a
    significant feature must reach) and the family-wise rates ``alpha`` and ``warning_alpha``
    its Holm-adjusted chi-square p-value must not exceed."""
    return {**config.thresholds, "alpha": config.alpha, "warning_alpha": config.warning_alpha}


def _test_of(feature: FeatureReport) -> str:
    """The score holding a report entry's p-value: the chi-square test's, or the reconstruction
    error's for the multivariate entry."""
    return "reconstruction_error_pvalue" if feature.kind == "multivariate" else "chi2_pvalue"


def judge(features: Sequence[FeatureReport], config: MonitorConfig) -> None:
    """The drift verdict of one window (the server's and batch's): per entry (input feature,
    model output column, multivariate error) its test's p-value, Holm-adjusted over all the
    entries that have one (one family: the model's false-alarm rate is ``alpha`` whatever the
    number of detectors), against ``config.alpha`` (drifting) and ``config.warning_alpha``
    (warning), each gated by the minimum effects of ``config.thresholds`` (rule and expected
    false-alarm rate: :mod:`edgewise.runtime.serving.monitor_config`). Adds ``<test>_adjusted``
    (e.g. ``chi2_pvalue_adjusted``) to each judged entry's scores and sets its ``drifting``,
    ``warning`` and ``reasons``."""
    raw = [f.scores.get(_test_of(f), math.nan) for f in features]
    for feature, adjusted in zip(features, holm(raw), strict=True):
        _judge_feature(feature, float(adjusted), config)


def _judge_feature(feature: FeatureReport, adjusted: float, config: MonitorConfig) -> None:
    feature.drifting = feature.warning = False
    feature.reasons = []
    if math.isnan(adjusted):
        return
    key = _test_of(feature)
    feature.scores[f"{key}_adjusted"] = adjusted
    effects = _effects(feature.scores, config.thresholds)
    if config.thresholds and not effects:
        return
    label = "reconstruction error" if feature.kind == "multivariate" else "chi2"
    test = (
        f"{label} p {feature.scores[key]:.3g} (Holm {adjusted:.3g})"
        f" <= {config.alpha if adjusted <= config.alpha else config.warning_alpha:g}"
    )
    if adjusted <= config.alpha:
        feature.drifting = True
    elif adjusted <= config.warning_alpha:
        feature.warning = True
    else:
        return
    feature.reasons = [test, *effects]


def _effects(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """The minimum effects ``scores`` reach, as reasons."""
    reached = []
    for statistic, limit in thresholds.items():
        value = scores.get(statistic)
        if value is not None and not math.isnan(value) and value >= limit:
            reached.append(f"{statistic} {value:.3g} >= {limit:g}")
    return reached
