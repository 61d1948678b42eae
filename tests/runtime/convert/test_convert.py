"""edgewise convert: scikit-learn models to model packages, with parity checks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from edgewise.runtime.convert import converter as convert_module
from edgewise.runtime.convert.converter import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    ConvertResult,
    convert,
    convert_files,
    frame_to_inputs,
    load_model,
)
from edgewise.runtime.errors import ConversionError, EdgewiseError, InvalidInput
from edgewise.runtime.package.manifest import (
    MODEL_FILE,
    PROFILE_FILE,
    Manifest,
    read_manifest,
    sha256_file,
    verify_files,
)
from edgewise.runtime.package.schema import MISSING_CATEGORY, onnxruntime_inputs
from tests.models import (
    MIXED_CATEGORICALS,
    MIXED_INTEGER,
    MODEL_NAMES,
    TRAINERS,
    convert_model,
    train_forest,
    train_logreg,
    train_mixed,
)

# --------------------------------------------------------------------------------------------
# helpers


def manifest_of(repo: Path, name: str, version: int = 1) -> Manifest:
    return read_manifest(repo / name / str(version))


def session_of(repo: Path, name: str, version: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repo / name / str(version) / MODEL_FILE), providers=["CPUExecutionProvider"]
    )


def run_package(repo: Path, name: str, frame: Any) -> dict[str, np.ndarray]:
    manifest = manifest_of(repo, name)
    session = session_of(repo, name)
    inputs = onnxruntime_inputs(frame_to_inputs(manifest, frame))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def assert_nothing_written(repo: Path, name: str) -> None:
    """No package folder for ``name`` and no staging folder anywhere in the repository."""
    assert not (repo / name).exists(), sorted(p.name for p in (repo / name).iterdir())
    if repo.exists():
        leftovers = [p for p in repo.rglob("*") if p.name.startswith(".staging-")]
        assert leftovers == []


def assert_one_line(exc: EdgewiseError) -> None:
    assert "\n" not in str(exc)
    assert len(str(exc)) < 400


# --------------------------------------------------------------------------------------------
# the reference models


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parity_recorded_and_below_atol(model_repo: Path, name: str) -> None:
    parity = manifest_of(model_repo, name).parity
    assert parity["passed"] is True
    assert parity["atol"] == DEFAULT_ATOL
    outputs = parity["sample"]["outputs"]
    assert parity["sample"]["rows"] == len(TRAINERS[name]()[1])
    assert outputs, "no output was compared"
    for output, figures in outputs.items():
        if "max_abs_diff" in figures:
            assert 0.0 <= figures["max_abs_diff"] <= DEFAULT_ATOL, output
        if "mismatches" in figures:
            assert figures["mismatches"] - figures["tied_mismatches"] == 0, output


def test_parity_figures_per_task(model_repo: Path) -> None:
    for name in ("logreg", "forest", "mixed"):
        outputs = manifest_of(model_repo, name).parity["sample"]["outputs"]
        assert set(outputs) == {"label", "probabilities"}
        assert outputs["label"]["mismatches"] == 0
    outputs = manifest_of(model_repo, "regressor").parity["sample"]["outputs"]
    assert set(outputs) == {"predictions"}
    assert outputs["predictions"]["elements"] == len(TRAINERS["regressor"]()[1])


def test_schema_of_logreg(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "logreg")
    _, X, _ = train_logreg()
    assert manifest.task == "classification"
    assert [f.name for f in manifest.features] == list(X.columns)
    assert all(f.kind == "numeric" and f.input == "features" for f in manifest.features)
    assert [f.column for f in manifest.features] == list(range(30))
    assert {f.dtype for f in manifest.features} == {"float64"}
    assert all(f.categories == () for f in manifest.features)
    assert [t.to_json() for t in manifest.inputs] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 30]}
    ]
    assert [t.to_json() for t in manifest.outputs] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]


def numpy_fit_model() -> tuple[Any, np.ndarray]:
    """A model fit on a plain array (no feature names): columns are positional."""
    _, X, y = train_forest()
    array = X.to_numpy()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(array, y), array


def test_numpy_fit_model(tmp_path: Path) -> None:
    model, array = numpy_fit_model()
    result = convert(model, array, name="np", repo=tmp_path)
    manifest = result.manifest
    assert [f.name for f in manifest.features] == [f"f{i}" for i in range(13)]
    assert [t.to_json() for t in manifest.inputs] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 13]}
    ]
    outputs = run_package(tmp_path, "np", array)
    np.testing.assert_allclose(outputs["probabilities"], model.predict_proba(array), atol=1e-4)
    # a DataFrame with other column names is taken positionally too, held-out rows as well
    renamed = pd.DataFrame(array, columns=[f"c{i}" for i in range(13)])
    again = convert(model, renamed, name="np", repo=tmp_path, held_out=array[:10])
    assert [f.name for f in again.manifest.features] == list(renamed.columns)
    assert again.parity["held_out"]["rows"] == 10
    with pytest.raises(InvalidInput, match=r"12 column.*13 features"):
        convert(model, array[:, :12], name="np", repo=tmp_path)


def test_schema_of_dataframe_fit_classifier_keeps_column_names(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "forest")
    _, X, _ = train_forest()
    assert [f.name for f in manifest.features] == list(X.columns)
    assert "od280/od315_of_diluted_wines" in [f.name for f in manifest.features]
    assert [t.name for t in manifest.inputs] == ["features"]
    assert manifest.inputs[0].shape == (-1, 13)
    assert [(t.name, t.shape) for t in manifest.outputs] == [
        ("label", (-1,)),
        ("probabilities", (-1, 3)),
    ]


def test_schema_of_column_transformer_pipeline(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "mixed")
    _, X, _ = train_mixed()
    assert [f.name for f in manifest.features] == list(X.columns)
    numeric = [f for f in manifest.features if f.kind == "numeric"]
    categorical = [f for f in manifest.features if f.kind == "categorical"]
    assert [f.column for f in numeric] == list(range(13))
    assert {f.input for f in numeric} == {"features"}
    assert [f.name for f in categorical] == list(MIXED_CATEGORICALS)
    for feature in categorical:
        assert feature.input == feature.name
        assert feature.column == 0
        assert feature.categories == ("high", "low", "mid")
    assert next(f for f in numeric if f.name == MIXED_INTEGER).dtype == "int64"
    assert [t.to_json() for t in manifest.inputs] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 13]},
        {"name": "alcohol_level", "datatype": "BYTES", "shape": [-1, 1]},
        {"name": "color_band", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    assert [t.to_json() for t in manifest.outputs] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]


def test_schema_of_regressor(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "regressor")
    assert manifest.task == "regression"
    assert [t.to_json() for t in manifest.inputs] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 10]}
    ]
    assert [t.to_json() for t in manifest.outputs] == [
        {"name": "predictions", "datatype": "FP32", "shape": [-1, 1]}
    ]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_graph_matches_manifest(model_repo: Path, name: str) -> None:
    manifest = manifest_of(model_repo, name)
    model = onnx.load(str(model_repo / name / "1" / MODEL_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [t.name for t in manifest.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in manifest.outputs]
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    for spec in manifest.inputs:
        expected = onnx.TensorProto.FLOAT if spec.datatype == "FP32" else onnx.TensorProto.STRING
        assert types[spec.name] == expected
    assert all(o.type.WhichOneof("value") == "tensor_type" for o in model.graph.output)
    assert not any(node.op_type == "ZipMap" for node in model.graph.node)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert manifest.opset == opsets["ai.onnx"] <= DEFAULT_OPSET
    assert manifest.source["conversion"]["opset_imports"] == opsets
    assert manifest.source["conversion"]["target_opset"]["ai.onnx"] == DEFAULT_OPSET


@pytest.mark.parametrize("name", ["logreg", "forest", "mixed"])
def test_onnx_reproduces_classifier(model_repo: Path, name: str) -> None:
    model, X, _ = TRAINERS[name]()
    outputs = run_package(model_repo, name, X)
    np.testing.assert_allclose(outputs["probabilities"], model.predict_proba(X), atol=DEFAULT_ATOL)
    assert outputs["label"].tolist() == model.predict(X).tolist()


def test_onnx_reproduces_regressor(model_repo: Path) -> None:
    model, X, _ = TRAINERS["regressor"]()
    outputs = run_package(model_repo, "regressor", X)
    np.testing.assert_allclose(
        outputs["predictions"].ravel(), model.predict(X), atol=DEFAULT_ATOL, rtol=1e-5
    )


def test_packed_inputs_take_rows_in_any_column_order(model_repo: Path) -> None:
    """frame_to_inputs places columns by name; the graph's Gather/Cast nodes unpack them."""
    model, X, _ = train_mixed()
    shuffled = X[list(reversed(X.columns))].iloc[::-1]
    outputs = run_package(model_repo, "mixed", shuffled)
    np.testing.assert_allclose(
        outputs["probabilities"], model.predict_proba(X.iloc[::-1]), atol=DEFAULT_ATOL
    )


