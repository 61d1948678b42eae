"""Batch scoring benchmark: ``edgewise batch`` against onnxruntime in a plain loop, in one run.

    .venv/bin/python benchmarks/batch.py [--sizes 1000000 10000000] [--rounds 3] [--workdir DIR]

Models: a logistic regression (StandardScaler + LogisticRegression) and a random forest (100 trees,
depth 8), both on scikit-learn's breast cancer data (30 numeric columns), converted with edgewise.
Input: the data tiled to each size with a unique ``row_id``, one Parquet file written with
pyarrow's defaults in row groups of 1M rows.

For each model and size, alternating in every round:
- the floor: onnxruntime called in a plain loop over the same rows already in memory (packed
  FP32 chunks of the job's chunk size), one session with the batch job's session settings, one
  thread (``floor``) and, for reference, the job's scorer threads sharing it (``floor_threads``);
- the read floor: pyarrow alone reading the input file in a plain loop (nothing scored), the
  lower bound on any job's time that reads the file;
- read+pack+write, nothing scored: the job's own reader, packing (``chunk_inputs``) and part
  file writer (encode, fsync, rename) in a plain single-thread loop, without and with the drift
  statistics, each chunk written with the outputs of one real model run (the same bytes to
  encode); from it, ``bound_ratio``: the best ratio a job on ``cpus_visible`` cores could reach
  if that work and the floor's scoring overlapped perfectly (the work split evenly over the
  cores, but never faster than the single reader thread);
- ``edgewise batch`` as a real process (``--id-columns row_id``, drift report on, the default
  chunk size and CPU budget): its own summary gives the job's time (model loading, schema check,
  scoring, report) and the scoring phase's; the process's wall time adds interpreter start-up;
  its peak RSS is the process's ``ru_maxrss`` from ``wait4``; once more with
  ``--no-drift-report``, to show what the input statistics cost; and once more with
  ``--part-rows 1000000`` (report on), to show what compacted output (chunks written in input
  order into large parts) costs against one part per chunk.

- the hand-written script (``SCRIPT`` below: what a user would otherwise write): pyarrow reads
  the file in batches of the job's chunk size, onnxruntime (default session options) scores
  them, id + scores go to one Parquet file; as a process of its own, timed from inside (after
  its imports, like the job's summary) and as a whole process (like the job's process time).
  Target: the job (drift report on) at >= 1.2x the script's rows/s, both models.

Prints one JSON line per case (medians over the rounds) with the ratios to the floor measured in
the same run, and one line per model comparing the peak RSS at the largest and smallest size.
Targets: the job at >= 85 % of the floor's rows/s; peak RSS at 10M rows within 10 % of 1M's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_RATIO = 0.85
TARGET_SCRIPT_RATIO = 1.2
#: --part-rows of the compacted job (report on): one part file per this many rows, chunks in order.
COMPACTED_PART_ROWS = 1_000_000

SCRIPT = r"""
import sys, time
started = time.perf_counter()
import numpy as np, onnxruntime as ort, pyarrow as pa, pyarrow.parquet as pq
source, model, out, chunk_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
imported = time.perf_counter()
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
parquet = pq.ParquetFile(source)
features = [n for n in parquet.schema_arrow.names if n != "row_id"]
writer = None
rows = 0
for batch in parquet.iter_batches(batch_size=chunk_rows):
    x = np.column_stack([batch.column(n).to_numpy() for n in features]).astype(np.float32)
    label, probabilities = session.run(None, {"features": x})
    table = pa.table({"row_id": batch.column("row_id"), "label": label,
                      **{f"p{j}": probabilities[:, j] for j in range(probabilities.shape[1])}})
    if writer is None:
        writer = pq.ParquetWriter(out, table.schema)
    writer.write_table(table)
    rows += batch.num_rows
