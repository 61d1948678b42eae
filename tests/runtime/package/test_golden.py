"""Golden requests: recorded through the serving code path, stored as plain JSON, checked within
tolerance; for every reference model (numeric and string inputs, integer and string labels)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.errors import PackageError
from edgewise.runtime.package.golden import (
    GOLDEN_FILE,
    GoldenRequest,
    GoldenSet,
    add_golden,
    check_golden,
    compare_outputs,
    golden_inputs_from_sample,
    read_golden,
    record_golden,
    synthetic_inputs,
    write_golden,
)
from edgewise.runtime.package.manifest import read_manifest, verify_files
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.model import SessionSettings, load_model
from tests import models


@pytest.fixture
def package(model_repo: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    name = getattr(request, "param", "logreg")
    target = tmp_path / name / "1"
    shutil.copytree(model_repo / name / "1", target)
    return target


@pytest.mark.parametrize("package", list(models.MODEL_NAMES), indirect=True)
def test_golden_round_trip_for_every_reference_model(package: Path) -> None:
    manifest = add_golden(package)
    assert any(f.path == GOLDEN_FILE for f in manifest.files)
    verify_files(package, manifest)
    golden = read_golden(package)
    assert golden is not None and golden.model == manifest.name
    assert golden.model_sha256 == manifest.model_sha256
    model = load_model(manifest.name, 1, package, SessionSettings())
    assert check_golden(model, golden) == 1
    # The JSON form gives back exactly what the model answered (float32 survives the trip).
    fresh = model.run(golden.requests[0].inputs)
    for name, recorded in golden.requests[0].outputs.items():
        assert recorded.dtype == fresh[name].dtype or recorded.dtype == object
        assert compare_outputs({name: recorded}, {name: fresh[name]}, 0.0, 0.0) == []


def test_golden_rows_from_the_sample(package: Path) -> None:
    _, X, _ = models.train_logreg()
    manifest = read_manifest(package)
    rows = golden_inputs_from_sample(manifest, X, rows=5)
    assert rows["features"].shape == (5, 30)
    expected = frame_to_inputs(manifest, X.iloc[[0, 142, 284, 426, 568]])["features"]
    np.testing.assert_array_equal(rows["features"], expected)
    add_golden(package, rows, replace=True)
    golden = read_golden(package)
    assert golden is not None
    np.testing.assert_array_equal(golden.requests[0].inputs["features"], expected)


@pytest.mark.parametrize("package", ["mixed"], indirect=True)
def test_synthetic_inputs_cover_categories_and_missing(package: Path) -> None:
    manifest = read_manifest(package)
    first, second = synthetic_inputs(manifest), synthetic_inputs(manifest)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])  # deterministic
    categorical = [f for f in manifest.features if f.kind == "categorical"]
    for feature in categorical:
        values = {v for v in first[feature.input].ravel()}
        assert values == {c.encode() for c in feature.categories} | {b""}
    assert not np.any(first["features"][0])  # the first row is all zeros


def test_a_model_that_answers_differently_is_caught(package: Path) -> None:
    manifest = add_golden(package)
    golden = read_golden(package)
    assert golden is not None
    model = load_model(manifest.name, 1, package, SessionSettings())
    request = golden.requests[0]
    outputs = dict(request.outputs)
    probabilities = next(k for k, v in outputs.items() if v.dtype.kind == "f")
    outputs[probabilities] = outputs[probabilities] + np.float32(1e-3)
    shifted = GoldenSet(
        golden.model, golden.model_sha256, (GoldenRequest(request.inputs, outputs),)
    )
    with pytest.raises(PackageError, match=f"output '{probabilities}'.*differ beyond"):
        check_golden(model, shifted)
    loose = GoldenSet(golden.model, golden.model_sha256, shifted.requests, atol=1e-2, rtol=0.0)
    assert check_golden(model, loose) == 1  # within a looser tolerance
    labels = next(k for k, v in outputs.items() if v.dtype.kind in "iO")
    flipped = dict(request.outputs)
    flipped[labels] = 1 - flipped[labels]
    wrong = GoldenSet(golden.model, golden.model_sha256, (GoldenRequest(request.inputs, flipped),))
    with pytest.raises(PackageError, match=f"output '{labels}': .* values differ"):
        check_golden(model, wrong)
    other = GoldenSet(golden.model, "0" * 64, golden.requests)
    with pytest.raises(PackageError, match="recorded with model sha256"):
        check_golden(model, other)


def test_string_outputs_are_compared_as_text(tmp_path: Path) -> None:
    recorded = np.array([b"class_0", b"class_2"], dtype=object)
    as_text = np.array(["class_0", "class_2"], dtype=object)  # what onnxruntime hands back
    assert compare_outputs({"label": recorded}, {"label": as_text}) == []
    other = np.array(["class_0", "class_1"], dtype=object)
    assert compare_outputs({"label": recorded}, {"label": other}) == [
        "output 'label': 1 of 2 values differ"
    ]
    assert compare_outputs({"label": recorded}, {}) == ["output 'label' is missing"]
    assert compare_outputs({"label": recorded}, {"label": as_text[:1]}) == [
        "output 'label': shape [1] != [2]"
    ]
    golden = GoldenSet("m", "", (GoldenRequest({"x": as_text}, {"label": recorded}),))
    write_golden(tmp_path, golden)
    back = read_golden(tmp_path)
    assert back is not None
    assert list(back.requests[0].outputs["label"]) == [b"class_0", b"class_2"]


def test_nan_and_infinity_survive_json(package: Path, tmp_path: Path) -> None:
    manifest = read_manifest(package)
    rows = synthetic_inputs(manifest, rows=3)
    rows["features"][1, 0] = np.nan
    rows["features"][2, 1] = np.inf
    rows["features"][2, 2] = -np.inf
    golden = record_golden(package, rows)
    write_golden(tmp_path, golden)
    text = (tmp_path / GOLDEN_FILE).read_text()
    json.loads(text)  # strict JSON: no NaN literal
    assert "NaN" not in text and '"Infinity"' in text and "null" in text
    back = read_golden(tmp_path)
    assert back is not None
    features = back.requests[0].inputs["features"]
    assert math.isnan(features[1, 0]) and features[2, 1] == np.inf and features[2, 2] == -np.inf
    np.testing.assert_array_equal(features, rows["features"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"format": "other"}', "unknown format"),
        ('{"format": "edgewise.golden/1", "model": "m", "requests": []}', "no request"),
        (
            '{"format": "edgewise.golden/1", "model": "m", "requests": [{"inputs": {"x": '
            '{"datatype": "FP32", "shape": [2], "data": [1]}}, "outputs": {"y": '
            '{"datatype": "FP32", "shape": [1], "data": [1]}}}]}',
            "do not fill shape",
        ),
        (
            '{"format": "edgewise.golden/1", "model": "m", "requests": [{"inputs": {"x": '
            '{"datatype": "FP99", "shape": [1], "data": [1]}}, "outputs": {"y": '
            '{"datatype": "FP32", "shape": [1], "data": [1]}}}]}',
            "unknown datatype",
        ),
        (  # an infinite tolerance would let every answer pass the parity check
            '{"format": "edgewise.golden/1", "model": "m", "atol": Infinity, "requests": '
            '[{"inputs": {"x": {"datatype": "FP32", "shape": [1], "data": [1]}}, "outputs": '
            '{"y": {"datatype": "FP32", "shape": [1], "data": [1]}}}]}',
            "must be finite",
        ),
    ],
)
def test_malformed_golden_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / GOLDEN_FILE).write_text(content)
    with pytest.raises(PackageError, match=message):
        read_golden(tmp_path)
    assert read_golden(tmp_path / "elsewhere") is None
