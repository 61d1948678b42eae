"""The chunked readers: fixed chunk boundaries whatever the file's row groups or CSV blocks, entry
at any chunk, input discovery, and the schema check."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.batch import reader as batch_reader
from edgewise.runtime.batch.reader import ColumnSpec, discover_inputs, open_reader
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from tests.runtime.batch.helpers import ID, Inputs


def _columns(model_repo: Path, name: str = "logreg", ids: tuple[str, ...] = (ID,)) -> ColumnSpec:
    return ColumnSpec(read_manifest(model_repo / name / "1").features, ids)


def _chunks(path: Path, columns: ColumnSpec, rows: int, first: int = 0) -> list[pd.DataFrame]:
    (file,) = discover_inputs(str(path))
    return [c.table.to_pandas() for c in open_reader(file, columns, rows).chunks(first)]


@pytest.mark.parametrize("source", ["cancer_parquet", "cancer_csv", "cancer_npy"])
@pytest.mark.parametrize("chunk_rows", [7, 999, 3000, 4096, 50_000])
def test_chunks_are_fixed_slices_of_the_file(
    model_repo: Path, inputs: Inputs, source: str, chunk_rows: int
) -> None:
    columns = _columns(model_repo)
    frame = inputs.cancer[list(columns.names)]
    chunks = _chunks(getattr(inputs, source), columns, chunk_rows)
    n = len(frame)
    assert [len(c) for c in chunks] == [min(chunk_rows, n - s) for s in range(0, n, chunk_rows)]
    got = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(got, frame, check_dtype=False)


@pytest.mark.parametrize("source", ["cancer_parquet", "cancer_csv", "cancer_npy"])
def test_reading_from_a_chunk_in_the_middle(model_repo: Path, inputs: Inputs, source: str) -> None:
    columns = _columns(model_repo)
    path = getattr(inputs, source)
    whole = _chunks(path, columns, 1300)
    for first in (1, 2, 3, 7, len(whole) - 1):  # row group boundaries at multiples of 3000
        tail = _chunks(path, columns, 1300, first)
        assert len(tail) == len(whole) - first
        for got, want in zip(tail, whole[first:], strict=True):
            pd.testing.assert_frame_equal(got, want)
    (file,) = discover_inputs(str(path))
    some = list(open_reader(file, columns, 1300).chunks(2, 4))
    assert [c.index for c in some] == [2, 3, 4]
    last = list(open_reader(file, columns, 1300).chunks(len(whole) - 1))
    assert last[0].last and not some[-1].last


def test_compressed_csv_and_progress_position(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    path = tmp_path / "cancer.csv.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(inputs.cancer_csv.read_bytes())
    columns = _columns(model_repo)
    (file,) = discover_inputs(str(path))
    assert file.format == "csv" and file.rows is None
    chunks = list(open_reader(file, columns, 5000).chunks())
    assert sum(c.table.num_rows for c in chunks) == len(inputs.cancer)
    positions = [c.bytes_read for c in chunks]
    assert positions == sorted(positions) and positions[-1] == file.size
    assert chunks[-1].last


def test_discovery_of_files_folders_and_globs(inputs: Inputs, tmp_path: Path) -> None:
    (tmp_path / "sub" / "_temporary").mkdir(parents=True)
    for name in ("b.parquet", "a.csv", "sub/c.npy", "sub/_temporary/x.parquet", ".d.parquet"):
        source = inputs.cancer_npy if name.endswith(".npy") else inputs.cancer_parquet
        if name.endswith(".csv"):
            source = inputs.cancer_csv
        (tmp_path / name).write_bytes(source.read_bytes())
    (tmp_path / "README.md").write_text("not data")
    names = [Path(f.path).relative_to(tmp_path).as_posix() for f in discover_inputs(str(tmp_path))]
    assert names == ["a.csv", "b.parquet", "sub/c.npy"]
    found = discover_inputs(f"{tmp_path}/**/*.parquet")
    assert [Path(f.path).name for f in found] == ["b.parquet", "x.parquet"]
    rows = {Path(f.path).suffix: f.rows for f in discover_inputs(str(tmp_path))}
    assert rows == {".csv": None, ".parquet": len(inputs.cancer), ".npy": len(inputs.cancer)}
    with pytest.raises(InvalidInput, match="no such file or folder"):
        discover_inputs(str(tmp_path / "missing.parquet"))
    with pytest.raises(InvalidInput, match="unknown table format"):
        discover_inputs(str(tmp_path / "README.md"))
    zipped = tmp_path / "data.csv.zip"
    zipped.write_bytes(b"PK")
    with pytest.raises(InvalidInput, match=r"\.zip and \.xz CSV files are not read in chunks"):
        discover_inputs(str(zipped))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 nonsense")
    with pytest.raises(InvalidInput, match="cannot read as Parquet"):
        discover_inputs(str(broken))


def test_npy_files_that_cannot_be_matched_to_the_features(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    features = inputs.cancer.drop(columns=[ID]).to_numpy()
    columns = _columns(model_repo, ids=())
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, features[:, :10])
    with pytest.raises(InvalidInput, match="has 10 column"):
        open_reader(discover_inputs(str(narrow))[0], columns, 100)
    plain = tmp_path / "plain.npy"
    np.save(plain, features)
    with pytest.raises(InvalidInput, match="plain array has no column names"):
        open_reader(discover_inputs(str(plain))[0], _columns(model_repo), 100)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match="object"):
        discover_inputs(str(objects))


def test_schema_check_names_every_problem(model_repo: Path) -> None:
    columns = _columns(model_repo, "mixed", ids=("id",))
    schema = pa.schema(
        [
            ("alcohol", pa.float32()),
            ("magnesium", pa.string()),
            ("alcohol_level", pa.dictionary(pa.int8(), pa.string())),
            ("color_band", pa.float64()),
            ("id", pa.string()),
        ]
    )
    with pytest.raises(InvalidInput) as caught:
        batch_reader.check_schema(schema, columns, "in.parquet")
    message = caught.value.message
    assert message.startswith("in.parquet: missing feature column 'malic_acid'")
    assert "column 'magnesium' holds string, but the model's feature is numeric" in message
    assert "column 'color_band' holds double, but the model's feature is categorical" in message
    assert "alcohol_level" not in message  # a dictionary of strings is a categorical column
    fields = [
        (f.name, pa.int16() if f.kind == "numeric" else pa.large_string()) for f in columns.features
    ]
    numeric_ok = pa.schema([*fields, ("id", pa.int64())])
    batch_reader.check_schema(numeric_ok, columns, "ok.parquet")


def test_parquet_chunks_across_many_small_row_groups(model_repo: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = list(_columns(model_repo, ids=()).feature_names)
    frame = pd.DataFrame(rng.normal(size=(10_007, len(names))), columns=names)
    path = tmp_path / "small-groups.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=333)
    chunks = _chunks(path, _columns(model_repo, ids=()), 1024, first=3)
    got = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(got, frame.iloc[3 * 1024 :].reset_index(drop=True))
