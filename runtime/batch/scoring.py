"""One chunk, from the rows read to the rows written: model inputs, the model run, the output table.

The inputs come from :func:`edgewise.runtime.package.schema.arrow_to_inputs`, the Arrow fast path of
``frame_to_inputs`` (the one place that turns a table into model inputs), and the model runs
through :class:`~edgewise.runtime.serving.model.LoadedModel` with the server's session settings: the
server and the batch scorer answer alike for the same rows.

The output table holds the id columns, as read, then one column per model output, named after
it: an output of one value per row (shape ``[-1]`` or ``[-1, 1]``) is a plain column, one of
``k`` values per row a fixed-size list column of width ``k``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from edgewise.runtime.batch.reader import ColumnSpec
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import Manifest, TensorSpec
from edgewise.runtime.package.schema import arrow_to_inputs
from edgewise.runtime.serving.model import LoadedModel

__all__ = [
    "OUTPUT_METADATA_KEY",
    "arrow_output_type",
    "chunk_inputs",
    "output_schema",
    "output_table",
    "score_chunk",
]

#: Key of the part files' schema metadata that describes the job (model, version, sha256).
OUTPUT_METADATA_KEY: Final = b"edgewise.batch"

_ARROW_TYPES: Final[Mapping[str, Any]] = {
    "BOOL": pa.bool_(),
    "UINT8": pa.uint8(),
    "UINT16": pa.uint16(),
    "UINT32": pa.uint32(),
    "UINT64": pa.uint64(),
    "INT8": pa.int8(),
    "INT16": pa.int16(),
    "INT32": pa.int32(),
    "INT64": pa.int64(),
    "FP16": pa.float16(),
    "FP32": pa.float32(),
    "FP64": pa.float64(),
    "BYTES": pa.string(),
}


def _row_width(spec: TensorSpec) -> int | None:
    """Values per row of an output (1 for a scalar output), None when not fixed."""
    dims = spec.shape[1:]
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims) if dims else 1


def arrow_output_type(spec: TensorSpec) -> Any:
    """The Arrow type of the column that holds a model output."""
    value = _ARROW_TYPES[spec.datatype]
    width = _row_width(spec)
    if width == 1:
        return value
    if width is None:
        return pa.list_(value)
    return pa.list_(value, width)


def output_schema(manifest: Manifest, id_fields: Sequence[Any], job: Mapping[str, Any]) -> Any:
    """The schema of every part file: id columns, then one column per model output; ``job``
    (model, version, sha256) is stored in the schema metadata."""
    outputs = {spec.name for spec in manifest.outputs}
    clash = [f.name for f in id_fields if f.name in outputs]
    if clash:
        raise InvalidInput(
            f"id column {clash[0]!r} has the name of a model output; rename the column"
        )
    fields = [*id_fields, *(pa.field(s.name, arrow_output_type(s)) for s in manifest.outputs)]
    return pa.schema(fields, metadata={OUTPUT_METADATA_KEY: json.dumps(dict(job)).encode()})


def chunk_inputs(manifest: Manifest, columns: ColumnSpec, table: Any) -> dict[str, Any]:
    """The model inputs of a chunk (an Arrow table): ``arrow_to_inputs``, the Arrow fast path of
    ``frame_to_inputs`` with the same result."""
    return arrow_to_inputs(manifest, table.select(list(columns.feature_names)))


def _column(spec: TensorSpec, values: npt.NDArray[Any], rows: int) -> Any:
    arrow_type = arrow_output_type(spec)
    if values.shape[:1] != (rows,):
        raise InvalidInput(
            f"model output {spec.name!r}: {values.shape[0] if values.ndim else 0} row(s) for a "
            f"chunk of {rows}"
        )
    if values.dtype == object:
        values = values.astype(str)
    width = _row_width(spec)
    if width == 1:
        return pa.array(values.reshape(rows), type=arrow_type)
    # a chunk whose rows were all set aside (--bad-records) has none: -1 cannot be inferred
    flat = np.ascontiguousarray(values).reshape(
        rows, width if width is not None else -1 if rows else 0
    )
    if width is None:
        offsets = np.arange(0, flat.size + 1, max(1, flat.shape[1]), dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))
    return pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1), type=arrow_type.value_type), width
    )


def output_table(
    schema: Any,
    manifest: Manifest,
    ids: Any,
    results: Mapping[str, npt.NDArray[Any]],
) -> Any:
    """The part file table of a chunk: ``ids`` (an Arrow table of the id columns) and outputs."""
    rows = ids.num_rows
    arrays = [ids.column(name).combine_chunks() for name in ids.column_names]
    for spec in manifest.outputs:
        arrays.append(_column(spec, results[spec.name], rows))
    table = pa.Table.from_arrays(arrays, names=[*ids.column_names, *results])
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidInput(f"output of a chunk does not fit the job's schema: {exc}") from None


def score_chunk(
    model: LoadedModel,
    columns: ColumnSpec,
    schema: Any,
    table: Any,
    feeds: Mapping[str, npt.NDArray[Any]],
    results: Mapping[str, npt.NDArray[Any]] | None = None,
) -> Any:
    """Run the model on a chunk's inputs (unless its ``results`` are given: the drift
    collector reads them too) and build its part file table."""
    if results is None:
        results = model.run(feeds)
    ordered = {spec.name: results[spec.name] for spec in model.manifest.outputs}
    return output_table(schema, model.manifest, table.select(list(columns.id_columns)), ordered)
