"""The capture's columns, in two stages: in the serving process, captured requests of one model
version (as the request path queued them, see :mod:`~edgewise.runtime.serving.capture`) become
plain columns (:func:`encode`: numpy arrays and lists, a whole chunk of records per call, no
per-record decoding where the answers are raw and numeric: their bytes are joined per output);
in the writer process (:mod:`~edgewise.runtime.serving.capture_writer`), those columns become
Arrow tables (:func:`tables`), so that Arrow and Parquet never run under the serving process's
GIL. Feedback labels are a table of their own (:func:`labels_table`).

Each row of a table is one row of a request (a request with a batch of 5 gives 5 rows):
``request_id``, ``row``, ``timestamp``, ``model``, ``version``, then ``input.<name>`` for each
decoded input tensor (the feature values the model used) and ``output.<name>`` for each answered
output; a tensor with more than one value per row is a fixed-size list column (a list where its
width varies).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, Final, TypedDict, cast

import numpy as np
import numpy.typing as npt

from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode_outputs

if TYPE_CHECKING:
    from edgewise.runtime.serving.model import LoadedModel

__all__ = [
    "CHUNK_RECORDS",
    "Batch",
    "Group",
    "Record",
    "encode",
    "labels_table",
    "records_table",
    "tables",
]

#: Records encoded as one chunk (one set of columns; the writer builds one Arrow table each).
CHUNK_RECORDS: Final = 1024

#: An encoded column: the values (flat: a numpy array, or a list of texts and bytes), the values
#: per row where fixed (1: a plain column, more: a fixed-size list) and, where the width varies
#: from row to row, the lists' offsets (else None).
Column = tuple["npt.NDArray[Any] | list[Any]", int, "npt.NDArray[np.int32] | None"]


class Chunk(TypedDict):
    """Up to CHUNK_RECORDS records as columns: per request its id, time (ns) and rows; per
    input and output tensor a column of their rows."""

    records: int  # those without rows (a batch of 0) count here but are in no column
    ids: list[str]
    times: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    inputs: dict[str, Column]
    outputs: dict[str, Column]


class Batch(TypedDict):
    """The records of one file, encoded: model, version, how many records and their chunks."""

    model: str
    version: str
    records: int
    chunks: list[Chunk]


class Group:
    """What the captured requests of one file share: the model version (its ``name`` and
    ``version`` text only: a group outlives a version that was unloaded while its records
    waited, and must not keep its session alive), the choice of outputs (None: all) and the
    answers' layout, ``(name, datatype)`` per output in answer order (read from the first
    answer). ``numeric``: every output has a fixed-size datatype, so a raw answer is kept as
    its bytes, one per output."""

    __slots__ = ("layout", "name", "numeric", "outputs", "version")

    def __init__(
        self, model: LoadedModel, outputs: tuple[str, ...] | None, response: pb.ModelInferResponse
    ) -> None:
        self.name: str = model.name
        self.version: str = model.version_str
        self.outputs = outputs
        self.layout = tuple((output.name, output.datatype) for output in response.outputs)
        self.numeric = all(d in DATATYPE_TO_NUMPY and d != BYTES for _, d in self.layout)


#: A captured request, as the request path queues it (a tuple: one allocation):
#: (group, time_ns, request_id, rows, feeds, answer). ``answer``: the raw answer's bytes, one
#: per output of ``group.layout`` (a list), or the response itself (typed contents, strings).
Record = tuple[
    Group, int, str, int, dict[str, npt.NDArray[Any]], "list[bytes] | pb.ModelInferResponse"
]


def encode(group: Group, records: Sequence[Record]) -> Batch:
    """What the writer process needs to write ``records`` (one group) as one file: plain
    columns (numpy arrays, lists of ids and texts; no Arrow, no per-record objects), a chunk of
    :data:`CHUNK_RECORDS` records at a time. A record that cannot be turned into columns raises
    (an error for the caller to count)."""
    chunks = [
        _chunk(records[start : start + CHUNK_RECORDS])
        for start in range(0, len(records), CHUNK_RECORDS)
    ]
    return {
        "model": group.name,
        "version": group.version,
        "records": len(records),
        "chunks": chunks,
    }


def _chunk(records: Sequence[Record]) -> Chunk:
    group = records[0][0]
    # The columns of the records (one C-level pass each; zip(*records) costs three times more).
    times, ids, rows, feeds, answers = (list(map(itemgetter(k), records)) for k in range(1, 6))
    if 0 in rows:  # tensors without a batch dimension (one row), or requests of no rows
        rows = [r or _rows(f) for r, f in zip(rows, feeds, strict=True)]
        keep = [i for i, r in enumerate(rows) if r]
        times, ids, feeds, answers = ([c[i] for i in keep] for c in (times, ids, feeds, answers))
        rows = [rows[i] for i in keep]
    chunk: Chunk = {
        "records": len(records),
        "ids": ids,
        "times": np.array(times, dtype=np.int64),
        "rows": np.array(rows, dtype=np.int64),
        "inputs": {},
        "outputs": {},
    }
    if not rows:
        return chunk
    for name in feeds[0]:
        parts = list(map(itemgetter(name), feeds))
        chunk["inputs"][name] = _numeric(parts, rows) or _column(parts, rows)
    joined = _raw_outputs(group, answers, rows)
    if joined is not None:
        for name, (values, width) in joined.items():
            chunk["outputs"][name] = (values, width, None)
    else:  # typed contents, strings, widths that vary: each answer decoded
        outputs = [_decoded(group, answer, n) for answer, n in zip(answers, rows, strict=True)]
        for name in list(outputs[0]):
            if all(name in answer for answer in outputs):
                chunk["outputs"][name] = _column([answer[name] for answer in outputs], rows)
    return chunk


def tables(batch: Batch) -> list[tuple[Any, int]]:
    """The tables to write for an encoded batch (in the writer process) and how many records
    each holds: one table, built a chunk at a time; a chunk whose columns differ from the
    others' (a tensor whose width varies) makes the chunks separate files."""
    import pyarrow as pa

    chunks = [
        (records_table(batch["model"], batch["version"], chunk), chunk["records"])
        for chunk in batch["chunks"]
    ]
    if len(chunks) <= 1:
        return chunks
    try:
        return [(pa.concat_tables([t for t, _ in chunks]), batch["records"])]
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return chunks