writer.close()
print(rows, time.perf_counter() - imported)
"""
TARGET_RSS_GROWTH = 0.10
ROW_GROUP = 1_000_000


def build_models(repo: Path) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from edgewise.runtime.convert.converter import convert

    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    logreg = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    forest = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0)
    for name, model in (("logreg", logreg), ("forest", forest)):
        if not (repo / name / "1").is_dir():
            convert(model.fit(X, y), X, name=name, repo=repo, version=1)


def write_input(path: Path, rows: int) -> None:
    """The breast cancer rows tiled to ``rows``, streamed in row groups of 1M rows."""
    if path.exists():
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).data
    values = frame.to_numpy()
    schema = pa.schema([("row_id", pa.int64()), *((c, pa.float64()) for c in frame.columns)])
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            index = np.arange(start, min(rows, start + ROW_GROUP))
            block = values[index % len(values)]
            arrays = [pa.array(index), *(pa.array(block[:, j]) for j in range(block.shape[1]))]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    partial.rename(path)


def job_settings() -> tuple[Any, int]:
    """The session settings and scorer threads ``edgewise batch`` uses on this machine."""
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.serving.model import SessionSettings

    settings = ServerSettings.from_sources({})
    return SessionSettings.of(settings), settings.worker_threads


def load_floor_data(path: Path, repo: Path, chunk_rows: int) -> list[np.ndarray]:
    """The input's model inputs, packed FP32 chunks in memory (as the job makes them)."""
    from edgewise.runtime.batch.reader import ColumnSpec, discover_inputs, open_reader
    from edgewise.runtime.batch.scoring import chunk_inputs
    from edgewise.runtime.package.manifest import read_manifest

    manifest = read_manifest(repo / "logreg" / "1")
    columns = ColumnSpec(manifest.features, ())
    (file,) = discover_inputs(str(path))
    return [
        chunk_inputs(manifest, columns, chunk.table)["features"]
        for chunk in open_reader(file, columns, chunk_rows).chunks()
    ]


