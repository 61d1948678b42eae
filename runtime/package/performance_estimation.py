"""Performance estimation without labels: confidence-based (CBPE) accuracy and ROC-AUC.

While labels are delayed, a classifier's own probabilities say how well it does, provided they
are calibrated: a row predicted class ``k`` with a calibrated probability ``c`` of being ``k`` is
right with probability ``c``. So per window, with ``c_j`` the calibrated probability of row
``j``'s predicted class, the expected accuracy is ``mean(c_j)``. With ``q_j`` the calibrated
probability that row ``j`` is positive, the estimated ROC-AUC is the expected number of
concordant positive-negative pairs (the positive ranked above; ties half) over the expected
number of positive-negative pairs, both over distinct rows: ``sum_{i above j} q_i (1 - q_j)``
over ``P N - sum_j q_j (1 - q_j)`` (``P = sum q_j``, ``N = sum (1 - q_j)``). The area under the
expected ROC curve (expected true and false positives at each threshold, NannyML's estimate)
also pairs each row with itself, a pair the realized metric never has, and so leans towards 0.5
(see :func:`expected_roc_auc`). Multiclass models: the accuracy as above, the ROC-AUC as the mean
of the one-vs-rest estimates (the macro average, as scikit-learn's
``roc_auc_score(multi_class="ovr")``).

Calibration (fitted at convert time, where scikit-learn is installed) maps each class's score to
``P(y = class | score)`` with isotonic regression on the reference rows with labels (the held-out
rows when convert has them, else the sample), interpolated linearly between the centres of its
inner blocks rather than scikit-learn's steps, the outer blocks flat (see :func:`_isotonic`).
``method="auto"`` keeps the model's scores as they are (an identity map) where cross-validation
on the reference finds that isotonic regression does not lower the Brier score; on the
breast-cancer protocol of ``benchmarks/cbpe.py`` (40 splits) isotonic alone estimated ROC-AUC
better with both models (MAE 0.0067 against 0.0078 logistic, 0.0128 against 0.0130 forest) and
accuracy with the logistic one (0.021 against 0.023; forest 0.025 against 0.024), so it is the
default. The map is stored as knots
(``calibration.json``, format ``edgewise.calibration/1``; maps of either shape read alike) and
evaluated with :func:`numpy.interp` alone, so a serving node needs no scikit-learn.

Because the calibrated map is monotone in the score, ordering rows by the calibrated probability
orders them as the score does (rows tied in the calibrated probability add a straight segment to
the expected ROC curve in any order). A window therefore keeps, per class, a histogram over the
calibrated probability (``bins`` equal bins on [0, 1]: the count and the sum of the calibrated
probabilities in each) and the sum of ``q_j (1 - q_j)``, plus the sum of ``c_j``: fixed-size,
mergeable sums (across workers and windows), from which :meth:`PerformanceWindow.estimate`
computes the estimates. Within a bin the rows are taken as tied; with 1000 bins that moves the
ROC-AUC by well under 1e-3 (the ``window`` case of ``benchmarks/cbpe.py``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.package.paths import validate_relative_path

__all__ = [
    "CALIBRATION_FILE",
    "CALIBRATION_FORMAT",
    "DEFAULT_BINS",
    "DEFAULT_WINDOW_ROWS",
    "PROBABILITIES_OUTPUT",
    "Calibration",
    "ClassMap",
    "LabelCheck",
    "PerformanceEstimator",
    "PerformancePublisher",
    "PerformanceWindow",
    "estimate",
    "expected_roc_auc",
    "fit_calibration",
    "fit_for_package",
    "read_calibration",
    "write_calibration",
]

CALIBRATION_FILE: Final = "calibration.json"
CALIBRATION_FORMAT: Final = "edgewise.calibration/1"
DEFAULT_BINS: Final = 1000
DEFAULT_WINDOW_ROWS: Final = 10_000  # the server's estimate window when monitoring has no row limit
PROBABILITIES_OUTPUT: Final = "probabilities"  # the classifier output the estimate reads
_FOLDS: Final = 5
_METHODS: Final = frozenset({"auto", "isotonic", "identity"})

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ClassMap:
    """A monotone map from a class's score to the probability that the row is that class."""

    scores: Floats  # knots, non-decreasing
    probabilities: Floats  # values at the knots, non-decreasing, in [0, 1]

    def __call__(self, scores: npt.ArrayLike) -> Floats:
        # np.interp holds the end values outside the knots (scikit-learn's out_of_bounds="clip").
        return np.interp(np.asarray(scores, dtype=np.float64), self.scores, self.probabilities)

    @classmethod
    def identity(cls) -> ClassMap:
        return cls(np.array([0.0, 1.0]), np.array([0.0, 1.0]))

    def to_json(self) -> dict[str, list[float]]:
        return {"scores": self.scores.tolist(), "probabilities": self.probabilities.tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassMap:
        scores = np.asarray(data["scores"], dtype=np.float64)
        probabilities = np.asarray(data["probabilities"], dtype=np.float64)
        if scores.ndim != 1 or scores.shape != probabilities.shape or scores.size < 1:
            raise ValueError("scores and probabilities: equal-length, non-empty lists")
        if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(probabilities))):
            raise ValueError("a knot is not finite")
        if np.any(np.diff(scores) < 0) or np.any(np.diff(probabilities) < 0):
            raise ValueError("the knots must be non-decreasing")
        if probabilities[0] < 0 or probabilities[-1] > 1:
            raise ValueError("probabilities outside [0, 1]")
        return cls(scores, probabilities)