def test_column_transformer_graph_is_packed(model_repo: Path) -> None:
    model = onnx.load(str(model_repo / "mixed" / "1" / MODEL_FILE))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Gather") == 13
    assert ops.count("Cast") >= 1  # the int64 column
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert all(n.input[0] == "features" for n in gathers)
    assert [(i.name) for i in model.graph.input] == ["features", *MIXED_CATEGORICALS]


def test_sha256_and_files(model_repo: Path) -> None:
    for name in MODEL_NAMES:
        folder = model_repo / name / "1"
        manifest = manifest_of(model_repo, name)
        assert [f.path for f in manifest.files] == [MODEL_FILE, PROFILE_FILE, "golden.json"]
        for path in (MODEL_FILE, PROFILE_FILE, "golden.json"):
            entry = manifest.file(path)
            assert entry.sha256 == sha256_file(folder / path)
            assert entry.size == (folder / path).stat().st_size
        verify_files(folder, manifest)
        assert sorted(p.name for p in folder.iterdir()) == [
            "golden.json",
            "manifest.json",
            MODEL_FILE,
            PROFILE_FILE,
        ]


def test_manifest_metadata(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "mixed")
    assert manifest.name == "mixed"
    assert manifest.profile == {"file": PROFILE_FILE, "format": "edgewise.profile/1", "rows": 178}
    assert set(manifest.parity["max_abs_diff"]) == {"probabilities"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest.created_at)
    for library in ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "edgewise"):
        assert manifest.libraries[library] not in ("", "unknown"), library
    assert manifest.source["estimator"] == "sklearn.pipeline.Pipeline"
    assert "OneHotEncoder" in manifest.source["summary"]
    assert manifest.source["n_features_in"] == 15
    assert manifest.source["sample"] == {"rows": 178, "columns": 15}
    assert "model_file" not in manifest.source  # converted from memory


