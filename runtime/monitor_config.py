"""How a model version is monitored: :class:`MonitorConfig` and the drift verdict's defaults.

Kept apart from :mod:`edgewise.runtime.monitor` so that reading a model's configuration does not
import the Numba kernels: a server with monitoring on never loads numba (about 120 MB of
resident memory between its import and its first kernel).

The drift verdict (:func:`edgewise.runtime.monitor.judge`, the same for the server and batch)
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

Expected false alarms: for one judgement of a window drawn from the reference's distribution,
the probability that *any* feature of the model is flagged drifting is at most ``alpha`` (1 %),
warning at most ``warning_alpha`` (5 %), up to the chi-square approximation (measured by
``benchmarks/drift_false_alarms.py``: <= 1 % of random held-out splits of four scikit-learn data
sets at 100-row windows). A window judged again as it grows is judged again each time: each
judgement holds the rate, a series of them does not.

``thresholds`` are minimum effect sizes, not the verdict: with large windows and references the
test finds shifts too small to matter, and a feature drifts only if one of the named statistics
reaches its threshold too. An empty mapping judges on the test alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from edgewise.runtime.config_values import count as _count
from edgewise.runtime.config_values import flag as _flag
from edgewise.runtime.config_values import number as _number
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_WARNING_ALPHA",
    "MIN_EXPECTED",
    "PSI_SMOOTHING",
    "STATISTICS",
    "MonitorConfig",
]

#: Minimum effect a significant feature must show to be flagged (any one statistic suffices).
#: PSI 0.1 is the customary "moderate shift" level; PSI is computed with :data:`PSI_SMOOTHING`.
DEFAULT_THRESHOLDS: Final[Mapping[str, float]] = {"psi": 0.1}
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
    warning_alpha < 1``. ``thresholds``: statistic -> minimum effect a significant feature must
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


_READERS: Final[Mapping[str, Callable[[str, Any], Any]]] = {
    "enabled": _flag,
    "window_rows": _count,
    "window_seconds": _number,
    "decay_half_life_seconds": _positive,
    "reservoir_rows": _count,
    "min_rows": _count,
    "alpha": _probability,
    "warning_alpha": _probability,
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
