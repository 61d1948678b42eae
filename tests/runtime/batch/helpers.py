"""Helpers of the batch tests: input tables made from scikit-learn's bundled datasets (tiled), jobs
run in this process or as a real ``edgewise batch`` process, and their output read back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from edgewise.runtime.batch import BatchOptions, BatchSummary, run_batch
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.model import SessionSettings, load_model
from tests import models

ID = "row_id"


def tile(frame: pd.DataFrame, times: int) -> pd.DataFrame:
    """``frame`` repeated ``times`` times, with a unique int64 ``row_id`` column first."""
    tiled = pd.concat([frame] * times, ignore_index=True)
    tiled.insert(0, ID, np.arange(len(tiled), dtype=np.int64) * 7 + 3)
    return tiled


def cancer_frame(times: int = 20) -> pd.DataFrame:
    """Breast cancer (the ``logreg`` model's 30 columns), tiled: 569 * times rows."""
    return tile(models.train_logreg()[1], times)


def mixed_with_nulls(times: int = 30) -> pd.DataFrame:
    """Wine with the ``mixed`` model's string and int columns, tiled, with some missing values
    (NaN numbers, None strings) and some categories the model never saw."""
    frame = tile(models.mixed_frame(), times)
    frame["alcohol_level"] = frame["alcohol_level"].astype(object)
    frame.loc[frame.index % 97 == 5, "alcohol_level"] = None
    frame.loc[frame.index % 89 == 7, "color_band"] = "unheard-of"
    frame.loc[frame.index % 83 == 11, "malic_acid"] = np.nan
    return frame


@dataclass(frozen=True)
class Inputs:
    folder: Path
    cancer: pd.DataFrame
    cancer_parquet: Path  # row groups of 3000 rows
    cancer_csv: Path
    cancer_npy: Path  # structured array
    mixed: pd.DataFrame
    mixed_parquet: Path
    mixed_csv: Path


def batch(
    repo: Path | None,
    model: str,
    source: Path | str,
    output: Path,
    *,
    id_columns: Sequence[str] = (ID,),
    chunk_rows: int = 1000,
    **options: Any,
) -> BatchSummary:
    """Run a job in this process (no progress output)."""
    options.setdefault("progress", "off")
    return run_batch(
        BatchOptions(
            repo=repo,
            model=model,
            input=str(source),
            output=output,
            id_columns=tuple(id_columns),
            chunk_rows=chunk_rows,
            **options,
        )
    )


def read_output(folder: Path) -> pa.Table:
    """Every part file of a job's output, in chunk order, as one table."""
    parts = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def expected_scores(
    repo: Path, name: str, frame: pd.DataFrame, chunk_rows: int
) -> dict[str, np.ndarray]:
    """The model's outputs for ``frame`` computed chunk by chunk with the same chunk boundaries
    (onnxruntime's linear kernels round differently for different batch sizes)."""
    folder = repo / name / "1"
    manifest = read_manifest(folder)
    model = load_model(name, 1, folder, SessionSettings())
    pieces: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(frame), chunk_rows):
        chunk = frame.iloc[start : start + chunk_rows]
        for key, value in model.run(frame_to_inputs(manifest, chunk)).items():
            pieces.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in pieces.items()}


def output_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Output columns as numpy: fixed-size lists become 2-D arrays."""
    arrays: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            arrays[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            arrays[name] = column.to_numpy(zero_copy_only=False)
    return arrays


def assert_tables_equal(actual: pa.Table, expected: pa.Table) -> None:
    """Same schema (metadata included) and the same values, row for row (NaN equals NaN: a model
    answers NaN for a row with a missing number it cannot handle)."""
    assert actual.schema.equals(expected.schema, check_metadata=True)
    assert actual.num_rows == expected.num_rows
    got, want = output_arrays(actual), output_arrays(expected)
    for name in expected.column_names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name, strict=True)


def assert_scores_equal(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]
) -> None:
    for key, want in expected.items():
        got = actual[key]
        assert got.shape[0] == want.shape[0], key
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=key)


def edgewise(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def report_without_time(folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((folder / "_drift_report.json").read_text())
    report.pop("computed_at")
    return report