def test_result_matches_published_package(tmp_path: Path) -> None:
    result = convert_model("forest", tmp_path)
    assert isinstance(result, ConvertResult)
    assert (result.name, result.version) == ("forest", 1)
    assert result.path == tmp_path / "forest" / "1"
    assert read_manifest(result.path) == result.manifest
    assert result.parity == result.manifest.parity
    assert read_manifest(result.path).to_json() == json.loads(
        (result.path / "manifest.json").read_text()
    )


def test_versions_increment(fresh_repo: Path) -> None:
    assert convert_model("logreg", fresh_repo).version == 2
    assert convert_model("logreg", fresh_repo, version=7).version == 7
    assert convert_model("logreg", fresh_repo).version == 8
    assert sorted(p.name for p in (fresh_repo / "logreg").iterdir()) == ["1", "2", "7", "8"]
    with pytest.raises(InvalidInput, match=r"already exists"):
        convert_model("logreg", fresh_repo, version=7)
    for bad in (0, -1):
        with pytest.raises(InvalidInput, match=r"version"):
            convert_model("logreg", fresh_repo, version=bad)
    assert sorted(p.name for p in (fresh_repo / "logreg").iterdir()) == ["1", "2", "7", "8"]


def test_held_out_parity_is_recorded(tmp_path: Path) -> None:
    model, X, _ = train_mixed()
    result = convert(model, X.iloc[:100], name="mixed", repo=tmp_path, held_out=X.iloc[100:])
    assert result.parity["sample"]["rows"] == 100
    held = result.parity["held_out"]
    assert held["rows"] == len(X) - 100
    assert held["outputs"]["probabilities"]["max_abs_diff"] < DEFAULT_ATOL
    assert held["outputs"]["label"]["mismatches"] == 0
    assert result.manifest.source["held_out"] == {"rows": len(X) - 100}


def test_target_opset_is_respected(tmp_path: Path) -> None:
    model, X, _ = train_logreg()
    result = convert(model, X, name="logreg", repo=tmp_path, opset=13)
    assert result.manifest.opset <= 13
    assert result.manifest.source["conversion"]["target_opset"]["ai.onnx"] == 13
    with pytest.raises(InvalidInput, match=r"opset"):
        convert(model, X, name="other", repo=tmp_path, opset=99)
    assert_nothing_written(tmp_path, "other")