def records_table(model: str, version: str, chunk: Chunk) -> Any:
    """The Arrow table of an encoded chunk of records (see the module's docstring)."""
    import pyarrow as pa

    rows = chunk["rows"].tolist()
    columns = _request_columns(model, version, chunk["ids"], chunk["times"], rows)
    for name, column in chunk["inputs"].items():
        columns["input." + name] = _arrow(column)
    for name, column in chunk["outputs"].items():
        columns["output." + name] = _arrow(column)
    return pa.table(columns)


def _request_columns(
    model: str, version: str, ids: list[str], times: npt.NDArray[np.int64], rows: list[int]
) -> dict[str, Any]:
    """The columns that say which request a row is of: request_id, row, timestamp, model and
    version (a request of ``rows[i]`` rows gives that many)."""
    import pyarrow as pa

    total = sum(rows)
    single = total == len(rows)  # one row per request: nothing to repeat
    stamps = times.astype("datetime64[ns]")
    return {
        "request_id": pa.array(ids if single else np.repeat(ids, rows).tolist(), pa.string()),
        "row": pa.array(
            np.zeros(total, np.int32)
            if single
            else np.concatenate([np.arange(n, dtype=np.int32) for n in rows])
        ),
        "timestamp": pa.array(
            stamps if single else np.repeat(stamps, rows), pa.timestamp("ns", tz="UTC")
        ),
        "model": pa.repeat(pa.scalar(model, pa.string()), total),
        "version": pa.repeat(pa.scalar(version, pa.string()), total),
    }


def _rows(feeds: dict[str, npt.NDArray[Any]]) -> int:
    """The rows of a request whose batch dimension is 0: none if a tensor has a first axis of
    length 0, else 1 (tensors without a dimension)."""
    return 0 if any(a.ndim and a.shape[0] == 0 for a in feeds.values()) else 1


