"""Data capture: a sample of the requests a server answered, with their answers, written to
rotating Parquet files off the request path (``serve --capture-dir DIR``; docs/serving.md).

On the request path (:meth:`Capture.offer`, called by the serving core after an answer): the
model version's sampling rate (``--capture-rate``, or ``capture.rate`` in the model's
``config.json``), a decision (deterministic per request id: a hash of it against the rate, so
every process and every replay takes the same requests; random for a request without an id),
and an append to a bounded queue. Nothing there waits, decodes or touches a file: a full queue
drops the record and counts it (``edgewise_capture_dropped_total{model,reason="queue_full"}``).

A writer thread drains the queue every ``flush_seconds`` (or as soon as ``batch_records`` wait),
builds one table per model version (the answers' raw bytes joined per output, not decoded one by
one) and writes it as one complete Parquet file
(:class:`~edgewise.runtime.serving.capture_files.CaptureFolder`: atomic, oldest removed past the
size cap). A writer error is counted (``reason="write_error"``) and logged once; it never
reaches a request. After SIGKILL at most the records not yet written are lost (those queued
since the last write: up to ``flush_seconds`` or ``batch_records`` of them); SIGTERM writes them.

Each row of a file is one row of a request (a request with a batch of 5 gives 5 rows):
``request_id``, ``row``, ``timestamp``, ``model``, ``version``, then ``input.<name>`` for each
decoded input tensor (the feature values the model used) and ``output.<name>`` for each answered
output; a tensor with more than one value per row is a fixed-size list column.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.capture_files import LABELS_FOLDER, CaptureFolder
from edgewise.runtime.serving.codecs import decode_outputs

if TYPE_CHECKING:
    from edgewise.runtime.serving.dataplane import PreparedRequest
    from edgewise.runtime.serving.model import LoadedModel

__all__ = [
    "CHUNK_RECORDS",
    "Capture",
    "CaptureSettings",
    "check_rate",
    "rate_from_config",
    "require_pyarrow",
    "sampled",
]

log = logging.getLogger(__name__)

_HASH_SPACE: Final = 1 << 32
_MASK: Final = _HASH_SPACE - 1
_GOLDEN: Final = 0x9E3779B1  # 2**32 / the golden ratio, odd
#: What the refusal says when pyarrow is missing.
PYARROW_MISSING: Final = (
    "data capture writes Parquet and needs pyarrow: pip install edgewise[data] "
    "(or serve without --capture-dir)"
)


def require_pyarrow() -> None:
    """Import pyarrow (and its Parquet writer) or refuse with one line naming the extra."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InvalidInput(PYARROW_MISSING) from None