# --------------------------------------------------------------------------------------------
# frame_to_inputs


def test_frame_to_inputs_shapes_and_types(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "mixed")
    _, X, _ = train_mixed()
    inputs = frame_to_inputs(manifest, X.iloc[:5])
    assert set(inputs) == {"features", *MIXED_CATEGORICALS}
    assert inputs["features"].dtype == np.float32
    assert inputs["features"].shape == (5, 13)
    numeric = [c for c in X.columns if c not in MIXED_CATEGORICALS]
    np.testing.assert_array_equal(
        inputs["features"], X[numeric].iloc[:5].to_numpy(dtype=np.float32)
    )
    for column in MIXED_CATEGORICALS:
        array = inputs[column]
        assert array.dtype == object
        assert array.shape == (5, 1)
        assert all(isinstance(v, bytes) for v in array.ravel())
        assert [v.decode() for v in array.ravel()] == X[column].iloc[:5].tolist()


def test_frame_to_inputs_missing_values_and_errors(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "mixed")
    _, X, _ = train_mixed()
    frame = X.iloc[:3].copy()
    frame["alcohol_level"] = [None, "low", np.nan]
    frame["hue"] = [np.nan, 1.0, 2.0]
    inputs = frame_to_inputs(manifest, frame)
    assert inputs["alcohol_level"][:, 0].tolist() == [MISSING_CATEGORY, b"low", MISSING_CATEGORY]
    hue = next(f.column for f in manifest.features if f.name == "hue")
    assert np.isnan(inputs["features"][0, hue])
    with pytest.raises(InvalidInput, match=r"'color_band'"):
        frame_to_inputs(manifest, X.drop(columns=["color_band"]))
    bad = X.iloc[:2].copy()
    bad["hue"] = ["a", "b"]
    with pytest.raises(InvalidInput, match=r"'hue'"):
        frame_to_inputs(manifest, bad)


def test_frame_to_inputs_from_array(model_repo: Path) -> None:
    manifest = manifest_of(model_repo, "logreg")
    X = train_logreg()[1].to_numpy()
    inputs = frame_to_inputs(manifest, X[:4])
    np.testing.assert_array_equal(inputs["features"], X[:4].astype(np.float32))
    with pytest.raises(InvalidInput, match=r"shape"):
        frame_to_inputs(manifest, X[:4, :5])


def test_onnxruntime_inputs_decodes_bytes() -> None:
    inputs = {
        "features": np.zeros((2, 3), np.float32),
        "city": np.array([[b"K\xc3\xb6ln"], [b""]], dtype=object),
    }
    fed = onnxruntime_inputs(inputs)
    assert fed["features"] is inputs["features"]
    assert fed["city"].tolist() == [["Köln"], [""]]
    with pytest.raises(InvalidInput, match=r"'city'"):
        onnxruntime_inputs({"city": np.array([[b"\xff"]], dtype=object)})


# --------------------------------------------------------------------------------------------
# conversion from files


def test_convert_files_records_model_file(tmp_path: Path) -> None:
    model, X, _ = train_mixed()
    model_path = tmp_path / "mixed.joblib"
    joblib.dump(model, model_path)
    sample_path = tmp_path / "sample.csv"
    X.to_csv(sample_path, index=False)
    repo = tmp_path / "repo"
    result = convert_files(model_path, sample_path, name="mixed", repo=repo)
    source = result.manifest.source
    assert source["model_file"]["sha256"] == sha256_file(model_path)
    assert source["model_file"]["size"] == model_path.stat().st_size
    assert source["sample"]["sha256"] == sha256_file(sample_path)
    assert source["sample"]["rows"] == len(X)
    assert result.manifest.parity["passed"] is True
    categorical = [f for f in result.manifest.features if f.kind == "categorical"]
    assert [f.name for f in categorical] == list(MIXED_CATEGORICALS)


def test_convert_files_npy_and_parquet_samples(tmp_path: Path) -> None:
    model, X, _ = train_forest()
    model_path = tmp_path / "forest.pkl"
    joblib.dump(model, model_path)
    npy = tmp_path / "sample.npy"
    np.save(npy, X.to_numpy())
    parquet = tmp_path / "held.parquet"
    X.iloc[:50].to_parquet(parquet)
    result = convert_files(
        model_path, npy, name="forest", repo=tmp_path / "repo", held_out_path=parquet
    )
    # a headerless .npy takes the column names the model was fit on
    assert [f.name for f in result.manifest.features] == list(X.columns)
    assert result.parity["held_out"]["rows"] == 50


