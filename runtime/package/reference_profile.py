"""The reference profile of the training data, stored beside the model (``profile.json``).

Format ``edgewise.profile/1`` (plain JSON, no pickle; ``null`` stands for NaN)::

    {
      "format": "edgewise.profile/1",
      "rows": 455,                               # rows of the sample it was built from
      "n_bins": 10,
      "numeric": {                               # the packed numeric input tensor, if any
        "input": "features",
        "names": ["mean radius", ...],           # column order of the tensor
        "edges": [[e0, e1, ...], ...],           # per feature, strictly increasing
        "counts": [[under, b0 .. bK-1, over, nan], ...],
        "moments": {"count": [...], "mean": [...], "m2": [...], "min": [...], "max": [...],
                    "nan": [...], "inf": [...]},
        "sample": [[...], ...]                   # up to `sample_rows` rows (exact KS/Wasserstein)
      },
      "categorical": [                           # one per categorical input tensor
        {"input": "color", "name": "color", "categories": ["a", "b"],
         "counts": [n_a, n_b, unseen], "missing": 0}
      ],
      "schema": {"<feature>": {"kind": "numeric", "min": .., "max": .., "nullable": false}
                 | {"kind": "categorical", "categories": [...], "nullable": false}},
      "outputs": {                               # the model's outputs on the reference rows
        "source": "held_out",                    # rows the model was not fit on, when given
        "columns": [1],                          # columns of the output tensor profiled
        "values": {"input": "probabilities", "names": ["probabilities[1]"], "edges": ..,
                   "counts": .., "moments": .., "sample": []}   # as "numeric" above
      },
      "multivariate": {                          # PCA reconstruction error (NannyML's)
        "method": "pca_reconstruction", "input": "features", "variance": 0.65,
        "columns": [0, 1, ...], "mean": [...], "scale": [...], "components": [[...], ...],
        "explained_variance": 0.67,
        "error": {"rows": 455, "mean": 2.1, "variance": 0.8, "folds": 5}
      },
      "unavailable": {"prediction": "why no outputs", "multivariate": "why none"}
    }

``outputs`` and ``multivariate`` came with prediction and multivariate drift; a profile without
either key was written before them (still ``edgewise.profile/1``: older readers ignore them), and
the monitor reports those detectors unavailable (:data:`BEFORE_OUTPUTS`,
:data:`BEFORE_MULTIVARIATE`).

The profile describes the model's *input tensors* (the FP32 values the server sees), so online
statistics are comparable with it bin for bin. Bin layout and the quantile-edge rule are those of
:mod:`edgewise.kernels.histograms`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from edgewise.kernels import BinEdges, HistogramState, MomentState, quantile_edges
from edgewise.runtime.errors import PackageError
from edgewise.runtime.package.manifest import PROFILE_FILE, Feature, Manifest

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BEFORE_MULTIVARIATE",
    "BEFORE_OUTPUTS",
    "DEFAULT_SAMPLE_ROWS",
    "MULTIVARIATE_VARIANCE",
    "PROFILE_FORMAT",
    "CategoricalProfile",
    "MultivariateProfile",
    "NumericProfile",
    "OutputProfile",
    "ReferenceOutputs",
    "ReferenceProfile",
    "build_profile",
    "fit_reconstruction",
    "profile_builder",
    "profile_outputs",
    "read_profile",
]

PROFILE_FORMAT: Final = "edgewise.profile/1"
DEFAULT_SAMPLE_ROWS: Final = 2000
_MOMENT_ROWS: Final = ("count", "mean", "m2", "min", "max", "nan", "inf")
#: Share of the standardised reference's variance the PCA keeps (NannyML's default, 65 %).
MULTIVARIATE_VARIANCE: Final = 0.65
#: Folds of the cross-fitted reference errors (each row's error from a PCA fit without it).
MULTIVARIATE_FOLDS: Final = 5
#: Rows the PCA is fitted on at most (a random subset of a larger sample): the fit and its
#: folds stay a few seconds however large the sample, and the components are as good.
MULTIVARIATE_MAX_ROWS: Final = 20_000
#: Why a profile written before prediction drift has none.
BEFORE_OUTPUTS: Final = (
    "package converted before edgewise profiled model outputs (its profile.json has no "
    "'outputs'); convert it again to monitor prediction drift"
)
#: Why a profile written before multivariate drift has none.
BEFORE_MULTIVARIATE: Final = (
    "package converted before edgewise profiled multivariate drift (its profile.json has no "
    "'multivariate'); convert it again to monitor it"
)


@dataclass(frozen=True)
class NumericProfile:
    input: str
    names: tuple[str, ...]
    edges: BinEdges
    counts: npt.NDArray[np.int64]  # [features, edges.width]
    moments: npt.NDArray[np.float64]  # [7, features], MomentState.to_array layout
    sample: npt.NDArray[np.float64]  # [rows, features]

    @property
    def minimum(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.moments[3], dtype=np.float64)

    @property
    def maximum(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.moments[4], dtype=np.float64)

    @property
    def nullable(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.moments[5] > 0, dtype=np.bool_)


@dataclass(frozen=True)
class CategoricalProfile:
    input: str
    name: str
    categories: tuple[str, ...]
    counts: npt.NDArray[np.int64]  # [len(categories) + 1], last = unseen
    missing: int

    def codes(self) -> dict[str, int]:
        return {category: code for code, category in enumerate(self.categories)}


@dataclass(frozen=True)
class OutputProfile:
    """The model's outputs on the reference rows, binned as numeric features are: ``values``
    profiles the ``columns`` of output tensor ``values.input`` (a classifier's probabilities or
    scores, a binary one's positive class only; a regressor's predictions), under the names
    ``values.names``. ``source``: the rows they were computed on (``held_out`` when convert had
    them: rows the model was not fit on; else ``sample``)."""

    values: NumericProfile
    columns: tuple[int, ...]
    source: str

    @property
    def output(self) -> str:
        return self.values.input

    @property
    def rows(self) -> int:
        return int(self.values.moments[0].max()) if self.values.moments.size else 0


@dataclass(frozen=True)
class MultivariateProfile:
    """A PCA of the standardised reference, for the reconstruction error (NannyML's data
    reconstruction drift). ``columns`` of the numeric tensor ``input`` are standardised with
    ``mean`` / ``scale`` and projected on ``components`` (``[k, len(columns)]``, orthonormal
    rows, keeping ``explained_variance`` of the variance). ``error_*``: the distribution of one
    reference row's error, cross-fitted (each row scored by a PCA fitted on the other folds),
    so it is the error of a new row from the reference's distribution, not of a row the PCA saw.
    """

    input: str
    variance: float
    columns: tuple[int, ...]
    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    components: npt.NDArray[np.float64]
    explained_variance: float
    error_rows: int
    error_mean: float
    error_variance: float
    folds: int


@dataclass(frozen=True)
class ReferenceOutputs:
    """What convert hands the profile builder about the model's outputs: the output tensors on
    the reference rows, the classifier's classes (as text, in output column order; empty for a
    regressor), the task, and which rows they are (``held_out`` or ``sample``)."""

    tensors: Mapping[str, npt.NDArray[Any]]
    task: str
    classes: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class ReferenceProfile:
    rows: int
    n_bins: int
    numeric: NumericProfile | None
    categorical: tuple[CategoricalProfile, ...]
    outputs: OutputProfile | None = None
    multivariate: MultivariateProfile | None = None
    #: detector ("prediction", "multivariate") -> why the profile has none.
    unavailable: Mapping[str, str] = field(default_factory=dict)

    # ---- JSON ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "rows": self.rows,
            "n_bins": self.n_bins,
            "numeric": None,
            "categorical": [
                {
                    "input": c.input,
                    "name": c.name,
                    "categories": list(c.categories),
                    "counts": c.counts.tolist(),
                    "missing": c.missing,
                }
                for c in self.categorical
            ],
            "schema": self.schema(),
        }
        if self.numeric is not None:
            data["numeric"] = _numeric_json(self.numeric)
        if self.outputs is not None:
            data["outputs"] = {
                "source": self.outputs.source,
                "columns": list(self.outputs.columns),
                "values": _numeric_json(self.outputs.values),
            }
        if self.multivariate is not None:
            m = self.multivariate
            data["multivariate"] = {
                "method": "pca_reconstruction",
                "input": m.input,
                "variance": m.variance,
                "columns": list(m.columns),
                "mean": _floats(m.mean),
                "scale": _floats(m.scale),
                "components": [_floats(row) for row in m.components],
                "explained_variance": m.explained_variance,
                "error": {
                    "rows": m.error_rows,
                    "mean": m.error_mean,
                    "variance": m.error_variance,
                    "folds": m.folds,
                },
            }
        if self.unavailable:
            data["unavailable"] = dict(self.unavailable)
        return data

    def schema(self) -> dict[str, dict[str, Any]]:
        schema: dict[str, dict[str, Any]] = {}
        if self.numeric is not None:
            n = self.numeric
            for index, name in enumerate(n.names):
                schema[name] = {
                    "kind": "numeric",
                    "min": _float(n.minimum[index]),
                    "max": _float(n.maximum[index]),
                    "nullable": bool(n.nullable[index]),
                }
        for c in self.categorical:
            schema[c.name] = {
                "kind": "categorical",
                "categories": list(c.categories),
                "nullable": c.missing > 0,
            }
        return schema

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        if data.get("format") != PROFILE_FORMAT:
            raise PackageError(
                f"unknown profile format {data.get('format')!r} (expected {PROFILE_FORMAT!r})"
            )
        try:
            raw = data.get("numeric")
            numeric = None if raw is None else _numeric_from_json(raw)
            categorical = tuple(
                CategoricalProfile(
                    input=str(c["input"]),
                    name=str(c["name"]),
                    categories=tuple(str(v) for v in c["categories"]),
                    counts=np.asarray(c["counts"], dtype=np.int64),
                    missing=int(c.get("missing", 0)),
                )
                for c in data.get("categorical", ())
            )
            for c in categorical:
                if c.counts.shape != (len(c.categories) + 1,):
                    raise ValueError(f"categorical profile {c.name!r}: counts do not match")
            unavailable = {str(k): str(v) for k, v in dict(data.get("unavailable", {})).items()}
            outputs = None
            if "outputs" in data:
                raw = data["outputs"]
                values = _numeric_from_json(raw["values"])
                columns = tuple(int(c) for c in raw["columns"])
                if len(columns) != len(values.names):
                    raise ValueError("outputs: columns do not match its names")
                outputs = OutputProfile(values, columns, str(raw["source"]))
            elif "prediction" not in unavailable:
                unavailable["prediction"] = BEFORE_OUTPUTS
            multivariate = None
            if "multivariate" in data:
                multivariate = _multivariate_from_json(data["multivariate"], numeric)
            elif "multivariate" not in unavailable:
                unavailable["multivariate"] = BEFORE_MULTIVARIATE
            return cls(
                int(data["rows"]),
                int(data["n_bins"]),
                numeric,
                categorical,
                outputs,
                multivariate,
                unavailable,
            )
        except PackageError:
            raise
        except (
            AttributeError,
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            OverflowError,
        ) as exc:  # a JSON value of the wrong kind (null or a list where an object belongs)
            raise PackageError(
                f"malformed reference profile: {type(exc).__name__}: {exc}"
            ) from None


def _numeric_json(numeric: NumericProfile) -> dict[str, Any]:
    return {
        "input": numeric.input,
        "names": list(numeric.names),
        "edges": [_floats(numeric.edges.edges_of(i)) for i in range(len(numeric.names))],
        "counts": numeric.counts.tolist(),
        "moments": {key: _floats(numeric.moments[row]) for row, key in enumerate(_MOMENT_ROWS)},
        "sample": [_floats(row) for row in numeric.sample],
    }


def _numeric_from_json(raw: Mapping[str, Any]) -> NumericProfile:
    names = tuple(str(n) for n in raw["names"])
    edges = BinEdges.from_ragged([_array(e) for e in raw["edges"]])
    counts = np.asarray(raw["counts"], dtype=np.int64)
    moments = np.vstack([_array(raw["moments"][key]) for key in _MOMENT_ROWS])
    sample = np.asarray([_array(row) for row in raw["sample"]], dtype=np.float64).reshape(
        -1, len(names)
    )
    if counts.shape != (len(names), edges.width) or moments.shape[1] != len(names):
        raise ValueError("numeric profile arrays do not match its feature names")
    return NumericProfile(str(raw["input"]), names, edges, counts, moments, sample)


def _multivariate_from_json(
    raw: Mapping[str, Any], numeric: NumericProfile | None
) -> MultivariateProfile:
    if raw.get("method") != "pca_reconstruction":
        raise ValueError(f"multivariate: unknown method {raw.get('method')!r}")
    columns = tuple(int(c) for c in raw["columns"])
    mean = _array(raw["mean"])
    scale = _array(raw["scale"])
    components = np.asarray([_array(row) for row in raw["components"]], dtype=np.float64)
    error = raw["error"]
    width = len(columns)
    if numeric is None or str(raw["input"]) != numeric.input:
        raise ValueError("multivariate: its input is not the profile's numeric tensor")
    if (
        width < 2
        or min(columns) < 0
        or max(columns) >= len(numeric.names)
        or mean.shape != (width,)
        or scale.shape != (width,)
        or components.ndim != 2
        or components.shape[1] != width
        or not 1 <= components.shape[0] <= width
        or not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(mean)))
        or not np.all(np.isfinite(components))
    ):
        raise ValueError("multivariate: columns, mean, scale and components do not match")
    return MultivariateProfile(
        input=str(raw["input"]),
        variance=float(raw["variance"]),
        columns=columns,
        mean=mean,
        scale=scale,
        components=components,
        explained_variance=float(raw["explained_variance"]),
        error_rows=int(error["rows"]),
        error_mean=float(error["mean"]),
        error_variance=float(error["variance"]),
        folds=int(error["folds"]),
    )


def _float(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _floats(values: npt.NDArray[np.float64] | Sequence[float]) -> list[float | None]:
    return [_float(v) for v in values]


def _array(values: Sequence[float | None]) -> npt.NDArray[np.float64]:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


# ---- building (at convert time) ---------------------------------------------------------------


def build_profile(
    inputs: Mapping[str, npt.NDArray[Any]],
    features: Sequence[Feature],
    *,
    n_bins: int = 10,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    outputs: ReferenceOutputs | None = None,
) -> ReferenceProfile:
    """Profile the model inputs built from the training sample (``frame_to_inputs`` output),
    the model's ``outputs`` on the reference rows (prediction drift) and the PCA of the numeric
    inputs (multivariate drift)."""
    numeric_features = [f for f in features if f.kind == "numeric"]
    numeric = None
    rows = 0
    if numeric_features:
        input_name = numeric_features[0].input
        ordered = sorted(numeric_features, key=lambda f: f.column)
        batch = np.ascontiguousarray(inputs[input_name], dtype=np.float64)
        rows = batch.shape[0]
        edges = quantile_edges(batch, n_bins)
        histogram = HistogramState(edges)
        histogram.update(batch)
        moments = MomentState.from_batch(batch)
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(rows, size=min(rows, sample_rows), replace=False))
        numeric = NumericProfile(
            input_name,
            tuple(f.name for f in ordered),
            edges,
            histogram.counts,
            moments.to_array(),
            batch[take],
        )
    categorical = []
    for feature in features:
        if feature.kind != "categorical":
            continue
        values = inputs[feature.input].reshape(-1)
        rows = max(rows, values.shape[0])
        text = [_as_text(v) for v in values]
        categories = feature.categories or tuple(sorted({t for t in text if t}))
        codes = {category: code for code, category in enumerate(categories)}
        counts = np.zeros(len(categories) + 1, dtype=np.int64)
        missing = 0
        for item in text:
            if not item:
                missing += 1
            counts[codes.get(item, len(categories))] += 1
        categorical.append(
            CategoricalProfile(feature.input, feature.name, tuple(categories), counts, missing)
        )
    unavailable: dict[str, str] = {}
    output_profile = None
    if outputs is None:
        unavailable["prediction"] = "the profile was built without the model's outputs"
    else:
        output_profile, reason = profile_outputs(outputs, n_bins=n_bins)
        if reason:
            unavailable["prediction"] = reason
    reconstruction = None
    if numeric is None:
        unavailable["multivariate"] = "the model has no numeric input tensor"
    else:
        reconstruction, reason = fit_reconstruction(
            numeric.input, np.ascontiguousarray(inputs[numeric.input], dtype=np.float64), seed=seed
        )
        if reason:
            unavailable["multivariate"] = reason
    return ReferenceProfile(
        rows, n_bins, numeric, tuple(categorical), output_profile, reconstruction, unavailable
    )


def profile_outputs(
    outputs: ReferenceOutputs, n_bins: int = 10
) -> tuple[OutputProfile | None, str]:
    """The binned profile of the model's outputs on the reference rows, or (None, why not).

    Profiled: a classifier's ``probabilities`` (else its ``scores``), one column per class, a
    binary classifier's positive class only (the other column is its complement, a second test
    of the same thing); a regressor's ``predictions``. The predicted label is the arg-max of
    those columns, so its distribution is covered by them."""
    tensors = outputs.tensors
    if outputs.task == "classification":
        name = next((n for n in ("probabilities", "scores") if n in tensors), None)
    elif outputs.task == "regression":
        name = "predictions" if "predictions" in tensors else None
    else:
        return None, f"no prediction drift for a {outputs.task} model"
    if name is None:
        return None, "the model has no probabilities, scores or predictions output"
    values = np.asarray(tensors[name])
    if values.dtype.kind not in "iuf" or values.ndim == 0 or values.shape[0] == 0:
        return None, f"output {name!r} is not a numeric tensor with rows"
    values = values.reshape(values.shape[0], -1).astype(np.float64)
    width = values.shape[1]
    classes = outputs.classes
    if outputs.task == "classification":
        labels = list(classes) if len(classes) == width else [str(i) for i in range(width)]
        columns = [1] if width == 2 else list(range(width))
        if width == 1 and len(classes) == 2:
            labels = [classes[1]]  # one decision score for a binary classifier
        names = [f"{name}[{labels[c]}]" for c in columns]
    else:
        columns = list(range(width))
        names = [name] if width == 1 else [f"{name}[{c}]" for c in columns]
    block = np.ascontiguousarray(values[:, columns])
    edges = quantile_edges(block, n_bins)
    histogram = HistogramState(edges)
    histogram.update(block)
    moments = MomentState.from_batch(block)
    profile = NumericProfile(
        name,
        tuple(names),
        edges,
        histogram.counts,
        moments.to_array(),
        np.empty((0, len(columns)), dtype=np.float64),
    )
    return OutputProfile(profile, tuple(columns), outputs.source), ""


def _standardise(
    batch: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(mean, scale) of each column's finite values; scale 1 for a column without spread."""
    finite = np.isfinite(batch)
    counts = np.maximum(finite.sum(axis=0), 1)
    filled = np.where(finite, batch, 0.0)
    mean = filled.sum(axis=0) / counts
    centred = np.where(finite, batch - mean, 0.0)
    scale = np.sqrt((centred**2).sum(axis=0) / counts)
    return mean, np.where(scale > 0, scale, 1.0)


