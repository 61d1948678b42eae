"""``edgewise evaluate``: quality metrics of a model version on labelled data, overall and per
slice, against a baseline version.

The candidate (and the baseline) run through onnxruntime exactly as the server runs them
(:func:`edgewise.runtime.serving.model.load_model`, inputs built by
:func:`edgewise.runtime.package.schema.frame_to_inputs`), on every labelled row of a table.

Metrics
-------
Classifiers (``label`` and ``probabilities`` outputs):

``accuracy``
    fraction of rows whose predicted label is the true one.
``precision``, ``recall``, ``f1``
    binary models: of the positive class (the second of the model's two classes, as
    scikit-learn's ``pos_label`` for 0/1 labels); multiclass models: the macro average over the
    classes present in the slice's true or predicted labels (scikit-learn's default ``labels``).
    A class whose ratio has a zero denominator has no value and is left out of the average
    (scikit-learn's ``zero_division=np.nan``).
``roc_auc``
    binary: the area under the ROC curve of the positive class's probability; multiclass: the
    macro average of the one-vs-rest AUCs of the classes present in the slice (each needs
    positives and negatives), which is scikit-learn's ``roc_auc_score(multi_class="ovr")``
    when every class is present.
``log_loss``
    mean negative log-likelihood of the true class, probabilities clipped to
    ``[eps, 1 - eps]`` (float64 ``eps``), as scikit-learn's ``log_loss``.
``calibration_error``
    expected calibration error over 10 equal-width probability bins, the bins of
    ``sklearn.calibration.calibration_curve(strategy="uniform")``: the row-weighted mean of
    ``|observed frequency - mean predicted probability|`` per bin. Binary: of the positive
    class's probability; multiclass: of the top-label confidence (the highest probability
    against whether its class is the true one).

Regressors (``predictions`` output): ``mae``, ``rmse`` and ``r2`` (scikit-learn's
``mean_absolute_error``, ``root_mean_squared_error`` and ``r2_score``).

A metric that is undefined on a slice (a ratio with a zero denominator, an AUC with one class,
R² of fewer than two rows or of a constant target) is ``None``; scikit-learn returns NaN, or a
conventional value with a warning, there. ``tests/runtime/evaluation/test_evaluate.py`` compares
every number with scikit-learn's.

Slices
------
``slice_by`` names columns of the data (model features or not). Each column gives one slice per
value (missing values form the slice ``null``); a numeric column with more than
:data:`MAX_SLICE_LEVELS` distinct values is cut into :data:`DEFAULT_NUMERIC_BINS` quantile bins
instead. With several columns, the crossed slices (one per combination of values that occurs)
follow. A slice with fewer rows than ``min_slice_size`` is reported with ``judged: false``:
the promotion gate does not judge it.

Baseline
--------
Given a baseline model, every slice also carries the baseline's metrics and the difference
``candidate - baseline`` per metric. Whether a difference is a degradation depends on the
metric's direction (:data:`LOWER_IS_BETTER`).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgewise.runtime.errors import InvalidInput, ModelNotFound
from edgewise.runtime.package.manifest import (
    MODEL_FILE,
    list_versions,
    read_manifest,
    sha256_file,
    validate_model_name,
)
from edgewise.runtime.package.paths import graph_class_labels
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.model import LoadedModel, SessionSettings, load_model

__all__ = [
    "CALIBRATION_BINS",
    "CLASSIFICATION_METRICS",
    "DEFAULT_MIN_SLICE_SIZE",
    "DEFAULT_NUMERIC_BINS",
    "EVALUATION_FORMAT",
    "LOWER_IS_BETTER",
    "MAX_SLICE_LEVELS",
    "REGRESSION_METRICS",
    "Evaluation",
    "ModelRef",
    "Predictions",
    "SliceResult",
    "SliceSpec",
    "build_slices",
    "classification_metrics",
    "data_info",
    "default_baseline_version",
    "evaluate_models",
    "expected_calibration_error",
    "format_summary",
    "is_worse",
    "load_package",
    "package_folder",
    "predict",
    "regression_metrics",
    "resolve_version",
    "roc_auc",
]

EVALUATION_FORMAT: Final = "edgewise.evaluation/1"

CLASSIFICATION_METRICS: Final = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "log_loss",
    "calibration_error",
)
REGRESSION_METRICS: Final = ("mae", "rmse", "r2")
LOWER_IS_BETTER: Final = frozenset({"log_loss", "calibration_error", "mae", "rmse"})
"""Metrics where a smaller value is better; for every other metric a larger one is."""

CALIBRATION_BINS: Final = 10
DEFAULT_MIN_SLICE_SIZE: Final = 30
MAX_SLICE_LEVELS: Final = 20
DEFAULT_NUMERIC_BINS: Final = 4
NULL_LEVEL: Final = "null"
_CHUNK_ROWS: Final = 8192

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.int64]
Metrics = dict[str, float | None]


# ---- models and versions ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """``NAME`` or ``NAME:VERSION`` as given on the command line."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.partition(":")
        try:
            validate_model_name(name)
        except InvalidInput:
            raise InvalidInput(f"model {text!r}: expected NAME or NAME:VERSION") from None
        if not sep:
            return cls(name)
        if not version.isascii() or not version.isdigit() or int(version) < 1:
            raise InvalidInput(f"model {text!r}: VERSION must be an integer >= 1")
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