# --------------------------------------------------------------------------------------------
# failures: one clear line, nothing written


class Doubler(BaseEstimator, TransformerMixin):
    """A custom step skl2onnx has no converter for."""

    def fit(self, X: Any, y: Any = None) -> Doubler:
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X: Any) -> Any:
        return np.asarray(X) * 2.0


def test_unconvertible_model(tmp_path: Path) -> None:
    _, X, y = train_logreg()
    model = make_pipeline(Doubler(), StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(X, y)
    with pytest.raises(ConversionError, match=r"no converter for .*Doubler") as info:
        convert(model, X, name="custom", repo=tmp_path)
    assert_one_line(info.value)
    assert_nothing_written(tmp_path, "custom")
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_or_not_fitted(tmp_path: Path) -> None:
    _, X, _ = train_logreg()
    with pytest.raises(ConversionError, match=r"expected a fitted scikit-learn estimator"):
        convert({"coef": [1, 2]}, X, name="m", repo=tmp_path)
    with pytest.raises(ConversionError, match=r"not fitted"):
        convert(LogisticRegression(), X, name="m", repo=tmp_path)
    assert_nothing_written(tmp_path, "m")


def test_sample_with_missing_column(tmp_path: Path) -> None:
    model, X, _ = train_mixed()
    with pytest.raises(InvalidInput, match=r"missing column.*'color_band'") as info:
        convert(model, X.drop(columns=["color_band"]), name="mixed", repo=tmp_path)
    assert_one_line(info.value)
    assert_nothing_written(tmp_path, "mixed")


def test_sample_with_extra_column(tmp_path: Path) -> None:
    model, X, y = train_forest()
    with pytest.raises(InvalidInput, match=r"not fit on: 'target'"):
        convert(model, X.assign(target=y), name="forest", repo=tmp_path)
    assert_nothing_written(tmp_path, "forest")


def test_sample_of_the_wrong_shape_or_type(tmp_path: Path) -> None:
    model, array = numpy_fit_model()
    with pytest.raises(InvalidInput, match=r"12 column.*13 features"):
        convert(model, array[:, :12], name="m", repo=tmp_path)
    with pytest.raises(InvalidInput, match="no rows"):
        convert(model, array[:0], name="m", repo=tmp_path)
    with pytest.raises(InvalidInput, match="DataFrame or a 2-D numpy array"):
        convert(model, array.tolist(), name="m", repo=tmp_path)
    with pytest.raises(InvalidInput, match="2-D"):
        convert(model, array[0], name="m", repo=tmp_path)
    assert_nothing_written(tmp_path, "m")


def test_sample_the_model_cannot_score(tmp_path: Path) -> None:
    model, X, _ = train_mixed()
    strict = copy.deepcopy(model)
    strict.named_steps["pre"].named_transformers_["cat"].handle_unknown = "error"
    sample = X.copy()
    sample.loc[sample.index[0], "color_band"] = "ultraviolet"
    with pytest.raises(InvalidInput, match=r"predict_proba\(\) fails") as info:
        convert(strict, sample, name="mixed", repo=tmp_path)
    assert_one_line(info.value)
    assert_nothing_written(tmp_path, "mixed")


def test_corrupt_pickle(tmp_path: Path) -> None:
    _, X, _ = train_logreg()
    sample = tmp_path / "sample.npy"
    np.save(sample, X)
    for content in (b"not a pickle at all", b"\x80\x04\x95\x10\x00\x00"):
        bad = tmp_path / "model.joblib"
        bad.write_bytes(content)
        with pytest.raises(InvalidInput, match=r"cannot load the model") as info:
            convert_files(bad, sample, name="logreg", repo=tmp_path / "repo")
        assert str(bad) in str(info.value)
        assert_one_line(info.value)
    assert_nothing_written(tmp_path / "repo", "logreg")
    with pytest.raises(InvalidInput, match=r"no such file"):
        load_model(tmp_path / "absent.pkl")
    with pytest.raises(InvalidInput, match=r"\.joblib or \.pkl"):
        load_model(sample)


def test_pickle_of_something_else(tmp_path: Path) -> None:
    _, X, _ = train_logreg()
    model_path = tmp_path / "model.pkl"
    joblib.dump({"weights": [1, 2, 3]}, model_path)
    sample = tmp_path / "sample.npy"
    np.save(sample, X)
    with pytest.raises(ConversionError, match=r"got builtins.dict"):
        convert_files(model_path, sample, name="m", repo=tmp_path / "repo")
    assert_nothing_written(tmp_path / "repo", "m")


def test_unreadable_sample(tmp_path: Path) -> None:
    model, _, _ = train_forest()
    model_path = tmp_path / "forest.joblib"
    joblib.dump(model, model_path)
    repo = tmp_path / "repo"
    corrupt = tmp_path / "sample.parquet"
    corrupt.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(InvalidInput, match=r"cannot read as Parquet") as info:
        convert_files(model_path, corrupt, name="forest", repo=repo)
    assert_one_line(info.value)
    with pytest.raises(InvalidInput, match=r"unknown table format"):
        convert_files(model_path, tmp_path / "sample.xlsx", name="forest", repo=repo)
    with pytest.raises(InvalidInput, match=r"no such file"):
        convert_files(model_path, tmp_path / "absent.csv", name="forest", repo=repo)
    assert_nothing_written(repo, "forest")


def test_bad_name(tmp_path: Path) -> None:
    model, X, _ = train_logreg()
    with pytest.raises(InvalidInput, match=r"model name"):
        convert(model, X, name="../escape", repo=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_with_tiny_tolerance(tmp_path: Path) -> None:
    model, X, _ = train_logreg()
    with pytest.raises(ConversionError, match=r"'probabilities' differs .* by up to") as info:
        convert(model, X, name="logreg", repo=tmp_path, atol=1e-12)  # rtol: not for probabilities
    assert_one_line(info.value)
    assert_nothing_written(tmp_path, "logreg")


def test_parity_failure_of_tampered_labels(tmp_path: Path) -> None:
    """A model whose predict() no longer matches what skl2onnx converts (its coefficients)."""
    model, X, _ = train_logreg()
    tampered = copy.deepcopy(model)
    original_predict = model.predict
    tampered.predict = lambda data: 1 - original_predict(data)
    with pytest.raises(ConversionError, match=r"'label' disagrees with predict\(\)") as info:
        convert(tampered, X, name="logreg", repo=tmp_path)
    assert_one_line(info.value)
    assert_nothing_written(tmp_path, "logreg")


def test_regressor_tolerance_is_relative_too(tmp_path: Path) -> None:
    model, X, _ = TRAINERS["regressor"]()
    # float32 predictions in the hundreds: ~1e-5 absolute error, within rtol 1e-5 but not 1e-9
    result = convert(model, X, name="regressor", repo=tmp_path, atol=1e-9)
    figures = result.parity["sample"]["outputs"]["predictions"]
    assert 0.0 < figures["max_rel_diff"] <= 1e-5
    with pytest.raises(ConversionError, match=r"'predictions' differs .*rtol 1e-12"):
        convert(model, X, name="regressor", repo=tmp_path, atol=1e-9, rtol=1e-12)


def test_parity_failure_of_regressor(tmp_path: Path) -> None:
    model, X, _ = TRAINERS["regressor"]()
    tampered = copy.deepcopy(model)
    original_predict = model.predict
    tampered.predict = lambda data: original_predict(data) + 0.5
    with pytest.raises(ConversionError, match=r"'predictions' differs .* by up to 0.5"):
        convert(tampered, X, name="regressor", repo=tmp_path)
    assert_nothing_written(tmp_path, "regressor")


def test_label_mismatch_allowed_only_on_tie() -> None:
    labels = np.array([0, 1, 1])
    expected = np.array([0, 0, 1])
    tie = np.array([[0.9, 0.1], [0.5, 0.5 - 1e-6], [0.2, 0.8]])
    record, failure = convert_module._compare_labels(labels, expected, tie, 1e-4)
    assert failure is None
    assert record == {"rows": 3, "mismatches": 1, "tied_mismatches": 1}
    clear = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    record, failure = convert_module._compare_labels(labels, expected, clear, 1e-4)
    assert record["tied_mismatches"] == 0
    assert failure is not None and "row 1" in failure


def test_profile_builder_writes_into_the_package(tmp_path: Path) -> None:
    model, X, _ = train_mixed()
    seen: dict[str, Any] = {}

    def builder(folder: Path, sample: pd.DataFrame, features: tuple[Any, ...]) -> dict[str, str]:
        seen["folder"] = folder
        seen["columns"] = list(sample.columns)
        seen["features"] = [f.name for f in features]
        (folder / PROFILE_FILE).write_text(json.dumps({"rows": len(sample)}))
        return {"file": PROFILE_FILE, "format": "test/1"}

    result = convert(model, X, name="mixed", repo=tmp_path, profile_builder=builder)
    assert seen["folder"].name.startswith(".staging-")
    assert seen["columns"] == seen["features"] == list(X.columns)
    assert result.manifest.profile == {"file": PROFILE_FILE, "format": "test/1"}
    assert [f.path for f in result.manifest.files] == [MODEL_FILE, PROFILE_FILE, "golden.json"]
    verify_files(result.path, result.manifest)


def test_failing_profile_builder_publishes_nothing(tmp_path: Path) -> None:
    model, X, _ = train_mixed()

    def builder(folder: Path, sample: pd.DataFrame, features: tuple[Any, ...]) -> None:
        (folder / PROFILE_FILE).write_text("{}")
        raise InvalidInput("profile: boom")

    with pytest.raises(InvalidInput, match=r"boom"):
        convert(model, X, name="mixed", repo=tmp_path / "repo", profile_builder=builder)
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------------------------
# column naming corner cases of the packed graph


def _pipeline(numeric: list[str], categorical: list[str]) -> Any:
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
        ]
    )
    return make_pipeline(pre, LogisticRegression(max_iter=3000))


