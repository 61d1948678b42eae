"""Compacted and partitioned output (``--part-rows``, ``--part-bytes``, ``--partition-by``): the
same rows as one part per chunk, in parts of the target size, in hive folders pyarrow.dataset
reads; exactly once after a failure at any step of a group's commit (local disk here, object
storage in test_object_storage.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.batch import compact
from edgewise.runtime.batch.options import PartLayout, parse_size
from edgewise.runtime.errors import InvalidInput
from tests.runtime.batch.helpers import (
    ID,
    Inputs,
    assert_tables_equal,
    batch,
    edgewise,
    read_output,
)

CHUNK = 1000


def _reference(model_repo: Path, source: Path, tmp: Path, **options: Any) -> pa.Table:
    out = tmp / "reference"
    batch(model_repo, "logreg", source, out, chunk_rows=CHUNK, **options)
    return read_output(out)


def _parts(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("part-*.parquet"))


def test_part_rows_groups_whole_chunks_into_parts(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = batch(
        model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=CHUNK,
        layout=PartLayout(part_rows=4000), drift_report=False,
    )  # fmt: skip
    rows = len(inputs.cancer)  # 11380: parts of 4000, 4000, 3380
    parts = _parts(out)
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [4000, 4000, rows - 8000]
    assert [p.name for p in parts] == [
        "part-00000-000000.parquet", "part-00000-000004.parquet", "part-00000-000008.parquet"
    ]  # fmt: skip
    assert summary.parts == 3 and summary.rows == rows
    # a chunk is a row group: the scores are those of the same chunks written one per part
    assert pq.ParquetFile(parts[0]).metadata.num_row_groups == 4
    expected = _reference(model_repo, inputs.cancer_parquet, tmp_path, drift_report=False)
    assert_tables_equal(read_output(out), expected)


def test_part_bytes_closes_a_part_once_the_target_is_written(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    target = parse_size("40KiB")
    assert target == 40 * 1024
    batch(
        model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=CHUNK,
        layout=PartLayout(part_bytes=target), drift_report=False,
    )  # fmt: skip
    parts = _parts(out)
    one_chunk = max(
        pq.ParquetFile(parts[0]).metadata.row_group(g).total_byte_size
        for g in range(pq.ParquetFile(parts[0]).metadata.num_row_groups)
    )
    assert len(parts) > 1
    for part in parts[:-1]:  # every part but the last holds the target, plus at most a chunk
        assert target <= part.stat().st_size <= target + 2 * one_chunk + 4096
    expected = _reference(model_repo, inputs.cancer_parquet, tmp_path, drift_report=False)
    assert_tables_equal(read_output(out), expected)


def _segmented(inputs: Inputs, tmp_path: Path) -> Path:
    frame = inputs.cancer.copy()
    frame["region"] = np.array(["north", "south", "east/west", "ünï"])[np.arange(len(frame)) % 4]
    frame.loc[frame.index % 13 == 0, "region"] = None
    source = tmp_path / "segmented.parquet"
    frame.to_parquet(source, index=False)
    return source


def test_partition_by_a_carried_column_writes_hive_folders(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    source = _segmented(inputs, tmp_path)
    out = tmp_path / "out"
    batch(
        model_repo, "logreg", source, out, chunk_rows=CHUNK, id_columns=(ID, "region"),
        layout=PartLayout(part_rows=5000, partition_by="region"), drift_report=False,
    )  # fmt: skip
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(
        [
            "region=__HIVE_DEFAULT_PARTITION__", "region=east%2Fwest", "region=north",
            "region=south", "region=%C3%BCn%C3%AF",  # "ünï", percent-encoded
        ]
    )  # fmt: skip
    for part in _parts(out):
        assert "region" not in pq.ParquetFile(part).schema_arrow.names
    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    got = dataset.to_table().to_pandas().sort_values(ID).reset_index(drop=True)
    expected = (
        _reference(model_repo, source, tmp_path, id_columns=(ID, "region"), drift_report=False)
        .to_pandas()
        .sort_values(ID)
        .reset_index(drop=True)
    )
    assert list(got[ID]) == list(expected[ID])
    assert got["region"].tolist() == expected["region"].tolist()  # nulls included
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_array_equal(
        np.stack(got["probabilities"]), np.stack(expected["probabilities"])
    )


def test_partition_by_a_model_output(model_repo: Path, inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    batch(
        model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=CHUNK,
        layout=PartLayout(partition_by="label"), drift_report=False,
    )  # fmt: skip
    expected = _reference(model_repo, inputs.cancer_parquet, tmp_path, drift_report=False)
    labels = sorted(set(expected.column("label").to_pylist()))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"label={v}" for v in labels]
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    got = table.to_pandas().sort_values(ID)
    want = expected.to_pandas().sort_values(ID)
    np.testing.assert_array_equal(got[ID], want[ID])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_a_partition_column_the_output_lacks_is_named(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match="--partition-by 'mean radius': the output has no"):
        batch(
            model_repo, "logreg", inputs.cancer_parquet, out,
            layout=PartLayout(partition_by="mean radius"),
        )  # fmt: skip
    with pytest.raises(InvalidInput, match="'probabilities': the column holds fixed_size_list"):
        batch(
            model_repo, "logreg", inputs.cancer_parquet, out,
            layout=PartLayout(partition_by="probabilities"),
        )  # fmt: skip
    hidden = inputs.cancer.assign(_seg=1)
    hidden.to_parquet(tmp_path / "hidden.parquet", index=False)
    with pytest.raises(InvalidInput, match="'_seg': Parquet dataset readers skip folders"):
        batch(
            model_repo, "logreg", tmp_path / "hidden.parquet", out, id_columns=(ID, "_seg"),
            layout=PartLayout(partition_by="_seg"),
        )  # fmt: skip
    assert not out.exists()  # validate, then commit
    result = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg", "--input",
        str(inputs.cancer_parquet), "--output", str(out), "--partition-by", "nope",
    )  # fmt: skip
    assert result.returncode != 0
    assert "--partition-by 'nope': the output has no such column" in result.stderr
    assert "Traceback" not in result.stderr
    result = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg", "--input",
        str(inputs.cancer_parquet), "--output", str(out), "--part-bytes", "12 parsecs",
    )  # fmt: skip
    assert result.returncode != 0 and "size '12 parsecs'" in result.stderr


class _Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["rename", "commit"])
def test_a_group_killed_mid_commit_is_redone_exactly_once(
    model_repo: Path, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The second group fails after one of its parts is renamed ("rename") or after every part
    is renamed but before its record ("commit"); --resume gives the uninterrupted output."""
    source = _segmented(inputs, tmp_path)
    layout = PartLayout(part_rows=1000, partition_by="region")  # groups of 4-5 chunks
    kwargs: dict[str, Any] = {
        "chunk_rows": CHUNK, "id_columns": (ID, "region"), "layout": layout,
        "drift_report": False,
    }  # fmt: skip
    out = tmp_path / "out"
    calls = {"install": 0, "commit": 0}
    real_install = compact._install

    def install(temporary: Path, final: Path) -> None:
        real_install(temporary, final)
        calls["install"] += 1
        if step == "rename" and calls["install"] == 7:  # the second group's second part
            raise _Crash

    monkeypatch.setattr(compact, "_install", install)
    from edgewise.runtime.batch.writer import JobFolder

    real_commit = JobFolder.commit_group

    def commit(self: JobFolder, record: Any) -> None:
        calls["commit"] += 1
        if step == "commit" and calls["commit"] == 2:
            raise _Crash
        real_commit(self, record)

    monkeypatch.setattr(JobFolder, "commit_group", commit)
    with pytest.raises(_Crash):
        batch(model_repo, "logreg", source, out, **kwargs)
    journal = (out / "_chunks.jsonl").read_text().splitlines()
    assert len(journal) == 1 and json.loads(journal[0])["group"] == "00000-000000"
    assert calls["commit"] == (1 if step == "rename" else 2)
    monkeypatch.setattr(compact, "_install", real_install)
    monkeypatch.setattr(JobFolder, "commit_group", real_commit)
    summary = batch(model_repo, "logreg", source, out, resume=True, **kwargs)
    assert summary.resumed and summary.rows == len(inputs.cancer)
    assert not list(out.rglob(".tmp-*"))
    clean = tmp_path / "clean"
    batch(model_repo, "logreg", source, clean, **kwargs)
    assert sorted(p.relative_to(out).as_posix() for p in _parts(out)) == sorted(
        p.relative_to(clean).as_posix() for p in _parts(clean)
    )
    for part in _parts(clean):
        assert_tables_equal(pq.read_table(out / part.relative_to(clean)), pq.read_table(part))


