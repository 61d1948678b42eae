"""Online quality from delayed labels: predictions kept by request id, joined with ground truth
when it arrives (minutes or days later), a running error, per-slice errors, and change detectors
(DDM on the 0/1 error stream of classifiers, ADWIN on the error of both kinds of model).

The join is bounded: the most recent ``join_size`` requests (with an id) are kept, oldest
dropped first. Keeping a prediction costs one dict insertion on the request path; everything else
happens when labels arrive. Configured per model in ``<repo>/<model>/config.json``::

    {"quality": {"join_size": 10000, "slice_by": ["region"],
                 "ddm": {"warm_start": 30, "warning_threshold": 2.0, "drift_threshold": 3.0},
                 "adwin": {"delta": 0.002}}}

``slice_by`` names categorical inputs (BYTES tensors) whose values split the error.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgewise.runtime.errors import InvalidInput

if TYPE_CHECKING:
    from edgewise.kernels import ADWIN, DDM

__all__ = ["LabelValue", "OnlineQuality", "QualityConfig"]

log = logging.getLogger(__name__)

LabelValue = int | float | str


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = True
    join_size: int = 10_000
    slice_by: tuple[str, ...] = ()
    ddm: Mapping[str, float] = field(default_factory=dict)
    adwin: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QualityConfig:
        unknown = set(data) - {"enabled", "join_size", "slice_by", "ddm", "adwin"}
        if unknown:
            raise InvalidInput(f"unknown quality setting(s) {sorted(unknown)}")
        try:
            config = cls(
                enabled=bool(data.get("enabled", True)),
                join_size=int(data.get("join_size", 10_000)),
                slice_by=tuple(str(s) for s in data.get("slice_by", ())),
                ddm=dict(data.get("ddm", {})),
                adwin=dict(data.get("adwin", {})),
            )
            if config.ddm or config.adwin:  # only then are the Numba kernels needed to check
                config.detectors(classifier=True)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"quality: {exc}") from None
        if config.join_size < 1:
            raise InvalidInput("quality.join_size must be at least 1")
        return config

    def detectors(self, classifier: bool) -> tuple[DDM | None, ADWIN]:
        """New change detectors with these settings (DDM only for a classifier's 0/1 errors).
        Imports the Numba kernels: called when the first labels arrive, not at load."""
        from edgewise.kernels import ADWIN, DDM

        ddm = DDM(**self.ddm) if classifier else None  # type: ignore[arg-type]
        return ddm, ADWIN(**self.adwin)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Kept:
    predictions: npt.NDArray[Any]  # one per row: class labels or regression values
    slices: tuple[npt.NDArray[Any], ...]  # per slice_by input, one value per row
    labelled: npt.NDArray[np.bool_]


@dataclass
class _SliceStats:
    count: int = 0
    error: float = 0.0


class OnlineQuality:
    """The prediction join and online error of one model version."""

    def __init__(
        self,
        model: str,
        version: str,
        classifier: bool,
        prediction_output: str,
        config: QualityConfig,
        on_alert: Callable[[str, Mapping[str, Any]], object] | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.classifier = classifier
        self.prediction_output = prediction_output
        self.config = config
        self.metric = "error_rate" if classifier else "mean_absolute_error"
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()
        # Built with the first labels (see QualityConfig.detectors): a server that keeps
        # predictions but never gets a label does not load the kernels.
        self._ddm: DDM | None = None
        self._adwin: ADWIN | None = None
        self._slices: dict[str, _SliceStats] = {}
        self.labelled = 0
        self.total_error = 0.0
        self.drifts = 0
        self.drifting = False
        self.warning = False
        self._on_alert = on_alert

    # ---- the request path --------------------------------------------------------------------

    def remember(
        self,
        request_id: str,
        feeds: Mapping[str, npt.NDArray[Any]],
        results: Mapping[str, npt.NDArray[Any]],
    ) -> None:
        """Keep one request's predictions (and slice values) for labels to come."""
        predictions = results.get(self.prediction_output)
        if predictions is None or not request_id:
            return
        rows = predictions.reshape(predictions.shape[0], -1)[:, 0].copy()
        slices = tuple(
            np.asarray(feeds[name]).reshape(-1).copy()
            for name in self.config.slice_by
            if name in feeds
        )
        kept = _Kept(rows, slices, np.zeros(rows.shape[0], dtype=np.bool_))
        with self._lock:
            self._kept[request_id] = kept
            self._kept.move_to_end(request_id)
            while len(self._kept) > self.config.join_size:
                self._kept.popitem(last=False)

    # ---- labels ------------------------------------------------------------------------------

    def feedback(self, labels: Sequence[tuple[str, int, LabelValue]]) -> tuple[int, int, int]:
        """Join labels ``(request_id, row, truth)``; returns (joined, unknown, duplicate)."""
        errors: list[float] = []
        slice_errors: list[tuple[str, float]] = []
        unknown = duplicate = 0
        with self._lock:
            for request_id, row, truth in labels:
                kept = self._kept.get(request_id)
                if kept is None or not 0 <= row < kept.predictions.shape[0]:
                    unknown += 1
                    continue
                if kept.labelled[row]:
                    duplicate += 1
                    continue
                kept.labelled[row] = True
                error = self._error(kept.predictions[row], truth)
                errors.append(error)
                for index, values in enumerate(kept.slices):
                    name = self.config.slice_by[index]
                    value = values[row]
                    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                    slice_errors.append((f"{name}={text}", error))
        if errors:
            self._learn(np.asarray(errors, dtype=np.float64), slice_errors)
        return len(errors), unknown, duplicate

    def _error(self, predicted: Any, truth: LabelValue) -> float:
        if self.classifier:
            if isinstance(predicted, bytes):
                predicted = predicted.decode("utf-8", "replace")
            if isinstance(truth, str) != isinstance(predicted, str):
                raise InvalidInput(
                    f"model {self.model!r} predicts {type(predicted).__name__} labels; "
                    f"got a {type(truth).__name__} label"
                )
            return 0.0 if predicted == truth else 1.0
        if isinstance(truth, str):
            raise InvalidInput(f"model {self.model!r} is a regressor: labels must be numbers")
        return abs(float(predicted) - float(truth))

    def _learn(self, errors: npt.NDArray[np.float64], slices: list[tuple[str, float]]) -> None:
        with self._lock:
            self.labelled += errors.size
            self.total_error += float(errors.sum())
            for key, error in slices:
                stats = self._slices.setdefault(key, _SliceStats())
                stats.count += 1
                stats.error += error
            if self._adwin is None:
                self._ddm, self._adwin = self.config.detectors(self.classifier)
            detections = 0
            if self._ddm is not None:
                status = self._ddm.update_status(errors)
                detections += int(np.count_nonzero(status == 2))
                self.warning = bool(status[-1] == 1)
            detections += int(self._adwin.update(errors).size)
            fired = detections > 0
            if fired:
                self.drifts += detections
                self.drifting = True
            snapshot = self.snapshot() if fired else None
        if snapshot is not None:
            log.warning(
                "quality: model %s version %s: a change detector fired (%s %.4g over %d labels)",
                self.model,
                self.version,
                self.metric,
                snapshot["recent_error"],
                snapshot["window"],
            )
            if self._on_alert is not None:
                self._on_alert("quality_drift", snapshot)

    # ---- reports -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The current state (called with or without the lock: reads plain attributes)."""
        adwin = self._adwin
        width = adwin.width if adwin is not None else 0
        return {
            "model": self.model,
            "version": self.version,
            "metric": self.metric,
            "labelled": self.labelled,
            "error": self.total_error / self.labelled if self.labelled else math.nan,
            "recent_error": adwin.estimation if adwin is not None and width else math.nan,
            "window": width,
            "warning": self.warning,
            "drifting": self.drifting,
            "drifts": self.drifts,
            "kept_predictions": len(self._kept),
            "slices": {
                key: {"count": s.count, "error": s.error / s.count}
                for key, s in sorted(self._slices.items())
            },
        }

    def report(self, reset: bool = True) -> dict[str, Any]:
        """The snapshot; ``drifting`` then starts over (it says: fired since the last report)."""
        with self._lock:
            snapshot = self.snapshot()
            if reset:
                self.drifting = False
        return snapshot
