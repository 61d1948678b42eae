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

CBPE against the labels: for a classifier whose package has a calibration (converted with
``--labels``), each kept row also keeps the ``probabilities`` the model already returned for it
(a copy of one small array on the request path: mapping them to a confidence there, one call
per request, costs several times the copy). When labels join, their rows' confidences (the
calibrated probability that the prediction is right, ``Calibration.confidence``) are computed
in one vectorised call for the whole batch, and added to a per-version ``LabelCheck``: the
estimated accuracy (the mean confidence) beside the realized one on exactly the labelled rows,
with the spread chance alone gives. Rows whose answer did not compute the probabilities (a
request that asked for the label only while the version has no CBPE estimator) keep none and
are left out of the check, never counted as a guess.

The state changes in two places only, each validated first: a batch of labels is checked whole
(type, NaN or infinity, a class the model has) before any row is marked labelled, so a refused
batch changes nothing; :meth:`OnlineQuality.reset` (the ResetQuality RPC) acknowledges the
detections. Reading the report changes nothing. The totals are published (the server's gauges)
where they change, after each batch that joined labels, and forgotten where the version goes:
:meth:`OnlineQuality.close`, called when it is unloaded or replaced.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from edgewise.runtime.config import values as config_values
from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.package.performance_estimation import (
    PROBABILITIES_OUTPUT,
    Calibration,
    LabelCheck,
)

if TYPE_CHECKING:
    from edgewise.kernels import ADWIN, DDM

__all__ = [
    "LabelValue",
    "OnlineQuality",
    "QualityConfig",
    "QualityPublisher",
    "submit_feedback",
]

log = logging.getLogger(__name__)

LabelValue = int | float | str
Label = tuple[str, int, LabelValue]  # (request_id, row, truth)
#: The class labels of a classifier, or what reads them (once, when the first labels arrive).
ClassSource = Sequence[LabelValue] | Callable[[], Sequence[LabelValue] | None] | None


class QualityPublisher(Protocol):
    """Where online quality shows its totals (the server's Prometheus gauges)."""

    def publish_quality(self, snapshot: Mapping[str, Any]) -> None:
        """Show ``snapshot`` as the model version's quality, replacing what was shown."""

    def forget_quality(self, model: str, version: str) -> None:
        """Show nothing more for a model version (it is unloaded)."""


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = True
    join_size: int = 10_000
    slice_by: tuple[str, ...] = ()
    ddm: Mapping[str, float] = field(default_factory=dict)
    adwin: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QualityConfig:
        """The settings of a ``"quality"`` object; every value is checked before any is used
        (JSON types only: ``"false"`` is not false, ``"color"`` is not a list of names)."""
        unknown = set(data) - {"enabled", "join_size", "slice_by", "ddm", "adwin"}
        if unknown:
            raise InvalidInput(f"unknown quality setting(s) {sorted(unknown)}")
        config = cls(
            enabled=config_values.flag("quality.enabled", data.get("enabled", True)),
            join_size=config_values.count("quality.join_size", data.get("join_size", 10_000), 1),
            slice_by=config_values.names("quality.slice_by", data.get("slice_by", [])),
            ddm=config_values.numbers("quality.ddm", data.get("ddm", {})),
            adwin=config_values.numbers("quality.adwin", data.get("adwin", {})),
        )
        if config.ddm or config.adwin:  # only then are the Numba kernels needed to check
            try:
                config.detectors(classifier=True)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"quality: {exc}") from None
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
    #: The model's probabilities, ``[rows, classes]``, for the confidence of a row that gets
    #: its label (None: the version is not calibrated, or the answer had none).
    probabilities: npt.NDArray[Any] | None = None


@dataclass
class _SliceStats:
    count: int = 0
    error: float = 0.0