def resolve_version(repo: Path, ref: ModelRef) -> int:
    """The version ``ref`` names, or the one the server serves by default
    (:func:`edgewise.runtime.package.model_config.default_version`: one rule everywhere)."""
    from edgewise.runtime.package.model_config import default_version

    versions = list_versions(repo / ref.name)
    if not versions:
        raise ModelNotFound(f"model {ref.name!r}: no versions in repository {repo}")
    if ref.version is None:
        return default_version(repo / ref.name)
    if ref.version not in versions:
        raise ModelNotFound(
            f"model {ref.name!r} has no version {ref.version} in {repo} "
            f"(versions: {', '.join(map(str, versions))})"
        )
    return ref.version


def default_baseline_version(repo: Path, name: str, candidate: int) -> int | None:
    """The version to compare a candidate with when none is named: the model's pinned default
    (``config.json``'s ``default_version``) if it is another version, else the highest version
    below the candidate; None when there is none."""
    from edgewise.runtime.package.model_config import VersionPolicy, read_model_config

    versions = list_versions(repo / name)
    pinned = read_model_config(repo / name, VersionPolicy()).default_version
    if pinned is not None and pinned != candidate and pinned in versions:
        return pinned
    below = [v for v in versions if v < candidate]
    return below[-1] if below else None


def package_folder(repo: Path, name: str, version: int) -> Path:
    return repo / name / str(version)


def load_package(folder: Path, settings: SessionSettings | None = None) -> LoadedModel:
    """Load a package folder (``REPO/NAME/VERSION`` or any folder with a manifest): its name
    comes from the manifest, its version from the folder name (0 when that is not a number)."""
    if not folder.is_dir():
        raise ModelNotFound(f"{folder}: no such package folder")
    manifest = read_manifest(folder)
    version = int(folder.name) if folder.name.isascii() and folder.name.isdigit() else 0
    return load_model(manifest.name, version, folder, settings or SessionSettings())


