"""CSV rows that fail to decode: strict by default (one line naming the file, column and row),
set aside with a reason and a count under ``--bad-records``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edgewise.runtime.errors import InvalidInput
from tests.runtime.batch.helpers import (
    ID,
    Inputs,
    assert_scores_equal,
    batch,
    edgewise,
    expected_scores,
    output_arrays,
    read_output,
)

NOT_A_NUMBER_ROW = 10  # 1-based data row whose 'mean texture' is "abc"
SHORT_LINE_AFTER = 2500  # a line with 2 fields follows this data row


def _broken_csv(frame: pd.DataFrame, folder: Path) -> Path:
    lines = frame.to_csv(index=False).splitlines()
    column = list(frame.columns).index("mean texture")
    fields = lines[NOT_A_NUMBER_ROW].split(",")
    fields[column] = "abc"
    lines[NOT_A_NUMBER_ROW] = ",".join(fields)
    lines.insert(SHORT_LINE_AFTER + 1, "1,2")
    path = folder / "broken.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_strict_by_default_names_the_column_and_the_row(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    frame = inputs.cancer
    lines = frame.to_csv(index=False).splitlines()
    column = list(frame.columns).index("mean texture")
    fields = lines[NOT_A_NUMBER_ROW].split(",")
    fields[column] = "abc"
    lines[NOT_A_NUMBER_ROW] = ",".join(fields)
    bad_value = tmp_path / "value.csv"
    bad_value.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput) as caught:
        batch(model_repo, "logreg", bad_value, tmp_path / "out")
    message = str(caught.value)
    assert "column 'mean texture' holds string, but the model's feature is numeric" in message
    assert f"(row {NOT_A_NUMBER_ROW}: 'abc' is not a number" in message
    assert "--bad-records" in message

    short = tmp_path / "short.csv"
    lines = frame.to_csv(index=False).splitlines()
    lines.insert(SHORT_LINE_AFTER + 1, "1,2")
    short.write_text("\n".join(lines) + "\n")
    done = edgewise(
        "--log-level", "WARNING", "batch", "--repo", str(model_repo), "--model", "logreg",
        "--input", str(short), "--output", str(tmp_path / "out2"), "--progress", "off",
    )  # fmt: skip
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    # The header is line 1: data row N is line N + 1.
    assert (
        f"line {SHORT_LINE_AFTER + 2}: expected {len(frame.columns)} fields, got 2" in done.stderr
    )


def test_bad_records_are_set_aside_with_a_reason_and_a_count(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    frame = inputs.cancer
    source = _broken_csv(frame, tmp_path)
    bad = tmp_path / "bad"
    out = tmp_path / "out"
    summary = batch(model_repo, "logreg", source, out, bad_records=bad)
    assert summary.bad_records == 2
    assert summary.rows == len(frame) - 1  # the short line is not a data row of the frame

    rows = [json.loads(line) for line in (bad / "rows-00000-000000.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["row"] == NOT_A_NUMBER_ROW and rows[0]["column"] == "mean texture"
    assert rows[0]["reason"] == "column 'mean texture': 'abc' is not a number"
    assert rows[0]["record"][ID] == int(frame[ID].iloc[NOT_A_NUMBER_ROW - 1])
    assert rows[0]["input"] == str(source.resolve())
    (malformed,) = (bad / "malformed-00000.jsonl").read_text().splitlines()
    short = json.loads(malformed)
    assert (short["line"], short["record"]) == (SHORT_LINE_AFTER + 2, "1,2")
    assert short["reason"] == f"expected {len(frame.columns)} fields, got 2"

    # Every other row is scored as the strict job scores the clean file.
    kept = frame.drop(index=NOT_A_NUMBER_ROW - 1)
    table = read_output(out)
    np.testing.assert_array_equal(table.column(ID).to_numpy(), kept[ID].to_numpy())
    clean = batch(model_repo, "logreg", inputs.cancer_csv, tmp_path / "clean")
    assert clean.bad_records == 0 and not (tmp_path / "clean-bad").exists()
    expected = output_arrays(read_output(tmp_path / "clean"))
    mask = np.ones(len(frame), dtype=bool)
    mask[NOT_A_NUMBER_ROW - 1] = False
    got = output_arrays(table)
    np.testing.assert_array_equal(got["label"], expected["label"][mask])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"][mask], rtol=1e-6)

    # Resuming rewrites the same files: the count stays 2; another folder is refused.
    (out / "_SUCCESS").unlink()
    again = batch(model_repo, "logreg", source, out, resume=True)
    assert again.bad_records == 2
    with pytest.raises(InvalidInput, match="cannot resume: the job sets bad records aside"):
        batch(model_repo, "logreg", source, out, resume=True, bad_records=tmp_path / "other")


def test_a_clean_file_under_bad_records_scores_like_the_strict_job(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    summary = batch(
        model_repo, "logreg", inputs.cancer_csv, tmp_path / "out", bad_records=tmp_path / "bad"
    )
    assert summary.bad_records == 0 and not (tmp_path / "bad").exists()
    expected = expected_scores(model_repo, "logreg", inputs.cancer, 1000)
    assert_scores_equal(output_arrays(read_output(tmp_path / "out")), expected)


GROUP_ROWS = 1500  # row groups of the corrupt Parquet file
BAD_GROUP = 3  # rows 4501-6000: the data page header of its first feature column is overwritten


def _corrupt_parquet(frame: pd.DataFrame, folder: Path) -> Path:
    """A Parquet file written by pyarrow with one row group made undecodable: the header of a
    data page of its 'mean radius' column overwritten with 0xff bytes (the footer stays
    intact, so the file opens and every other row group decodes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "corrupt.parquet"
    pq.write_table(
        pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=GROUP_ROWS
    )
    metadata = pq.ParquetFile(path).metadata
    group = metadata.row_group(BAD_GROUP)
    column = next(
        group.column(i)
        for i in range(group.num_columns)
        if group.column(i).path_in_schema == "mean radius"
    )
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))
    # pyarrow itself fails on that row group, and only on it
    corrupt = pq.ParquetFile(path)
    with pytest.raises(OSError, match="page header"):
        corrupt.read_row_group(BAD_GROUP)
    for other in range(metadata.num_row_groups):
        if other != BAD_GROUP:
            corrupt.read_row_group(other)
    return path


