"""Data capture: a sample of the requests a server answered, with their answers, written to
rotating Parquet files off the request path (``serve --capture-dir DIR``; docs/serving.md).

On the request path (:meth:`Capture.offer`, called by the serving core after an answer): the
model version's sampling rate (``--capture-rate``, or ``capture.rate`` in the model's
``config.json``), a decision (deterministic per request id: a hash of it against the rate, so
every process and every replay takes the same requests; random for a request without an id),
and one tuple appended to a bounded queue: the decoded inputs by reference, and a raw numeric
answer's bytes (one per output) rather than the response message, so that a queued record holds
a few hundred bytes, not the request's and answer's objects. Nothing there waits, decodes,
converts or touches a file: a full queue drops the record and counts it
(``edgewise_capture_dropped_total{model,reason="queue_full"}``).

A shipper thread takes the queue every ``flush_seconds`` (or as soon as ``batch_records``
wait), groups it by model version and choice of outputs, turns each group into plain columns
(:func:`~edgewise.runtime.serving.capture_tables.encode`: numpy, a chunk of records per call, the
tensors' and answers' bytes joined at once) and sends them to the capture's writer process
(:mod:`~edgewise.runtime.serving.capture_process`,
:mod:`~edgewise.runtime.serving.capture_writer`), which builds the Arrow tables and writes each
as one complete Parquet file (atomic, oldest removed past the size cap): Arrow and Parquet never
take the serving process's GIL. The writer's reports move the metrics here. A write error is
counted (``reason="write_error"``) and logged once; a writer process that dies is counted
(``reason="writer_exited"``) and replaced at the next flush (writers that exit in a row before
finishing a frame after a back-off of up to a minute); neither reaches a request. The
queue's bound (``queue_records`` and ``queue_bytes``: a full queue drops, counted as
``queue_full``) counts the records the shipper has taken and not yet sent too, so that it
bounds the capture's memory and what a crash loses: after SIGKILL of the server, the records
not yet sent, at most ``queue_records`` (the writer writes what it had received, then exits).
A stop (:meth:`Capture.close`) writes them all, unless the writer takes longer than its timeout:
then the writer is killed and what it had not written is counted (``reason="stopped"``).

The columns of a file: see :mod:`~edgewise.runtime.serving.capture_tables`.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.capture_process import WriterProcess
from edgewise.runtime.serving.capture_tables import Group, Record, encode

if TYPE_CHECKING:
    from edgewise.runtime.serving.dataplane import PreparedRequest
    from edgewise.runtime.serving.model import LoadedModel

__all__ = [
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
    """Refuse with one line naming the extra unless pyarrow is installed. Found, not imported:
    a serving process leaves Arrow and Parquet to its capture's writer process and never loads
    them (tens of megabytes); the readers import it when they read."""
    try:
        found = importlib.util.find_spec("pyarrow") is not None
    except ValueError:  # a module whose spec is unset: not an installed pyarrow
        found = False
    if not found:
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
    queue_bytes: int = 64 << 20  # ... and their bytes (inputs and answers); beyond: dropped
    flush_seconds: float = 5.0  # the writer writes at least this often
    batch_records: int = 5_000  # ... or as soon as this many wait

    def __post_init__(self) -> None:
        check_rate(self.rate, "capture-rate")
        if self.max_bytes < 1:
            raise InvalidInput(f"capture-max-bytes must be at least 1, not {self.max_bytes}")
        if self.queue_records < 1:
            raise InvalidInput(f"capture-queue must be at least 1, not {self.queue_records}")
        if self.queue_bytes < 1:
            raise InvalidInput(f"capture-queue-bytes must be at least 1, not {self.queue_bytes}")
        if not self.flush_seconds > 0:
            raise InvalidInput(f"capture-flush-seconds must be positive, not {self.flush_seconds}")
        if self.batch_records < 1:
            raise InvalidInput(
                f"capture batch_records must be at least 1, not {self.batch_records}"
            )


_NBYTES: Final = attrgetter("nbytes")
#: The longest wait before another writer process replaces one that exited before writing.
RESTART_BACKOFF_MAX: Final = 60.0

#: The first item of a queued tuple of feedback labels: (_LABELS, time_ns, model, labels).
_LABELS: Final = object()


class _Model:
    """What the request path keeps per served model version: a weak reference to it (an
    unloaded version is pruned), its sampling rate, its groups (one per choice of outputs,
    made from its first captured answer) and its counters."""

    __slots__ = ("captured", "chosen", "full", "group", "rate", "ref")

    def __init__(self, model: LoadedModel, rate: float, metrics: CaptureMetrics) -> None:
        self.ref = weakref.ref(model)
        self.rate = rate
        self.group: Group | None = None  # every output answered
        self.chosen: dict[tuple[str, ...], Group] = {}  # the outputs a request named
        if rate > 0.0:
            self.captured = metrics.captured.labels(model.name)
            self.full = metrics.dropped.labels(model.name, "queue_full")

    def group_for(
        self, model: LoadedModel, outputs: list[str] | None, response: pb.ModelInferResponse
    ) -> Group:
        if outputs is None:
            if self.group is None:
                self.group = Group(model, None, response)
            return self.group
        chosen = tuple(outputs)
        group = self.chosen.get(chosen)
        if group is None:
            group = self.chosen[chosen] = Group(model, chosen, response)
        return group


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
            "the request was answered), write_error (a file could not be written), "
            "writer_exited (the writer process died before writing them), stopped (the server "
            "stopped and the writer did not write them in time: killed).",
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
        self.writer_cpu = Counter(
            "edgewise_capture_writer_cpu_seconds",
            "CPU time of the capture's writer process (Arrow and Parquet; not in the server's "
            "own process_cpu_seconds_total), as it reports after each file.",
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
    """The sampler, the bounded queue, the shipper thread and the writer process of one server
    process (see the module's docstring). ``rate_of(model)``: a model's sampling rate (its
    ``config.json``'s, else the default), asked once per loaded version."""

    def __init__(
        self,
        settings: CaptureSettings,
        registry: CollectorRegistry,
        rate_of: Callable[[str], float] | None = None,
    ) -> None:
        require_pyarrow()
        self.settings = settings
        self.metrics = CaptureMetrics(registry)
        self.rate_of = rate_of if rate_of is not None else (lambda _name: settings.rate)
        # id(model) -> what the request path keeps for it: a dictionary look-up by an int (a
        # WeakKeyDictionary's costs ten times more); unloaded versions pruned.
        self._models: dict[int, _Model] = {}
        # Captured requests (Record tuples) and feedback labels ((_LABELS, ...) tuples).
        self._queue: deque[tuple[Any, ...]] = deque()
        self._limit = settings.queue_records
        self._bytes_limit = settings.queue_bytes
        # The bytes of the queued records (inputs and answers), and of those the shipper holds.
        # Added to by request threads without a lock (a lost update is rare and small) and reset
        # as the shipper takes the queue: an error never outlives a flush.
        self._queued_bytes = 0
        self._held_bytes = 0
        self._batch = settings.batch_records
        self._wake = threading.Event()
        self._stopping = False
        self._failed = False  # a write failed and was logged (later ones are counted only)
        self._restarted = False  # a writer process exited and was replaced (said once)
        # Writers that exited in a row without finishing a frame (a folder that became
        # unusable: each would import pyarrow to fail again), and when the next may start.
        self._exits = 0
        self._restart_at = 0.0
        self._oversize = False  # a file larger than the cap was written (said once)
        self._idle = threading.Condition()
        self._busy = 0  # records taken from the queue and not yet sent or dropped
        self._abandoned = False  # close() gave up waiting and killed the writer
        self._stopped = 0  # records counted lost as "stopped"
        self._writer = self._start_writer()
        self._thread = threading.Thread(target=self._run, name="edgewise-capture", daemon=True)
        self._thread.start()

    @property
    def writer_pid(self) -> int:
        """The writer process's id (its CPU is the capture's too)."""
        return self._writer.pid

    # ---- the request path ----------------------------------------------------------------------

    def offer(self, prepared: PreparedRequest, response: pb.ModelInferResponse) -> None:
        """After an answer: sample it and queue it for the writer, or drop it if the queue is
        full (counted). Never raises for a request; never waits; converts nothing: the decoded
        inputs are referenced, a raw numeric answer's bytes are taken from the response (which
        is not kept), any other answer is referenced."""
        model = prepared.model
        entry = self._models.get(id(model))
        if entry is None or entry.ref() is not model:
            entry = self._entry_for(model)
        rate = entry.rate
        if rate < 1.0 and (rate <= 0.0 or not sampled(prepared.request_id, rate)):
            return
        queue = self._queue
        # What the shipper holds (taken, not yet sent) counts too: the bound is on all the
        # records and bytes a stop or a SIGKILL can lose.
        if (
            len(queue) + self._busy >= self._limit
            or self._queued_bytes + self._held_bytes >= self._bytes_limit
        ):
            entry.full.inc()
            return
        feeds = prepared.feeds
        outputs = prepared.outputs
        group = entry.group if outputs is None else entry.chosen.get(tuple(outputs))
        if group is None:
            group = entry.group_for(model, outputs, response)
        # A raw numeric answer's bytes, one per output (the response is not kept: its message
        # and arena weigh more than its values); else the response.
        answer: list[bytes] | pb.ModelInferResponse
        if prepared.raw and group.numeric:
            answer = list(response.raw_output_contents)
            size = sum(map(len, answer))
        else:
            answer = response
            size = response.ByteSize()
        self._queued_bytes += size + sum(map(_NBYTES, feeds.values()))
        queue.append((group, time.time_ns(), prepared.request_id, prepared.rows, feeds, answer))
        entry.captured.inc()
        if len(queue) >= self._batch:
            self._wake.set()

    def rate_for(self, model: LoadedModel) -> float:
        """The sampling rate of a served model version (0: not captured): what a front end that
        samples its calls itself (the native fast path) samples at, by :func:`sampled`'s rule."""
        entry = self._models.get(id(model))
        if entry is None or entry.ref() is not model:
            entry = self._entry_for(model)
        return entry.rate

    def offer_sampled(
        self,
        model: LoadedModel,
        outputs: tuple[str, ...] | None,
        layout: tuple[tuple[str, str], ...],
        records: Sequence[tuple[int, str, int, dict[str, Any], list[bytes]]],
        dropped: int = 0,
    ) -> None:
        """Calls answered and sampled elsewhere (the native fast path: at :meth:`rate_for`, by
        :func:`sampled`'s rule), in a batch: each ``(time_ns, request_id, rows, feeds,
        answer)``, ``answer`` the raw bytes of each output of ``layout`` (``(name, datatype)``
        in answer order; ``outputs`` the names the calls asked for, None: all), queued as
        :meth:`offer` queues a raw numeric answer, so that the writer writes them alike. Those
        past the queue's bound, and ``dropped`` ones the caller could not keep, are counted as
        ``queue_full``. Never raises for a request's sake; never waits."""
        entry = self._models.get(id(model))
        if entry is None or entry.ref() is not model:
            entry = self._entry_for(model)
        if entry.rate <= 0.0:
            return
        if dropped:
            entry.full.inc(dropped)
        if not records:
            return
        group = entry.group if outputs is None else entry.chosen.get(outputs)
        if group is None:
            described = pb.ModelInferResponse(
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype)
                    for name, datatype in layout
                ]
            )
            group = entry.group_for(model, None if outputs is None else list(outputs), described)
        queue = self._queue
        room = min(
            len(records),
            max(0, self._limit - len(queue) - self._busy),
        )
        size = 0
        taken = 0
        now_bytes = self._queued_bytes + self._held_bytes
        for time_ns, request_id, rows, feeds, answer in records[:room]:
            if now_bytes + size >= self._bytes_limit:
                break
            size += sum(map(len, answer)) + sum(map(_NBYTES, feeds.values()))
            queue.append((group, time_ns, request_id, rows, feeds, answer))
            taken += 1
        self._queued_bytes += size
        if taken:
            entry.captured.inc(taken)
        if taken < len(records):
            entry.full.inc(len(records) - taken)
        if len(queue) >= self._batch:
            self._wake.set()

    def _entry_for(self, model: LoadedModel) -> _Model:
        try:
            rate = self.rate_of(model.name)
        except Exception as exc:  # a config.json changed since start-up: off, said once
            log.error("capture of model %s version %s is off: %s", model.name, model.version, exc)
            rate = 0.0
        for key, known in list(self._models.items()):
            if known.ref() is None:  # an unloaded version's (two request threads may both see it)
                self._models.pop(key, None)
        entry = self._models[id(model)] = _Model(model, rate, self.metrics)
        return entry

    def record_labels(self, model: str, labels: Sequence[tuple[str, int, object]]) -> None:
        """Feedback labels ``(request_id, row, label)`` a server took: written beside the
        model's captured requests, for ``edgewise capture export --labelled`` to join. Dropped
        (counted) when the queue is full, like a request."""
        if not labels:
            return
        if len(self._queue) + self._busy >= self._limit:
            self.metrics.dropped.labels(model, "queue_full").inc(len(labels))
            return
        self._queue.append((_LABELS, time.time_ns(), model, list(labels)))
        self._wake.set()

    # ---- the shipper and the writer process ------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wake the shipper and wait until everything queued so far is written (or dropped);
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
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._writer.wait_done(left)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the shipper and the writer process (a server's
        stop). If that takes longer than ``timeout`` (the writer is behind: a stalled disk, a
        hung write), the writer process is killed and every record not yet written, sent or
        still queued, is counted lost (``reason="stopped"``) and logged."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        self._abandoned = True  # the shipper counts what it holds rather than send it
        self._writer.abort(timeout)  # a send blocked on its pipe fails at once
        self._thread.join(timeout)
        with self._idle:
            left = list(self._queue)
            self._queue.clear()
        self._count(left, "stopped")
        log.error(
            "capture: the writer did not finish within %gs of the stop: killed; %d captured "
            'record(s) never written (edgewise_capture_dropped_total{reason="stopped"})',
            timeout,
            self._stopped,
        )

    def _count(self, items: Sequence[tuple[Any, ...]], reason: str) -> None:
        """Count queued items (records and labels) lost, per model."""
        lost: dict[str, int] = {}
        for item in items:
            if item[0] is _LABELS:
                lost[item[2]] = lost.get(item[2], 0) + len(item[3])
            else:
                lost[item[0].name] = lost.get(item[0].name, 0) + 1
        for name, count in lost.items():
            self._lost(name, count, reason)

    def _start_writer(self) -> WriterProcess:
        return WriterProcess(
            self.settings.folder, self.settings.max_bytes, self._reported, self._lost
        )

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.flush_seconds)
            self._wake.clear()
            stopping = self._stopping
            taken: list[tuple[Any, ...]] = []
            with self._idle:
                queue = self._queue
                while queue:
                    taken.append(queue.popleft())
                self._busy = len(taken)
                self._held_bytes = self._queued_bytes
                self._queued_bytes = 0
            try:
                if taken:
                    self._ship(taken)
            except Exception as exc:  # never let the shipper die: what it held is counted
                log.exception("capture: shipping %d record(s) failed: %s", len(taken), exc)
            finally:
                del taken  # the records' arrays, before the requests may queue more
                with self._idle:
                    self._busy = 0
                    self._held_bytes = 0
                    self._idle.notify_all()
            if stopping and not self._queue:
                break
        self._writer.close()

    def _ship(self, taken: list[tuple[Any, ...]]) -> None:
        """Turn what was taken into frames (one per group: model version and choice of outputs,
        the same columns throughout; one per model's labels) and send them to the writer."""
        if self._abandoned:  # the server stopped and the writer was killed: counted
            self._count(taken, "stopped")
            return
        writer = self._writer
        if writer.dead:  # it exited (killed, out of memory): counted, said once, started again
            restarted = self._restart(writer)
            if restarted is None:  # backing off: what was taken is lost
                self._count(taken, "writer_exited")
                return
            writer = restarted
        groups: dict[Group, list[Record]] = {}
        labels: dict[str, list[tuple[int, Sequence[tuple[str, int, object]]]]] = {}
        # The queue holds long runs of one group, taken a run at a time.
        for key, run in groupby(taken, key=itemgetter(0)):
            if key is _LABELS:
                for _, time_ns, name, given in run:
                    labels.setdefault(name, []).append((time_ns, given))
            else:
                groups.setdefault(key, []).extend(run)
        for group, records in groups.items():
            name = group.name
            try:
                batch = encode(group, records)
            except Exception as exc:  # a record the shipper cannot turn into columns
                self._lost(name, len(records), "write_error", str(exc))
                continue
            del records[:]  # the requests' arrays are not needed any more
            writer.send(("records", batch), name, batch["records"])
        for name, batches in labels.items():
            count = sum(len(batch) for _, batch in batches)
            writer.send(("labels", name, batches), name, count)

    def _restart(self, dead: WriterProcess) -> WriterProcess | None:
        """Another writer in place of ``dead``, or None while backing off: the first exit is
        replaced at once; writers that exit in a row without finishing a frame are replaced
        after 1, 2, 4 ... up to :data:`RESTART_BACKOFF_MAX` seconds."""
        if dead.finished:  # it wrote before it died: not a writer that cannot start
            self._exits = 0
            self._restart_at = 0.0
        now = time.monotonic()
        if now < self._restart_at:
            return None
        if not self._restarted:
            self._restarted = True
            log.error(
                "capture: the writer process exited (exit status %s): starting another (later "
                'exits are counted in edgewise_capture_dropped_total{reason="writer_exited"}; '
                "writers that exit before writing are restarted at most every %gs)",
                dead.exit_code,
                RESTART_BACKOFF_MAX,
            )
        self._exits += 1
        self._restart_at = now + min(RESTART_BACKOFF_MAX, 2.0 ** (self._exits - 1))
        self._writer = self._start_writer()
        return self._writer

    def _reported(self, report: dict[str, Any]) -> None:
        """A report of the writer process (on its reader thread): the metrics it moves."""
        if "oversize" in report and not self._oversize:
            self._oversize = True
            log.warning(
                "capture: a file of %d bytes is larger than the folder's size cap "
                "(--capture-max-bytes %d) and was removed as soon as written (its records count "
                "in edgewise_capture_written_records_total, the file in "
                "edgewise_capture_files_removed_total); raise the cap",
                report["bytes"],
                report["oversize"],
            )
        if "written" in report:
            self.metrics.written.labels(report["written"]).inc(report["records"])
            self.metrics.written_bytes.inc(report["bytes"])
        elif "labels" in report:
            self.metrics.labels.labels(report["labels"]).inc(report["records"])
            self.metrics.written_bytes.inc(report["bytes"])
        elif "failed" in report:
            self._lost(report["failed"], report["records"], "write_error", report["error"])
        elif "folder" in report:
            files, size, removed = report["folder"]
            self.metrics.files.set(files)
            self.metrics.folder_bytes.set(size)
            if removed:
                self.metrics.removed.inc(removed)
        elif "cpu" in report:
            self.metrics.writer_cpu.inc(report["cpu"])
        elif "fatal" in report:
            log.error("capture: %s", report["fatal"])

    def _lost(self, name: str, count: int, reason: str, error: str = "") -> None:
        self.metrics.dropped.labels(name, reason).inc(count)
        if reason == "stopped":  # logged by close() with their total
            self._stopped += count
            return
        if not self._failed:
            self._failed = True
            log.error(
                "capture: %d record(s) of model %s lost (%s)%s (later losses are counted in "
                "edgewise_capture_dropped_total{reason=...}, not logged)",
                count,
                name,
                reason,
                f": {error}" if error else "",
            )