# ---- predictions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """A model's outputs on a table. Classifiers: ``labels`` (the ``label`` output) and
    ``proba`` (float64 ``[n, n_classes]``, clipped to [0, 1]); regressors: ``values``."""

    task: str
    labels: npt.NDArray[Any] | None = None
    proba: FloatArray | None = None
    values: FloatArray | None = None


def _output(outputs: Mapping[str, npt.NDArray[Any]], name: str, model: LoadedModel) -> Any:
    if name not in outputs:
        raise InvalidInput(
            f"model {model.name!r} version {model.version}: no {name!r} output "
            f"(outputs: {', '.join(outputs)})"
        )
    return outputs[name]


def predict(model: LoadedModel, frame: Any) -> Predictions:
    """Run ``model`` on every row of ``frame`` (in chunks), as the server would."""
    task = model.manifest.task
    if task not in ("classification", "regression"):
        raise InvalidInput(
            f"model {model.name!r}: task {task!r} cannot be evaluated "
            "(only classifiers and regressors)"
        )
    names = ["label", "probabilities"] if task == "classification" else ["predictions"]
    missing = [n for n in names if n not in model.output_names]
    if missing:
        raise InvalidInput(f"model {model.name!r}: no output(s) {', '.join(missing)}")
    parts: dict[str, list[npt.NDArray[Any]]] = {n: [] for n in names}
    for start in range(0, max(len(frame), 1), _CHUNK_ROWS):
        chunk = frame.iloc[start : start + _CHUNK_ROWS]
        if len(chunk) == 0:
            break
        outputs = model.run(frame_to_inputs(model.manifest, chunk), names)
        for name in names:
            parts[name].append(np.asarray(_output(outputs, name, model)))
    if task == "regression":
        values = np.concatenate(parts["predictions"]) if parts["predictions"] else np.empty(0)
        return Predictions(task, values=values.reshape(len(frame)).astype(np.float64))
    labels = np.concatenate(parts["label"]).reshape(-1) if parts["label"] else np.empty(0)
    proba = (
        np.concatenate(parts["probabilities"]).astype(np.float64)
        if parts["probabilities"]
        else np.empty((0, 0))
    )
    if proba.ndim != 2 or proba.shape[0] != labels.shape[0]:
        raise InvalidInput(f"model {model.name!r}: probabilities of shape {list(proba.shape)}")
    if not np.all(np.isfinite(proba)):
        raise InvalidInput(f"model {model.name!r}: returned non-finite probabilities")
    return Predictions(task, labels=labels, proba=np.clip(proba, 0.0, 1.0))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for JSON and for dictionary keys)."""
    return value.item() if isinstance(value, np.generic) else value


def _class_order(model: LoadedModel, predictions: Predictions, y_raw: Any) -> tuple[Any, ...]:
    """The model's classes, in probability-column order (from the graph, else from the data)."""
    assert predictions.proba is not None and predictions.labels is not None
    n_classes = predictions.proba.shape[1]
    classes = graph_class_labels(model.folder / MODEL_FILE)
    if classes is None or len(classes) != n_classes:
        seen = {_plain(v) for v in predictions.labels} | {_plain(v) for v in y_raw}
        try:
            inferred = tuple(sorted(seen))
        except TypeError:
            inferred = ()
        if len(inferred) != n_classes:
            raise InvalidInput(
                f"model {model.name!r}: cannot tell which of its {n_classes} probability "
                "columns is which class (the graph names no classes and the data does not "
                "show all of them)"
            )
        classes = inferred
    # Guard: where one probability clearly wins, the label output must be its class.
    proba = predictions.proba
    if proba.shape[0]:
        top = np.argmax(proba, axis=1)
        ordered = np.sort(proba, axis=1)
        clear = (ordered[:, -1] - ordered[:, -2] > 1e-3) if n_classes > 1 else np.ones_like(top)
        winners = np.array(classes, dtype=object)[top]
        labels = np.array([_plain(v) for v in predictions.labels], dtype=object)
        if np.any((winners != labels) & clear.astype(bool)):
            raise InvalidInput(
                f"model {model.name!r}: its label output disagrees with its probabilities "
                "under the class order " + repr(list(classes))
            )
    return classes