def test_a_corrupt_parquet_row_group_is_strict_by_default_and_set_aside_with_bad_records(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    frame = inputs.cancer
    source = _corrupt_parquet(frame, tmp_path)
    first, last = BAD_GROUP * GROUP_ROWS + 1, (BAD_GROUP + 1) * GROUP_ROWS

    with pytest.raises(InvalidInput) as caught:
        batch(model_repo, "logreg", source, tmp_path / "strict", chunk_rows=1000)
    message = str(caught.value)
    assert message.startswith(f"{source}: row group {BAD_GROUP} (rows {first}-{last}) cannot be")
    assert "--bad-records" in message and "\n" not in message
    result = edgewise(
        "batch", "--repo", str(model_repo), "--model", "logreg", "--input", str(source),
        "--output", str(tmp_path / "cli"),
    )  # fmt: skip
    assert result.returncode != 0 and f"row group {BAD_GROUP}" in result.stderr
    assert "Traceback" not in result.stderr

    bad = tmp_path / "bad"
    out = tmp_path / "out"
    summary = batch(
        model_repo, "logreg", source, out, chunk_rows=1000, bad_records=bad, drift_report=False
    )
    assert summary.bad_records == GROUP_ROWS
    assert summary.rows == len(frame) - GROUP_ROWS
    records = [json.loads(line) for p in sorted(bad.glob("rows-*.jsonl")) for line in
               p.read_text().splitlines()]  # fmt: skip
    # rows 4501-6000 lie in chunks 4 (4501-5000) and 5 (5001-6000)
    assert [(r["row_group"], r["rows"], r["count"]) for r in records] == [
        (BAD_GROUP, [first, 5000], 500),
        (BAD_GROUP, [5001, last], 1000),
    ]
    assert all("row group 3 cannot be decoded" in r["reason"] for r in records)
    table = read_output(out)
    kept = frame[(frame.index < first - 1) | (frame.index >= last)]
    assert table.column(ID).to_pylist() == kept[ID].tolist()
    # the scores of the rows kept are onnxruntime's on the same rows, chunk by chunk
    got = output_arrays(table)
    for chunk in range(0, len(frame), 1000):
        rows = kept[(kept.index >= chunk) & (kept.index < chunk + 1000)]
        if rows.empty:
            continue
        want = expected_scores(model_repo, "logreg", rows, len(rows))
        at = np.searchsorted(table.column(ID).to_numpy(), rows[ID].to_numpy())
        assert_scores_equal({k: v[at] for k, v in got.items()}, want)

    again = batch(model_repo, "logreg", source, out, resume=True, bad_records=bad)
    assert again.already_complete and again.bad_records == GROUP_ROWS
