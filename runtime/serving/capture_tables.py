"""The capture writer's tables: captured requests of one model version (as the request path
queued them, see :mod:`~edgewise.runtime.serving.capture`) turned into Arrow columns, a whole
chunk of records per Arrow call (no per-record decoding where the answers are raw and numeric:
their bytes are joined per output); feedback labels as a table of their own.

Each row of a table is one row of a request (a request with a batch of 5 gives 5 rows):
``request_id``, ``row``, ``timestamp``, ``model``, ``version``, then ``input.<name>`` for each
decoded input tensor (the feature values the model used) and ``output.<name>`` for each answered
output; a tensor with more than one value per row is a fixed-size list column (a list where its
width varies).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np
import numpy.typing as npt

from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode_outputs

if TYPE_CHECKING:
    from edgewise.runtime.serving.model import LoadedModel

__all__ = [
    "CHUNK_RECORDS",
    "Group",
    "Record",
    "labels_table",
    "records_table",
    "tables",
]

#: Records turned into Arrow at a time by the writer, which then lets the request threads have
#: the GIL (time.sleep(0)): a flush of thousands of records never holds it for long.
CHUNK_RECORDS: Final = 1024


class Group:
    """What the captured requests of one file share: the model version, the choice of outputs
    (None: all) and the answers' layout, ``(name, datatype)`` per output in answer order (read
    from the first answer). ``numeric``: every output has a fixed-size datatype, so a raw answer
    is kept as its bytes, one per output."""

    __slots__ = ("layout", "model", "numeric", "outputs")

    def __init__(
        self, model: LoadedModel, outputs: tuple[str, ...] | None, response: pb.ModelInferResponse
    ) -> None:
        self.model = model
        self.outputs = outputs
        self.layout = tuple((output.name, output.datatype) for output in response.outputs)
        self.numeric = all(d in DATATYPE_TO_NUMPY and d != BYTES for _, d in self.layout)


#: A captured request, as the request path queues it (a tuple: one allocation):
#: (group, time_ns, request_id, rows, feeds, answer). ``answer``: the raw answer's bytes, one
#: per output of ``group.layout`` (a list), or the response itself (typed contents, strings).
Record = tuple[
    Group, int, str, int, dict[str, npt.NDArray[Any]], "list[bytes] | pb.ModelInferResponse"
]


def tables(group: Group, records: Sequence[Record]) -> list[tuple[Any, int]]:
    """The tables to write for ``records`` (one group) and how many records each holds: one
    table, built a chunk at a time; a chunk whose columns differ from the others' (a tensor
    whose width varies) makes the chunks separate files. A chunk that cannot be built is an
    error for the writer to count."""
    import pyarrow as pa

    chunks = []
    for start in range(0, len(records), CHUNK_RECORDS):
        part = records[start : start + CHUNK_RECORDS]
        chunks.append((records_table(group, part), len(part)))
        time.sleep(0)  # the request threads take the GIL between chunks
    if len(chunks) == 1:
        return chunks
    try:
        return [(pa.concat_tables([t for t, _ in chunks]), len(records))]
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return chunks


def records_table(group: Group, records: Sequence[Record]) -> Any:
    """The Arrow table of records of one group (see the module's docstring)."""
    import pyarrow as pa

    # The columns of the records (one C-level pass each; zip(*records) costs three times more).
    times, ids, rows, feeds, answers = (list(map(itemgetter(k), records)) for k in range(1, 6))
    if 0 in rows:  # tensors without a batch dimension (one row), or requests of no rows
        rows = [r or _rows(f) for r, f in zip(rows, feeds, strict=True)]
        keep = [i for i, r in enumerate(rows) if r]
        times, ids, feeds, answers = ([c[i] for i in keep] for c in (times, ids, feeds, answers))
        rows = [rows[i] for i in keep]
    columns = _request_columns(group.model, ids, times, rows)
    if not rows:
        return pa.table(columns)
    for name in feeds[0]:
        columns["input." + name] = _column([given[name] for given in feeds], rows)
    joined = _raw_outputs(group, answers, rows)
    if joined is not None:
        for name, (values, width) in joined.items():
            columns["output." + name] = _fixed(values, width)
    else:  # typed contents, strings, widths that vary: each answer decoded
        outputs = [_decoded(group, answer, n) for answer, n in zip(answers, rows, strict=True)]
        for name in list(outputs[0]):
            if all(name in answer for answer in outputs):
                columns["output." + name] = _column([answer[name] for answer in outputs], rows)
    return pa.table(columns)


def _request_columns(
    model: LoadedModel, ids: list[str], times: list[int], rows: list[int]
) -> dict[str, Any]:
    """The columns that say which request a row is of: request_id, row, timestamp, model and
    version (a request of ``rows[i]`` rows gives that many)."""
    import pyarrow as pa

    total = sum(rows)
    single = total == len(rows)  # one row per request: nothing to repeat
    stamps = np.array(times, dtype="datetime64[ns]")
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
        "model": pa.repeat(pa.scalar(model.name, pa.string()), total),
        "version": pa.repeat(pa.scalar(model.version_str, pa.string()), total),
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


def _column(parts: list[npt.NDArray[Any]], rows: list[int]) -> Any:
    """One Arrow column from each record's tensor (``rows[i]`` rows each): a plain column for
    one value per row, a fixed-size list for several (a list where the width varies)."""
    import pyarrow as pa

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
    if flat.dtype.kind == "O" or flat.dtype.kind in "SU":
        values = pa.array([_text(v) for v in flat.tolist()])
    else:
        values = pa.array(flat)
    if widths == {1}:
        return values
    if len(widths) == 1:
        return pa.FixedSizeListArray.from_arrays(values, widths.pop())
    assert shaped is not None  # joined tensors share one width
    offsets = np.concatenate([[0], np.cumsum([p.size for p in shaped])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


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


def _fixed(values: npt.NDArray[Any], width: int) -> Any:
    import pyarrow as pa

    array = pa.array(values)
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