def _raw_outputs(
    group: Group, answers: Sequence[list[bytes] | pb.ModelInferResponse], rows: list[int]
) -> dict[str, tuple[npt.NDArray[Any], int]] | None:
    """Every answer's outputs at once where all are raw bytes of a numeric layout, each the same
    number of bytes per row: one join of their bytes per output instead of decoding each
    answer. None where one does not fit."""
    layout = group.layout
    if not group.numeric or set(map(type, answers)) != {list}:
        return None
    raws = cast("Sequence[list[bytes]]", answers)
    if set(map(len, raws)) != {len(layout)}:
        return None
    expected_rows = np.array(rows, dtype=np.int64)
    out: dict[str, tuple[npt.NDArray[Any], int]] = {}
    for k, (name, datatype) in enumerate(layout):
        dtype = np.dtype(DATATYPE_TO_NUMPY[datatype])
        chunks = list(map(itemgetter(k), raws))
        sizes = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        row_bytes = int(sizes[0]) // rows[0]
        if (
            row_bytes == 0
            or row_bytes % dtype.itemsize
            or (sizes != expected_rows * row_bytes).any()
        ):
            return None
        out[name] = (np.frombuffer(b"".join(chunks), dtype=dtype), row_bytes // dtype.itemsize)
    return out


def _decoded(
    group: Group, answer: list[bytes] | pb.ModelInferResponse, rows: int
) -> dict[str, npt.NDArray[Any]]:
    """One answer's outputs as arrays of ``rows`` rows: a response decoded, raw bytes read by
    the group's layout (an answer whose bytes do not fit it is an error for the writer)."""
    if isinstance(answer, pb.ModelInferResponse):
        return decode_outputs(answer)
    if len(answer) != len(group.layout):
        raise ValueError(f"a raw answer has {len(answer)} outputs, not {len(group.layout)}")
    return {
        name: np.frombuffer(raw, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(rows, -1)
        for (name, datatype), raw in zip(group.layout, answer, strict=True)
    }


def _column(parts: list[npt.NDArray[Any]], rows: list[int]) -> Column:
    """One column from each record's tensor (``rows[i]`` rows each), as plain values: a flat
    array (or a list of texts), the values per row where they are fixed (1: a plain column,
    more: a fixed-size list) or the lists' offsets where the width varies."""
    total = sum(rows)
    joined = _joined(parts, total)
    if joined is not None:  # every tensor [rows, ...] with the same trailing shape
        shaped = None
        widths = {joined.size // total if total else 1}
        flat = joined.reshape(-1)
    else:
        shaped = [
            p.reshape(r, -1) if p.size or r == 0 else p.reshape(r, 0)
            for p, r in zip(parts, rows, strict=True)
        ]
        widths = {p.shape[1] for p in shaped}
        flat = np.concatenate([p.reshape(-1) for p in shaped]) if shaped else np.empty(0)
    values: npt.NDArray[Any] | list[Any] = flat.tolist() if flat.dtype.kind in "OSU" else flat
    if len(widths) == 1:
        return (values, widths.pop(), None)
    assert shaped is not None  # joined tensors share one width
    offsets = np.concatenate([[0], np.cumsum([p.size for p in shaped])]).astype(np.int32)
    return (values, 0, offsets)


def _numeric(parts: list[npt.NDArray[Any]], rows: list[int]) -> Column | None:
    """The common case at a fraction of :func:`_column`'s cost: numeric tensors of one dtype,
    each C-contiguous with the same number of values per row, their bytes joined at once (the
    buffers, not the arrays: a tenth of a microsecond each where concatenating the arrays costs
    half a microsecond). None where one does not fit."""
    first = parts[0]
    if first.dtype.kind not in "biufc" or first.ndim == 0 or not rows[0]:
        return None
    if set(map(_dtype, parts)) != {first.dtype}:
        return None
    row_bytes = first.nbytes // rows[0]
    sizes = np.fromiter(map(_nbytes, parts), dtype=np.int64, count=len(parts))
    if not row_bytes or (sizes != np.array(rows, dtype=np.int64) * row_bytes).any():
        return None
    try:
        joined = b"".join(parts)  # type: ignore[arg-type]  # ndarrays are buffers
    except (BufferError, TypeError):  # a tensor that is not C-contiguous
        return None
    return (np.frombuffer(joined, dtype=first.dtype), row_bytes // first.itemsize, None)


_dtype = attrgetter("dtype")
_nbytes = attrgetter("nbytes")


def _joined(parts: list[npt.NDArray[Any]], total: int) -> npt.NDArray[Any] | None:
    """The tensors concatenated along their first axis, where they all have one and the same
    trailing shape (and ``total`` rows together); else None."""
    if not parts or parts[0].ndim == 0:
        return None
    try:
        joined = np.concatenate(parts)
    except ValueError:  # different trailing shapes or dimensions
        return None
    return joined if joined.shape[0] == total else None


def _text(value: object) -> object:
    """A BYTES tensor's element as text where it is UTF-8 (as the client sent it), else bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _arrow(column: Column) -> Any:
    """An encoded column as Arrow: plain, a fixed-size list or a list (see :func:`_column`)."""
    import pyarrow as pa

    values, width, offsets = column
    array = pa.array([_text(v) for v in values] if isinstance(values, list) else values)
    if offsets is not None:
        return pa.ListArray.from_arrays(pa.array(offsets), array)
    return array if width == 1 else pa.FixedSizeListArray.from_arrays(array, width)


def labels_table(batches: Sequence[tuple[int, Sequence[tuple[str, int, object]]]]) -> Any:
    """The Arrow table of feedback labels, from ``(time_ns, labels)`` batches of
    ``(request_id, row, label)``: request_id, row, label (as text) and label_type (int, float
    or str: how ``edgewise capture export`` reads it back), timestamp."""
    import pyarrow as pa

    ids: list[str] = []
    rows: list[int] = []
    texts: list[str] = []
    kinds: list[str] = []
    times: list[int] = []
    for time_ns, labels in batches:
        for request_id, row, given in labels:
            ids.append(request_id)
            rows.append(row)
            kind, text = _label_text(given)
            texts.append(text)
            kinds.append(kind)
            times.append(time_ns)
    return pa.table(
        {
            "request_id": pa.array(ids, pa.string()),
            "row": pa.array(rows, pa.int32()),
            "label": pa.array(texts, pa.string()),
            "label_type": pa.array(kinds, pa.string()),
            "timestamp": pa.array(
                np.array(times, dtype="datetime64[ns]"), pa.timestamp("ns", tz="UTC")
            ),
        }
    )


def _label_text(label: object) -> tuple[str, str]:
    """A label's kind (int, float or str) and its text, read back exactly by the export."""
    if isinstance(label, bool | np.bool_):
        return "int", str(int(label))
    if isinstance(label, int | np.integer):
        return "int", str(int(label))
    if isinstance(label, float | np.floating):
        return "float", repr(float(label))
    return "str", str(label)