@dataclass(slots=True)
class _Join:
    """One label matched with its kept prediction, not yet committed."""

    kept: _Kept
    row: int
    error: float
    slices: tuple[str, ...]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _member(truth: Any, classes: frozenset[LabelValue]) -> bool:
    """``truth in classes``, false for a value that cannot be a class (unhashable)."""
    try:
        return truth in classes
    except TypeError:
        return False


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
        classes: ClassSource = None,
        publisher: QualityPublisher | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        """``publisher`` shows a snapshot as the version's gauges after every batch that joined
        labels (the one place the totals change), and forgets them at :meth:`close`.
        ``calibration`` (a classifier's, from its package): keep each row's confidence and check
        the CBPE estimate against the labels that join (:class:`LabelCheck`)."""
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
        self._publisher = publisher
        self._closed = False
        self._calibration = calibration if classifier else None
        self._label_check = LabelCheck() if self._calibration is not None else None
        self._class_source = classes if classifier else None
        self._classes: tuple[LabelValue, ...] | None = None
        self._classes_read = False
        # Read with the classes, for the check of each label: the set and whether they are
        # strings (None: no classes known).
        self._class_set: frozenset[LabelValue] | None = None
        self._string_classes: bool | None = None
        # Whether the model predicts string labels (from its first kept prediction): the type
        # check of a classifier's labels when the graph names no classes.
        self._string_labels: bool | None = None

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
        if self._string_labels is None:
            self._string_labels = rows.dtype.kind in "OSU"
        slices = tuple(
            np.asarray(feeds[name]).reshape(-1).copy()
            for name in self.config.slice_by
            if name in feeds
        )
        kept = _Kept(
            rows,
            slices,
            np.zeros(rows.shape[0], dtype=np.bool_),
            self._probabilities(results, rows),
        )
        with self._lock:
            self._kept[request_id] = kept
            self._kept.move_to_end(request_id)
            while len(self._kept) > self.config.join_size:
                self._kept.popitem(last=False)

    def _probabilities(
        self, results: Mapping[str, npt.NDArray[Any]], rows: npt.NDArray[Any]
    ) -> npt.NDArray[Any] | None:
        """A copy of the probabilities the model returned, kept for the confidence of rows whose
        labels join (None without a calibration, or when the answer has none of the right
        shape)."""
        calibration = self._calibration
        if calibration is None:
            return None
        probabilities = results.get(PROBABILITIES_OUTPUT)
        if probabilities is None or probabilities.shape != (rows.shape[0], calibration.n_classes):
            return None
        return probabilities.copy()

    def keeps(self, request_id: str) -> bool:
        """Whether a prediction of ``request_id`` is kept here (for routing labels)."""
        return request_id in self._kept

    # ---- labels ------------------------------------------------------------------------------

    def feedback(self, labels: Sequence[Label]) -> tuple[int, int, int]:
        """Join labels ``(request_id, row, truth)``; returns (joined, unknown, duplicate).
        Every label is checked before any is joined: :class:`InvalidInput` changes nothing."""
        return self.commit(self.validate(labels))

    def validate(
        self, labels: Sequence[Label], numbers: Sequence[int] | None = None
    ) -> list[Label]:
        """The labels with their truths normalised (an integral float class index -> int), or
        :class:`InvalidInput` naming the first bad one (``numbers``: their places in the batch
        the caller received). Changes nothing."""
        places = range(len(labels)) if numbers is None else numbers
        return [
            (request_id, row, self._checked(place, request_id, row, truth))
            for place, (request_id, row, truth) in zip(places, labels, strict=True)
        ]

    def _checked(self, place: int, request_id: str, row: int, truth: LabelValue) -> LabelValue:
        where = f"label {place} (request {request_id!r} row {row})"
        truth = _plain(truth)
        if isinstance(truth, float) and not math.isfinite(truth):
            raise InvalidInput(f"{where}: {truth} is not a label")
        if not self.classifier:
            if isinstance(truth, str | bytes):
                raise InvalidInput(
                    f"{where}: model {self.model!r} is a regressor: labels must be numbers"
                )
            return truth
        return self._checked_class(where, truth)

    def _checked_class(self, where: str, truth: LabelValue) -> LabelValue:
        if isinstance(truth, float):
            if not truth.is_integer():
                raise InvalidInput(f"{where}: {truth} is not a class index")
            truth = int(truth)
        self.classes()  # read once, with the first labels
        class_set = self._class_set
        string_labels = self._string_labels if class_set is None else self._string_classes
        if string_labels is not None and isinstance(truth, str) != string_labels:
            raise InvalidInput(
                f"{where}: model {self.model!r} predicts {'str' if string_labels else 'int'} "
                f"labels; got a {type(truth).__name__} label"
            )
        if class_set is not None and not _member(truth, class_set):
            raise InvalidInput(
                f"{where}: {truth!r} is not a class of model {self.model!r} "
                f"(classes: {', '.join(str(c) for c in self._classes or ())})"
            )
        return truth

    def classes(self) -> tuple[LabelValue, ...] | None:
        """The classifier's class labels (None: unknown, or a regressor); read once."""
        if not self._classes_read:
            classes = self._read_classes()
            if classes:
                self._class_set = frozenset(classes)
                self._string_classes = all(isinstance(c, str) for c in classes)
            self._classes = classes
            self._classes_read = True
        return self._classes

    def _read_classes(self) -> tuple[LabelValue, ...] | None:
        source = self._class_source
        try:
            found = source() if callable(source) else source
        except PackageError as exc:
            log.warning(
                "quality: model %s version %s: cannot read its classes (%s); labels are checked "
                "for type only",
                self.model,
                self.version,
                exc,
            )
            return None
        return None if found is None else tuple(_plain(c) for c in found)

    def commit(self, labels: Sequence[Label]) -> tuple[int, int, int]:
        """Join labels that :meth:`validate` returned; returns (joined, unknown, duplicate)."""
        with self._lock:
            joins, unknown, duplicate = self._match(labels)
            self._check_estimate(joins)  # may refuse the batch: before anything is marked
            for join in joins:
                join.kept.labelled[join.row] = True
            fired = self._learn(joins) if joins else False
            snapshot = self.snapshot() if joins else None
            # Under the lock: the gauges show the batches in the order they were joined, and
            # nothing is shown again for a version that close() forgot.
            if snapshot is not None and self._publisher is not None and not self._closed:
                self._publisher.publish_quality(snapshot)
        if snapshot is not None and fired:
            self._alert(snapshot)
        return len(joins), unknown, duplicate

    def _match(self, labels: Sequence[Label]) -> tuple[list[_Join], int, int]:
        """Which labels join which kept row (under the lock; marks nothing)."""
        joins: list[_Join] = []
        taken: set[tuple[str, int]] = set()
        unknown = duplicate = 0
        for request_id, row, truth in labels:
            kept = self._kept.get(request_id)
            if kept is None or not 0 <= row < kept.predictions.shape[0]:
                unknown += 1
            elif kept.labelled[row] or (request_id, row) in taken:
                duplicate += 1
            else:
                taken.add((request_id, row))
                error = self._error(kept.predictions[row], truth)
                joins.append(_Join(kept, row, error, self._slice_keys(kept, row)))
        return joins, unknown, duplicate

    def _check_estimate(self, joins: Sequence[_Join]) -> None:
        """Add the joined rows that kept their probabilities to the label check, their
        confidences mapped in one call (under the lock; ``LabelCheck.add`` checks the whole
        batch before counting any of it)."""
        check, calibration = self._label_check, self._calibration
        if check is None or calibration is None:
            return
        rows: list[npt.NDArray[Any]] = []
        correct: list[bool] = []
        for join in joins:
            probabilities = join.kept.probabilities
            if probabilities is not None:
                rows.append(probabilities[join.row])
                correct.append(join.error == 0.0)
        if rows:
            check.add(calibration.confidence(np.stack(rows)), np.asarray(correct, dtype=np.bool_))

    def _slice_keys(self, kept: _Kept, row: int) -> tuple[str, ...]:
        keys = []
        for index, values in enumerate(kept.slices):
            value = values[row]
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            keys.append(f"{self.config.slice_by[index]}={text}")
        return tuple(keys)

    def _error(self, predicted: Any, truth: LabelValue) -> float:
        if self.classifier:
            if isinstance(predicted, bytes):
                predicted = predicted.decode("utf-8", "replace")
            return 0.0 if _plain(predicted) == truth else 1.0
        return abs(float(predicted) - float(truth))

    def _learn(self, joins: Sequence[_Join]) -> bool:
        """Count joined labels and feed the detectors (under the lock); whether one fired."""
        errors = np.asarray([join.error for join in joins], dtype=np.float64)
        self.labelled += errors.size
        self.total_error += float(errors.sum())
        for join in joins:
            for key in join.slices:
                stats = self._slices.setdefault(key, _SliceStats())
                stats.count += 1
                stats.error += join.error
        if self._adwin is None:
            self._ddm, self._adwin = self.config.detectors(self.classifier)
        detections = 0
        if self._ddm is not None:
            status = self._ddm.update_status(errors)
            detections += int(np.count_nonzero(status == 2))
            self.warning = bool(status[-1] == 1)
        detections += int(self._adwin.update(errors).size)
        if not detections:
            return False
        self.drifts += detections
        self.drifting = True
        return True

    def _alert(self, snapshot: Mapping[str, Any]) -> None:
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

    # ---- commands and reports --------------------------------------------------------------------

    def close(self) -> None:
        """The version is unloaded (or replaced by a reload): publish no more, and have the
        publisher forget its series."""
        with self._lock:
            self._closed = True
            if self._publisher is not None:
                self._publisher.forget_quality(self.model, self.version)

    def reset(self) -> None:
        """Acknowledge the detections: ``drifting`` is false until a detector fires again. The
        kept predictions, the totals, ``drifts`` and the detectors' own state are kept."""
        with self._lock:
            self.drifting = False

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
            # CBPE against the labels (None: the version has no calibration).
            "label_check": self._label_check.report() if self._label_check is not None else None,
            "check_reason": self._check_reason(),
        }

    def _check_reason(self) -> str:
        """Why the estimate is not checked against the labels ("" when it is)."""
        if self._label_check is not None:
            return ""
        if not self.classifier:
            return "CBPE estimates classifiers only"
        return "the package has no calibration (convert the model with --labels)"

    def report(self) -> dict[str, Any]:
        """A consistent snapshot (taken under the lock). Reading changes nothing."""
        with self._lock:
            return self.snapshot()


def submit_feedback(
    qualities: Sequence[OnlineQuality], labels: Sequence[Label]
) -> tuple[int, int, int]:
    """Join labels across the served versions of one model, each with the version that kept its
    request id (``qualities[0]``, the default version, first; an id no version keeps is counted
    unknown). Every label is checked, against the version it goes to, before any is joined.
    Returns (joined, unknown, duplicate)."""
    groups: dict[int, list[int]] = {}
    for place, (request_id, _, _) in enumerate(labels):
        owner = next((i for i, q in enumerate(qualities) if q.keeps(request_id)), 0)
        groups.setdefault(owner, []).append(place)
    checked = {
        owner: qualities[owner].validate([labels[p] for p in places], places)
        for owner, places in groups.items()
    }
    joined = unknown = duplicate = 0
    for owner, group in checked.items():
        counts = qualities[owner].commit(group)
        joined, unknown, duplicate = joined + counts[0], unknown + counts[1], duplicate + counts[2]
    return joined, unknown, duplicate
