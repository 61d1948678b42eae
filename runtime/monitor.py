"""Per model-version monitoring: live feature statistics, schema skew and drift scores against the
reference profile. The only caller of :mod:`edgewise.kernels` in the server.

Request path (:meth:`ModelMonitor.observe`): one fused kernel call (moments + reference-binned
histogram) for the packed numeric tensor, one for the categorical codes, and a slice copy into a
ring buffer of recent rows (the reservoir for exact tests). Numeric schema skew needs no extra work:
values outside the reference ``[min, max]`` are exactly the histogram's underflow and overflow
columns, and NaN/inf are counted by the moments.

Windows: a *current* window, tumbling by row count and/or time; the *previous* complete window; an
exponentially *decayed* view updated on each timer tick; and *lifetime* totals. Drift is computed
on demand (the gRPC monitoring service, ``edgewise drift``) and on a timer (Prometheus gauges and
one log line per drift transition), never per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgewise.kernels import (
    CategoricalState,
    FeatureProfile,
    drift_scores,
    ks_2samp,
    wasserstein_samples,
)
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.monitor_config import DEFAULT_THRESHOLDS, MonitorConfig
from edgewise.runtime.profile import ReferenceProfile

__all__ = [
    "DEFAULT_THRESHOLDS",
    "WINDOWS",
    "DriftReport",
    "FeatureReport",
    "ModelMonitor",
    "MonitorConfig",
    "WindowStats",
]

log = logging.getLogger(__name__)

WINDOWS: Final = ("current", "previous", "decayed", "lifetime")

PSI_WARNING: Final = 0.1


@dataclass
class FeatureReport:
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


class WindowStats:
    """Statistics of one span of traffic: numeric profile, categorical counts, missing counts.

    The monitor's windows are ``WindowStats``; so are the statistics a caller collects on its own
    (:meth:`ModelMonitor.new_window`, :meth:`ModelMonitor.observe_window`) and folds in later
    (:meth:`ModelMonitor.fold`), e.g. the batch scorer's per-chunk statistics. Picklable (numpy
    arrays and the kernels' states), so statistics can be collected on another machine.
    """

    __slots__ = ("categorical", "missing", "numeric", "rows", "started")

    def __init__(self, reference: ReferenceProfile) -> None:
        ref = reference
        self.numeric = FeatureProfile(ref.numeric.edges) if ref.numeric is not None else None
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
        self.missing += other.missing
        self.rows += other.rows

    def copy(self, reference: ReferenceProfile) -> WindowStats:
        new = WindowStats(reference)
        new.merge(self)
        new.started = self.started
        return new


class ModelMonitor:
    """Live statistics and drift of one model version against its reference profile."""

    def __init__(
        self, model: str, version: str, reference: ReferenceProfile, config: MonitorConfig
    ) -> None:
        self.model = model
        self.version = version
        self.reference = reference
        self.config = config
        self._lock = threading.Lock()
        self._numeric_input = reference.numeric.input if reference.numeric is not None else None
        self._categorical_inputs = [c.input for c in reference.categorical]
        self._codes = [c.codes() for c in reference.categorical]
        self._unseen = [len(c.categories) for c in reference.categorical]
        self.current = WindowStats(self.reference)
        self.previous: WindowStats | None = None
        self.lifetime = WindowStats(self.reference)
        n_features = len(reference.numeric.names) if reference.numeric is not None else 0
        self._ring = np.full((config.reservoir_rows, n_features), np.nan, dtype=np.float64)
        self._ring_pos = 0
        self._ring_filled = 0
        self.wrong_type: dict[str, int] = {}
        # Decayed view: float counts, updated at each tick from the lifetime totals' growth.
        self._decayed_numeric: npt.NDArray[np.float64] | None = None
        self._decayed_categorical: npt.NDArray[np.float64] | None = None
        self._decayed_rows = 0.0
        self._last_tick = time.monotonic()
        self._last_totals = self._totals()
        self.drifting = False
        self.drifting_features: set[str] = set()

    # ---- the request path ----------------------------------------------------------------------

    def observe(self, feeds: Mapping[str, npt.NDArray[Any]]) -> None:
        """Add one request's inputs (already validated against the model's schema)."""
        with self._lock:
            window = self.current
            self._observe(window, feeds)
            if self._numeric_input is not None:
                self._remember(feeds[self._numeric_input])
            self._maybe_roll()

    def _observe(self, window: WindowStats, feeds: Mapping[str, npt.NDArray[Any]]) -> None:
        numeric_name = self._numeric_input
        rows = 0
        if numeric_name is not None:
            batch = feeds[numeric_name]
            rows = batch.shape[0]
            assert window.numeric is not None
            window.numeric.update(batch)
        if self._categorical_inputs:
            rows = self._observe_categorical(feeds, window)
        window.rows += rows

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

    def observe_window(self, window: WindowStats, feeds: Mapping[str, npt.NDArray[Any]]) -> None:
        """Add inputs to a caller-owned ``window`` (from :meth:`new_window`), as :meth:`observe`
        adds them to the current one; the monitor's own state (windows, reservoir) is untouched,
        so different windows can be observed on different threads at once."""
        self._observe(window, feeds)

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
        return self._window_counts(window)[0]

    def _observe_categorical(
        self, feeds: Mapping[str, npt.NDArray[Any]], window: WindowStats
    ) -> int:
        columns = []
        for index, name in enumerate(self._categorical_inputs):
            values = feeds[name].reshape(-1)
            table = self._codes[index]
            unseen = self._unseen[index]
            codes = np.empty(values.shape[0], dtype=np.int64)
            for row, value in enumerate(values):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                if not text:
                    window.missing[index] += 1
                codes[row] = table.get(text, unseen)
            columns.append(codes)
        assert window.categorical is not None
        window.categorical.update(np.ascontiguousarray(np.stack(columns, axis=1)))
        return len(columns[0])

    def _remember(self, batch: npt.NDArray[Any]) -> None:
        ring = self._ring
        size = ring.shape[0]
        if size == 0:
            return
        rows = batch.shape[0]
        if rows >= size:
            ring[:] = batch[-size:]
            self._ring_pos = 0
            self._ring_filled = size
            return
        start = self._ring_pos
        end = start + rows
        if end <= size:
            ring[start:end] = batch
        else:
            first = size - start
            ring[start:] = batch[:first]
            ring[: rows - first] = batch[first:]
        self._ring_pos = end % size
        self._ring_filled = min(size, self._ring_filled + rows)

    def count_wrong_type(self, input_name: str) -> None:
        with self._lock:
            self.wrong_type[input_name] = self.wrong_type.get(input_name, 0) + 1

    # ---- windows ---------------------------------------------------------------------------------

    def _roll(self) -> None:
        """Close the current window (lock held)."""
        self.lifetime.merge(self.current)
        self.previous = self.current
        self.current = WindowStats(self.reference)

    def reset(self) -> None:
        with self._lock:
            self.lifetime.merge(self.current)
            self.current = WindowStats(self.reference)

    def _totals(self) -> tuple[npt.NDArray[np.float64] | None, npt.NDArray[np.float64] | None, int]:
        numeric = categorical = None
        total = self.lifetime.copy(self.reference)
        total.merge(self.current)
        if total.numeric is not None:
            numeric = total.numeric.histogram.counts.astype(np.float64)
        if total.categorical is not None:
            categorical = total.categorical.counts.astype(np.float64)
        return numeric, categorical, total.rows

    def tick(self) -> None:
        """Timer work: roll a time-limited window, fold new traffic into the decayed view."""
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

        self._decayed_numeric = fold(self._decayed_numeric, totals[0], previous[0])
        self._decayed_categorical = fold(self._decayed_categorical, totals[1], previous[1])
        self._decayed_rows = self._decayed_rows * factor + (totals[2] - previous[2])
        self._last_totals = totals
        self._last_tick = now

    # ---- reports ---------------------------------------------------------------------------------

    def _window_counts(
        self, window: str
    ) -> tuple[WindowStats | None, npt.NDArray[Any] | None, npt.NDArray[Any] | None, float]:
        """(statistics window, numeric counts, categorical counts, rows) of a named window."""
        with self._lock:
            if window == "current":
                chosen: WindowStats | None = self.current.copy(self.reference)
            elif window == "previous":
                chosen = self.previous.copy(self.reference) if self.previous is not None else None
            elif window == "lifetime":
                chosen = self.lifetime.copy(self.reference)
                chosen.merge(self.current)
            elif window == "decayed":
                chosen = None
            else:
                raise InvalidInput(f"window {window!r} is not one of {', '.join(WINDOWS)}")
        if window == "decayed":
            return None, self._decayed_numeric, self._decayed_categorical, self._decayed_rows
        if chosen is None:
            return None, None, None, 0.0
        numeric = chosen.numeric.histogram.counts if chosen.numeric is not None else None
        categorical = chosen.categorical.counts if chosen.categorical is not None else None
        return chosen, numeric, categorical, float(chosen.rows)

    def report(
        self, window: str = "current", exact: bool = False, scores: bool = True
    ) -> DriftReport:
        stats_window, numeric_counts, categorical_counts, rows = self._window_counts(window)
        thresholds = dict(self.config.thresholds)
        report = DriftReport(
            model=self.model,
            version=self.version,
            window=window,
            available=True,
            rows=round(rows),
            reference_rows=self.reference.rows,
            insufficient_data=rows < self.config.min_rows,
            wrong_type=dict(self.wrong_type),
            computed_at=time.time(),
            thresholds=thresholds,
        )
        if window == "previous" and stats_window is None:
            report.reason = "no window has completed yet"
        ref = self.reference
        if ref.numeric is not None:
            numeric = ref.numeric
            table = None
            if scores and numeric_counts is not None and rows > 0:
                table = drift_scores(numeric.counts, numeric_counts, numeric.edges)
            for index, name in enumerate(numeric.names):
                feature = FeatureReport(name, "numeric", {}, False, False, [], {})
                if table is not None:
                    feature.scores = {
                        "psi": float(table.psi[index]),
                        "jensenshannon": float(table.jensenshannon[index]),
                        "wasserstein": float(table.wasserstein[index]),
                        "ks": float(table.ks[index]),
                        "chi2": float(table.chi2[index]),
                        "chi2_pvalue": float(table.chi2_pvalue[index]),
                    }
                if stats_window is not None and stats_window.numeric is not None:
                    feature.statistics = _numeric_statistics(
                        stats_window.numeric, index, numeric.edges.overflow_column
                    )
                report.features.append(feature)
            if exact and scores:
                self._exact_tests(report)
        for index, cat in enumerate(ref.categorical):
            feature = FeatureReport(cat.name, "categorical", {}, False, False, [], {})
            if scores and categorical_counts is not None and rows > 0:
                # Counts rows are [categories..., padding..., unseen]: keep this feature's own.
                row = categorical_counts[index]
                current = np.concatenate([row[: len(cat.categories)], row[-1:]])
                table = drift_scores(cat.counts[None, :], current[None, :])
                feature.scores = {
                    "psi": float(table.psi[0]),
                    "jensenshannon": float(table.jensenshannon[0]),
                    "chi2": float(table.chi2[0]),
                    "chi2_pvalue": float(table.chi2_pvalue[0]),
                    "linf": float(table.linf[0]),
                }
            if stats_window is not None and stats_window.categorical is not None:
                counts = stats_window.categorical.counts[index]
                feature.statistics = {
                    "count": float(counts.sum()),
                    "missing": float(stats_window.missing[index]),
                    "unseen": float(counts[-1] - stats_window.missing[index]),
                }
            report.features.append(feature)
        if not report.insufficient_data:
            for feature in report.features:
                _judge(feature, thresholds)
            report.drifting = any(f.drifting for f in report.features)
        return report

    def judgement_window(self) -> str:
        """The window the timer judges: the current one once it holds enough rows, else the last
        complete one, else the current one (reported as insufficient data)."""
        if self.current.rows >= self.config.min_rows or self.previous is None:
            return "current"
        return "previous"

    def _exact_tests(self, report: DriftReport) -> None:
        numeric = self.reference.numeric
        assert numeric is not None
        with self._lock:
            recent = self._ring[: self._ring_filled].copy()
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

    def observe_transition(self, report: DriftReport) -> None:
        """Log once per change of the model's or a feature's drift state."""
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


def _judge(feature: FeatureReport, thresholds: Mapping[str, float]) -> None:
    for statistic, limit in thresholds.items():
        value = feature.scores.get(statistic)
        if value is not None and not math.isnan(value) and value >= limit:
            feature.drifting = True
            feature.reasons.append(f"{statistic} {value:.3g} >= {limit:g}")
    psi = feature.scores.get("psi", math.nan)
    feature.warning = not feature.drifting and psi >= PSI_WARNING
