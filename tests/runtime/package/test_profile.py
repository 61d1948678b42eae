from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.errors import PackageError
from edgewise.runtime.package.manifest import PROFILE_FILE, read_manifest
from edgewise.runtime.package.reference_profile import (
    PROFILE_FORMAT,
    ReferenceProfile,
    build_profile,
    read_profile,
)
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models


def test_convert_stores_a_profile_of_the_model_inputs(model_repo: Path) -> None:
    _, frame, _ = models.train_logreg()
    folder = model_repo / "logreg" / "1"
    manifest = read_manifest(folder)
    profile = read_profile(folder, manifest)
    assert profile is not None
    numeric = profile.numeric
    assert numeric is not None
    assert numeric.input == "features"
    assert list(numeric.names) == list(frame.columns)
    assert profile.rows == len(frame)
    batch = frame_to_inputs(manifest, frame)["features"].astype(np.float64)
    for index in range(len(numeric.names)):
        edges = numeric.edges.edges_of(index)
        assert edges[0] == batch[:, index].min()
        assert edges[-1] == batch[:, index].max()
        inside, _ = np.histogram(batch[:, index], bins=edges)
        counts = numeric.counts[index]
        # [underflow, bins..., overflow, nan]: the reference itself never falls outside
        assert counts[0] == 0
        assert counts[numeric.edges.overflow_column] == 0
        np.testing.assert_array_equal(counts[1 : 1 + len(inside)], inside)
    np.testing.assert_allclose(numeric.moments[1], batch.mean(axis=0), rtol=1e-9)
    assert numeric.sample.shape == (len(frame), 30)  # 569 rows <= the 2000-row cap
    schema = profile.schema()
    assert schema["mean radius"]["kind"] == "numeric"
    assert schema["mean radius"]["min"] == pytest.approx(batch[:, 0].min())
    assert schema["mean radius"]["nullable"] is False


def test_categorical_profile(model_repo: Path) -> None:
    _, frame, _ = models.train_mixed()
    folder = model_repo / "mixed" / "1"
    profile = read_profile(folder, read_manifest(folder))
    assert profile is not None
    by_name = {c.name: c for c in profile.categorical}
    level = by_name["alcohol_level"]
    assert level.categories == ("high", "low", "mid")
    expected = [int((frame["alcohol_level"] == c).sum()) for c in level.categories]
    assert level.counts.tolist() == [*expected, 0]
    assert level.missing == 0


def test_json_round_trip_and_nan_as_null() -> None:
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(300, 3))
    batch[:10, 1] = np.nan
    batch[:, 2] = 4.0  # constant
    from edgewise.runtime.package.manifest import Feature

    features = tuple(Feature(f"f{i}", "numeric", "features", i, "float64") for i in range(3))
    profile = build_profile({"features": batch}, features, n_bins=5, sample_rows=50)
    data = profile.to_json()
    text = json.dumps(data, allow_nan=False)  # strict JSON: NaN is stored as null
    again = ReferenceProfile.from_json(json.loads(text))
    assert again.numeric is not None and profile.numeric is not None
    np.testing.assert_array_equal(again.numeric.counts, profile.numeric.counts)
    np.testing.assert_array_equal(again.numeric.moments, profile.numeric.moments)
    np.testing.assert_array_equal(again.numeric.sample, profile.numeric.sample)
    assert again.numeric.sample.shape == (50, 3)
    assert again.schema()["f1"]["nullable"] is True
    assert profile.numeric.counts[1, -1] == 10  # the NaN column


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="edgewise.profile/99"),
        lambda d: d["numeric"].update(counts=[[1, 2]]),
        lambda d: d["numeric"].pop("edges"),
        lambda d: d.update(rows="many"),
    ],
)
def test_malformed_profiles_are_package_errors(model_repo: Path, mutate: object) -> None:
    folder = model_repo / "logreg" / "1"
    data = json.loads((folder / PROFILE_FILE).read_text())
    mutate(data)  # type: ignore[operator]
    with pytest.raises(PackageError):
        ReferenceProfile.from_json(data)


def test_missing_profile_file_is_a_package_error(fresh_repo: Path) -> None:
    folder = fresh_repo / "logreg" / "1"
    (folder / PROFILE_FILE).unlink()
    with pytest.raises(PackageError, match=r"profile\.json is missing"):
        read_profile(folder, read_manifest(folder))
    assert PROFILE_FORMAT == "edgewise.profile/1"
