"""The local engine: a reader thread, scorer threads and a writer thread joined by bounded queues.

::

    reader ──(chunks)──> scorers (N threads) ──(part tables)──> writer
    pyarrow decode        inputs, onnxruntime,                  Parquet encode, fsync,
                          monitor (all GIL-free                 rename, journal
                          in their heavy parts)

The queues hold at most ``N + 1`` chunks each, so memory is bounded by about ``3N + 3`` chunks
whatever the input's size, and the reader waits when the scorers fall behind. onnxruntime, the
pyarrow readers and writers and the monitor's kernels release the GIL, so the stages overlap.

The first error on any thread stops every thread and is raised from :func:`run_local`;
chunks finished before it stay finished (journaled), so ``--resume`` carries on from there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from edgewise.runtime.batch.badrecords import (
    features_name,
    malformed_name,
    rows_name,
    write_bad_records,
)
from edgewise.runtime.batch.compact import GroupWriter
from edgewise.runtime.batch.plan import EngineResult, JobPlan
from edgewise.runtime.batch.progress import Progress
from edgewise.runtime.batch.reader import ChunkReader
from edgewise.runtime.batch.scoring import chunk_inputs, score_chunk
from edgewise.runtime.batch.stats import ChunkWindow, DriftCollector
from edgewise.runtime.batch.writer import ChunkRecord, write_part
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.model import LoadedModel

__all__ = ["run_local"]

_POLL: Final = 0.1
T = TypeVar("T")


class _Stopped(Exception):
    """Another thread failed (or the run was interrupted): leave quietly."""


@dataclass
class _Chunk:
    seq: int  # the chunk's place in input order (grouped output writes in that order)
    file: int
    index: int
    table: Any
    last: bool
    bytes_read: int
    done: bool  # finished by an earlier run: observed for the report, not scored again


@dataclass
class _Scored:
    seq: int
    file: int
    index: int
    rows: int
    last: bool
    bytes_read: int
    output: Any | None  # the part file table (None for an earlier run's chunk)
    window: ChunkWindow | None


_END: Final = object()


class _Run:
    def __init__(
        self,
        plan: JobPlan,
        model: LoadedModel,
        collector: DriftCollector | None,
        progress: Progress,
        threads: int,
    ) -> None:
        self.plan = plan
        self.model = model
        self.collector = collector
        self.progress = progress
        self.threads = threads
        self.chunks: queue.Queue[Any] = queue.Queue(maxsize=threads + 1)
        self.scored: queue.Queue[Any] = queue.Queue(maxsize=threads + 1)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._error_lock = threading.Lock()
        self.rows_scored = 0
        self.chunks_scored = 0
        self.file_chunks: dict[int, int] = {}
        # Grouped output (:mod:`.compact`) writes chunks in input order: the writer holds those
        # that arrive early, and this bounds how many chunks are between reader and writer.
        self.grouped = plan.layout.grouped
        self.in_flight = threading.Semaphore(3 * threads + 3)
        self.seq = 0

    # ---- plumbing ----------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._error_lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def _put(self, target: queue.Queue[Any], item: object) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                target.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _get(self, source: queue.Queue[Any]) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return source.get(timeout=_POLL)
            except queue.Empty:
                continue

    def _thread(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            try:
                body()
            except _Stopped:
                pass
            except BaseException as exc:
                self._fail(exc)

        return threading.Thread(target=target, name=f"edgewise-batch-{name}", daemon=True)

    # ---- stages ------------------------------------------------------------------------------

    def read(self) -> None:
        plan = self.plan
        for number, file in enumerate(plan.files):
            done = plan.done_chunks(number)
            known = file.chunk_count(plan.chunk_rows)
            if known is not None and len(done) == known and self.collector is None:
                self.progress.file_done(number)
                continue  # every chunk finished earlier and no report to feed: skip the file
            first = 0
            if self.collector is None and known is not None:
                first = min(set(range(known)) - done)
            reader = ChunkReader(
                file,
                plan.read_columns or plan.columns,
                plan.chunk_rows,
                tolerant=plan.bad_records is not None,
            )
            count = first
            for raw in reader.chunks(first):
                if raw.bad and plan.bad_records is not None:  # before the chunk's part file
                    write_bad_records(plan.bad_records, rows_name(number, raw.index), raw.bad)
                if self.grouped:
                    self._acquire()
                self._put(
                    self.chunks,
                    _Chunk(
                        self.seq,
                        number,
                        raw.index,
                        raw.table,
                        raw.last,
                        raw.bytes_read,
                        raw.index in done,
                    ),
                )
                self.seq += 1
                count = raw.index + 1
            if reader.malformed and plan.bad_records is not None:
                write_bad_records(plan.bad_records, malformed_name(number), reader.malformed)
            self.file_chunks[number] = count
            if self.collector is not None:
                self.collector.file_chunks(number, count)
        for _ in range(self.threads):
            self._put(self.chunks, _END)

    def score(self) -> None:
        plan = self.plan
        while True:
            item = self._get(self.chunks)
            if item is _END:
                self._put(self.scored, _END)
                return
            chunk: _Chunk = item
            window = None
            output = None
            feeds = None
            if plan.join is not None and (self.collector is not None or not chunk.done):
                chunk.table = self._join(chunk)
            if self.collector is not None or not chunk.done:
                feeds = chunk_inputs(self.model.manifest, plan.columns, chunk.table)
                results = None
                if not chunk.done:
                    results = self.model.run(feeds)
                    output = score_chunk(
                        self.model, plan.columns, plan.schema, chunk.table, feeds, results
                    )
                if self.collector is not None:  # inputs and outputs (prediction drift)
                    window = self.collector.observe(feeds, results, self.model)
                del results
            scored = _Scored(
                chunk.seq,
                chunk.file,
                chunk.index,
                chunk.table.num_rows,
                chunk.last,
                chunk.bytes_read,
                output,
                window,
            )
            del chunk, item, feeds  # the input rows are not needed past this point
            self._put(self.scored, scored)

    def _acquire(self) -> None:
        while not self.in_flight.acquire(timeout=_POLL):
            if self.stop.is_set():
                raise _Stopped

    def _join(self, chunk: _Chunk) -> Any:
        """The chunk with its looked-up features joined (:mod:`.features`); rows without a
        value (``not_found``) go to --bad-records, or fail the job."""
        plan = self.plan
        path = plan.files[chunk.file].path
        table, bad = plan.join.join(chunk.table, plan.columns, path, chunk.index * plan.chunk_rows)
        if bad and not chunk.done:
            if plan.bad_records is None:
                raise InvalidInput(
                    f"{path}: row {bad[0]['row']}: {bad[0]['reason']} (--bad-records PATH sets "
                    "such rows aside)"
                )
            write_bad_records(plan.bad_records, features_name(chunk.file, chunk.index), bad)
        return table

    def write(self) -> None:
        if self.grouped:
            self._write_grouped()
            return
        plan = self.plan
        ended = 0
        while ended < self.threads:
            item = self._get(self.scored)
            if item is _END:
                ended += 1
                continue
            result: _Scored = item
            rows = result.rows
            if result.output is not None:
                size = write_part(plan.out, result.file, result.index, result.output)
                plan.folder.record(ChunkRecord(result.file, result.index, rows, size, result.last))
                self._written(result)
            else:
                self.progress.seen(result.file, result.bytes_read)
            self._observed(result)

    def _written(self, result: _Scored) -> None:
        self.rows_scored += result.rows
        self.chunks_scored += 1
        self.progress.advance(result.rows, result.file, result.bytes_read)

    def _observed(self, result: _Scored) -> None:
        if result.last:
            self.progress.file_done(result.file)
        if self.collector is not None and result.window is not None:
            self.collector.add(result.file, result.index, result.window)

    def _write_grouped(self) -> None:
        """Chunks in input order into grouped parts (:mod:`.compact`); rows count as written
        when their group is committed."""
        plan = self.plan
        writer = GroupWriter(
            plan.out, plan.schema, plan.layout, plan.chunk_rows, plan.folder.commit_group
        )
        early: dict[int, _Scored] = {}
        uncommitted: list[_Scored] = []
        next_seq = 0
        ended = 0
        try:
            while ended < self.threads or early:
                if next_seq not in early:
                    item = self._get(self.scored)
                    if item is _END:
                        ended += 1
                    else:
                        early[item.seq] = item
                    continue
                result = early.pop(next_seq)
                next_seq += 1
                if result.output is not None:
                    groups = writer.groups
                    writer.add(result.file, result.index, result.rows, result.last, result.output)
                    result.output = None
                    uncommitted.append(result)
                    if writer.groups != groups:
                        for done in uncommitted:
                            self._written(done)
                        uncommitted = []
                else:
                    self.progress.seen(result.file, result.bytes_read)
                self._observed(result)
                self.in_flight.release()
            writer.close_group()
            for done in uncommitted:
                self._written(done)
        except BaseException:
            writer.abandon()
            raise

    # ---- driving -----------------------------------------------------------------------------

    def run(self, tick_seconds: float) -> EngineResult:
        started = time.perf_counter()
        workers = [
            self._thread("reader", self.read),
            *(self._thread(f"scorer-{i}", self.score) for i in range(self.threads)),
            self._thread("writer", self.write),
        ]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                while worker.is_alive():
                    worker.join(timeout=tick_seconds)
                    self.progress.tick()
        except BaseException:
            self.stop.set()
            for worker in workers:
                worker.join(timeout=10.0)
            raise
        if self.error is not None:
            raise self.error
        return EngineResult(
            rows_scored=self.rows_scored,
            chunks_scored=self.chunks_scored,
            seconds=time.perf_counter() - started,
            file_chunks=dict(self.file_chunks),
        )


def run_local(
    plan: JobPlan,
    model: LoadedModel,
    collector: DriftCollector | None,
    progress: Progress,
    threads: int,
    tick_seconds: float = 0.25,
) -> EngineResult:
    """Score every unfinished chunk of ``plan`` on this machine with ``threads`` scorer threads."""
    return _Run(plan, model, collector, progress, max(1, threads)).run(tick_seconds)
