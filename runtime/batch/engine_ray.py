"""The Ray engine: the same chunks, scored by a pool of Ray Data actors, each with one onnxruntime
session.

The driver cuts the job into *units* (a Parquet file's row group worth of chunks, a few chunks of
an ``.npy`` file, a whole CSV file, which cannot be entered in the middle) and hands them to
``map_batches`` over an actor pool. Each actor loads the model once (the server's session
settings), and for each unit reads its chunks with the local engine's reader, scores them, writes
their part files atomically (the same names as the local engine: identical output) and returns,
per chunk, its row count, part file size and monitor window. The driver journals each chunk as its
record arrives and merges the windows in chunk order, so resuming and the drift report work as
they do locally. A unit retried by Ray rewrites identical part files: still exactly once.

Each actor takes one CPU and builds its session with the driver's settings (the server's, for
the driver's CPU budget). Inputs and the output folder must be reachable under the same paths
from every node (a shared filesystem), and edgewise must be installed on the nodes. Without
``address`` and without ``RAY_ADDRESS``, a local Ray instance is started with the process's CPU
budget and shut down at the end (and, should the driver be killed, its processes are killed by
:mod:`.reaper`); an instance already running (``ray.init`` by the caller) is used as it is.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from edgewise.runtime.batch.plan import EngineResult, JobPlan
from edgewise.runtime.batch.progress import Progress
from edgewise.runtime.batch.reader import ChunkReader, ColumnSpec, InputFile, _parquet_file
from edgewise.runtime.batch.scoring import chunk_inputs, score_chunk
from edgewise.runtime.batch.stats import DriftCollector
from edgewise.runtime.batch.storage import is_uri
from edgewise.runtime.batch.writer import ChunkRecord, write_part
from edgewise.runtime.package.reference_profile import ReferenceProfile
from edgewise.runtime.package.tabular import MissingDependency
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.serving.monitor import MonitorConfig

__all__ = ["RAY_EXTRA_HINT", "run_ray"]

log = logging.getLogger("edgewise.runtime.batch")

RAY_EXTRA_HINT: Final = "pip install 'edgewise[ray]'"
#: Chunks per unit of an ``.npy`` file (it can be entered anywhere).
NPY_UNIT_CHUNKS: Final = 4
_END_OF_FILE: Final = -1  # a result row's ``chunk`` value that reports a file's chunk count


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingDependency(
            f"the Ray engine needs the Python package 'ray[data]', which is not installed: "
            f"run {RAY_EXTRA_HINT}"
        ) from None
    return ray


@dataclass(frozen=True)
class _Unit:
    file: int
    first: int
    last: int | None  # None: to the end of the file
    done: tuple[int, ...]  # chunks finished by an earlier run (observed, not scored)


def _units(plan: JobPlan, observe_done: bool) -> Iterator[_Unit]:
    for number, file in enumerate(plan.files):
        done = plan.done_chunks(number)
        count = file.chunk_count(plan.chunk_rows)
        if count is None:
            yield _Unit(number, 0, None, tuple(sorted(done)))
            continue
        starts = list(range(count))
        if file.format == "parquet":
            # Chunks that start in the same row group make one unit: each unit decodes its row
            # groups once.
            metadata = _parquet_file(file.path).metadata
            bounds = np.cumsum(
                [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            )
            group_of = np.searchsorted(bounds, np.asarray(starts) * plan.chunk_rows, side="right")
            breaks = [0, *(i for i in range(1, count) if group_of[i] != group_of[i - 1]), count]
        else:
            breaks = [*range(0, count, NPY_UNIT_CHUNKS), count]
        for first, end in itertools.pairwise(breaks):
            unit_done = tuple(c for c in range(first, end) if c in done)
            if len(unit_done) == end - first and not observe_done:
                continue
            yield _Unit(number, first, end - 1, unit_done)


class _ActorScorer:
    """One Ray actor: one model session, scoring the units it is given."""

    def __init__(
        self,
        out: str,
        files: list[InputFile],
        columns: ColumnSpec,
        chunk_rows: int,
        schema: Any,
        model: tuple[str, int, str],
        session: SessionSettings,
        monitoring: tuple[ReferenceProfile, MonitorConfig] | None,
    ) -> None:
        name, version, folder = model
        self.out: Path | str = out if is_uri(out) else Path(out)
        self.files = files
        self.columns = columns
        self.chunk_rows = chunk_rows
        self.schema = schema
        self.model = load_model(name, version, Path(folder), session)
        self.collector = (
            None
            if monitoring is None
            else DriftCollector(name, str(version), monitoring[0], monitoring[1])
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        records: dict[str, list[Any]] = {
            key: []
            for key in ("file", "chunk", "rows", "size", "last", "scored", "bytes", "window")
        }
        for text in batch["unit"]:
            data = json.loads(str(text))
            unit = _Unit(data["file"], data["first"], data["last"], tuple(data["done"]))
            self._score(unit, records)
        return {
            key: np.array(values, dtype=object if key == "window" else None)
            for key, values in records.items()
        }

    def _score(self, unit: _Unit, records: dict[str, list[Any]]) -> None:
        reader = ChunkReader(self.files[unit.file], self.columns, self.chunk_rows)
        done = set(unit.done)
        count = unit.first
        for raw in reader.chunks(unit.first, unit.last):
            feeds = None
            window = b""
            size = 0
            scored = raw.index not in done
            if self.collector is not None or scored:
                feeds = chunk_inputs(self.model.manifest, self.columns, raw.table)
            results = None
            if scored and feeds is not None:
                results = self.model.run(feeds)
                table = score_chunk(
                    self.model, self.columns, self.schema, raw.table, feeds, results
                )
                size = write_part(self.out, unit.file, raw.index, table)
            if self.collector is not None and feeds is not None:  # inputs and outputs
                window = pickle.dumps(self.collector.observe(feeds, results, self.model))
            for key, value in (
                ("file", unit.file),
                ("chunk", raw.index),
                ("rows", raw.table.num_rows),
                ("size", size),
                ("last", raw.last),
                ("scored", scored),
                ("bytes", raw.bytes_read),
                ("window", window),
            ):
                records[key].append(value)
            count = raw.index + 1
        if unit.last is None:  # read to the end of the file: say how many chunks it has
            for key, value in (
                ("file", unit.file),
                ("chunk", _END_OF_FILE),
                ("rows", count),
                ("size", 0),
                ("last", True),
                ("scored", False),
                ("bytes", 0),
                ("window", b""),
            ):
                records[key].append(value)


def _default_actors(ray: Any) -> int:
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, math.floor(cpus))


def run_ray(
    plan: JobPlan,
    collector: DriftCollector | None,
    progress: Progress,
    *,
    address: str | None = None,
    actors: int | None = None,
    threads: int = 1,
) -> EngineResult:
    """Score every unfinished chunk of ``plan`` on Ray Data actors (see the module docstring)."""
    ray = _ray()
    started_here = False
    reaper = None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if address:
            kwargs["address"] = address
        else:
            import os

            if not os.environ.get("RAY_ADDRESS"):
                kwargs["num_cpus"] = max(1, threads)
                # A local Ray started here: a killed driver must not leave its processes.
                from edgewise.runtime.batch.reaper import Reaper

                reaper = Reaper()
        try:
            ray.init(**kwargs)
        except BaseException:
            if reaper is not None:
                reaper.release()
            raise
        started_here = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        return _run(ray, plan, collector, progress, actors or _default_actors(ray))
    finally:
        if started_here:
            ray.shutdown()
        if reaper is not None:
            reaper.release()


def _run(
    ray: Any,
    plan: JobPlan,
    collector: DriftCollector | None,
    progress: Progress,
    actors: int,
) -> EngineResult:
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    file_chunks: dict[int, int] = {}
    for number, file in enumerate(plan.files):
        count = file.chunk_count(plan.chunk_rows)
        if count is not None:
            file_chunks[number] = count
            if collector is not None:
                collector.file_chunks(number, count)
            if count == len(plan.done_chunks(number)) and collector is None:
                progress.file_done(number)
    units = [
        {"unit": json.dumps({**u.__dict__, "done": list(u.done)})}
        for u in _units(plan, observe_done=collector is not None)
    ]
    rows_scored = 0
    chunks_scored = 0
    if units:
        monitoring = None if collector is None else (collector.reference, collector.config)
        dataset = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _ActorScorer,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(units))),
            num_cpus=1,
            fn_constructor_kwargs={
                "out": str(plan.out),
                "files": plan.files,
                "columns": plan.columns,
                "chunk_rows": plan.chunk_rows,
                "schema": plan.schema,
                "model": (plan.model_name, plan.version, str(plan.version_dir)),
                "session": plan.session,
                "monitoring": monitoring,
            },
            batch_format="numpy",
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["file"])):
                number = int(batch["file"][i])
                chunk, rows = int(batch["chunk"][i]), int(batch["rows"][i])
                if chunk == _END_OF_FILE:
                    file_chunks[number] = rows
                    progress.file_done(number)
                    if collector is not None:
                        collector.file_chunks(number, rows)
                    continue
                if bool(batch["scored"][i]):
                    plan.folder.record(
                        ChunkRecord(
                            number, chunk, rows, int(batch["size"][i]), bool(batch["last"][i])
                        )
                    )
                    rows_scored += rows
                    chunks_scored += 1
                    progress.advance(rows, number, int(batch["bytes"][i]))
                else:
                    progress.seen(number, int(batch["bytes"][i]))
                if collector is not None:
                    collector.add(number, chunk, pickle.loads(batch["window"][i]))
            progress.tick()
    return EngineResult(
        rows_scored=rows_scored,
        chunks_scored=chunks_scored,
        seconds=time.perf_counter() - started,
        file_chunks=file_chunks,
    )