def test_resume_keeps_the_layout_and_refuses_another(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch(
        model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=CHUNK,
        layout=PartLayout(part_rows=4000), drift_report=False,
    )  # fmt: skip
    with pytest.raises(InvalidInput, match="lays its parts out as --part-rows 4000, not"):
        batch(
            model_repo, "logreg", inputs.cancer_parquet, out, chunk_rows=CHUNK, resume=True,
            layout=PartLayout(part_rows=8000),
        )  # fmt: skip
    again = batch(model_repo, "logreg", inputs.cancer_parquet, out, resume=True)
    assert again.already_complete and again.parts == 3
    with pytest.raises(InvalidInput, match="local engine only"):
        batch(
            model_repo, "logreg", inputs.cancer_parquet, tmp_path / "ray", engine="ray",
            layout=PartLayout(part_rows=4000),
        )  # fmt: skip


def test_more_partitions_than_open_parts_stay_bounded(
    model_repo: Path, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compact, "MAX_OPEN_PARTS", 4)
    opened: list[int] = []
    real_open = compact.GroupWriter._open

    def counting(self: compact.GroupWriter, folder: str) -> Any:
        part = real_open(self, folder)
        opened.append(len(self.parts) + 1)
        return part

    monkeypatch.setattr(compact.GroupWriter, "_open", counting)
    frame = inputs.cancer.copy()
    frame["bucket"] = np.arange(len(frame)) % 10  # 10 values in every chunk
    source = tmp_path / "buckets.parquet"
    frame.to_parquet(source, index=False)
    out = tmp_path / "out"
    batch(
        model_repo, "logreg", source, out, chunk_rows=CHUNK, id_columns=(ID, "bucket"),
        layout=PartLayout(part_rows=100_000, partition_by="bucket"), drift_report=False,
    )  # fmt: skip
    assert max(opened) <= 4 + 1
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column(ID).to_pylist()) == sorted(frame[ID].tolist())
    assert table.num_rows == len(frame)