def _principal_axes(
    batch: npt.NDArray[np.float64], mean: npt.NDArray[np.float64], scale: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(axes as rows, explained variance ratio of each) of the standardised, mean-imputed
    batch: the principal axes scikit-learn's PCA finds (there by an SVD of the centred matrix),
    here from the eigenvectors of its ``features x features`` Gram matrix, which costs one
    small product whatever the rows (a 1,000-row SVD took 80 ms on a loaded machine)."""
    standard = np.where(np.isfinite(batch), (batch - mean) / scale, 0.0)
    standard = standard - standard.mean(axis=0)
    values, vectors = np.linalg.eigh(standard.T @ standard)
    order = np.argsort(values)[::-1]
    variance = np.clip(values[order], 0.0, None)
    axes = np.ascontiguousarray(vectors[:, order].T)
    total = variance.sum()
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    return axes, ratio


def fit_reconstruction(
    input_name: str,
    batch: npt.NDArray[np.float64],
    *,
    variance: float = MULTIVARIATE_VARIANCE,
    folds: int = MULTIVARIATE_FOLDS,
    seed: int = 0,
) -> tuple[MultivariateProfile | None, str]:
    """The PCA of NannyML's data-reconstruction drift on a ``[rows, features]`` reference: the
    columns with more than one finite value, standardised (mean-imputed), and the fewest
    principal axes that keep ``variance`` of their variance; plus the cross-fitted distribution
    of one row's reconstruction error (``folds`` folds), or (None, why not). A sample above
    :data:`MULTIVARIATE_MAX_ROWS` rows is fitted on a random subset of that many."""
    from edgewise.kernels import reconstruction_errors

    if batch.shape[0] > MULTIVARIATE_MAX_ROWS:
        subset = np.random.default_rng(seed).choice(batch.shape[0], MULTIVARIATE_MAX_ROWS, False)
        batch = batch[np.sort(subset)]
    finite = np.isfinite(batch)
    spread = [
        j
        for j in range(batch.shape[1])
        if finite[:, j].sum() >= 2 and np.ptp(batch[finite[:, j], j]) > 0
    ]
    if len(spread) < 2:
        return None, "fewer than two numeric features vary in the reference"
    rows = batch.shape[0]
    if rows < 4 * folds:
        return None, f"{rows} reference rows; the reconstruction error needs {4 * folds}"
    data = np.ascontiguousarray(batch[:, spread])
    mean, scale = _standardise(data)
    axes, ratio = _principal_axes(data, mean, scale)
    keep = min(int(np.searchsorted(np.cumsum(ratio), variance, side="right")) + 1, len(spread))
    components = np.ascontiguousarray(axes[:keep])
    order = np.random.default_rng(seed).permutation(rows)
    errors = np.empty(rows, dtype=np.float64)
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold, assume_unique=True)
        fold_mean, fold_scale = _standardise(data[rest])
        fold_axes, _ = _principal_axes(data[rest], fold_mean, fold_scale)
        errors[fold] = reconstruction_errors(data[fold], fold_mean, fold_scale, fold_axes[:keep])
    profile = MultivariateProfile(
        input=input_name,
        variance=float(variance),
        columns=tuple(spread),
        mean=mean,
        scale=scale,
        components=components,
        explained_variance=float(ratio[:keep].sum()),
        error_rows=rows,
        error_mean=float(errors.mean()),
        error_variance=float(errors.var(ddof=1)),
        folds=folds,
    )
    return profile, ""


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def write_profile(folder: Path, profile: ReferenceProfile) -> dict[str, Any]:
    """Write ``profile.json`` into a package folder; returns the manifest's ``profile`` entry."""
    path = folder / PROFILE_FILE
    with path.open("w", encoding="utf-8") as handle:
        json.dump(profile.to_json(), handle, separators=(",", ":"), allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    return {"file": PROFILE_FILE, "format": PROFILE_FORMAT, "rows": profile.rows}


def profile_builder(n_bins: int = 10, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> Any:
    """A ``convert`` profile hook: profiles the sample as the model's input tensors."""

    def build(
        folder: Path,
        sample: pd.DataFrame,
        features: tuple[Feature, ...],
        outputs: ReferenceOutputs | None = None,
    ) -> dict[str, Any]:
        from edgewise.runtime.package.schema import frame_to_inputs

        inputs = frame_to_inputs(features, sample)
        profile = build_profile(
            inputs, features, n_bins=n_bins, sample_rows=sample_rows, outputs=outputs
        )
        return write_profile(folder, profile)

    return build


def read_profile(folder: Path, manifest: Manifest) -> ReferenceProfile | None:
    """The package's reference profile, or None when it has none."""
    if manifest.profile is None:
        return None
    path = folder / str(manifest.profile.get("file", PROFILE_FILE))
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise PackageError(
            f"{folder}: the manifest names a profile but {path.name} is missing"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise PackageError(f"{path}: cannot read the reference profile: {exc}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object")
    return ReferenceProfile.from_json(data)
