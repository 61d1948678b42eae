"""How a model version is monitored: :class:`MonitorConfig` and the drift verdict's defaults.

Kept apart from :mod:`edgewise.runtime.serving.monitor` so that reading a model's configuration does
not import the Numba kernels: a server with monitoring off never loads numba (about 120 MB of
resident memory between its import and its first kernel).

The drift verdict (:func:`edgewise.runtime.serving.monitor.judge`, the same for server and batch)
--------------------------------------------------------------------------------------------
Per feature, a chi-square test of homogeneity of the window's binned counts against the
reference profile's (numeric: the profile's quantile bins with open outer bins; categorical: the
categories plus "unseen"), sparse adjacent columns pooled until every expected count is at
least :data:`MIN_EXPECTED`. Its null distribution accounts for both the window's rows ``W`` and
the reference's rows ``N`` (the statistic is about ``chi2(dof) / (1/W + 1/N)`` times the
squared share differences), so the verdict follows the window and reference sizes by itself.
Across the model's features the p-values are Holm-adjusted (family-wise error control under any
dependence between the features). A feature is

* **drifting** when its adjusted p-value is <= ``alpha`` (default 0.01) and its effect reaches
  one of ``thresholds`` (default PSI >= 0.1);
* **warning** when, not drifting, its adjusted p-value is <= ``warning_alpha`` (default 0.05)
  and its effect reaches one of ``thresholds``.

The same family holds the model's other detectors, judged in the same Holm correction as the
features: each profiled column of the model's outputs (prediction drift: a chi-square test of
its binned values against the reference's outputs, exactly as a numeric feature) and the
multivariate PCA reconstruction error (a one-sided Welch test of the window's mean error against
the reference's cross-fitted errors, minimum effect ``reconstruction_error_change``). One family,
not one per detector: "the model is drifting" keeps the rate ``alpha`` however many detectors
there are, at the price of a slightly stricter level per test (Holm over ``m + k`` tests
instead of ``m``).

Expected false alarms: for one judgement of a window drawn from the reference's distribution,
the probability that *any* feature of the model is flagged drifting is at most ``alpha`` (1 %),
warning at most ``warning_alpha`` (5 %), up to the chi-square approximation (measured by
``benchmarks/drift_false_alarms.py``: <= 1 % of random held-out splits of four scikit-learn data
sets at 100-row windows).

Looks: the server judges a growing window more than once
--------------------------------------------------------
The server's drift timer (every ``--drift-interval-seconds``) sees the current window grow from
``min_rows`` to ``window_rows``. Judging it afresh at every tick at the full ``alpha`` would let
a window without drift be flagged at *some* tick far more often than ``alpha`` (optional
stopping: 7.7 % of windows flagged instead of at most 1 % over 65 ticks, measured by
``benchmarks/drift_false_alarms.py --sequential``). So the timer judges a window only at
planned *looks*, and splits the rates across them (a group-sequential rule, Bonferroni over
the looks):

* a look is due when the window's rows reach the next doubling of ``min_rows``: the
  window's *level* ``floor(log2(rows / min_rows))`` is above the level of its last look (looks at
  about ``min_rows * 2**k`` rows; a tick that skips levels takes one look, not several);
* a window that closes (rolls: full, or its time is up) gets one last look, the closed window's
  judgement, at the next tick; every window that closed since the last tick gets its own, oldest
  first (the monitor queues the closed windows, at most ``closed_windows`` of them: beyond that
  the oldest is dropped unjudged and counted, e.g. above ``closed_windows * window_rows`` rows
  per tick);
* with a row limit, a window has at most :func:`planned_looks` ``K = ceil(log2(window_rows /
  min_rows)) + 1`` looks (its levels below ``window_rows``, and the closed window's), and each
  look uses ``alpha / K`` and ``warning_alpha / K``;
* without a row limit (``window_rows`` 0: a time window, or none), a look at level ``k`` uses
  ``alpha * 2**-(k + 1)`` (and ``warning_alpha`` alike), the closed window's look the level after
  its last one: the shares sum to less than 1 however long the window grows;
* between looks the published verdict (gauges, log, alert, :meth:`ModelMonitor.evaluate`'s
  result) stays the last look's; ``reset`` starts the looks over.

So the expected false-alarm rate is **per window, across all its looks**: a window drawn from the
reference's distribution is flagged drifting at any of its looks with probability at most
``alpha``, warning at most ``warning_alpha``. A report asked for on demand (``edgewise drift``,
batch) is one judgement at the full rates; its ``thresholds`` show the rates used, so a
published look shows ``alpha / K``.

``thresholds`` are minimum effect sizes, not the verdict: with large windows and references the
test finds shifts too small to matter, and a feature drifts only if one of the named statistics
reaches its threshold too. An empty mapping judges on the test alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from edgewise.runtime.config.values import count as _count
from edgewise.runtime.config.values import flag as _flag
from edgewise.runtime.config.values import number as _number
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_WARNING_ALPHA",
    "MIN_EXPECTED",
    "PSI_SMOOTHING",
    "STATISTICS",
    "MonitorConfig",
    "look_alpha_share",
    "look_level",
    "planned_looks",
]

#: Minimum effect a significant feature must show to be flagged (any one statistic suffices).
#: PSI 0.1 is the customary "moderate shift" level; PSI is computed with :data:`PSI_SMOOTHING`.
#: The multivariate detector has no PSI: its minimum effect is a 5 % rise of the mean PCA
#: reconstruction error over the reference's (a +1 sd shift of one of 30 features raises it
#: about 6 %, rows of another class about 140 %, on the breast-cancer data).
DEFAULT_THRESHOLDS: Final[Mapping[str, float]] = {"psi": 0.1, "reconstruction_error_change": 0.05}
#: Family-wise false-alarm rate of the "drifting" verdict (Holm-adjusted chi-square p-value).
DEFAULT_ALPHA: Final = 0.01
#: Family-wise rate of the "warning" verdict.
DEFAULT_WARNING_ALPHA: Final = 0.05
#: The chi-square test pools adjacent sparse columns until each expected count reaches this
#: (Cochran's rule), so its p-value is trustworthy for small windows and rare bins.
MIN_EXPECTED: Final = 5.0
#: Additive smoothing of both histograms for PSI (half a row per non-empty column) instead of
#: clipping shares at 1e-4: an empty window bin no longer adds ``p ln(p / 1e-4)``. (Values
#: beyond the reference's range count in its open outer bins, so they add no column of their
#: own either.)
PSI_SMOOTHING: Final = 0.5


@dataclass(frozen=True)
class MonitorConfig:
    """How a model version is monitored; set per model in ``<repo>/<model>/config.json`` under
    ``"monitoring"`` (the keys below), with server-wide defaults from ``edgewise serve``.

    ``alpha`` / ``warning_alpha``: family-wise false-alarm rates of the drifting / warning
    verdicts (Holm-adjusted chi-square p-values, see the module docstring), ``0 < alpha <=
    warning_alpha < 1``; in the server, per window across all its looks (the timer judges a
    growing window at the doublings of ``min_rows`` and when it closes, ``alpha / K`` per look
    with ``K`` = :func:`planned_looks`, or ``alpha * 2**-(k+1)`` at level ``k`` without a row
    limit). ``thresholds``: statistic -> minimum effect a significant feature must
    reach (any one) to be flagged; ``{}`` judges on the test alone."""

    enabled: bool = True
    window_rows: int = 10_000  # tumbling window by row count (0: no count limit)
    window_seconds: float = 0.0  # tumbling window by time (0: no time limit)
    decay_half_life_seconds: float = 300.0
    reservoir_rows: int = 5_000  # recent rows kept for the exact tests
    min_rows: int = 100  # fewer rows are reported but not judged
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    alpha: float = DEFAULT_ALPHA
    warning_alpha: float = DEFAULT_WARNING_ALPHA
    #: Closed windows waiting for the timer's last look (at least 1). A process that closes more
    #: windows between two ticks than this drops the oldest unjudged (counted in the reports'
    #: ``windows_dropped`` and the ``edgewise_drift_windows_dropped`` gauge).
    closed_windows: int = 64

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base: MonitorConfig | None = None) -> MonitorConfig:
        """``base`` with the settings of a ``"monitoring"`` object; every value is checked
        before any is used (JSON booleans and numbers only: ``"false"`` is not false)."""
        config = base or cls()
        values: dict[str, Any] = {}
        for key, value in data.items():
            reader = _READERS.get(key)
            if key == "thresholds":
                values["thresholds"] = {**config.thresholds, **_thresholds(value)}
            elif reader is not None:
                values[key] = reader(f"monitoring.{key}", value)
            else:
                raise InvalidInput(f"unknown monitoring setting {key!r}")
        result = replace(config, **values)
        if result.alpha > result.warning_alpha:
            raise InvalidInput(
                f"monitoring.alpha ({result.alpha:g}) must not exceed monitoring.warning_alpha "
                f"({result.warning_alpha:g})"
            )
        return result


def look_level(rows: int, min_rows: int) -> int:
    """The doubling of ``min_rows`` a window of ``rows`` has reached: ``floor(log2(rows /
    min_rows))``, -1 below ``min_rows`` (``min_rows`` 0 counts as 1)."""
    base = max(min_rows, 1)
    return (rows // base).bit_length() - 1


def planned_looks(config: MonitorConfig) -> int:
    """How many looks a row-limited window can have: its levels below ``window_rows``
    (``ceil(log2(window_rows / min_rows))``) and its closed window's look. 0 without a row
    limit (the looks are then unbounded, see :func:`look_alpha_share`)."""
    if not config.window_rows:
        return 0
    doublings = 0
    reached = max(config.min_rows, 1)
    while reached < config.window_rows:
        reached *= 2
        doublings += 1
    return doublings + 1


def look_alpha_share(config: MonitorConfig, level: int) -> float:
    """The share of ``alpha`` (and ``warning_alpha``) one look at ``level`` uses: ``1 / K``
    with a row limit, ``2**-(level + 1)`` without one; the shares of a window's looks sum to at
    most 1."""
    looks = planned_looks(config)
    if looks:
        return 1.0 / looks
    return 0.5 ** (max(level, 0) + 1)


#: The statistics a report can carry, hence the ones a threshold can name.
STATISTICS: Final = frozenset(
    {
        "psi",
        "jensenshannon",
        "wasserstein",
        "ks",
        "chi2",
        "chi2_pvalue",
        "linf",
        "ks_exact",
        "ks_exact_pvalue",
        "wasserstein_exact",
        "reconstruction_error",
        "reconstruction_error_reference",
        "reconstruction_error_change",
        "reconstruction_error_z",
        "reconstruction_error_pvalue",
    }
)


def _probability(where: str, value: Any) -> float:
    number = _number(where, value)
    if not 0 < number < 1:
        raise InvalidInput(f"{where} must be a number between 0 and 1 (exclusive), not {value!r}")
    return number


def _positive(where: str, value: Any) -> float:
    number = _number(where, value)
    if number == 0:
        raise InvalidInput(f"{where} must be > 0")
    return number


def _at_least_one(where: str, value: Any) -> int:
    return _count(where, value, 1)


_READERS: Final[Mapping[str, Callable[[str, Any], Any]]] = {
    "enabled": _flag,
    "window_rows": _count,
    "window_seconds": _number,
    "decay_half_life_seconds": _positive,
    "reservoir_rows": _count,
    "min_rows": _count,
    "alpha": _probability,
    "warning_alpha": _probability,
    "closed_windows": _at_least_one,
}


def _thresholds(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise InvalidInput("monitoring.thresholds must be an object")
    unknown = sorted(str(name) for name in value if name not in STATISTICS)
    if unknown:
        raise InvalidInput(
            f"monitoring.thresholds: unknown statistic(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(STATISTICS))})"
        )
    return {name: _number(f"monitoring.thresholds.{name}", limit) for name, limit in value.items()}
