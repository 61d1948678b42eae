"""Golden requests: a few input rows stored in the model package with the outputs they gave when
the package was made, so that a node can prove a package answers as recorded before serving it.

The file is ``golden.json`` in the package folder (listed in the manifest's ``files``), plain JSON,
no pickle::

    {
      "format": "edgewise.golden/1",
      "model": "logreg",
      "model_sha256": "…",                      # the model the outputs were recorded with
      "atol": 1e-05, "rtol": 0.0001,             # float outputs must agree within these
      "created_at": "2026-01-01T00:00:00Z",
      "requests": [
        {"inputs":  {"features": {"datatype": "FP32", "shape": [8, 30], "data": [...]}},
         "outputs": {"label": {"datatype": "INT64", "shape": [8], "data": [...]}, ...}}
      ]
    }

``data`` is the row-major flattening of the tensor; a NaN is ``null``, an infinity the string
``"Infinity"`` or ``"-Infinity"``; a BYTES element is a UTF-8 string. Float outputs are compared
with ``numpy.isclose(got, recorded, rtol, atol)`` (NaN equal to NaN), every other output exactly.

The rows come from the caller (the conversion sample: :func:`golden_inputs_from_sample`) or, when a
package has none, are synthesised from the manifest's features (:func:`synthetic_inputs`): a row
of zeros and seeded standard-normal rows for the numeric features, the recorded categories in
turn (plus the missing value) for the categorical ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from edgewise.runtime.errors import PackageError
from edgewise.runtime.package.datatypes import BYTES, datatype_of, numpy_dtype
from edgewise.runtime.package.manifest import (
    FileEntry,
    Manifest,
    TensorSpec,
    file_entry,
    read_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from edgewise.runtime.serving.model import LoadedModel

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "GOLDEN_FILE",
    "GOLDEN_FORMAT",
    "GoldenRequest",
    "GoldenSet",
    "add_golden",
    "check_golden",
    "compare_outputs",
    "golden_inputs_from_sample",
    "read_golden",
    "record_golden",
    "synthetic_inputs",
    "write_golden",
]

GOLDEN_FILE: Final = "golden.json"
GOLDEN_FORMAT: Final = "edgewise.golden/1"
DEFAULT_ATOL: Final = 1e-5
DEFAULT_RTOL: Final = 1e-4
DEFAULT_ROWS: Final = 8

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class GoldenRequest:
    """One request (a batch of rows) and the outputs it gave."""

    inputs: Mapping[str, npt.NDArray[Any]]
    outputs: Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class GoldenSet:
    model: str
    model_sha256: str
    requests: tuple[GoldenRequest, ...]
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": GOLDEN_FORMAT,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "atol": self.atol,
            "rtol": self.rtol,
            "created_at": self.created_at,
            "requests": [
                {
                    "inputs": {k: _tensor_json(v) for k, v in r.inputs.items()},
                    "outputs": {k: _tensor_json(v) for k, v in r.outputs.items()},
                }
                for r in self.requests
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GoldenSet:
        try:
            if data.get("format") != GOLDEN_FORMAT:
                raise PackageError(
                    f"golden requests: unknown format {data.get('format')!r} "
                    f"(expected {GOLDEN_FORMAT!r})"
                )
            requests = tuple(
                GoldenRequest(
                    inputs={str(k): _tensor_from_json(str(k), v) for k, v in r["inputs"].items()},
                    outputs={str(k): _tensor_from_json(str(k), v) for k, v in r["outputs"].items()},
                )
                for r in data["requests"]
            )
            atol, rtol = (
                float(data.get("atol", DEFAULT_ATOL)),
                float(data.get("rtol", DEFAULT_RTOL)),
            )
            if not (0 <= atol < math.inf and 0 <= rtol < math.inf):
                raise PackageError("golden requests: atol and rtol must be finite and >= 0")
            if not requests or any(not r.inputs or not r.outputs for r in requests):
                raise PackageError("golden requests: no request, or one without inputs/outputs")
            return cls(
                model=str(data["model"]),
                model_sha256=str(data.get("model_sha256", "")),
                requests=requests,
                atol=atol,
                rtol=rtol,
                created_at=str(data.get("created_at", "")),
            )
        except PackageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise PackageError(f"golden requests: malformed: {type(exc).__name__}: {exc}") from None


# ---- tensors as JSON -----------------------------------------------------------------------------


def _json_number(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    return value


def _tensor_json(array: npt.NDArray[Any]) -> dict[str, Any]:
    array = np.asarray(array)
    datatype = datatype_of(array.dtype)
    flat = array.ravel().tolist()
    if datatype == BYTES:
        data: list[Any] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
    elif array.dtype.kind == "f":
        data = [_json_number(float(v)) for v in flat]
    else:
        data = flat
    return {"datatype": datatype, "shape": list(array.shape), "data": data}


def _tensor_from_json(name: str, data: Mapping[str, Any]) -> npt.NDArray[Any]:
    datatype = str(data["datatype"])
    shape = tuple(int(d) for d in data["shape"])
    values = list(data["data"])
    if math.prod(shape) != len(values):
        raise PackageError(
            f"golden tensor {name!r}: {len(values)} values do not fill shape {list(shape)}"
        )
    if datatype == BYTES:
        array = np.empty(len(values), dtype=object)
        array[:] = [str(v).encode("utf-8") for v in values]
        return array.reshape(shape)
    try:
        dtype = numpy_dtype(datatype)
    except KeyError:
        raise PackageError(f"golden tensor {name!r}: unknown datatype {datatype!r}") from None
    if dtype.kind == "f":
        floats = [
            math.nan if v is None else float(v)  # "Infinity" and "-Infinity" parse as floats
            for v in values
        ]
        return np.asarray(floats, dtype=np.float64).astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


# ---- making and reading --------------------------------------------------------------------------


def synthetic_inputs(manifest: Manifest, rows: int = DEFAULT_ROWS, seed: int = 0) -> Arrays:
    """Deterministic input rows for a package that came with none (see the module docstring)."""
    if rows < 1:
        raise ValueError("rows must be >= 1")
    rng = np.random.default_rng(seed)
    inputs: Arrays = {}
    categoricals = {f.input: f for f in manifest.features if f.kind == "categorical"}
    for spec in manifest.inputs:
        shape = tuple(
            rows if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(spec.shape)
        )
        if spec.datatype == BYTES:
            feature = categoricals.get(spec.name)
            choices = [c.encode("utf-8") for c in (feature.categories if feature else ())]
            choices.append(b"")  # the missing value: an unknown category for the model
            array = np.empty(math.prod(shape), dtype=object)
            array[:] = [choices[i % len(choices)] for i in range(array.size)]
            inputs[spec.name] = array.reshape(shape)
        else:
            dtype = numpy_dtype(spec.datatype)
            values = rng.standard_normal(shape)
            values[0] = 0.0
            if dtype.kind in "iu":
                values = np.round(values * 3)
                if dtype.kind == "u":
                    values = np.abs(values)
            if dtype.kind == "b":
                inputs[spec.name] = values > 0
            else:
                inputs[spec.name] = values.astype(dtype)
    return inputs


def golden_inputs_from_sample(manifest: Manifest, sample: Any, rows: int = DEFAULT_ROWS) -> Arrays:
    """``rows`` rows spread evenly over a conversion sample (a DataFrame, or a 2-D array in
    feature order), as the model's input tensors."""
    from edgewise.runtime.package.schema import frame_to_inputs

    count = len(sample)
    if count == 0:
        raise PackageError("golden requests: the sample has no rows")
    picks = np.unique(np.linspace(0, count - 1, num=min(rows, count)).round().astype(np.int64))
    subset = sample.iloc[picks] if hasattr(sample, "iloc") else np.asarray(sample)[picks]
    return frame_to_inputs(manifest, subset)


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_golden(
    folder: Path,
    inputs: Sequence[Mapping[str, npt.NDArray[Any]]] | Mapping[str, npt.NDArray[Any]] | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> GoldenSet:
    """Run the package in ``folder`` on ``inputs`` (one request, several, or None for synthetic
    rows) through the serving code path and return what it answered."""
    from edgewise.runtime.serving.model import SessionSettings, load_model

    manifest = read_manifest(folder)
    model = load_model(manifest.name, 0, folder, SessionSettings())
    if inputs is None:
        batches: list[Mapping[str, npt.NDArray[Any]]] = [synthetic_inputs(manifest)]
    elif isinstance(inputs, Mapping):
        batches = [inputs]
    else:
        batches = list(inputs)
    requests = []
    for batch in batches:
        outputs = model.run(batch)
        requests.append(
            GoldenRequest(inputs={k: np.asarray(v) for k, v in batch.items()}, outputs=outputs)
        )
    return GoldenSet(
        model=manifest.name,
        model_sha256=manifest.model_sha256,
        requests=tuple(requests),
        atol=atol,
        rtol=rtol,
        created_at=_utc_now(),
    )


def write_golden(folder: Path, golden: GoldenSet) -> FileEntry:
    """Write ``golden.json`` into ``folder`` (fsynced); returns its file entry."""
    path = folder / GOLDEN_FILE
    text = json.dumps(golden.to_json(), allow_nan=False) + "\n"
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return file_entry(folder, GOLDEN_FILE)


def read_golden(folder: Path) -> GoldenSet | None:
    """The package's golden requests, or None when it has none."""
    path = folder / GOLDEN_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object")
    return GoldenSet.from_json(data)


def add_golden(
    folder: Path,
    inputs: Sequence[Mapping[str, npt.NDArray[Any]]] | Mapping[str, npt.NDArray[Any]] | None = None,
    *,
    replace: bool = False,
) -> Manifest:
    """Record golden requests for the package in ``folder`` (a writable copy, not a published
    version) and list ``golden.json`` in its manifest. A package that has golden requests keeps
    them unless ``replace``. Returns the manifest as written."""
    manifest = read_manifest(folder)
    if (folder / GOLDEN_FILE).exists() and not replace:
        if not any(f.path == GOLDEN_FILE for f in manifest.files):
            manifest = dataclasses.replace(
                manifest, files=(*manifest.files, file_entry(folder, GOLDEN_FILE))
            )
            write_manifest(folder, manifest)
        return manifest
    golden = record_golden(folder, inputs)
    entry = write_golden(folder, golden)
    files = (*(f for f in manifest.files if f.path != GOLDEN_FILE), entry)
    manifest = dataclasses.replace(manifest, files=files)
    write_manifest(folder, manifest)
    return manifest


# ---- checking ------------------------------------------------------------------------------------


def _as_text(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def compare_outputs(
    expected: Mapping[str, npt.NDArray[Any]],
    got: Mapping[str, npt.NDArray[Any]],
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> list[str]:
    """Differences between recorded and actual outputs, one readable line each (empty: equal)."""
    problems: list[str] = []
    for name, recorded in expected.items():
        if name not in got:
            problems.append(f"output {name!r} is missing")
            continue
        have = np.asarray(got[name])
        want = np.asarray(recorded)
        if have.shape != want.shape:
            problems.append(f"output {name!r}: shape {list(have.shape)} != {list(want.shape)}")
            continue
        if want.dtype.kind == "f" and have.dtype.kind in "fiub":
            close = np.isclose(have.astype(np.float64), want.astype(np.float64), rtol, atol, True)
            if not bool(np.all(close)):
                diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
                worst = float(np.nanmax(np.where(close, 0.0, diff))) if diff.size else 0.0
                problems.append(
                    f"output {name!r}: {int(np.count_nonzero(~close))} of {close.size} values "
                    f"differ beyond atol {atol:g}/rtol {rtol:g} (max |diff| {worst:.3g})"
                )
        elif want.dtype.kind in "OUS" or have.dtype.kind in "OUS":
            if not np.array_equal(_as_text(have), _as_text(want)):
                count = int(np.count_nonzero(_as_text(have) != _as_text(want)))
                problems.append(f"output {name!r}: {count} of {want.size} values differ")
        elif not np.array_equal(have, want):
            count = int(np.count_nonzero(have != want))
            problems.append(f"output {name!r}: {count} of {want.size} values differ")
    return problems


def _check_inputs(golden: GoldenSet, specs: Sequence[TensorSpec]) -> None:
    by_name = {s.name: s for s in specs}
    for index, request in enumerate(golden.requests):
        if set(request.inputs) != set(by_name):
            raise PackageError(
                f"golden request {index}: inputs {sorted(request.inputs)} are not the model's "
                f"{sorted(by_name)}"
            )
        for name, array in request.inputs.items():
            spec = by_name[name]
            if datatype_of(array.dtype) != spec.datatype or array.ndim != len(spec.shape):
                raise PackageError(
                    f"golden request {index}: input {name!r} is {datatype_of(array.dtype)} "
                    f"{list(array.shape)}, the model wants {spec.datatype} {list(spec.shape)}"
                )


def check_golden(model: LoadedModel, golden: GoldenSet) -> int:
    """Run every golden request on a loaded model; :class:`PackageError` naming the first output
    that differs. Returns the number of requests checked."""
    _check_inputs(golden, model.inputs)
    if golden.model_sha256 and golden.model_sha256 != model.sha256:
        raise PackageError(
            f"golden requests were recorded with model sha256 {golden.model_sha256[:12]}…, "
            f"not this package's {model.sha256[:12]}…"
        )
    for index, request in enumerate(golden.requests):
        got = model.run(request.inputs, list(request.outputs))
        problems = compare_outputs(request.outputs, got, golden.atol, golden.rtol)
        if problems:
            raise PackageError(f"golden request {index}: {problems[0]}")
    return len(golden.requests)
