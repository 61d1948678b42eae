"""The input schema of a model package: which column of a table goes into which input tensor.

Numeric columns are packed, in feature order, into one ``[batch, n_numeric]`` FP32 tensor named
``features`` (the form latency-sensitive clients send); every categorical (string) column is an
input of its own, a BYTES tensor ``[batch, 1]`` named after the column. The manifest's
``features`` list records, for each column of the training data in order, its kind, the input
tensor, its index along that tensor's last axis, the dtype seen in the sample and, for a
categorical, the categories seen.

This module only needs numpy at import time; pandas is imported when a table is handled (the
``edgewise[data]`` extra). The conversion, the server and the batch scorer share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.datatypes import BYTES
from edgewise.runtime.package.manifest import Feature, Manifest, TensorSpec

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FEATURES_INPUT",
    "MISSING_CATEGORY",
    "arrow_to_inputs",
    "frame_to_inputs",
    "infer_features",
    "input_specs",
    "is_categorical_dtype",
    "is_numeric_dtype",
    "onnxruntime_inputs",
]

FEATURES_INPUT: Final = "features"
"""Name of the packed FP32 input tensor that holds every numeric feature."""

MISSING_CATEGORY: Final = b""
"""What a missing categorical value (None/NaN) is sent as: an unknown category for the model."""


def _pandas() -> Any:
    from edgewise.runtime.package.tabular import require_pandas

    return require_pandas()


def is_numeric_dtype(dtype: Any) -> bool:
    """True for int, uint, float and bool column dtypes (numpy or pandas extension dtypes)."""
    pd = _pandas()
    return bool(pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))


def is_categorical_dtype(dtype: Any) -> bool:
    """True for the dtypes taken as categorical features: object, string and category."""
    pd = _pandas()
    if isinstance(dtype, pd.CategoricalDtype):
        return True
    return bool(pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype))


def _format_names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def infer_features(frame: pd.DataFrame) -> tuple[Feature, ...]:
    """The features of a sample table, in its column order.

    Numeric columns (int, uint, float, bool) go into ``features`` at increasing indices;
    object/string/category columns become categorical features, each its own input named after
    the column, with the sorted distinct non-missing values seen as categories. Other dtypes
    (datetimes, timedeltas, complex, ...) are refused with :class:`InvalidInput`.
    """
    pd = _pandas()
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInput(f"sample: expected a pandas DataFrame, got {type(frame).__name__}")
    names = [str(c) for c in frame.columns]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidInput(f"sample: duplicate column name(s) {_format_names(duplicated)}")
    # Object columns that hold only numbers (e.g. a DataFrame built from an object array) are
    # numeric features; infer_objects only changes the dtype of such columns.
    inferred = frame.infer_objects()
    features: list[Feature] = []
    n_numeric = 0
    for name, column in zip(names, inferred.columns, strict=True):
        series = inferred[column]
        dtype = series.dtype
        if pd.api.types.is_complex_dtype(dtype):
            raise InvalidInput(f"sample column {name!r}: complex numbers are not supported")
        if is_numeric_dtype(dtype):
            features.append(
                Feature(
                    name=name,
                    kind="numeric",
                    input=FEATURES_INPUT,
                    column=n_numeric,
                    dtype=str(dtype),
                )
            )
            n_numeric += 1
        elif is_categorical_dtype(dtype):
            if name == FEATURES_INPUT:
                raise InvalidInput(
                    f"sample column {name!r}: a categorical column cannot be named "
                    f"{FEATURES_INPUT!r} (the packed numeric input has that name); rename it"
                )
            values = series.dropna()
            categories = tuple(sorted({str(v) for v in values.unique()}))
            features.append(
                Feature(
                    name=name,
                    kind="categorical",
                    input=name,
                    column=0,
                    dtype=str(dtype),
                    categories=categories,
                )
            )
        else:
            raise InvalidInput(
                f"sample column {name!r}: dtype {dtype} is neither numeric nor categorical "
                "(convert it to numbers or strings first)"
            )
    return tuple(features)


def input_specs(features: Sequence[Feature]) -> tuple[TensorSpec, ...]:
    """The model inputs the features describe: ``features`` first (if any numeric), then one
    BYTES ``[-1, 1]`` tensor per categorical, in feature order."""
    n_numeric = sum(1 for f in features if f.kind == "numeric")
    specs: list[TensorSpec] = []
    if n_numeric:
        specs.append(TensorSpec(name=FEATURES_INPUT, datatype="FP32", shape=(-1, n_numeric)))
    specs.extend(
        TensorSpec(name=f.input, datatype=BYTES, shape=(-1, 1))
        for f in features
        if f.kind == "categorical"
    )
    return tuple(specs)


def frame_to_inputs(
    schema: Manifest | Sequence[Feature], frame: pd.DataFrame | np.ndarray[Any, Any]
) -> dict[str, np.ndarray[Any, Any]]:
    """Build the V2 input tensors of a model from a table, following the manifest's features.

    ``frame`` is a DataFrame with (at least) the feature columns, by name, or a 2-D array whose
    columns are the features in manifest order. Returns ``{"features": float32 [n, k]}`` (when
    the model has numeric features) plus one ``object`` array of ``bytes`` ``[n, 1]`` per
    categorical feature; missing categorical values become :data:`MISSING_CATEGORY`, missing
    numeric values NaN. Raises :class:`InvalidInput` naming the column that is missing or not
    numeric.
    """
    features = tuple(schema.features if isinstance(schema, Manifest) else schema)
    if not features:
        raise InvalidInput("the model's manifest lists no features")
    pd = _pandas()
    if isinstance(frame, np.ndarray):
        if frame.ndim != 2 or frame.shape[1] != len(features):
            raise InvalidInput(
                f"input array: expected shape [n, {len(features)}] (one column per feature), "
                f"got {list(frame.shape)}"
            )
        frame = pd.DataFrame(frame, columns=[f.name for f in features])
    elif not isinstance(frame, pd.DataFrame):
        raise InvalidInput(
            f"input table: expected a pandas DataFrame or a 2-D numpy array, "
            f"got {type(frame).__name__}"
        )
    columns: Mapping[str, Any] = {str(c): c for c in frame.columns}
    missing = [f.name for f in features if f.name not in columns]
    if missing:
        raise InvalidInput(f"input table: missing column(s) {_format_names(missing)}")
    n_rows = len(frame)
    numeric = [f for f in features if f.kind == "numeric"]
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    if numeric:
        width = max(f.column for f in numeric) + 1
        packed = np.full((n_rows, width), np.nan, dtype=np.float32)
        for feature in numeric:
            series = frame[columns[feature.name]]
            try:
                values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError):
                try:
                    values = pd.to_numeric(series, errors="raise").to_numpy(
                        dtype=np.float64, na_value=np.nan
                    )
                except (TypeError, ValueError):
                    raise InvalidInput(
                        f"input column {feature.name!r}: expected numbers, "
                        f"got values of dtype {series.dtype}"
                    ) from None
            packed[:, feature.column] = values
        inputs[FEATURES_INPUT] = packed
    for feature in features:
        if feature.kind != "categorical":
            continue
        series = frame[columns[feature.name]]
        missing_mask = series.isna().to_numpy(dtype=bool)
        encoded = np.empty((n_rows, 1), dtype=object)
        encoded[:, 0] = [
            MISSING_CATEGORY
            if is_missing
            else value
            if isinstance(value, bytes)
            else str(value).encode("utf-8")
            for value, is_missing in zip(series.tolist(), missing_mask.tolist(), strict=True)
        ]
        inputs[feature.input] = encoded
    return inputs


def arrow_to_inputs(
    schema: Manifest | Sequence[Feature], table: Any
) -> dict[str, np.ndarray[Any, Any]]:
    """:func:`frame_to_inputs` for a pyarrow ``Table`` or ``RecordBatch``, with the same result.

    The batch scorer's fast path: numeric columns (integer, floating-point, boolean) go from
    Arrow buffers straight into the packed FP32 tensor, without pandas (nulls become NaN, values
    are converted to float64 and then to float32, as :func:`frame_to_inputs` does). Categorical
    columns, and numeric columns of any other Arrow type, take :func:`frame_to_inputs`' own path
    through pandas, so every value is encoded exactly as it would be from a DataFrame.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    features = tuple(schema.features if isinstance(schema, Manifest) else schema)
    if not features:
        raise InvalidInput("the model's manifest lists no features")
    present = set(table.column_names)
    missing = [f.name for f in features if f.name not in present]
    if missing:
        raise InvalidInput(f"input table: missing column(s) {_format_names(missing)}")

    def direct(feature: Feature) -> bool:
        dtype = table.schema.field(feature.name).type
        return feature.kind == "numeric" and bool(
            pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
        )

    fast = [f for f in features if direct(f)]
    slow = [f for f in features if not direct(f)]
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    if slow:
        frame = table.select([f.name for f in slow]).to_pandas()
        inputs.update(frame_to_inputs(slow, frame))
    if fast:
        numeric = [f for f in features if f.kind == "numeric"]
        width = max(f.column for f in numeric) + 1
        packed = inputs.get(FEATURES_INPUT)
        if packed is None:
            packed = np.full((table.num_rows, width), np.nan, dtype=np.float32)
        elif packed.shape[1] < width:
            grown = np.full((table.num_rows, width), np.nan, dtype=np.float32)
            grown[:, : packed.shape[1]] = packed
            packed = grown
        for feature in fast:
            column = table.column(feature.name)
            if not pa.types.is_float64(column.type):
                column = pc.cast(column, pa.float64(), safe=False)
            values = column.to_numpy(zero_copy_only=False)
            if values.dtype != np.float64:  # a null-only or boolean-with-nulls column
                values = np.asarray(values, dtype=np.float64)
            packed[:, feature.column] = values
        inputs[FEATURES_INPUT] = packed
    return {name: inputs[name] for name in _input_order(features) if name in inputs}


