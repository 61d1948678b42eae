"""Tables on disk: .csv, .parquet and .npy as DataFrames."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.tabular import (
    DATA_EXTRA_HINT,
    MissingDependency,
    array_to_frame,
    load_table,
    require_module,
    table_format,
    write_table,
)


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "x": rng.normal(size=20),
            "n": rng.integers(-5, 5, size=20).astype("int64"),
            "flag": rng.random(20) > 0.5,
            "city": rng.choice(["Köln", "Paris", "Lima, Peru"], size=20).astype(object),
        }
    )


def test_table_format() -> None:
    assert table_format("a.csv") == "csv"
    assert table_format("a.CSV.gz") == "csv"
    assert table_format(Path("d/a.parquet")) == "parquet"
    assert table_format("a.pq") == "parquet"
    assert table_format("a.npy") == "npy"
    with pytest.raises(InvalidInput, match=r"unknown table format"):
        table_format("a.xlsx")


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_round_trip(tmp_path: Path, frame: pd.DataFrame, suffix: str) -> None:
    path = tmp_path / f"table{suffix}"
    write_table(frame, path)
    loaded = load_table(path)
    assert list(loaded.columns) == list(frame.columns)
    np.testing.assert_array_equal(loaded["x"].to_numpy(), frame["x"].to_numpy())  # exact floats
    assert loaded["n"].dtype == np.int64
    assert loaded["flag"].dtype == bool
    assert loaded["city"].tolist() == frame["city"].tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_pandas_written_files_load(tmp_path: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        loaded = load_table(tmp_path / name)
        assert loaded.shape == frame.shape
        assert loaded["city"].tolist() == frame["city"].tolist()


def test_parquet_keeps_category_dtype(tmp_path: Path, frame: pd.DataFrame) -> None:
    frame["city"] = frame["city"].astype("category")
    write_table(frame, tmp_path / "t.parquet")
    assert isinstance(load_table(tmp_path / "t.parquet")["city"].dtype, pd.CategoricalDtype)


def test_columns_selects_and_orders(tmp_path: Path, frame: pd.DataFrame) -> None:
    for name in ("t.csv", "t.parquet"):
        write_table(frame, tmp_path / name)
        loaded = load_table(tmp_path / name, columns=["city", "x"])
        assert list(loaded.columns) == ["city", "x"]
        with pytest.raises(InvalidInput, match=r"missing column.*'nope'"):
            load_table(tmp_path / name, columns=["x", "nope"])


def test_npy_two_d(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "a.npy", array)
    loaded = load_table(tmp_path / "a.npy")
    assert list(loaded.columns) == ["f0", "f1", "f2"]
    np.testing.assert_array_equal(loaded.to_numpy(), array)
    named = load_table(tmp_path / "a.npy", names=["a", "b", "c"], columns=["c", "a"])
    assert list(named.columns) == ["c", "a"]
    np.testing.assert_array_equal(named["c"].to_numpy(), array[:, 2])
    with pytest.raises(InvalidInput, match=r"3 column.*2 name"):
        load_table(tmp_path / "a.npy", names=["a", "b"])


def test_npy_write_round_trip(tmp_path: Path, frame: pd.DataFrame) -> None:
    numeric = frame[["x", "n"]]
    write_table(numeric, tmp_path / "t.npy")
    loaded = load_table(tmp_path / "t.npy", names=["x", "n"])
    np.testing.assert_allclose(loaded.to_numpy(), numeric.to_numpy())
    with pytest.raises(InvalidInput, match=r"numeric columns only.*'city'"):
        write_table(frame, tmp_path / "u.npy")
    assert not (tmp_path / "u.npy").exists()


def test_npy_one_d_and_structured(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.array([1.0, 2.0, 3.0]))
    assert load_table(tmp_path / "v.npy")["f0"].tolist() == [1.0, 2.0, 3.0]
    structured = np.array([(1, 2.5), (2, 3.5)], dtype=[("id", "<i8"), ("score", "<f8")])
    np.save(tmp_path / "s.npy", structured)
    loaded = load_table(tmp_path / "s.npy")
    assert list(loaded.columns) == ["id", "score"]
    assert loaded["score"].tolist() == [2.5, 3.5]


def test_npy_object_array_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([["a", 1]], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match=r"object \(pickled\) array"):
        load_table(tmp_path / "o.npy")


def test_array_to_frame_rejects_three_d() -> None:
    with pytest.raises(InvalidInput, match=r"1-D or 2-D"):
        array_to_frame(np.zeros((2, 2, 2)))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no such file"):
        load_table(tmp_path / "absent.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(InvalidInput, match=r"not a file"):
        load_table(tmp_path / "dir.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InvalidInput, match=r"empty CSV"):
        load_table(tmp_path / "empty.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InvalidInput, match=r"binary.csv"):
        load_table(tmp_path / "binary.csv")
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(InvalidInput, match=r"cannot read as Parquet") as info:
        load_table(tmp_path / "bad.parquet")
    assert "\n" not in str(info.value)
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(InvalidInput, match=r"cannot read as .npy"):
        load_table(tmp_path / "bad.npy")


def test_missing_optional_dependency(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(MissingDependency, match=DATA_EXTRA_HINT.replace("[", "\\[")):
        require_module("pyarrow", "reading Parquet files")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependency, match=r"pyarrow"):
        load_table(tmp_path / "t.parquet")