def _encode(values: Any, classes: Sequence[Any], what: str) -> IndexArray:
    """Class labels -> indices into ``classes``; :class:`InvalidInput` for an unknown label."""
    index = {_plain(c): i for i, c in enumerate(classes)}
    # Integral floats (a label column read as float) match integer classes.
    if classes and all(isinstance(c, int) for c in classes):
        lookup = {float(k): v for k, v in index.items()}
        index = {**lookup, **index}
    out = np.empty(len(values), dtype=np.int64)
    unknown: set[str] = set()
    for i, value in enumerate(values):
        key = _plain(value)
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        position = index.get(key)
        if position is None and not isinstance(key, str):
            position = index.get(str(key))
        if position is None:
            unknown.add(repr(key))
            out[i] = -1
        else:
            out[i] = position
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise InvalidInput(
            f"{what} holds value(s) the model does not know as classes: {shown} "
            f"(classes: {', '.join(map(repr, classes))})"
        )
    return out


# ---- metrics -------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _average_ranks(scores: FloatArray) -> FloatArray:
    """1-based ranks, ties sharing their average rank."""
    n = scores.shape[0]
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    boundaries = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [n]))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(positive: npt.NDArray[np.bool_], scores: FloatArray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted as one half); None
    without both positives and negatives."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = int(positive.shape[0]) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def expected_calibration_error(
    outcome: npt.NDArray[np.bool_], probability: FloatArray, n_bins: int = CALIBRATION_BINS
) -> float | None:
    """Row-weighted mean over equal-width bins of ``|mean(outcome) - mean(probability)|``; the
    bins are those of scikit-learn's ``calibration_curve(strategy="uniform")`` (a probability
    on an inner edge goes to the lower bin). None for no rows."""
    n = probability.shape[0]
    if n == 0:
        return None
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], probability)
    totals = np.bincount(bins, minlength=n_bins).astype(np.float64)
    predicted = np.bincount(bins, weights=probability, minlength=n_bins)
    observed = np.bincount(bins, weights=outcome.astype(np.float64), minlength=n_bins)
    used = totals > 0
    gaps = np.abs(observed[used] / totals[used] - predicted[used] / totals[used])
    return float(np.sum(gaps * totals[used]) / n)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def classification_metrics(
    y_true: IndexArray, y_pred: IndexArray, proba: FloatArray, n_bins: int = CALIBRATION_BINS
) -> Metrics:
    """The classifier metrics (module docstring) of one slice; labels are class indices into the
    columns of ``proba``."""
    n = y_true.shape[0]
    n_classes = proba.shape[1]
    if n == 0:
        return dict.fromkeys(CLASSIFICATION_METRICS)
    out: Metrics = {"accuracy": float(np.mean(y_true == y_pred))}
    labels = np.array([1]) if n_classes == 2 else np.union1d(y_true, y_pred)
    precisions, recalls, f1s = [], [], []
    for c in labels:
        truth = y_true == c
        guess = y_pred == c
        tp = float(np.count_nonzero(truth & guess))
        fp = float(np.count_nonzero(guess & ~truth))
        fn = float(np.count_nonzero(truth & ~guess))
        precisions.append(_ratio(tp, tp + fp))
        recalls.append(_ratio(tp, tp + fn))
        f1s.append(_ratio(2.0 * tp, 2.0 * tp + fp + fn))
    for name, values in (("precision", precisions), ("recall", recalls), ("f1", f1s)):
        defined = [v for v in values if not math.isnan(v)]
        out[name] = float(np.mean(defined)) if defined else None
    if n_classes == 2:
        out["roc_auc"] = roc_auc(y_true == 1, proba[:, 1])
    else:
        aucs = [roc_auc(y_true == c, proba[:, c]) for c in range(n_classes)]
        defined_aucs = [a for a in aucs if a is not None]
        out["roc_auc"] = float(np.mean(defined_aucs)) if len(defined_aucs) >= 2 else None
    eps = np.finfo(np.float64).eps
    true_proba = np.clip(proba[np.arange(n), y_true], eps, 1.0 - eps)
    out["log_loss"] = _finite(float(-np.mean(np.log(true_proba))))
    if n_classes == 2:
        out["calibration_error"] = expected_calibration_error(y_true == 1, proba[:, 1], n_bins)
    else:
        top = np.argmax(proba, axis=1)
        out["calibration_error"] = expected_calibration_error(
            top == y_true, proba[np.arange(n), top], n_bins
        )
    return {name: out[name] for name in CLASSIFICATION_METRICS}


