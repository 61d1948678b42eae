"""Inputs and outputs on object storage (``s3://``) against a real S3-compatible server (moto's
server mode on 127.0.0.1): the same output as a local job, the commit protocol without renames,
and a job SIGKILLed mid-way and resumed gives every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from edgewise.runtime.batch.objectfolder import RECORDS
from edgewise.runtime.batch.writer import part_name
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
from tests.runtime.batch.s3 import S3Server, moto_missing, running_s3

pytestmark = pytest.mark.skipif(moto_missing() is not None, reason=str(moto_missing()))

_buckets = iter(range(10**6))


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The server's filesystem, the environment pointed at it, a fresh bucket, and the current
    folder moved to tmp_path (so a URI mistaken for a path would show up there)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    filesystem = s3_server.filesystem()
    bucket = f"edgewise-{next(_buckets)}"
    filesystem.create_dir(bucket)  # type: ignore[attr-defined]
    yield filesystem, bucket
    assert not (tmp_path / "s3:").exists()


def _upload(filesystem: Any, local: Path, key: str) -> None:
    with filesystem.open_output_stream(key) as out:
        out.write(local.read_bytes())


def _parts(filesystem: Any, prefix: str) -> list[str]:
    selector = fs.FileSelector(prefix, allow_not_found=True)
    return sorted(
        i.base_name for i in filesystem.get_file_info(selector) if i.base_name.startswith("part-")
    )


def _read_s3_output(filesystem: Any, prefix: str) -> pa.Table:
    tables = [
        pq.read_table(f"{prefix}/{name}", filesystem=filesystem)
        for name in _parts(filesystem, prefix)
    ]
    return pa.concat_tables(tables)


def _read_json(filesystem: Any, key: str) -> Any:
    with filesystem.open_input_stream(key) as handle:
        return json.loads(handle.read())


def test_s3_input_and_output_give_the_local_jobs_output(
    model_repo: Path, inputs: Inputs, tmp_path: Path, s3: tuple[Any, str]
) -> None:
    filesystem, bucket = s3
    _upload(filesystem, inputs.cancer_parquet, f"{bucket}/in/a.parquet")
    _upload(filesystem, inputs.cancer_csv, f"{bucket}/in/sub/b.csv")
    _upload(filesystem, inputs.cancer_csv, f"{bucket}/in/_skipped/c.csv")
    local_in = tmp_path / "local-in"
    (local_in / "sub").mkdir(parents=True)
    (local_in / "a.parquet").write_bytes(inputs.cancer_parquet.read_bytes())
    (local_in / "sub" / "b.csv").write_bytes(inputs.cancer_csv.read_bytes())
    reference = tmp_path / "reference"
    batch(model_repo, "logreg", local_in, reference)

    summary = batch(model_repo, "logreg", f"s3://{bucket}/in/", f"s3://{bucket}/out")
    assert summary.rows == 2 * len(inputs.cancer) and summary.inputs == 2
    assert summary.output == f"s3://{bucket}/out"
    assert summary.drift["report"] == f"s3://{bucket}/out/_drift_report.html"
    assert_tables_equal(_read_s3_output(filesystem, f"{bucket}/out"), read_output(reference))
    job = _read_json(filesystem, f"{bucket}/out/_job.json")
    assert [f["path"] for f in job["inputs"]] == [
        f"s3://{bucket}/in/a.parquet",
        f"s3://{bucket}/in/sub/b.csv",
    ]
    assert all(f["size"] > 0 for f in job["inputs"])
    for name in ("_SUCCESS", "_summary.json", "_drift_report.json", "_drift_report.html"):
        assert filesystem.get_file_info(f"{bucket}/out/{name}").type == fs.FileType.File
    records = filesystem.get_file_info(fs.FileSelector(f"{bucket}/out/{RECORDS}"))
    assert len(records) == summary.parts

    # A glob over keys, and the already-complete answer of a resumed finished job.
    globbed = batch(model_repo, "logreg", f"s3://{bucket}/in/*.parquet", f"s3://{bucket}/g")
    assert globbed.inputs == 1 and globbed.rows == len(inputs.cancer)
    again = batch(
        model_repo, "logreg", f"s3://{bucket}/in/*.parquet", f"s3://{bucket}/g", resume=True
    )
    assert again.already_complete and again.rows == len(inputs.cancer)


def test_object_storage_errors_are_one_line(
    model_repo: Path, inputs: Inputs, tmp_path: Path, s3: tuple[Any, str]
) -> None:
    filesystem, bucket = s3
    with pytest.raises(InvalidInput, match=r"no \.parquet or \.csv object matches"):
        batch(model_repo, "logreg", f"s3://{bucket}/nothing/", tmp_path / "out")
    _upload(filesystem, inputs.cancer_parquet, f"{bucket}/in/a.parquet")
    _upload(filesystem, inputs.cancer_parquet, f"{bucket}/taken/x.parquet")
    with pytest.raises(InvalidInput, match="not empty"):
        batch(model_repo, "logreg", f"s3://{bucket}/in/", f"s3://{bucket}/taken")
    assert not (tmp_path / "out").exists()
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "batch", "--repo", str(model_repo),
         "--model", "logreg", "--input", f"s3://{bucket}/in/", "--output",
         "s3://no-such-bucket-edgewise/out", "--progress", "off"],
        capture_output=True, text=True, check=False, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3://no-such-bucket-edgewise/out" in done.stderr


def test_resume_on_object_storage_keeps_only_recorded_parts(
    model_repo: Path, inputs: Inputs, tmp_path: Path, s3: tuple[Any, str]
) -> None:
    """A part uploaded without its record (killed between the two steps) is rewritten; a record
    whose part is gone is redone; recorded parts are kept as they are."""
    filesystem, bucket = s3
    _upload(filesystem, inputs.cancer_parquet, f"{bucket}/in/a.parquet")
    out = f"s3://{bucket}/out"
    first = batch(model_repo, "logreg", f"s3://{bucket}/in/", out)
    expected = _read_s3_output(filesystem, f"{bucket}/out")
    kept = filesystem.get_file_info(f"{bucket}/out/{part_name(0, 0)}").mtime_ns
    # Simulate the crash states: before the end (no _SUCCESS), an unrecorded part (garbage
    # bytes), a record without its part.
    filesystem.delete_file(f"{bucket}/out/_SUCCESS")
    filesystem.delete_file(f"{bucket}/out/{RECORDS}/00000-000003.json")
    with filesystem.open_output_stream(f"{bucket}/out/{part_name(0, 3)}") as handle:
        handle.write(b"torn")
    filesystem.delete_file(f"{bucket}/out/{part_name(0, 5)}")
    resumed = batch(model_repo, "logreg", f"s3://{bucket}/in/", out, resume=True)
    assert resumed.resumed and resumed.rows_this_run == 2000 and resumed.rows == first.rows
    assert_tables_equal(_read_s3_output(filesystem, f"{bucket}/out"), expected)
    assert filesystem.get_file_info(f"{bucket}/out/{part_name(0, 0)}").mtime_ns == kept


def _recorded(filesystem: Any, prefix: str) -> int:
    selector = fs.FileSelector(f"{prefix}/{RECORDS}", allow_not_found=True)
    return len(filesystem.get_file_info(selector))


def test_sigkill_mid_job_on_s3_then_resume_gives_every_row_once(
    model_repo: Path, tmp_path: Path, s3: tuple[Any, str]
) -> None:
    filesystem, bucket = s3
    frame = cancer_frame(times=60)  # 34,140 rows: 23 chunks of 1500
    source = tmp_path / "input.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), source, row_group_size=7000)
    _upload(filesystem, source, f"{bucket}/in/input.parquet")
    reference = tmp_path / "reference"
    batch(model_repo, "logreg", source, reference, chunk_rows=1500)
    chunks = -(-len(frame) // 1500)

    out = f"s3://{bucket}/out"
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "batch", "--repo", str(model_repo),
        "--model", "logreg", "--input", f"s3://{bucket}/in/", "--output", out,
        "--id-columns", ID, "--chunk-rows", "1500", "--progress", "off",
    ]  # fmt: skip
    log = tmp_path / "log.txt"
    kills = 0
    for target in (4, 12):
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [*command, *(["--resume"] if kills else [])],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
            )
        deadline = time.monotonic() + 120
        try:
            while process.poll() is None:
                if _recorded(filesystem, f"{bucket}/out") >= target:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    kills += 1
                    break
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert kills == 2, log.read_text()
    assert _recorded(filesystem, f"{bucket}/out") < chunks
    final = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, check=False, env=dict(os.environ)
    )
    assert final.returncode == 0, final.stderr
    actual = _read_s3_output(filesystem, f"{bucket}/out")
    assert_tables_equal(actual, read_output(reference))
    ids = actual.column(ID).to_numpy()
    assert len(np.unique(ids)) == len(ids) == len(frame)
    assert _parts(filesystem, f"{bucket}/out") == [part_name(0, c) for c in range(chunks)]
    assert _recorded(filesystem, f"{bucket}/out") == chunks
    summary = _read_json(filesystem, f"{bucket}/out/_summary.json")
    assert summary["rows"] == len(frame) and summary["resumed"] is True
    report = _read_json(filesystem, f"{bucket}/out/_drift_report.json")
    report.pop("computed_at")
    assert report == report_without_time(reference)


def test_partitioned_compacted_output_on_s3_resumes_exactly_once(
    model_repo: Path,
    inputs: Inputs,
    tmp_path: Path,
    s3: tuple[Any, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--part-rows and --partition-by on object storage: a group whose parts are uploaded but
    whose record is not (the run fails there) is deleted on --resume and written again; the
    prefix then reads (pyarrow.dataset, hive) as the local job's output."""
    import pyarrow.dataset as ds

    from edgewise.runtime.batch.objectfolder import ObjectJobFolder
    from edgewise.runtime.batch.options import PartLayout

    filesystem, bucket = s3
    frame = cancer_frame(8)
    frame["region"] = np.array(["north", "south", "east"])[np.arange(len(frame)) % 3]
    local = tmp_path / "in.parquet"
    frame.to_parquet(local, index=False)
    _upload(filesystem, local, f"{bucket}/in/in.parquet")
    options: dict[str, Any] = {
        "chunk_rows": 500,
        "id_columns": (ID, "region"),
        "layout": PartLayout(part_rows=600, partition_by="region"),
        "drift_report": False,
    }
    reference = tmp_path / "reference"
    batch(model_repo, "logreg", local, reference, **options)

    real_commit = ObjectJobFolder.commit_group
    commits = []

    def failing(self: ObjectJobFolder, group: Any) -> None:
        commits.append(group.name)
        if len(commits) == 3:
            raise OSError("injected: the process dies before the group's record")
        real_commit(self, group)

    monkeypatch.setattr(ObjectJobFolder, "commit_group", failing)
    out = f"s3://{bucket}/out"
    with pytest.raises(OSError, match="injected"):
        batch(model_repo, "logreg", f"s3://{bucket}/in/", out, **options)
    uploaded = [
        i.path
        for i in filesystem.get_file_info(fs.FileSelector(f"{bucket}/out", recursive=True))
        if i.base_name.startswith("part-")
    ]
    assert len(uploaded) == 3 * 3  # the third group's parts are there, without a record
    monkeypatch.setattr(ObjectJobFolder, "commit_group", real_commit)
    summary = batch(model_repo, "logreg", f"s3://{bucket}/in/", out, resume=True, **options)
    assert summary.rows == len(frame) and summary.resumed

    def layout(prefix: str, filesystem: Any = None) -> list[str]:
        dataset = ds.dataset(prefix, format="parquet", partitioning="hive", filesystem=filesystem)
        return sorted(f[len(prefix) :].lstrip("/") for f in dataset.files)

    assert layout(f"{bucket}/out", filesystem) == layout(str(reference))
    got = ds.dataset(f"{bucket}/out", format="parquet", partitioning="hive", filesystem=filesystem)
    want = ds.dataset(reference, format="parquet", partitioning="hive")
    g = got.to_table().to_pandas().sort_values(ID).reset_index(drop=True)
    w = want.to_table().to_pandas().sort_values(ID).reset_index(drop=True)
    assert g[ID].tolist() == w[ID].tolist() and g["region"].tolist() == w["region"].tolist()
    np.testing.assert_array_equal(np.stack(g["probabilities"]), np.stack(w["probabilities"]))
