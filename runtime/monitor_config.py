"""How a model version is monitored: :class:`MonitorConfig` and the default drift thresholds.

Kept apart from :mod:`edgewise.runtime.monitor` so that reading a model's configuration does not
import the Numba kernels: a server with monitoring off never loads numba (about 120 MB of
resident memory between its import and its first kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from edgewise.runtime.errors import InvalidInput

__all__ = ["DEFAULT_THRESHOLDS", "MonitorConfig"]

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
        config = base or cls()
        known = {
            "enabled": bool,
            "window_rows": int,
            "window_seconds": float,
            "decay_half_life_seconds": float,
            "reservoir_rows": int,
            "min_rows": int,
        }
        values: dict[str, Any] = {}
        for key, value in data.items():
            try:
                if key == "thresholds":
                    if not isinstance(value, Mapping):
                        raise InvalidInput("monitoring.thresholds must be an object")
                    values["thresholds"] = {
                        **config.thresholds,
                        **{k: float(v) for k, v in value.items()},
                    }
                elif key in known:
                    values[key] = known[key](value)
                else:
                    raise InvalidInput(f"unknown monitoring setting {key!r}")
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInput(f"monitoring.{key}: {exc}") from None
        result = replace(config, **values)
        if result.window_rows < 0 or result.window_seconds < 0 or result.reservoir_rows < 0:
            raise InvalidInput("monitoring windows and reservoir sizes must be >= 0")
        return result