def regression_metrics(y_true: FloatArray, y_pred: FloatArray) -> Metrics:
    """MAE, RMSE and R² of one slice (R² is None for fewer than 2 rows or a constant target)."""
    n = y_true.shape[0]
    if n == 0:
        return dict.fromkeys(REGRESSION_METRICS)
    error = y_true - y_pred
    ss_res = float(np.sum(error**2))
    ss_tot = float(np.sum((y_true - np.mean(y_true)) ** 2))
    r2 = 1.0 - ss_res / ss_tot if n >= 2 and ss_tot > 0 else None
    return {
        "mae": _finite(float(np.mean(np.abs(error)))),
        "rmse": _finite(math.sqrt(float(np.mean(error**2)))),
        "r2": None if r2 is None else _finite(r2),
    }


def is_worse(metric: str, delta: float) -> bool:
    """Whether ``candidate - baseline = delta`` is a degradation for ``metric``."""
    return delta > 0 if metric in LOWER_IS_BETTER else delta < 0


# ---- slices --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSpec:
    """One slice: its key (``col=value`` joined by `` & ``), its column values and its rows."""

    key: str
    columns: tuple[tuple[str, str], ...]
    rows: IndexArray


def _format_number(value: float) -> str:
    return f"{value:.4g}"


def _levels(series: Any, numeric_bins: int) -> tuple[list[str], list[str]]:
    """Per row, the slice level of ``series`` as text; and the levels in display order."""
    import pandas as pd

    missing = series.isna().to_numpy(dtype=bool)
    is_numeric = pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(
        series.dtype
    )
    if is_numeric and series.nunique(dropna=True) > MAX_SLICE_LEVELS:
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = values[~missing]
        edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, numeric_bins + 1)))
        inner = edges[1:-1]
        bins = np.searchsorted(inner, values, side="right")
        names = []
        for b in range(len(edges) - 1):
            close = "]" if b == len(edges) - 2 else ")"
            names.append(f"[{_format_number(edges[b])}, {_format_number(edges[b + 1])}{close}")
        per_row = [NULL_LEVEL if m else names[b] for b, m in zip(bins, missing, strict=True)]
        order = [n for n in names if n in set(per_row)]
    else:
        raw = series.tolist()
        keyed: dict[str, Any] = {}
        per_row = []
        for item, is_missing in zip(raw, missing, strict=True):
            if is_missing:
                per_row.append(NULL_LEVEL)
                continue
            value = int(item) if isinstance(item, float) and item.is_integer() else item
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            keyed.setdefault(text, value)
            per_row.append(text)
        try:
            order = sorted(keyed, key=lambda t: keyed[t])
        except TypeError:
            order = sorted(keyed)
    if NULL_LEVEL in per_row and NULL_LEVEL not in order:
        order.append(NULL_LEVEL)
    return per_row, order