def test_numeric_column_named_features(tmp_path: Path) -> None:
    _, X, y = train_mixed()
    frame = X.rename(columns={"hue": "features"})
    model = _pipeline(["features", "alcohol", MIXED_INTEGER], ["alcohol_level"]).fit(frame, y)
    result = convert(model, frame, name="m", repo=tmp_path)
    assert [t.name for t in result.manifest.inputs] == ["features", *MIXED_CATEGORICALS]
    outputs = run_package(tmp_path, "m", frame)
    np.testing.assert_allclose(outputs["probabilities"], model.predict_proba(frame), atol=1e-4)


def test_categorical_column_named_like_an_output(tmp_path: Path) -> None:
    _, X, y = train_mixed()
    frame = X.rename(columns={"color_band": "label"})
    model = _pipeline(["alcohol"], ["label"]).fit(frame, y)
    with pytest.raises(InvalidInput, match=r"'label'"):
        convert(model, frame, name="m", repo=tmp_path)
    assert_nothing_written(tmp_path, "m")


def test_categorical_column_named_features_is_refused(tmp_path: Path) -> None:
    _, X, y = train_mixed()
    frame = X.rename(columns={"color_band": "features"})
    model = _pipeline(["alcohol"], ["features"]).fit(frame, y)
    with pytest.raises(InvalidInput, match=r"cannot be named 'features'"):
        convert(model, frame, name="m", repo=tmp_path)


