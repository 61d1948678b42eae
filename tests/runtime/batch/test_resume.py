"""Exactly-once: real ``edgewise batch`` processes killed with SIGKILL at random points, then
``--resume``d, give the output of an uninterrupted run row for row; and every state a crash can
leave in the output folder is cleaned up the same way."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.batch import pipeline
from edgewise.runtime.batch.reader import InputFile
from edgewise.runtime.batch.writer import ChunkRecord, JobFolder, part_name, write_part
from edgewise.runtime.errors import InvalidInput
from tests.runtime.batch.helpers import (
    ID,
    Inputs,
    assert_tables_equal,
    batch,
    cancer_frame,
    read_output,
    report_without_time,
)

CHUNK_ROWS = 1500


def _command(repo: Path, source: Path, out: Path, resume: bool) -> list[str]:
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "batch", "--repo", str(repo),
        "--model", "logreg", "--input", str(source), "--output", str(out),
        "--id-columns", ID, "--chunk-rows", str(CHUNK_ROWS), "--progress", "off",
    ]  # fmt: skip
    return [*command, "--resume"] if resume else command


def _journaled(out: Path) -> int:
    try:
        return (out / "_chunks.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_and_kill(command: list[str], out: Path, target: int, log: Path) -> bool:
    """Start the job and SIGKILL it once its journal holds ``target`` more chunks than at start
    (``target`` 0: as soon as its job manifest exists). Returns False if it finished first."""
    before = _journaled(out)
    with log.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None:
            ready = (out / "_job.json").exists() and _journaled(out) - before >= target
            if ready:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            if time.monotonic() > deadline:
                raise AssertionError(f"job did not progress:\n{log.read_text()}")
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()
    return False


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_output(
    model_repo: Path, tmp_path: Path, fmt: str
) -> None:
    frame = cancer_frame(times=100)  # 56,900 rows: 38 chunks
    source = tmp_path / f"input.{fmt}"
    if fmt == "parquet":
        pq.write_table(
            pa.Table.from_pandas(frame, preserve_index=False), source, row_group_size=7000
        )
    else:
        frame.to_csv(source, index=False)
    chunks = -(-len(frame) // CHUNK_ROWS)

    reference = tmp_path / "reference"
    log = tmp_path / "log.txt"
    command = _command(model_repo, source, reference, False)
    done = subprocess.run(command, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    rng = random.Random(f"edgewise-{fmt}")
    kills = 0
    resume = False
    # Kill points: at once, at random chunk counts, and when every chunk is journaled (the
    # report and summary phase). Each run after the first resumes the previous one.
    targets = [0, *sorted(rng.sample(range(1, chunks // 3), 3)), chunks]
    for target in targets:
        wanted = max(0, target - _journaled(out))
        if _run_and_kill(_command(model_repo, source, out, resume), out, wanted, log):
            kills += 1
        resume = True
    assert kills >= 3, log.read_text()
    command = _command(model_repo, source, out, True)
    final = subprocess.run(command, capture_output=True, check=False)
    assert final.returncode == 0, final.stderr

    expected = read_output(reference)
    actual = read_output(out)
    assert actual.num_rows == len(frame)
    assert_tables_equal(actual, expected)
    ids = actual.column(ID).to_numpy()
    assert len(np.unique(ids)) == len(ids)
    assert sorted(p.name for p in out.glob("part-*")) == [part_name(0, c) for c in range(chunks)]
    assert not list(out.glob(".tmp-*"))
    journal = [json.loads(line) for line in (out / "_chunks.jsonl").read_text().splitlines()]
    assert sorted(r["chunk"] for r in journal) == list(range(chunks))
    assert sum(r["rows"] for r in journal) == len(frame)
    assert report_without_time(out) == report_without_time(reference)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == len(frame) and summary["resumed"] is True


def test_recover_keeps_only_journaled_complete_chunks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = JobFolder(out)
    folder.create()
    folder.lock()
    table = pa.table({"x": pa.array(np.arange(10, dtype=np.int64))})
    sizes = {c: write_part(out, 0, c, table) for c in range(5)}
    folder.record(ChunkRecord(0, 0, 10, sizes[0], False))
    folder.record(ChunkRecord(0, 1, 10, sizes[1], False))
    folder.record(ChunkRecord(0, 3, 10, sizes[3], False))
    # Crash states: chunk 2 renamed but not journaled; chunk 3's file cut short; chunk 4 only a
    # temporary file; a torn last journal line; a summary from a previous complete run.
    with (out / part_name(0, 3)).open("r+b") as handle:
        handle.truncate(sizes[3] - 1)
    (out / part_name(0, 4)).rename(out / f".tmp-0123-{part_name(0, 4)}")
    with (out / "_chunks.jsonl").open("a") as journal:
        journal.write('{"file": 0, "chunk": 4, "ro')
    (out / "_summary.json").write_text("{}")
    folder.close()

    again = JobFolder(out)
    again.lock()
    done = again.recover()
    assert sorted(done) == [(0, 0), (0, 1)]
    assert sorted(p.name for p in out.glob("part-*")) == [part_name(0, 0), part_name(0, 1)]
    assert not list(out.glob(".tmp-*")) and not (out / "_summary.json").exists()
    lines = (out / "_chunks.jsonl").read_text().splitlines()
    assert [json.loads(line)["chunk"] for line in lines] == [0, 1]
    again.record(ChunkRecord(0, 2, 10, sizes[2], True))  # appends after a clean line
    assert json.loads((out / "_chunks.jsonl").read_text().splitlines()[-1])["chunk"] == 2
    again.close()


def test_one_writer_per_output_folder(tmp_path: Path) -> None:
    first = JobFolder(tmp_path)
    first.lock()
    second = JobFolder(tmp_path)
    with pytest.raises(InvalidInput, match="in use by another edgewise batch process"):
        second.lock()
    first.close()
    second.lock()
    second.close()


def test_resume_after_losing_chunks_redoes_exactly_those(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch(model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=1000)
    expected = read_output(out)
    report = report_without_time(out)
    lines = (out / "_chunks.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["chunk"] % 3]
    (out / "_chunks.jsonl").write_text("".join(f"{line}\n" for line in kept))
    (out / "_SUCCESS").unlink()
    summary = batch(model_repo, "logreg", inputs.cancer_parquet, out, resume=True)
    assert summary.resumed and summary.rows_this_run < summary.rows == len(inputs.cancer)
    redone = len(lines) - len(kept)
    assert summary.rows_this_run == sum(
        min(1000, len(inputs.cancer) - c * 1000) for c in range(0, len(lines), 3)
    )
    assert redone == len(range(0, len(lines), 3))
    assert_tables_equal(read_output(out), expected)
    assert report_without_time(out) == report


def test_resume_without_drift_report_skips_finished_files(
    model_repo: Path, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    inputs.cancer.iloc[:5000].to_parquet(folder / "a.parquet", index=False)
    inputs.cancer.iloc[5000:].to_parquet(folder / "b.parquet", index=False)
    out = tmp_path / "out"
    batch(model_repo, "logreg", folder, out, chunk_rows=1000, drift_report=False)
    expected = read_output(out)
    lines = (out / "_chunks.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["file"] == 0]
    (out / "_chunks.jsonl").write_text("".join(f"{line}\n" for line in kept))
    (out / "_SUCCESS").unlink()
    opened: list[str] = []

    class Recording(pipeline.ChunkReader):
        def __init__(self, file: InputFile, *args: Any, **kwargs: Any) -> None:
            opened.append(Path(file.path).name)
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(pipeline, "ChunkReader", Recording)
    summary = batch(model_repo, "logreg", folder, out, resume=True)
    assert opened == ["b.parquet"], "a finished file is not read again without a report"
    assert summary.rows_this_run == len(inputs.cancer) - 5000
    assert_tables_equal(read_output(out), expected)
    report = json.loads((out / "_drift_report.json").read_text())
    assert report["available"] is False and "turned off" in report["reason"]
    pd.testing.assert_series_equal(
        read_output(out).column(ID).to_pandas(), inputs.cancer[ID], check_names=False
    )


@pytest.mark.parametrize("suffix", ["npy", "csv"])
def test_resume_refuses_an_input_rewritten_with_the_same_size_and_mtime(
    model_repo: Path, inputs: Inputs, tmp_path: Path, suffix: str
) -> None:
    """The size and modification time match but the content fingerprint (first, middle and last
    64 KiB) does not: the resumed job would mix two versions of the file."""
    source = tmp_path / f"input.{suffix}"
    source.write_bytes((inputs.cancer_npy if suffix == "npy" else inputs.cancer_csv).read_bytes())
    out = tmp_path / "out"
    batch(model_repo, "logreg", source, out)
    stat = source.stat()
    data = bytearray(source.read_bytes())
    # One byte in the last block: a digit of the CSV's last row, a byte of the last .npy record.
    at = len(data) - 3
    if suffix == "csv":
        assert data[at : at + 1].isdigit()
    data[at] = ord("7") if data[at] != ord("7") else ord("8")
    source.write_bytes(bytes(data))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(InvalidInput, match="was rewritten since the job started"):
        batch(model_repo, "logreg", source, out, resume=True)