def build_slices(
    frame: Any, slice_by: Sequence[str], numeric_bins: int = DEFAULT_NUMERIC_BINS
) -> list[SliceSpec]:
    """The slices of ``frame`` (module docstring): per column, then crossed."""
    if numeric_bins < 2:
        raise InvalidInput("numeric slice bins must be at least 2")
    columns = {str(c): c for c in frame.columns}
    unknown = [c for c in slice_by if c not in columns]
    if unknown:
        raise InvalidInput(f"slice column(s) not in the data: {', '.join(map(repr, unknown))}")
    if len(set(slice_by)) != len(slice_by):
        raise InvalidInput("a slice column is named twice")
    levels: dict[str, tuple[list[str], list[str]]] = {
        name: _levels(frame[columns[name]], numeric_bins) for name in slice_by
    }
    slices: list[SliceSpec] = []
    for name in slice_by:
        per_row, order = levels[name]
        rows_of: dict[str, list[int]] = {}
        for i, level in enumerate(per_row):
            rows_of.setdefault(level, []).append(i)
        for level in order:
            slices.append(
                SliceSpec(f"{name}={level}", ((name, level),), np.asarray(rows_of[level], np.int64))
            )
    if len(slice_by) >= 2:
        combos: dict[tuple[str, ...], list[int]] = {}
        for i, combo in enumerate(zip(*(levels[n][0] for n in slice_by), strict=True)):
            combos.setdefault(combo, []).append(i)
        for combo in itertools.product(*(levels[n][1] for n in slice_by)):
            if combo not in combos:
                continue
            pairs = tuple(zip(slice_by, combo, strict=True))
            key = " & ".join(f"{n}={v}" for n, v in pairs)
            slices.append(SliceSpec(key, pairs, np.asarray(combos[combo], np.int64)))
    return slices


# ---- evaluation ------------------------------------------------------------------------------


@dataclass
class SliceResult:
    """Metrics of one slice (``key`` ``"overall"`` for all rows)."""

    key: str
    columns: dict[str, str]
    count: int
    judged: bool
    metrics: Metrics
    baseline_metrics: Metrics | None = None
    label_counts: dict[str, int] = field(default_factory=dict)

    @property
    def delta(self) -> Metrics:
        """``candidate - baseline`` per metric (None where either is undefined)."""
        if self.baseline_metrics is None:
            return {}
        out: Metrics = {}
        for name, value in self.metrics.items():
            base = self.baseline_metrics.get(name)
            out[name] = None if value is None or base is None else value - base
        return out

    def worse(self) -> list[str]:
        """The metrics on which the candidate is worse than the baseline."""
        return [m for m, d in self.delta.items() if d is not None and is_worse(m, d)]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "key": self.key,
            "columns": dict(self.columns),
            "count": self.count,
            "judged": self.judged,
            "metrics": dict(self.metrics),
        }
        if self.label_counts:
            data["label_counts"] = dict(self.label_counts)
        if self.baseline_metrics is not None:
            data["baseline"] = dict(self.baseline_metrics)
            data["delta"] = self.delta
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SliceResult:
        return cls(
            key=str(data["key"]),
            columns={str(k): str(v) for k, v in dict(data.get("columns", {})).items()},
            count=int(data["count"]),
            judged=bool(data["judged"]),
            metrics=dict(data["metrics"]),
            baseline_metrics=dict(data["baseline"]) if data.get("baseline") is not None else None,
            label_counts={str(k): int(v) for k, v in dict(data.get("label_counts", {})).items()},
        )