def check_rate(rate: float, field: str) -> float:
    """``rate`` if it is a sampling rate (0 to 1), else InvalidInput naming ``field``."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise InvalidInput(f"{field} must be a number from 0 to 1 (a fraction), not {rate!r}")
    return float(rate)


def rate_from_config(section: Mapping[str, Any] | None, default: float, where: str) -> float:
    """The sampling rate a model's ``config.json`` ``capture`` section sets (``{"rate": R}``),
    else ``default``; an unknown key or a bad rate is InvalidInput naming it."""
    if not section:
        return default
    unknown = sorted(set(section) - {"rate"})
    if unknown:
        raise InvalidInput(f"{where}: capture: unknown key {unknown[0]!r} (known: rate)")
    if "rate" not in section:
        return default
    return check_rate(section["rate"], f"{where}: capture.rate")


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is captured at ``rate``: by a hash of its id where it has one (the same
    answer in every process, every time), else at random."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    if request_id:
        # CRC-32 (a tenth of a microsecond; a cryptographic hash costs 30 times more), its bits
        # spread by a Fibonacci multiplier so that the threshold on them is fair.
        mixed = (zlib.crc32(request_id.encode("utf-8", "surrogatepass")) * _GOLDEN) & _MASK
        return mixed < rate * _HASH_SPACE
    return random.random() < rate


@dataclass(frozen=True)
class CaptureSettings:
    folder: Path
    rate: float = 1.0  # the default sampling rate of every model
    max_bytes: int = 1 << 30  # the folder's size cap
    queue_records: int = 10_000  # records waiting for the writer; beyond: dropped
    flush_seconds: float = 5.0  # the writer writes at least this often
    batch_records: int = 5_000  # ... or as soon as this many wait

    def __post_init__(self) -> None:
        check_rate(self.rate, "capture-rate")
        if self.max_bytes < 1:
            raise InvalidInput(f"capture-max-bytes must be at least 1, not {self.max_bytes}")
        if self.queue_records < 1:
            raise InvalidInput(f"capture-queue must be at least 1, not {self.queue_records}")
        if not self.flush_seconds > 0:
            raise InvalidInput(f"capture-flush-seconds must be positive, not {self.flush_seconds}")
        if self.batch_records < 1:
            raise InvalidInput(
                f"capture batch_records must be at least 1, not {self.batch_records}"
            )


class _Record:
    __slots__ = ("prepared", "response", "time_ns")

    def __init__(
        self, time_ns: int, prepared: PreparedRequest, response: pb.ModelInferResponse
    ) -> None:
        self.time_ns = time_ns
        self.prepared = prepared
        self.response = response


class _Labels:
    __slots__ = ("labels", "name", "time_ns")

    def __init__(self, time_ns: int, name: str, labels: Sequence[tuple[str, int, object]]) -> None:
        self.time_ns = time_ns
        self.name = name
        self.labels = labels


class CaptureMetrics:
    """The capture's counters and gauges, on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.captured = Counter(
            "edgewise_capture_records",
            "Requests sampled for capture and queued for the writer, by model.",
            ["model"],
            registry=registry,
        )
        self.written = Counter(
            "edgewise_capture_written_records",
            "Captured requests written to Parquet files, by model.",
            ["model"],
            registry=registry,
        )
        self.dropped = Counter(
            "edgewise_capture_dropped",
            "Captured requests lost, by model and reason: queue_full (the writer fell behind; "
            "the request was answered), write_error (a file could not be written).",
            ["model", "reason"],
            registry=registry,
        )
        self.written_bytes = Counter(
            "edgewise_capture_written_bytes",
            "Bytes of Parquet files written by the capture.",
            registry=registry,
        )
        self.labels = Counter(
            "edgewise_capture_labels",
            "Feedback labels written to the capture folder, by model.",
            ["model"],
            registry=registry,
        )
        self.removed = Counter(
            "edgewise_capture_files_removed",
            "Capture files removed, oldest first, to keep the folder under its size cap.",
            registry=registry,
        )
        self.files = Gauge(
            "edgewise_capture_files", "Complete files in the capture folder.", registry=registry
        )
        self.folder_bytes = Gauge(
            "edgewise_capture_folder_bytes",
            "Bytes of the files in the capture folder.",
            registry=registry,
        )