def _input_order(features: Sequence[Feature]) -> list[str]:
    """Input names in :func:`frame_to_inputs`' order: ``features`` first, then categoricals."""
    names = [FEATURES_INPUT] if any(f.kind == "numeric" for f in features) else []
    names.extend(f.input for f in features if f.kind == "categorical")
    return names


def onnxruntime_inputs(
    inputs: Mapping[str, np.ndarray[Any, Any]],
) -> dict[str, np.ndarray[Any, Any]]:
    """The input dict as onnxruntime wants it: BYTES (object arrays of ``bytes``) decoded as UTF-8.

    onnxruntime's Python binding turns a ``bytes`` element of a string tensor into its ``str()``
    (``b'low'`` becomes ``"b'low'"``), so every categorical value would be an unknown category.
    Arrays that are not object arrays are passed through unchanged. :class:`InvalidInput` names
    the input holding bytes that are not UTF-8.
    """
    fed: dict[str, np.ndarray[Any, Any]] = {}
    for name, array in inputs.items():
        if array.dtype != object:
            fed[name] = array
            continue
        try:
            decoded = [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.ravel()]
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES element is not valid UTF-8") from None
        out = np.empty(array.shape, dtype=object)
        out.ravel()[:] = decoded
        fed[name] = out
    return fed
