"""``edgewise batch`` on entity-keyed input for a model that looks its features up (issue 24 item
2): the features are joined point in time from the Feast file offline store of the test
repository (tests/feast_repo.py), as the server reads them from the online store. The oracles:
Feast's own ``get_historical_features`` on the same entity rows (run in Feast's environment), and
onnxruntime on the rows it answers; the batch job never imports Feast."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from edgewise.runtime.convert.converter import convert
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.reference_profile import read_profile
from tests import feast_repo as fr
from tests.prerequisites import unmet
from tests.runtime.batch.helpers import batch, edgewise, read_output

UNKNOWN = 100_000  # a patient the store does not have


@dataclass
class Setup:
    repo: Path  # the feature repository
    models: Path  # the edgewise model repository
    rows: pd.DataFrame  # the entity rows (the batch input)
    feast: pd.DataFrame  # Feast's get_historical_features on them, in input order
    source: Path  # rows as a Parquet file


def _section(repo: Path, **extra: Any) -> dict[str, Any]:
    return {
        "registry": str(repo / "data" / "registry.db"),
        "project": fr.PROJECT,
        "online_store": {"type": "sqlite", "path": str(repo / "data" / "online_store.db")},
        "feature_service": fr.SERVICE,
        "request_inputs": [fr.REQUEST_INPUT],
        **extra,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    reason = fr.feast_missing()
    if reason is not None:
        unmet(reason)
    root = tmp_path_factory.mktemp("batch-feast")
    repo = fr.write_repo(root / "feature_repo")
    entities = fr.training_entities()
    bmi = dict(zip(entities[fr.ENTITY], entities[fr.REQUEST_INPUT], strict=True))
    moments = [fr.T0, fr.BETWEEN, fr.T1, fr.T1 + timedelta(minutes=5)]  # old, old, new, new
    ids = list(range(0, 442, 3))
    rows = pd.DataFrame(
        [(i, pd.Timestamp(m), bmi[i]) for m in moments for i in ids],
        columns=[fr.ENTITY, "event_timestamp", fr.REQUEST_INPUT],
    )
    rows.insert(0, "row_id", np.arange(len(rows), dtype=np.int64) * 5 + 1)
    source = root / "rows.parquet"
    rows.to_parquet(source, index=False)
    fr.run_feast(
        repo,
        apply=True,
        historical={"entities": str(source), "out": str(root / "feast.parquet")},
    )
    feast = pd.read_parquet(root / "feast.parquet")
    assert len(feast) == len(rows)  # every row has a value in its view's TTL window
    feast = feast.set_index("row_id").loc[rows["row_id"]].reset_index()
    # The model, trained on the point-in-time training set as in tests/runtime/features.
    train = entities.copy()
    snap = fr.snapshots()
    old = snap[snap["event_timestamp"] == pd.Timestamp(fr.T0)].set_index(fr.ENTITY)
    for name in fr.FEATURES:
        train[name] = old.loc[train[fr.ENTITY], name].to_numpy()
    X = train[list(fr.COLUMNS)].astype(np.float64)
    model = LinearRegression().fit(X, train["target"])
    models = root / "models"
    for name in ("risk", "risk_default", "plain"):
        convert(model, X, name=name, repo=models)
    (models / "risk" / "config.json").write_text(
        json.dumps({"features": _section(repo, on_missing="not_found")})
    )
    (models / "risk_default" / "config.json").write_text(json.dumps({"features": _section(repo)}))
    yield Setup(repo, models, rows, feast, source)


def _onnx(setup: Setup, frame: pd.DataFrame) -> np.ndarray[Any, Any]:
    """onnxruntime on the columns of ``frame`` (the model's, in its order)."""
    session = ort.InferenceSession(str(setup.models / "plain" / "1" / "model.onnx"))
    X = frame[list(fr.COLUMNS)].to_numpy(dtype=np.float32)
    return np.asarray(session.run(None, {"features": X})[0]).reshape(-1)


def _scores(out: Path) -> pd.DataFrame:
    table = read_output(out).to_pandas()
    scores = [c for c in table.columns if c != "row_id"]
    assert len(scores) == 1
    return table.rename(columns={scores[0]: "score"})


def test_batch_joins_features_point_in_time_like_feast(setup: Setup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = batch(
        setup.models, "risk", setup.source, out, id_columns=("row_id",), chunk_rows=128,
        drift_report=False,
    )  # fmt: skip
    assert summary.rows == len(setup.rows)
    got = _scores(out)
    assert got["row_id"].tolist() == setup.rows["row_id"].tolist()
    want = _onnx(setup, setup.feast)
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-5, atol=1e-4)
    # the old snapshot before T1, the new one (old + 1) from T1 on: the join is point in time
    old_rows = setup.rows["event_timestamp"] < pd.Timestamp(fr.T1)
    assert not np.allclose(want[old_rows.to_numpy()][:10], want[~old_rows.to_numpy()][:10])
    job = json.loads((out / "_job.json").read_text())
    assert job["features"]["feature_service"] == fr.SERVICE
    assert job["features"]["event_timestamp"] == "event_timestamp"


def test_missing_features_follow_the_models_policy(setup: Setup, tmp_path: Path) -> None:
    rows = setup.rows.iloc[:40].copy()
    rows.loc[rows.index[7], fr.ENTITY] = UNKNOWN
    rows.loc[rows.index[9], "event_timestamp"] = pd.Timestamp(fr.T0 - timedelta(hours=1))
    source = tmp_path / "rows.parquet"
    rows.to_parquet(source, index=False)

    # not_found, strict: one line naming the file, the row and the entity
    with pytest.raises(InvalidInput) as caught:
        batch(setup.models, "risk", source, tmp_path / "strict", id_columns=("row_id",))
    message = str(caught.value)
    assert message.startswith(f"{source}: row 8: no value of feature 'age' for patient_id=")
    assert str(UNKNOWN) in message and "--bad-records" in message
    cli = edgewise(
        "batch", "--repo", str(setup.models), "--model", "risk", "--input", str(source),
        "--output", str(tmp_path / "cli"), "--id-columns", "row_id",
    )  # fmt: skip
    assert cli.returncode != 0 and "row 8: no value of feature" in cli.stderr
    assert "Traceback" not in cli.stderr

    # not_found with --bad-records: the two rows set aside, the others scored
    bad = tmp_path / "bad"
    summary = batch(
        setup.models, "risk", source, tmp_path / "aside", id_columns=("row_id",), bad_records=bad
    )
    assert summary.bad_records == 2 and summary.rows == 38
    records = [
        json.loads(x) for p in bad.glob("features-*.jsonl") for x in p.read_text().splitlines()
    ]
    assert sorted(r["row"] for r in records) == [8, 10]
    kept = np.ones(40, dtype=bool)
    kept[[7, 9]] = False
    got = _scores(tmp_path / "aside")
    assert got["row_id"].tolist() == rows["row_id"][kept].tolist()
    np.testing.assert_allclose(
        got["score"].to_numpy(), _onnx(setup, setup.feast.iloc[:40][kept]), rtol=1e-5, atol=1e-4
    )

    # default: the reference profile's means fill the missing values, as serving does
    summary = batch(setup.models, "risk_default", source, tmp_path / "dflt", id_columns=("row_id",))
    assert summary.rows == 40
    folder = setup.models / "risk_default" / "1"
    profile = read_profile(folder, read_manifest(folder))
    assert profile is not None and profile.numeric is not None
    means = dict(zip(profile.numeric.names, profile.numeric.moments[1], strict=True))
    filled = setup.feast.iloc[:40].copy()
    for row in (7, 9):
        for name in fr.FEATURES:
            filled.loc[filled.index[row], name] = means[name]
    got = _scores(tmp_path / "dflt")
    np.testing.assert_allclose(got["score"].to_numpy(), _onnx(setup, filled), rtol=1e-5, atol=1e-4)


def test_an_input_without_the_join_keys_is_refused_before_anything_is_written(
    setup: Setup, tmp_path: Path
) -> None:
    source = tmp_path / "no-keys.parquet"
    setup.rows.drop(columns=[fr.ENTITY, "event_timestamp"]).to_parquet(source, index=False)
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match="missing id column 'patient_id', id column 'event_tim"):
        batch(setup.models, "risk", source, out, id_columns=("row_id",))
    assert not out.exists()
    with pytest.raises(InvalidInput, match="--event-timestamp 'ts': the model declares no"):
        batch(
            setup.models, "plain", setup.source, out, id_columns=("row_id",), event_timestamp="ts"
        )