@dataclass
class Evaluation:
    """The result of ``edgewise evaluate`` (JSON: :meth:`to_json`, format
    :data:`EVALUATION_FORMAT`)."""

    model: str
    version: int
    task: str
    label: str
    rows: int
    metric_names: tuple[str, ...]
    overall: SliceResult
    slices: list[SliceResult]
    min_slice_size: int
    slice_by: tuple[str, ...] = ()
    classes: tuple[Any, ...] = ()
    baseline: tuple[str, int] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    unlabelled_rows: int = 0
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )

    def all_slices(self) -> list[SliceResult]:
        return [self.overall, *self.slices]

    def slice(self, key: str) -> SliceResult:
        for result in self.all_slices():
            if result.key == key:
                return result
        raise KeyError(key)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EVALUATION_FORMAT,
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "baseline": (
                None
                if self.baseline is None
                else {"model": self.baseline[0], "version": self.baseline[1]}
            ),
            "data": dict(self.data),
            "label": self.label,
            "rows": self.rows,
            "unlabelled_rows": self.unlabelled_rows,
            "classes": [_plain(c) for c in self.classes],
            "metrics": list(self.metric_names),
            "lower_is_better": [m for m in self.metric_names if m in LOWER_IS_BETTER],
            "slice_by": list(self.slice_by),
            "min_slice_size": self.min_slice_size,
            "overall": self.overall.to_json(),
            "slices": [s.to_json() for s in self.slices],
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        if data.get("format") != EVALUATION_FORMAT:
            raise InvalidInput(f"not an evaluation ({EVALUATION_FORMAT}) document")
        baseline = data.get("baseline")
        return cls(
            model=str(data["model"]),
            version=int(data["version"]),
            task=str(data["task"]),
            label=str(data["label"]),
            rows=int(data["rows"]),
            metric_names=tuple(data["metrics"]),
            overall=SliceResult.from_json(data["overall"]),
            slices=[SliceResult.from_json(s) for s in data["slices"]],
            min_slice_size=int(data["min_slice_size"]),
            slice_by=tuple(data.get("slice_by", ())),
            classes=tuple(data.get("classes", ())),
            baseline=None if not baseline else (str(baseline["model"]), int(baseline["version"])),
            data=dict(data.get("data", {})),
            unlabelled_rows=int(data.get("unlabelled_rows", 0)),
            created_at=str(data.get("created_at", "")),
        )


class _Scorer:
    """One model's predictions on the labelled rows, ready to score any subset of them."""

    def __init__(self, model: LoadedModel, frame: Any, y_raw: Any, label: str) -> None:
        self.model = model
        self.task = model.manifest.task
        predictions = predict(model, frame)
        what = f"label column {label!r}"
        if self.task == "classification":
            self.classes = _class_order(model, predictions, y_raw)
            assert predictions.labels is not None and predictions.proba is not None
            self.y_true = _encode(y_raw, self.classes, what)
            self.y_pred = _encode(predictions.labels, self.classes, f"model {model.name!r}'s label")
            self.proba = predictions.proba
        else:
            self.classes = ()
            try:
                self.y_values = np.asarray(y_raw, dtype=np.float64)
            except (TypeError, ValueError):
                raise InvalidInput(f"{what}: a regressor needs numeric labels") from None
            assert predictions.values is not None
            self.values = predictions.values

    def metrics(self, rows: IndexArray | None) -> Metrics:
        take: Any = slice(None) if rows is None else rows
        if self.task == "classification":
            return classification_metrics(self.y_true[take], self.y_pred[take], self.proba[take])
        return regression_metrics(self.y_values[take], self.values[take])

    def label_counts(self, rows: IndexArray | None) -> dict[str, int]:
        if self.task != "classification":
            return {}
        take: Any = slice(None) if rows is None else rows
        counts = np.bincount(self.y_true[take], minlength=len(self.classes))
        return {str(c): int(n) for c, n in zip(self.classes, counts, strict=True)}


