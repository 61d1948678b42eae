"""``--carry-columns`` (SageMaker's join source): every input column reaches the output beside
the scores, the id columns first; an input column named like a model output is left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.errors import InvalidInput
from tests.runtime.batch.helpers import (
    ID,
    Inputs,
    assert_scores_equal,
    batch,
    expected_scores,
    output_arrays,
    read_output,
)


def test_every_input_column_is_carried_beside_the_scores(
    model_repo: Path, inputs: Inputs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = inputs.cancer.copy()
    frame["label"] = np.arange(len(frame)) % 2  # ground truth named like the model's output
    frame["segment"] = np.where(np.arange(len(frame)) % 3 == 0, "a", "b")
    source = tmp_path / "in.parquet"
    frame.to_parquet(source, index=False)
    out = tmp_path / "out"
    batch(model_repo, "logreg", source, out, id_columns=("segment",), carry_columns=True)
    table = read_output(out)
    carried = [c for c in frame.columns if c not in ("segment", "label")]
    assert table.column_names == ["segment", *carried, "label", "probabilities"]
    assert "'label'" in caplog.text and "--carry-columns leaves out" in caplog.text
    got = table.select(["segment", *carried]).to_pandas()
    pd.testing.assert_frame_equal(got, frame[["segment", *carried]], check_dtype=False)
    assert_scores_equal(
        output_arrays(table), expected_scores(model_repo, "logreg", inputs.cancer, 1000)
    )
    job = json.loads((out / "_job.json").read_text())
    assert job["carry_columns"] is True and job["id_columns"] == ["segment"]
    # Resumed: the same columns (recomputed from the unchanged first input).
    (out / "_SUCCESS").unlink()
    (out / "_summary.json").unlink()
    again = batch(model_repo, "logreg", source, out, id_columns=(), resume=True)
    assert again.rows == len(frame)
    assert pq.read_schema(next(out.glob("part-*.parquet"))).names == table.column_names


def test_carrying_is_recorded_and_resume_cannot_add_it(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch(model_repo, "logreg", inputs.cancer_parquet, out)
    with pytest.raises(InvalidInput, match="does not carry the input columns"):
        batch(model_repo, "logreg", inputs.cancer_parquet, out, resume=True, carry_columns=True)
    assert read_output(out).column_names == [ID, "label", "probabilities"]
