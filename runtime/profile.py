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
                 | {"kind": "categorical", "categories": [...], "nullable": false}}
    }

The profile describes the model's *input tensors* (the FP32 values the server sees), so online
statistics are comparable with it bin for bin. Bin layout and the quantile-edge rule are those of
:mod:`edgewise.kernels.histograms`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from edgewise.kernels import BinEdges, HistogramState, MomentState, quantile_edges
from edgewise.runtime.errors import PackageError
from edgewise.runtime.package import PROFILE_FILE, Feature, Manifest

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_SAMPLE_ROWS",
    "PROFILE_FORMAT",
    "CategoricalProfile",
    "NumericProfile",
    "ReferenceProfile",
    "build_profile",
    "profile_builder",
    "read_profile",
]

PROFILE_FORMAT: Final = "edgewise.profile/1"
DEFAULT_SAMPLE_ROWS: Final = 2000
_MOMENT_ROWS: Final = ("count", "mean", "m2", "min", "max", "nan", "inf")


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
class ReferenceProfile:
    rows: int
    n_bins: int
    numeric: NumericProfile | None
    categorical: tuple[CategoricalProfile, ...]

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
        numeric = self.numeric
        if numeric is not None:
            data["numeric"] = {
                "input": numeric.input,
                "names": list(numeric.names),
                "edges": [_floats(numeric.edges.edges_of(i)) for i in range(len(numeric.names))],
                "counts": numeric.counts.tolist(),
                "moments": {
                    key: _floats(numeric.moments[row]) for row, key in enumerate(_MOMENT_ROWS)
                },
                "sample": [_floats(row) for row in numeric.sample],
            }
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
            numeric = None
            raw = data.get("numeric")
            if raw is not None:
                names = tuple(str(n) for n in raw["names"])
                edges = BinEdges.from_ragged([_array(e) for e in raw["edges"]])
                counts = np.asarray(raw["counts"], dtype=np.int64)
                moments = np.vstack([_array(raw["moments"][key]) for key in _MOMENT_ROWS])
                sample = np.asarray(
                    [_array(row) for row in raw["sample"]], dtype=np.float64
                ).reshape(-1, len(names))
                if counts.shape != (len(names), edges.width) or moments.shape[1] != len(names):
                    raise ValueError("numeric profile arrays do not match its feature names")
                numeric = NumericProfile(str(raw["input"]), names, edges, counts, moments, sample)
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
            return cls(int(data["rows"]), int(data["n_bins"]), numeric, categorical)
        except PackageError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise PackageError(
                f"malformed reference profile: {type(exc).__name__}: {exc}"
            ) from None


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
) -> ReferenceProfile:
    """Profile the model inputs built from the training sample (``frame_to_inputs`` output)."""
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
    return ReferenceProfile(rows, n_bins, numeric, tuple(categorical))


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

    def build(folder: Path, sample: pd.DataFrame, features: tuple[Feature, ...]) -> dict[str, Any]:
        from edgewise.runtime.features import frame_to_inputs

        inputs = frame_to_inputs(features, sample)
        profile = build_profile(inputs, features, n_bins=n_bins, sample_rows=sample_rows)
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