def evaluate_models(
    candidate: LoadedModel,
    frame: Any,
    label: str,
    *,
    baseline: LoadedModel | None = None,
    slice_by: Sequence[str] = (),
    min_slice_size: int = DEFAULT_MIN_SLICE_SIZE,
    numeric_bins: int = DEFAULT_NUMERIC_BINS,
    data_info: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Score ``candidate`` (and ``baseline``) on the labelled rows of ``frame``, overall and per
    slice. Rows whose label is missing are left out (counted in ``unlabelled_rows``)."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise InvalidInput(f"labelled data: expected a DataFrame, got {type(frame).__name__}")
    if min_slice_size < 1:
        raise InvalidInput("min slice size must be at least 1")
    columns = {str(c): c for c in frame.columns}
    if label not in columns:
        raise InvalidInput(f"label column {label!r} is not in the data")
    if label in slice_by:
        raise InvalidInput(f"label column {label!r} cannot also be a slice column")
    labelled = frame[~frame[columns[label]].isna()].reset_index(drop=True)
    unlabelled = len(frame) - len(labelled)
    if len(labelled) == 0:
        raise InvalidInput(f"label column {label!r}: no row has a label")
    task = candidate.manifest.task
    if baseline is not None and baseline.manifest.task != task:
        raise InvalidInput(
            f"baseline {baseline.name!r} version {baseline.version} is a "
            f"{baseline.manifest.task} model, the candidate a {task} model"
        )
    y_raw = labelled[columns[label]].tolist()
    scorer = _Scorer(candidate, labelled, y_raw, label)
    base_scorer = _Scorer(baseline, labelled, y_raw, label) if baseline is not None else None
    specs = build_slices(labelled, slice_by, numeric_bins)

    def result(key: str, pairs: dict[str, str], rows: IndexArray | None) -> SliceResult:
        count = len(labelled) if rows is None else int(rows.shape[0])
        return SliceResult(
            key=key,
            columns=pairs,
            count=count,
            judged=count >= min_slice_size,
            metrics=scorer.metrics(rows),
            baseline_metrics=None if base_scorer is None else base_scorer.metrics(rows),
            label_counts=scorer.label_counts(rows),
        )

    metric_names = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    return Evaluation(
        model=candidate.name,
        version=candidate.version,
        task=task,
        label=label,
        rows=len(labelled),
        metric_names=tuple(metric_names),
        overall=result("overall", {}, None),
        slices=[result(s.key, dict(s.columns), s.rows) for s in specs],
        min_slice_size=min_slice_size,
        slice_by=tuple(slice_by),
        classes=tuple(_plain(c) for c in scorer.classes),
        baseline=None if baseline is None else (baseline.name, baseline.version),
        data=dict(data_info or {}),
        unlabelled_rows=unlabelled,
    )


def data_info(path: Path) -> dict[str, Any]:
    """How an evaluation names its data file: path, size and sha256."""
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---- text ------------------------------------------------------------------------------------


def _cell(value: float | None, delta: float | None, metric: str, with_delta: bool) -> str:
    text = "-" if value is None else f"{value:.4f}"
    if with_delta:
        if delta is None:
            text += "        "
        else:
            mark = "!" if is_worse(metric, delta) and abs(delta) > 1e-12 else " "
            text += f" {delta:+.4f}{mark}"
    return text


def format_summary(evaluation: Evaluation) -> str:
    """A plain-text table: one row per slice, one column per metric (with ``+delta`` against
    the baseline; ``!`` marks a degradation, ``*`` a slice too small to be judged)."""
    with_delta = evaluation.baseline is not None
    against = (
        f" against {evaluation.baseline[0]} version {evaluation.baseline[1]}"
        if evaluation.baseline
        else " (no baseline)"
    )
    source = evaluation.data.get("path", "the data")
    lines = [
        f"{evaluation.model} version {evaluation.version}{against} on {source}: "
        f"{evaluation.rows} labelled rows, label {evaluation.label!r}"
    ]
    results = evaluation.all_slices()
    key_width = min(max(len(r.key) for r in results) + 2, 48)
    widths = {m: max(len(m), 17 if with_delta else 8) for m in evaluation.metric_names}
    header = f"{'slice':<{key_width}} {'count':>6}  " + " ".join(
        f"{m:>{widths[m]}}" for m in evaluation.metric_names
    )
    lines.append(header)
    for result in results:
        key = result.key if len(result.key) <= key_width - 2 else result.key[: key_width - 3] + "…"
        mark = " " if result.judged else "*"
        delta = result.delta
        cells = " ".join(
            f"{_cell(result.metrics[m], delta.get(m), m, with_delta):>{widths[m]}}"
            for m in evaluation.metric_names
        )
        lines.append(f"{key:<{key_width}} {result.count:>5}{mark}  {cells}")
    small = sum(1 for r in evaluation.slices if not r.judged)
    if small:
        lines.append(
            f"* {small} slice(s) under {evaluation.min_slice_size} rows: reported, not judged"
        )
    return "\n".join(lines)
