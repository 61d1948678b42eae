"""How a model version is monitored: :class:`MonitorConfig` and the default drift thresholds.

Kept apart from :mod:`edgewise.runtime.monitor` so that reading a model's configuration does not
import the Numba kernels: a server with monitoring off never loads numba (about 120 MB of
resident memory between its import and its first kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from edgewise.runtime.config_values import count as _count
from edgewise.runtime.config_values import flag as _flag
from edgewise.runtime.config_values import number as _number
from edgewise.runtime.errors import InvalidInput

__all__ = ["DEFAULT_THRESHOLDS", "STATISTICS", "MonitorConfig"]

# A feature drifts when a statistic reaches its threshold. PSI 0.1 / 0.25 are the customary
# "moderate" / "significant" shift levels; the distances are on a 0..1 scale.
DEFAULT_THRESHOLDS: Final[Mapping[str, float]] = {
    "psi": 0.25,
    "jensenshannon": 0.2,
    "ks": 0.2,
    "linf": 0.2,
}


@dataclass(frozen=True)
class MonitorConfig:
    """How a model version is monitored; set per model in ``<repo>/<model>/config.json`` under
    ``"monitoring"`` (the keys below), with server-wide defaults from ``edgewise serve``."""

    enabled: bool = True
    window_rows: int = 10_000  # tumbling window by row count (0: no count limit)
    window_seconds: float = 0.0  # tumbling window by time (0: no time limit)
    decay_half_life_seconds: float = 300.0
    reservoir_rows: int = 5_000  # recent rows kept for the exact tests
    min_rows: int = 100  # fewer rows are reported but not judged
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

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
        return replace(config, **values)


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