@dataclass(frozen=True)
class Calibration:
    """Per-class calibration maps of a classifier (probability columns in the model's order).

    A binary model has one map, for the second column (the positive class); the first column's
    calibrated probability is its complement. A multiclass model has one map per class
    (one-vs-rest), and the calibrated rows are renormalised to sum to 1.
    """

    classes: tuple[Any, ...]
    maps: tuple[ClassMap, ...]
    rows: int  # the reference rows the maps were fitted on
    source: str  # which rows: "held_out" or "sample"
    method: tuple[str, ...]  # per map: "isotonic" or "identity"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def calibrate(self, probabilities: npt.ArrayLike) -> Floats:
        """Calibrated probabilities, ``[rows, classes]``, for the model's ``[rows, classes]``."""
        scores = _probability_matrix(probabilities, self.n_classes)
        if self.n_classes == 2:
            positive = self.maps[0](scores[:, 1])
            return np.column_stack([1.0 - positive, positive])
        calibrated = np.column_stack([m(scores[:, k]) for k, m in enumerate(self.maps)])
        totals = calibrated.sum(axis=1, keepdims=True)
        uniform = np.full_like(calibrated, 1.0 / self.n_classes)
        safe = np.where(totals > 0, totals, 1.0)
        return np.asarray(np.where(totals > 0, calibrated / safe, uniform), dtype=np.float64)

    def confidence(self, probabilities: npt.ArrayLike) -> Floats:
        """Per row, the calibrated probability that the model's prediction (the column with the
        highest score; the first on a tie) is right: each row's share of the estimated accuracy,
        kept with a prediction so that its label can be checked against it (:class:`LabelCheck`).
        """
        scores = _probability_matrix(probabilities, self.n_classes)
        calibrated = self.calibrate(scores)
        rows = np.arange(scores.shape[0])
        return np.asarray(calibrated[rows, np.argmax(scores, axis=1)], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "classes": list(self.classes),
            "rows": self.rows,
            "source": self.source,
            "maps": [
                {**m.to_json(), "method": method}
                for m, method in zip(self.maps, self.method, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        if data.get("format") != CALIBRATION_FORMAT:
            raise PackageError(
                f"unknown calibration format {data.get('format')!r} "
                f"(expected {CALIBRATION_FORMAT!r})"
            )
        try:
            classes = tuple(data["classes"])
            raw_maps = list(data["maps"])
            maps = tuple(ClassMap.from_json(m) for m in raw_maps)
            method = tuple(str(m.get("method", "isotonic")) for m in raw_maps)
            if len(classes) < 2 or len(maps) != _map_count(len(classes)):
                raise ValueError(f"{len(maps)} map(s) for {len(classes)} classes")
            return cls(classes, maps, int(data["rows"]), str(data["source"]), method)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PackageError(f"malformed calibration: {type(exc).__name__}: {exc}") from None


def _map_count(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


def _probability_matrix(probabilities: npt.ArrayLike, n_classes: int) -> Floats:
    scores = np.asarray(probabilities, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise InvalidInput(
            f"probabilities: expected [rows, {n_classes}], got shape {list(scores.shape)}"
        )
    return scores


# ---- fitting (convert time: needs scikit-learn) -----------------------------------------------


def fit_calibration(
    probabilities: npt.ArrayLike,
    labels: npt.ArrayLike,
    classes: Sequence[Any],
    *,
    source: str = "held_out",
    method: str = "isotonic",
    seed: int = 0,
) -> Calibration:
    """Fit the calibration maps from a classifier's probabilities and the true labels.

    ``classes`` are the model's classes in its probability-column order (``model.classes_``).
    ``method``: ``"isotonic"``, ``"identity"`` (the scores as they are) or ``"auto"`` (isotonic
    where it lowers the cross-validated Brier score on these rows, else identity). Raises
    :class:`InvalidInput` when the rows and labels do not match or a label is not a class.
    """
    classes = tuple(_plain(c) for c in classes)
    scores = _probability_matrix(probabilities, len(classes))
    truth = np.asarray(labels).reshape(-1)
    if truth.shape[0] != scores.shape[0]:
        raise InvalidInput(f"labels: {truth.shape[0]} for {scores.shape[0]} rows")
    if len(classes) < 2:
        raise InvalidInput("calibration needs a classifier with at least two classes")
    if method not in _METHODS:
        raise InvalidInput(f"method: expected one of {sorted(_METHODS)}, got {method!r}")
    codes = {c: k for k, c in enumerate(classes)}
    try:
        index = np.array([codes[_plain(v)] for v in truth], dtype=np.int64)
    except KeyError as exc:
        raise InvalidInput(f"labels: {exc.args[0]!r} is not one of the classes") from None
    columns = [1] if len(classes) == 2 else list(range(len(classes)))
    maps, methods = [], []
    for column in columns:
        fitted, chosen = _fit_class_map(scores[:, column], index == column, method, seed)
        maps.append(fitted)
        methods.append(chosen)
    return Calibration(classes, tuple(maps), int(scores.shape[0]), source, tuple(methods))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _fit_class_map(
    scores: Floats, positive: npt.NDArray[np.bool_], method: str, seed: int
) -> tuple[ClassMap, str]:
    target = positive.astype(np.float64)
    if (
        method == "identity"
        or target.min() == target.max()
        or (method == "auto" and not _isotonic_helps(scores, target, seed))
    ):
        return ClassMap.identity(), "identity"
    return _isotonic(scores, target), "isotonic"


def _isotonic(scores: Floats, target: Floats) -> ClassMap:
    """Isotonic regression, interpolated between its blocks' centres.

    scikit-learn's isotonic fit is a step function: each block of pooled rows gets the block's
    share of positives over its whole score range, and jumps at the block ends. The rows fitted
    are few (a held-out set: a few hundred, with a handful of errors), so where the jumps fall is
    mostly noise. The map kept here puts a knot at the mean score of each inner block, with the
    block's share of positives as its value, and interpolates linearly between: a score near a
    block's edge is not handed the whole block's value. The two outer blocks keep their value
    over their whole range (their knot is at their inner end): they are where the reference saw
    (nearly) one class only, the long tails where a good model puts most rows, and a line from
    deep inside them would hand rows the reference saw as certain a share of the other class
    (for a multiclass model, on every class, which then lowers the renormalised probability of
    the predicted one). ``benchmarks/cbpe.py`` measures it against the step map and NannyML.
    """
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, target)
    fitted = np.asarray(model.predict(scores), dtype=np.float64)
    # Monotone, so rows with one fitted value are one block (pooled neighbours) and the values
    # come out sorted; the blocks' score ranges follow one another.
    values, block = np.unique(fitted, return_inverse=True)
    if values.size == 1:
        return ClassMap(np.array([float(np.mean(scores))]), values)
    rows = np.bincount(block, minlength=values.size).astype(np.float64)
    knots = np.bincount(block, weights=scores, minlength=values.size) / rows
    knots[0] = scores[block == 0].max()
    knots[-1] = scores[block == values.size - 1].min()
    return ClassMap(np.maximum.accumulate(knots), values)


def _isotonic_helps(scores: Floats, target: Floats, seed: int) -> bool:
    """Whether an isotonic map lowers the out-of-fold Brier score below the raw scores'."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(_FOLDS, int(target.sum()), int((1 - target).sum()))
    if folds < 2:
        return False
    calibrated = np.empty_like(scores)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, test_rows in splitter.split(scores.reshape(-1, 1), target):
        calibrated[test_rows] = _isotonic(scores[fit_rows], target[fit_rows])(scores[test_rows])
    raw_brier = float(np.mean((np.clip(scores, 0, 1) - target) ** 2))
    return float(np.mean((calibrated - target) ** 2)) < raw_brier


def fit_for_package(
    task: str,
    classes: Sequence[Any] | None,
    probabilities: npt.ArrayLike | None,
    labels: npt.ArrayLike,
    source: str,
) -> Calibration:
    """The calibration ``edgewise convert`` stores for a classifier given true labels.

    ``probabilities`` are the converted model's on the labelled rows (the held-out rows, else the
    sample). Raises :class:`InvalidInput` where the model is no classifier with probabilities.
    """
    if task != "classification" or classes is None or probabilities is None:
        raise InvalidInput(
            "labels: performance estimation needs a classifier with predict_proba "
            "(its probabilities output)"
        )
    return fit_calibration(probabilities, labels, classes, source=source)


# ---- estimating (serve time: numpy only) ------------------------------------------------------


def expected_roc_auc(
    order_by: Floats,
    positive: Floats,
    weight: Floats | None = None,
    spread: float | None = None,
    *,
    distinct_pairs: bool = True,
) -> float:
    """The expected ROC-AUC of rows whose labels are drawn with probabilities ``positive``.

    Rows are ordered by ``order_by`` (descending; equal values are tied), ``positive`` is each
    row's calibrated probability of being positive, ``weight`` its count (1 when None; a
    histogram bin's row count with ``positive`` its summed probability) and ``spread`` the sum of
    ``q (1 - q)`` over the rows (computed from ``positive`` when ``weight`` is None; a histogram
    must pass it). NaN when no two rows can make a positive-negative pair.

    ``distinct_pairs=False`` is the area under the expected ROC curve (expected true and false
    positives at each threshold; NannyML's estimate). Its numerator and denominator count each
    row paired with itself, with weight ``q (1 - q)``, a pair the realized ROC-AUC never has; so
    it leans towards 0.5 by about ``spread / (P N)`` (``P``, ``N``: the expected positives and
    negatives), 0.001-0.003 on a 50-row window of a good model. The default drops those
    self-pairs: expected concordant pairs over the expected number of positive-negative pairs,
    ``(area P N - spread / 2) / (P N - spread)``.
    """
    count = np.ones_like(positive) if weight is None else np.asarray(weight, dtype=np.float64)
    order = np.argsort(-order_by, kind="stable")
    keys, tp_step, fp_step = order_by[order], positive[order], (count - positive)[order]
    tps, fps = np.cumsum(tp_step), np.cumsum(fp_step)
    last_of_tie = np.r_[np.flatnonzero(np.diff(keys)), keys.size - 1]
    tps, fps = np.r_[0.0, tps[last_of_tie]], np.r_[0.0, fps[last_of_tie]]
    if tps[-1] <= 0 or fps[-1] <= 0:
        return math.nan
    area = float(np.trapezoid(tps / tps[-1], fps / fps[-1]))
    if not distinct_pairs:
        return area
    if spread is None:
        if weight is not None:
            raise ValueError("spread: a weighted (histogram) call must pass the rows' spread")
        spread = float(np.sum(positive * (1.0 - positive)))
    pairs = float(tps[-1] * fps[-1])
    distinct = pairs - spread
    if distinct <= 1e-12 * pairs:
        return math.nan  # a single row: no positive-negative pair at all
    return min(1.0, max(0.0, (area * pairs - 0.5 * spread) / distinct))


def estimate(probabilities: npt.ArrayLike, calibration: Calibration) -> dict[str, float]:
    """Estimated accuracy and ROC-AUC of one window, exactly (row by row)."""
    scores = _probability_matrix(probabilities, calibration.n_classes)
    calibrated = calibration.calibrate(scores)
    predicted = np.argmax(scores, axis=1)
    accuracy = float(np.mean(calibrated[np.arange(len(predicted)), predicted]))
    if calibration.n_classes == 2:
        roc_auc = expected_roc_auc(calibrated[:, 1], calibrated[:, 1])
    else:
        roc_auc = _macro_mean(
            [
                expected_roc_auc(calibrated[:, k], calibrated[:, k])
                for k in range(calibration.n_classes)
            ]
        )
    return {"accuracy": accuracy if len(predicted) else math.nan, "roc_auc": roc_auc}


def _macro_mean(areas: Sequence[float]) -> float:
    """The one-vs-rest mean over the classes whose estimate is defined (NaN when none is).

    A class the calibration gives no chance at all in a window (every row's calibrated
    probability 0) has no expected positives, so no estimate; it is left out of the mean rather
    than making the whole window's estimate NaN (the binary case has one curve: NaN stays NaN).
    """
    defined = [a for a in areas if not math.isnan(a)]
    return float(np.mean(defined)) if defined else math.nan


class PerformanceWindow:
    """Mergeable per-window sums from which the CBPE estimates are computed.

    ``update`` adds a batch of the model's probabilities; ``estimate`` reads (and changes
    nothing); ``merge`` adds another window's sums (e.g. another worker's).
    """

    def __init__(self, calibration: Calibration, bins: int = DEFAULT_BINS) -> None:
        if bins < 1:
            raise InvalidInput(f"bins: expected a positive integer, got {bins}")
        self.calibration = calibration
        self.bins = bins
        curves = 1 if calibration.n_classes == 2 else calibration.n_classes
        self.rows = 0
        self.correct = 0.0  # the sum of the calibrated probability of the predicted class
        self.counts = np.zeros((curves, bins), dtype=np.float64)
        self.positives = np.zeros((curves, bins), dtype=np.float64)
        self.spread = np.zeros(curves, dtype=np.float64)  # per curve: the sum of q (1 - q)

    def update(self, probabilities: npt.ArrayLike) -> None:
        scores = _probability_matrix(probabilities, self.calibration.n_classes)
        if scores.shape[0] == 1 and self.calibration.n_classes == 2:
            self._update_binary_row(*scores[0].tolist())
            return
        if not np.all(np.isfinite(scores)):
            raise InvalidInput("probabilities: NaN or infinity")
        calibrated = self.calibration.calibrate(scores)
        predicted = np.argmax(scores, axis=1)
        columns = [1] if self.calibration.n_classes == 2 else range(self.calibration.n_classes)
        bin_of = np.minimum((calibrated * self.bins).astype(np.int64), self.bins - 1)
        for curve, column in enumerate(columns):
            np.add.at(self.counts[curve], bin_of[:, column], 1.0)
            np.add.at(self.positives[curve], bin_of[:, column], calibrated[:, column])
            self.spread[curve] += float(np.dot(calibrated[:, column], 1.0 - calibrated[:, column]))
        self.correct += float(calibrated[np.arange(len(predicted)), predicted].sum())
        self.rows += int(scores.shape[0])

    def _update_binary_row(self, negative: float, positive: float) -> None:
        """``update`` of one binary row in Python floats (the common one-row request: the
        array path's set-up costs several times the arithmetic); the same sums."""
        if not (math.isfinite(negative) and math.isfinite(positive)):
            raise InvalidInput("probabilities: NaN or infinity")
        ours = self.calibration.maps[0]
        calibrated = float(np.interp(positive, ours.scores, ours.probabilities))
        index = min(int(calibrated * self.bins), self.bins - 1)
        self.counts[0, index] += 1.0
        self.positives[0, index] += calibrated
        self.spread[0] += calibrated * (1.0 - calibrated)
        # argmax picks the first of equal scores: the negative class on a tie.
        self.correct += calibrated if positive > negative else 1.0 - calibrated
        self.rows += 1

    def merge(self, other: PerformanceWindow) -> None:
        if other.bins != self.bins or other.counts.shape != self.counts.shape:
            raise InvalidInput("cannot merge performance windows of different shapes")
        self.rows += other.rows
        self.correct += other.correct
        self.counts += other.counts
        self.positives += other.positives
        self.spread += other.spread

    def estimate(self) -> dict[str, float]:
        if self.rows == 0:
            return {"accuracy": math.nan, "roc_auc": math.nan}
        centres = (np.arange(self.bins, dtype=np.float64) + 0.5) / self.bins
        areas = []
        for counts, positives, spread in zip(self.counts, self.positives, self.spread, strict=True):
            used = counts > 0
            areas.append(
                expected_roc_auc(centres[used], positives[used], counts[used], float(spread))
            )
        return {"accuracy": self.correct / self.rows, "roc_auc": _macro_mean(areas)}

    def reset(self) -> None:
        self.rows = 0
        self.correct = 0.0
        self.counts[:] = 0.0
        self.positives[:] = 0.0
        self.spread[:] = 0.0


class LabelCheck:
    """The estimate against the labels that arrive: on the rows whose labels came back, the
    estimated accuracy (the mean of their :meth:`Calibration.confidence`) beside the realized one.

    Comparing on the same rows matters: labels come back for some rows only (and not at random:
    disputes, audits), so the estimate of a whole window is not the one to hold them against.
    ``chance`` is the standard deviation the realized accuracy would have from chance alone if
    the calibration were exact (``sqrt(sum c (1 - c)) / rows``): a floor, not a test, since the
    calibration is fitted on a few hundred rows and is itself off by about the benchmark's
    error (``benchmarks/cbpe.py``; it gives rows with no error in the reference a confidence of
    exactly 1). A difference far beyond both says the estimate no longer holds (concept drift,
    or a calibration fitted on rows unlike these), which only labels can tell. Sums only:
    mergeable across workers and windows. ``add`` checks the batch whole before counting any of
    it; ``report`` reads.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.expected = 0.0  # sum of c
        self.correct = 0  # rows whose prediction was right
        self.variance = 0.0  # sum of c (1 - c)

    def add(self, confidence: npt.ArrayLike, correct: npt.ArrayLike) -> None:
        """Count labelled rows: each one's confidence (kept from when it was served) and
        whether its prediction was right."""
        c = np.asarray(confidence, dtype=np.float64).reshape(-1)
        right = np.asarray(correct).reshape(-1)
        if right.shape != c.shape:
            raise InvalidInput(f"correct: {right.size} values for {c.size} confidences")
        if right.dtype != np.bool_:
            raise InvalidInput("correct: expected booleans (whether each prediction was right)")
        if not (np.all(np.isfinite(c)) and np.all((c >= 0) & (c <= 1))):
            raise InvalidInput("confidence: expected probabilities in [0, 1]")
        self.rows += int(c.size)
        self.expected += float(c.sum())
        self.correct += int(np.count_nonzero(right))
        self.variance += float(np.dot(c, 1.0 - c))

    def merge(self, other: LabelCheck) -> None:
        self.rows += other.rows
        self.expected += other.expected
        self.correct += other.correct
        self.variance += other.variance

    def report(self) -> dict[str, float]:
        """``labelled``, ``estimated_accuracy``, ``realized_accuracy``, ``difference`` (realized
        - estimated) and ``chance`` (see above); NaN with no labelled rows."""
        if self.rows == 0:
            keys = ("estimated_accuracy", "realized_accuracy", "difference", "chance")
            return {"labelled": 0, **dict.fromkeys(keys, math.nan)}
        return {
            "labelled": self.rows,
            "estimated_accuracy": self.expected / self.rows,
            "realized_accuracy": self.correct / self.rows,
            "difference": (self.correct - self.expected) / self.rows,
            "chance": math.sqrt(self.variance) / self.rows,
        }


class PerformancePublisher(Protocol):
    """Where a served version's estimates are shown (the server's Prometheus gauges)."""

    def publish_performance(self, model: str, version: str, estimates: Mapping[str, float]) -> None:
        """Show ``estimates`` (metric name: value) as the version's, replacing what was shown."""

    def forget_performance(self, model: str, version: str) -> None:
        """Show nothing more for a model version (it is unloaded)."""


class PerformanceEstimator:
    """The server's CBPE estimate of one served classifier version, over windows of its own.

    ``update`` (the request path, after the answer) adds a request's probabilities to the
    current window; when the window reaches ``window_rows`` rows it closes: its estimate is
    published and a fresh window starts (the roll is where the state changes, so it publishes
    there). Between rolls the published estimate is that of the last closed window. ``reset``
    (``ResetWindow``) drops the window and the shown estimate. ``close``
    (the version is unloaded) has the publisher forget the version; later updates are ignored.
    """

    def __init__(
        self,
        model: str,
        version: str,
        calibration: Calibration,
        window_rows: int = DEFAULT_WINDOW_ROWS,
        publisher: PerformancePublisher | None = None,
    ) -> None:
        if window_rows < 1:
            raise InvalidInput(f"window_rows: expected a positive integer, got {window_rows}")
        self.model = model
        self.version = version
        self.window_rows = window_rows
        self.current = PerformanceWindow(calibration)
        self.last: dict[str, float] | None = None  # the last closed window's estimate
        self._publisher = publisher
        self._lock = threading.Lock()
        self._closed = False

    def update(self, probabilities: npt.ArrayLike) -> None:
        with self._lock:
            if self._closed:
                return
            self.current.update(probabilities)
            if self.current.rows >= self.window_rows:
                self._roll()

    def _roll(self) -> None:
        """Close the current window: publish its estimate, start a fresh one (lock held)."""
        self.last = self.current.estimate()
        self.current.reset()
        if self._publisher is not None:
            self._publisher.publish_performance(self.model, self.version, self.last)

    def reset(self) -> None:
        """Start over (with the drift monitor's ``ResetWindow``): drop the current window and
        the shown estimate, so that nothing from before the reset is shown any more."""
        with self._lock:
            if self._closed:
                return
            self.current.reset()
            self.last = None
            if self._publisher is not None:
                self._publisher.forget_performance(self.model, self.version)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._publisher is not None:
                self._publisher.forget_performance(self.model, self.version)


# ---- files ------------------------------------------------------------------------------------


def write_calibration(folder: Path, calibration: Calibration) -> dict[str, Any]:
    """Write ``calibration.json`` into a package folder; returns its manifest entry."""
    text = json.dumps(calibration.to_json(), separators=(",", ":"), allow_nan=False)
    write_text_atomic(folder / CALIBRATION_FILE, text)
    return {"file": CALIBRATION_FILE, "format": CALIBRATION_FORMAT, "rows": calibration.rows}


def read_calibration(folder: Path, entry: Mapping[str, Any] | None) -> Calibration | None:
    """The package's calibration (``entry`` is the manifest's), or None when it has none."""
    if entry is None:
        return None
    name = str(entry.get("file", CALIBRATION_FILE))
    validate_relative_path(name, "calibration file")
    path = folder / name
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise PackageError(f"{folder}: the manifest names {name} but it is missing") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise PackageError(f"{path}: cannot read the calibration: {exc}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object")
    return Calibration.from_json(data)