class Capture:
    """The sampler, the bounded queue and the writer thread of one server process (see the
    module's docstring). ``rate_of(model)``: a model's sampling rate (its ``config.json``'s,
    else the default), asked once per loaded version. ``folder``: where files go (default: a
    :class:`CaptureFolder` on ``settings.folder``; a test may give its own)."""

    def __init__(
        self,
        settings: CaptureSettings,
        registry: CollectorRegistry,
        rate_of: Callable[[str], float] | None = None,
        folder: CaptureFolder | None = None,
    ) -> None:
        require_pyarrow()
        self.settings = settings
        self.metrics = CaptureMetrics(registry)
        self.rate_of = rate_of if rate_of is not None else (lambda _name: settings.rate)
        if folder is None:
            folder = CaptureFolder(settings.folder, settings.max_bytes, self._folder_changed)
        else:
            folder.on_change = self._folder_changed
            self._folder_changed(len(folder.files), folder.bytes, 0)
        self.folder = folder
        # id(model) -> (a weak reference to it, its rate): a dictionary look-up by an int on the
        # request path (a WeakKeyDictionary's costs ten times more); unloaded versions pruned.
        self._rates: dict[int, tuple[weakref.ref[LoadedModel], float]] = {}
        self._queue: deque[_Record | _Labels] = deque()
        self._limit = settings.queue_records
        self._batch = settings.batch_records
        self._wake = threading.Event()
        self._stopping = False
        self._failed = False  # a write failed and was logged (later ones are counted only)
        self._captured: dict[str, Any] = {}  # model -> its captured counter
        self._full: dict[str, Any] = {}  # model -> its queue_full counter
        self._idle = threading.Condition()
        self._busy = 0  # records taken from the queue and not yet written or dropped
        self._thread = threading.Thread(target=self._run, name="edgewise-capture", daemon=True)
        self._thread.start()

    # ---- the request path ----------------------------------------------------------------------

    def offer(self, prepared: PreparedRequest, response: pb.ModelInferResponse) -> None:
        """After an answer: sample it and queue it for the writer, or drop it if the queue is
        full (counted). Never raises for a request; never waits; copies nothing (the decoded
        inputs and the answer are only referenced)."""
        model = prepared.model
        known = self._rates.get(id(model))
        rate = known[1] if known is not None and known[0]() is model else self._rate_for(model)
        if rate <= 0.0 or not sampled(prepared.request_id, rate):
            return
        queue = self._queue
        if len(queue) >= self._limit:
            counter = self._full.get(model.name)
            if counter is None:
                counter = self._full[model.name] = self.metrics.dropped.labels(
                    model.name, "queue_full"
                )
            counter.inc()
            return
        queue.append(_Record(time.time_ns(), prepared, response))
        counter = self._captured.get(model.name)
        if counter is None:
            counter = self._captured[model.name] = self.metrics.captured.labels(model.name)
        counter.inc()
        if len(queue) >= self._batch:
            self._wake.set()

    def _rate_for(self, model: LoadedModel) -> float:
        try:
            rate = self.rate_of(model.name)
        except Exception as exc:  # a config.json changed since start-up: off, said once
            log.error("capture of model %s version %s is off: %s", model.name, model.version, exc)
            rate = 0.0
        for key, (ref, _) in list(self._rates.items()):
            if ref() is None:  # an unloaded version's (two request threads may both see it)
                self._rates.pop(key, None)
        self._rates[id(model)] = (weakref.ref(model), rate)
        return rate

    def record_labels(self, model: str, labels: Sequence[tuple[str, int, object]]) -> None:
        """Feedback labels ``(request_id, row, label)`` a server took: written beside the
        model's captured requests, for ``edgewise capture export --labelled`` to join. Dropped
        (counted) when the queue is full, like a request."""
        if not labels:
            return
        if len(self._queue) >= self._limit:
            self.metrics.dropped.labels(model, "queue_full").inc(len(labels))
            return
        self._queue.append(_Labels(time.time_ns(), model, list(labels)))
        self._wake.set()

    # ---- the writer ----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wake the writer and wait until everything queued so far is written (or dropped);
        False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()
        with self._idle:
            while self._queue or self._busy:
                self._wake.set()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer (a server's stop)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.flush_seconds)
            self._wake.clear()
            stopping = self._stopping
            taken: list[_Record | _Labels] = []
            with self._idle:
                queue = self._queue
                while queue:
                    taken.append(queue.popleft())
                self._busy = len(taken)
            try:
                if taken:
                    self._write(taken)
            finally:
                with self._idle:
                    self._busy = 0
                    self._idle.notify_all()
            if stopping and not self._queue:
                return

    def _write(self, taken: list[_Record | _Labels]) -> None:
        # One file per model version and choice of outputs (the same columns throughout).
        groups: dict[tuple[str, str, tuple[str, ...] | None], list[_Record]] = {}
        labels: dict[str, list[_Labels]] = {}
        for item in taken:
            if isinstance(item, _Record):
                prepared = item.prepared
                model = prepared.model
                chosen = None if prepared.outputs is None else tuple(prepared.outputs)
                groups.setdefault((model.name, model.version_str, chosen), []).append(item)
            else:
                labels.setdefault(item.name, []).append(item)
        for (name, version, _), records in groups.items():
            try:
                tables = _tables(records)
            except Exception as exc:  # a record the writer cannot turn into columns
                self._write_failed(name, len(records), exc)
                continue
            for table, count in tables:
                try:
                    stored = self.folder.write(f"{name}/{version}", table)
                except Exception as exc:
                    self._write_failed(name, count, exc)
                    continue
                self.metrics.written.labels(name).inc(count)
                self.metrics.written_bytes.inc(stored.size)
        for name, batches in labels.items():
            count = sum(len(batch.labels) for batch in batches)
            try:
                stored = self.folder.write(f"{name}/{LABELS_FOLDER}", labels_table(batches))
            except Exception as exc:
                self._write_failed(name, count, exc)
                continue
            self.metrics.labels.labels(name).inc(count)
            self.metrics.written_bytes.inc(stored.size)

    def _write_failed(self, name: str, count: int, exc: Exception) -> None:
        self.metrics.dropped.labels(name, "write_error").inc(count)
        if not self._failed:
            self._failed = True
            log.error(
                "capture: writing %d record(s) of model %s failed: %s (later failures are "
                'counted in edgewise_capture_dropped_total{reason="write_error"}, not logged)',
                count,
                name,
                exc,
            )

    def _folder_changed(self, files: int, size: int, removed: int) -> None:
        self.metrics.files.set(files)
        self.metrics.folder_bytes.set(size)
        if removed:
            self.metrics.removed.inc(removed)


# ---- tables ------------------------------------------------------------------------------------


def _rows(prepared: PreparedRequest) -> int:
    """A request's rows: its batch size (1 for a request whose tensors have no dimension)."""
    if prepared.rows:
        return prepared.rows
    return 0 if any(a.ndim and a.shape[0] == 0 for a in prepared.feeds.values()) else 1


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


#: Records turned into Arrow at a time by the writer, which then lets the request threads have
#: the GIL (time.sleep(0)): a flush of thousands of records never holds it for long.
CHUNK_RECORDS: Final = 256


def _tables(records: list[_Record]) -> list[tuple[Any, int]]:
    """The tables to write for ``records`` (one model version, one choice of outputs) and how
    many records each holds: one table, built a chunk at a time; a chunk whose columns differ
    from the others' (a tensor whose width varies) makes the chunks separate files. A chunk
    that cannot be built is an error for the writer to count."""
    import pyarrow as pa

    chunks = []
    for start in range(0, len(records), CHUNK_RECORDS):
        part = records[start : start + CHUNK_RECORDS]
        chunks.append((records_table(part), len(part)))
        time.sleep(0)  # the request threads take the GIL between chunks
    if len(chunks) == 1:
        return chunks
    try:
        return [(pa.concat_tables([t for t, _ in chunks]), len(records))]
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return chunks


def records_table(records: list[_Record]) -> Any:
    """The Arrow table of records of one model version with one choice of outputs (see the
    module's docstring)."""
    import pyarrow as pa

    prepared = [r.prepared for r in records]
    rows = [p.rows for p in prepared]
    if 0 in rows:  # tensors without a batch dimension (one row), or requests of no rows
        records = [r for r, p in zip(records, prepared, strict=True) if _rows(p)]
        prepared = [r.prepared for r in records]
        rows = [_rows(p) for p in prepared]
    total = sum(rows)
    single = total == len(records)  # one row per request: nothing to repeat
    ids = [p.request_id for p in prepared]
    stamps = np.array([r.time_ns for r in records], dtype="datetime64[ns]")
    model = prepared[0].model if prepared else None
    columns: dict[str, Any] = {
        "request_id": pa.array(ids if single else np.repeat(ids, rows).tolist(), pa.string()),
        "row": pa.array(
            np.zeros(total, np.int32)
            if single
            else np.concatenate([np.arange(n, dtype=np.int32) for n in rows])
        ),
        "timestamp": pa.array(
            stamps if single else np.repeat(stamps, rows), pa.timestamp("ns", tz="UTC")
        ),
        "model": pa.array([model.name if model else ""] * total, pa.string()),
        "version": pa.array([model.version_str if model else ""] * total, pa.string()),
    }
    if not records:
        return pa.table(columns)
    inputs = [p.feeds for p in prepared]
    for name in inputs[0]:
        columns["input." + name] = _column([given[name] for given in inputs], rows)
    joined = _raw_outputs(records, rows)
    if joined is not None:
        for name, (values, width) in joined.items():
            columns["output." + name] = _fixed(values, width)
    else:  # typed contents, strings: each answer decoded
        outputs = [decode_outputs(record.response) for record in records]
        for name in list(outputs[0]):
            if all(name in answer for answer in outputs):
                columns["output." + name] = _column([answer[name] for answer in outputs], rows)
    return pa.table(columns)


def _fixed(values: npt.NDArray[Any], width: int) -> Any:
    import pyarrow as pa

    array = pa.array(values)
    return array if width == 1 else pa.FixedSizeListArray.from_arrays(array, width)


def _raw_outputs(
    records: list[_Record], rows: list[int]
) -> dict[str, tuple[npt.NDArray[Any], int]] | None:
    """Every answer's outputs at once where all are raw and numeric: one join of their bytes
    per output instead of decoding each answer. The records share a model version and a choice
    of outputs, so their outputs have the same names and datatypes in the same order (checked
    on the first); each answer's size is checked against its rows. None where one does not fit."""
    first = records[0].response
    layout = [(o.name, o.datatype) for o in first.outputs]
    if any(datatype not in DATATYPE_TO_NUMPY or datatype == BYTES for _, datatype in layout):
        return None
    count = len(layout)
    contents = [r.response.raw_output_contents for r in records]
    if any(len(raw) != count for raw in contents):
        return None  # typed contents
    expected_rows = np.array(rows, dtype=np.int64)
    out: dict[str, tuple[npt.NDArray[Any], int]] = {}
    for k, (name, datatype) in enumerate(layout):
        dtype = np.dtype(DATATYPE_TO_NUMPY[datatype])
        chunks = [raw[k] for raw in contents]
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


def labels_table(batches: list[_Labels]) -> Any:
    """The Arrow table of feedback labels: request_id, row, label (as text) and label_type
    (int, float or str: how ``edgewise capture export`` reads it back), timestamp."""
    import pyarrow as pa

    ids: list[str] = []
    rows: list[int] = []
    texts: list[str] = []
    kinds: list[str] = []
    times: list[int] = []
    for batch in batches:
        for request_id, row, given in batch.labels:
            ids.append(request_id)
            rows.append(row)
            kind, text = _label_text(given)
            texts.append(text)
            kinds.append(kind)
            times.append(batch.time_ns)
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
