"""The Ray engine on a local Ray instance (started here, two CPUs, no dashboard): the same part
files, journal and drift report as the local engine, and it resumes a job the local engine began."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.runtime.batch.helpers import (
    Inputs,
    assert_tables_equal,
    batch,
    cancer_frame,
    read_output,
    report_without_time,
)

ray = pytest.importorskip("ray", reason="the Ray engine needs edgewise[ray] (ray[data])")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def mixed_folder(inputs: Inputs, tmp_path: Path) -> Path:
    """Parquet (row groups of 3000 rows), CSV and .npy inputs of one job."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(inputs.cancer_parquet.read_bytes())
    (folder / "b.csv").write_bytes(inputs.cancer_csv.read_bytes())
    (folder / "c.npy").write_bytes(inputs.cancer_npy.read_bytes())
    return folder


def _journal(out: Path) -> list[dict[str, object]]:
    lines = (out / "_chunks.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: (r["file"], r["chunk"]))


@pytest.mark.usefixtures("local_ray")
def test_ray_engine_output_matches_the_local_engine(
    model_repo: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    local = batch(model_repo, "logreg", mixed_folder, tmp_path / "local", chunk_rows=1700)
    distributed = batch(
        model_repo, "logreg", mixed_folder, tmp_path / "ray", chunk_rows=1700, engine="ray"
    )
    assert distributed.engine == "ray" and distributed.rows == local.rows == 3 * 569 * 20
    assert distributed.parts == local.parts
    assert_tables_equal(read_output(tmp_path / "ray"), read_output(tmp_path / "local"))
    assert report_without_time(tmp_path / "ray") == report_without_time(tmp_path / "local")
    assert _journal(tmp_path / "ray") == _journal(tmp_path / "local")
    assert ray.is_initialized(), "an instance the caller started is left running"


@pytest.mark.usefixtures("local_ray")
def test_ray_engine_resumes_a_job_the_local_engine_began(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch(model_repo, "mixed", inputs.mixed_csv, tmp_path / "reference", chunk_rows=900)
    batch(model_repo, "mixed", inputs.mixed_csv, out, chunk_rows=900)
    lines = (out / "_chunks.jsonl").read_text().splitlines()
    kept = lines[::2]  # lose every other chunk, as a crash would
    (out / "_chunks.jsonl").write_text("".join(f"{line}\n" for line in kept))
    (out / "_SUCCESS").unlink()
    summary = batch(
        model_repo, "mixed", inputs.mixed_csv, out, chunk_rows=900, resume=True, engine="ray"
    )
    assert summary.resumed and summary.parts == len(lines)
    assert summary.rows_this_run == sum(json.loads(line)["rows"] for line in lines[1::2])
    assert_tables_equal(read_output(out), read_output(tmp_path / "reference"))
    assert report_without_time(out) == report_without_time(tmp_path / "reference")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_driver_leaves_no_ray_processes_behind(model_repo: Path, tmp_path: Path) -> None:
    """``edgewise batch --engine ray`` with a local Ray it starts itself, SIGKILLed while its
    actors score: every process Ray started for it (GCS, raylet, workers, actors) is gone within
    a bounded wait."""
    frame = cancer_frame(times=100)  # 56,900 rows: 114 chunks of 500
    source = tmp_path / "input.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), source)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "batch",
        "--repo", str(model_repo), "--model", "logreg", "--input", str(source),
        "--output", str(out), "--chunk-rows", "500", "--progress", "off", "--engine", "ray",
        "--ray-actors", "1", "--threads", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "log.txt"
    with log.open("wb") as sink:
        driver = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    started: list[psutil.Process] = []
    try:
        while True:
            assert driver.poll() is None, f"the job ended before it was killed:\n{log.read_text()}"
            journal = out / "_chunks.jsonl"
            if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                started = psutil.Process(driver.pid).children(recursive=True)
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        assert any("raylet" in " ".join(p.cmdline()) for p in started), [
            p.cmdline()[:2] for p in started
        ]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in started if _alive(p)]
    names = [" ".join(p.cmdline())[:80] for p in left if _alive(p)]
    for process in left:  # leave the machine clean even when the test fails
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    assert not left, f"Ray processes left behind: {names}"