def floor(model_path: Path, chunks: list[np.ndarray], session: Any, threads: int) -> float:
    """rows/s of onnxruntime's ``run`` in a plain loop over ``chunks`` (``threads`` loops)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(model_path), sess_options=session.session_options(), providers=["CPUExecutionProvider"]
    )
    sess.run(None, {"features": chunks[0]})
    rows = sum(c.shape[0] for c in chunks)

    def loop(part: list[np.ndarray]) -> None:
        for chunk in part:
            sess.run(None, {"features": chunk})

    started = time.perf_counter()
    if threads == 1:
        loop(chunks)
    else:
        workers = [
            threading.Thread(target=loop, args=(chunks[i::threads],)) for i in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return rows / (time.perf_counter() - started)


def rss_helper(args: list[str]) -> None:
    """Run one job as a child and print its summary with the child's own peak RSS (wait4)."""
    repo, model, source, out, extra = args
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "batch",
        "--repo", repo, "--model", model, "--input", source, "--output", out,
        "--id-columns", "row_id", "--progress", "off", "--json",
        *filter(None, extra.removeprefix("flags:").split(",")),
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"edgewise batch failed with {process.returncode}")
    summary = json.loads(stdout)
    summary["process_seconds"] = wall
    summary["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux: kilobytes
    print(json.dumps(summary))


def read_pack_write(
    path: Path, repo: Path, model: str, chunk_rows: int, out: Path, stats: bool
) -> tuple[float, float]:
    """(rows/s, rows/s of the reading alone) of the job's reader, packing and part writer in a
    plain loop: everything a job does per row except scoring (and the thread hand-offs)."""
    import pyarrow as pa

    from edgewise.runtime.batch.reader import ColumnSpec, discover_inputs, open_reader
    from edgewise.runtime.batch.scoring import chunk_inputs, output_schema, output_table
    from edgewise.runtime.batch.stats import DriftCollector
    from edgewise.runtime.batch.writer import write_part
    from edgewise.runtime.package.manifest import read_manifest
    from edgewise.runtime.serving.model import load_model

    version_dir = repo / model / "1"
    manifest = read_manifest(version_dir)
    session, _ = job_settings()
    loaded = load_model(model, 1, version_dir, session)
    collector = DriftCollector.for_model(repo / model, version_dir, manifest) if stats else None
    columns = ColumnSpec(manifest.features, ("row_id",))
    schema = output_schema(manifest, [pa.field("row_id", pa.int64())], {"model": model})
    (file,) = discover_inputs(str(path))
    reader = open_reader(file, columns, chunk_rows)
    results: dict[str, np.ndarray] = {}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = 0
    reading = 0.0
    started = time.perf_counter()
    chunks = reader.chunks()
    while True:
        began = time.perf_counter()
        chunk = next(chunks, None)
        reading += time.perf_counter() - began
        if chunk is None:
            break
        table = chunk.table
        feeds = chunk_inputs(manifest, columns, table)
        if collector is not None:
            collector.observe(feeds)
        if not results:
            results = loaded.run(feeds)  # one model run, reused: nothing is scored in the loop
        n = table.num_rows
        outputs = {spec.name: results[spec.name][:n] for spec in manifest.outputs}
        part = output_table(schema, manifest, table.select(["row_id"]), outputs)
        write_part(out, 0, chunk.index, part)
        rows += n
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return rows / seconds, rows / reading


def bound_ratio(floor_rate: float, work_rate: float, read_rate: float, cores: int) -> float:
    """The best job/floor ratio on ``cores`` cores: scoring (the floor's time) and the rest
    (``work_rate``'s time) perfectly overlapped and split, but no faster than the one reader."""
    floor_time, work_time, read_time = 1 / floor_rate, 1 / work_rate, 1 / read_rate
    best = max((floor_time + work_time) / cores, read_time, floor_time / cores)
    return floor_time / best


def read_floor(path: Path, chunk_rows: int) -> float:
    """rows/s of pyarrow alone reading the input's columns in a plain loop (nothing scored)."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    rows = sum(batch.num_rows for batch in parquet.iter_batches(batch_size=chunk_rows))
    return rows / (time.perf_counter() - started)


def measure_job(repo: Path, model: str, source: Path, out: Path, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rss-helper", str(repo), model,
         str(source), str(out), "flags:" + ",".join(extra)],
        capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr.decode())
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_script(model_path: Path, source: Path, out: Path, chunk_rows: int) -> tuple[float, float]:
    """The hand-written script as a process: (seconds after its imports, process seconds)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(source), str(model_path), str(out), str(chunk_rows)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    _rows, seconds = done.stdout.split()
    return float(seconds), wall


def fingerprint_cost(source: Path, rounds: int = 50) -> dict[str, Any]:
    """What the resume fingerprint costs per input file (page cache warm), against the rest of
    describing the file (stat + Parquet footer), in one run."""
    from edgewise.runtime.batch.reader import FINGERPRINT_BLOCK, discover_inputs, fingerprint

    size = source.stat().st_size
    prints, describes = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        fingerprint(str(source), size)
        prints.append(time.perf_counter() - started)
        started = time.perf_counter()
        discover_inputs(str(source))
        describes.append(time.perf_counter() - started)
    return {
        "bench": "batch-fingerprint",
        "file_bytes": size,
        "bytes_hashed": min(size, 3 * FINGERPRINT_BLOCK),
        "fingerprint_ms": round(statistics.median(prints) * 1e3, 3),
        "discover_ms_with_fingerprint": round(statistics.median(describes) * 1e3, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--models", nargs="+", default=["logreg", "forest"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep models and inputs here between runs")
    parser.add_argument("--rss-helper", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_helper:
        rss_helper(args.rss_helper)
        return

    from edgewise.runtime.batch import DEFAULT_CHUNK_ROWS

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgewise-batch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "repo"
    build_models(repo)
    session, threads = job_settings()
    import onnxruntime
    import pyarrow

    print(
        json.dumps(
            {
                "bench": "batch-setup",
                "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__,
                "pyarrow": pyarrow.__version__,
                "cpus_visible": len(os.sched_getaffinity(0)),
                "scorer_threads": threads,
                "intra_op_threads": session.intra_op_threads,
                "chunk_rows": DEFAULT_CHUNK_ROWS,
            }
        ),
        flush=True,
    )
    rss: dict[tuple[str, int], float] = {}
    for rows in args.sizes:
        source = workdir / f"cancer_{rows}.parquet"
        write_input(source, rows)
        print(json.dumps({**fingerprint_cost(source), "rows": rows}), flush=True)
        chunks = load_floor_data(source, repo, DEFAULT_CHUNK_ROWS)
        for model in args.models:
            model_path = repo / model / "1" / "model.onnx"
            floors: list[float] = []
            floors_threads: list[float] = []
            reads: list[float] = []
            bare_work: list[tuple[float, float]] = []
            stats_work: list[tuple[float, float]] = []
            jobs: list[dict[str, Any]] = []
            bare: list[dict[str, Any]] = []
            compacted: list[dict[str, Any]] = []
            scripts: list[tuple[float, float]] = []
            for round_ in range(args.rounds):
                script_out = workdir / f"script-{model}-{rows}.parquet"
                scripts.append(run_script(model_path, source, script_out, DEFAULT_CHUNK_ROWS))
                script_out.unlink()
                floors.append(floor(model_path, chunks, session, 1))
                floors_threads.append(floor(model_path, chunks, session, threads))
                reads.append(read_floor(source, DEFAULT_CHUNK_ROWS))
                out = workdir / f"out-{model}-{rows}-{round_}"
                for work, stats in ((bare_work, False), (stats_work, True)):
                    work.append(
                        read_pack_write(source, repo, model, DEFAULT_CHUNK_ROWS, out, stats)
                    )
                for results, extra in (
                    (jobs, ()),
                    (bare, ("--no-drift-report",)),
                    (compacted, ("--part-rows", str(COMPACTED_PART_ROWS))),
                ):
                    shutil.rmtree(out, ignore_errors=True)
                    results.append(measure_job(repo, model, source, out, *extra))
                    assert results[-1]["rows"] == rows
                    shutil.rmtree(out)
            floor_rate = statistics.median(floors)
            floor_threads_rate = statistics.median(floors_threads)
            job_rate = statistics.median(rows / j["seconds"] for j in jobs)
            scoring_rate = statistics.median(rows / j["scoring_seconds"] for j in jobs)
            process_rate = statistics.median(rows / j["process_seconds"] for j in jobs)
            peak = statistics.median(j["peak_rss_bytes"] for j in jobs)
            no_report_rate = statistics.median(rows / j["seconds"] for j in bare)
            compacted_rate = statistics.median(rows / j["seconds"] for j in compacted)
            read_rate = statistics.median(reads)
            bare_rate = statistics.median(w[0] for w in bare_work)
            stats_rate = statistics.median(w[0] for w in stats_work)
            reader_rate = statistics.median(w[1] for w in bare_work + stats_work)
            cores = len(os.sched_getaffinity(0))
            rss[(model, rows)] = peak
            script_rate = statistics.median(rows / s[0] for s in scripts)
            script_process_rate = statistics.median(rows / s[1] for s in scripts)
            print(
                json.dumps(
                    {
                        "bench": "batch",
                        "model": model,
                        "rows": rows,
                        "rounds": args.rounds,
                        "floor_rows_per_s": round(floor_rate),
                        "floor_threads_rows_per_s": round(floor_threads_rate),
                        "job_rows_per_s": round(job_rate),
                        "scoring_rows_per_s": round(scoring_rate),
                        "process_rows_per_s": round(process_rate),
                        "ratio_job_vs_floor": round(job_rate / floor_rate, 3),
                        "ratio_scoring_vs_floor": round(scoring_rate / floor_rate, 3),
                        "ratio_process_vs_floor": round(process_rate / floor_rate, 3),
                        "ratio_job_vs_floor_threads": round(job_rate / floor_threads_rate, 3),
                        "read_only_rows_per_s": round(read_rate),
                        "ratio_read_only_vs_floor": round(read_rate / floor_rate, 3),
                        "job_no_drift_report_rows_per_s": round(no_report_rate),
                        "ratio_job_no_drift_report_vs_floor": round(no_report_rate / floor_rate, 3),
                        "read_pack_write_rows_per_s": round(bare_rate),
                        "read_pack_stats_write_rows_per_s": round(stats_rate),
                        "job_reader_rows_per_s": round(reader_rate),
                        "bound_ratio_no_drift_report": round(
                            bound_ratio(floor_rate, bare_rate, reader_rate, cores), 3
                        ),
                        "bound_ratio": round(
                            bound_ratio(floor_rate, stats_rate, reader_rate, cores), 3
                        ),
                        "script_rows_per_s": round(script_rate),
                        "script_process_rows_per_s": round(script_process_rate),
                        "ratio_job_vs_script": round(job_rate / script_rate, 3),
                        "ratio_job_no_drift_report_vs_script": round(
                            no_report_rate / script_rate, 3
                        ),
                        "job_compacted_rows_per_s": round(compacted_rate),
                        "ratio_job_compacted_vs_script": round(compacted_rate / script_rate, 3),
                        "ratio_job_compacted_vs_job": round(compacted_rate / job_rate, 3),
                        "ratio_process_vs_script_process": round(
                            process_rate / script_process_rate, 3
                        ),
                        "target_script_ratio": TARGET_SCRIPT_RATIO,
                        "meets_script_target": job_rate / script_rate >= TARGET_SCRIPT_RATIO,
                        "peak_rss_mib": round(peak / 2**20, 1),
                        "target_ratio": TARGET_RATIO,
                        "meets_target": job_rate / floor_rate >= TARGET_RATIO,
                    }
                ),
                flush=True,
            )
        del chunks
    smallest, largest = min(args.sizes), max(args.sizes)
    if smallest != largest:
        for model in args.models:
            low, high = rss[(model, smallest)], rss[(model, largest)]
            growth = high / low - 1
            print(
                json.dumps(
                    {
                        "bench": "batch-rss",
                        "model": model,
                        "rows_small": smallest,
                        "rows_large": largest,
                        "peak_rss_small_mib": round(low / 2**20, 1),
                        "peak_rss_large_mib": round(high / 2**20, 1),
                        "growth": round(growth, 3),
                        "target_growth": TARGET_RSS_GROWTH,
                        "meets_target": growth <= TARGET_RSS_GROWTH,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
