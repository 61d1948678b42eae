"""``arrow_to_inputs`` (the batch scorer's Arrow fast path) gives exactly what ``frame_to_inputs``
gives for the same table read through pandas, for every column type a batch input may hold."""

from __future__ import annotations

import decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import Feature, read_manifest
from edgewise.runtime.package.schema import arrow_to_inputs, frame_to_inputs


def _assert_same(features: list[Feature] | object, table: pa.Table) -> None:
    fast = arrow_to_inputs(features, table)  # type: ignore[arg-type]
    slow = frame_to_inputs(features, table.to_pandas())  # type: ignore[arg-type]
    assert list(fast) == list(slow)
    for name, want in slow.items():
        got = fast[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype == object:
            assert got.tolist() == want.tolist(), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def _numeric(name: str, column: int) -> Feature:
    return Feature(name, "numeric", "features", column, "float64")


def _categorical(name: str) -> Feature:
    return Feature(name, "categorical", name, 0, "object", ("a", "b"))


def test_numeric_column_types() -> None:
    n = 257
    rng = np.random.default_rng(3)
    ints = rng.integers(-(2**60), 2**60, n)
    mask = rng.random(n) < 0.1
    columns = {
        "f64": pa.array(rng.normal(size=n)),
        "f64_nulls": pa.array(rng.normal(size=n), mask=mask),
        "f32": pa.array(rng.normal(size=n).astype(np.float32)),
        "f16": pa.array(rng.normal(size=n).astype(np.float16)),
        "i64_big": pa.array(ints),  # beyond 2**53: rounded to the nearest float64, as numpy does
        "i8_nulls": pa.array(rng.integers(-100, 100, n).astype(np.int8), mask=mask),
        "u32": pa.array(rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)),
        "bool": pa.array(rng.random(n) < 0.5),
        "bool_nulls": pa.array(rng.random(n) < 0.5, mask=mask),
        "all_null": pa.nulls(n, pa.float64()),
        "null_type": pa.nulls(n),
        "decimal": pa.array(
            [decimal.Decimal(f"{v:.4f}") for v in rng.normal(size=n)], pa.decimal128(12, 4)
        ),
        "dict_float": pa.array(rng.integers(1, 9, n) / 4).dictionary_encode(),
    }
    table = pa.table(columns)
    # Features in a different order from the table's columns, with a gap in the packed tensor.
    names = list(columns)[::-1]
    features = [_numeric(name, index + (index > 4)) for index, name in enumerate(names)]
    _assert_same(features, table)
    sliced = pa.concat_tables([table.slice(0, 100), table.slice(100)])  # several chunks
    _assert_same(features, sliced)


def test_categorical_column_types() -> None:
    n = 120
    values = [["a", "b", None, "zz", ""][i % 5] for i in range(n)]
    table = pa.table(
        {
            "s": pa.array(values),
            "large": pa.array(values, pa.large_string()),
            "dict": pa.array(values).dictionary_encode(),
            "ints": pa.array([i % 3 for i in range(n)]),
            "ints_nulls": pa.array([None if i % 7 == 0 else i % 3 for i in range(n)]),
            "x": pa.array(np.arange(n, dtype=np.float64)),
        }
    )
    features = [_numeric("x", 0)] + [
        _categorical(name) for name in ("s", "large", "dict", "ints", "ints_nulls")
    ]
    _assert_same(features, table)


def test_real_models_on_real_rows(model_repo: Path) -> None:
    from tests import models

    for name, frame in (("logreg", models.train_logreg()[1]), ("mixed", models.mixed_frame())):
        manifest = read_manifest(model_repo / name / "1")
        _assert_same(manifest, pa.Table.from_pandas(frame, preserve_index=False))


def test_missing_column_is_named() -> None:
    table = pa.table({"x": [1.0]})
    with pytest.raises(InvalidInput, match="missing column\\(s\\) 'y'"):
        arrow_to_inputs([_numeric("x", 0), _numeric("y", 1)], table)