def test_numeric_only_column_transformer_is_packed(tmp_path: Path) -> None:
    _, X, y = train_mixed()
    frame = X.drop(columns=list(MIXED_CATEGORICALS))
    pre = ColumnTransformer([("num", StandardScaler(), ["alcohol", MIXED_INTEGER])])
    model = make_pipeline(pre, LogisticRegression(max_iter=3000)).fit(frame, y)
    result = convert(model, frame, name="m", repo=tmp_path)
    assert [t.to_json() for t in result.manifest.inputs] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 13]}
    ]
    assert "per-column" in result.manifest.source["conversion"]["input_packing"]
    outputs = run_package(tmp_path, "m", frame)
    np.testing.assert_allclose(outputs["probabilities"], model.predict_proba(frame), atol=1e-4)


def test_string_class_labels_are_bytes_outputs(tmp_path: Path) -> None:
    model, X, y = train_mixed()
    names = np.array(["red", "white", "rosé"], dtype=object)[y]
    model = copy.deepcopy(model).fit(X, names)
    result = convert(model, X, name="m", repo=tmp_path)
    assert result.manifest.outputs[0].to_json() == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [-1],
    }
    outputs = run_package(tmp_path, "m", X)
    assert outputs["label"].tolist() == model.predict(X).tolist()
