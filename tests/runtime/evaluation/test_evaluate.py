"""``edgewise evaluate``: every metric against scikit-learn, slices, baselines, JSON, HTML, CLI.

The metric functions are compared with scikit-learn on synthetic arrays (ties, missing classes,
zero denominators), and the whole evaluation of the four reference models (converted by the
``model_repo`` fixture) is recomputed with scikit-learn from the ONNX outputs, overall and per
slice.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from edgewise.runtime.cli.main import main
from edgewise.runtime.errors import InvalidInput, ModelNotFound
from edgewise.runtime.evaluation.evaluate import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    Evaluation,
    ModelRef,
    build_slices,
    classification_metrics,
    default_baseline_version,
    evaluate_models,
    expected_calibration_error,
    load_package,
    regression_metrics,
    resolve_version,
    roc_auc,
)
from edgewise.runtime.evaluation.report import render_html
from edgewise.runtime.package.model_config import ModelConfig, VersionPolicy, write_model_config
from tests.models import TRAINERS, convert_model, train_logreg, train_regressor

REL = 1e-12


def close(got: float | None, want: float, rel: float = REL) -> bool:
    """``None`` stands for scikit-learn's NaN (an undefined metric)."""
    if got is None:
        return math.isnan(want)
    return not math.isnan(want) and math.isclose(got, want, rel_tol=rel, abs_tol=1e-15)


# ---- scikit-learn, the oracle ------------------------------------------------------------------


def sk_ece(outcome: np.ndarray, probability: np.ndarray, n_bins: int = 10) -> float:
    """ECE from calibration_curve's per-bin frequencies, weighted by the rows per bin (the
    weights use calibration_curve's own binning rule)."""
    prob_true, prob_pred = calibration_curve(outcome, probability, n_bins=n_bins)
    bins = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], probability)
    totals = np.bincount(bins, minlength=n_bins)
    weights = totals[totals > 0] / probability.shape[0]
    return float(np.sum(np.abs(prob_true - prob_pred) * weights))


def sk_classification(y: np.ndarray, p: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """scikit-learn's numbers for class indices ``y``/``p`` and probabilities ``proba``."""
    n_classes = proba.shape[1]
    classes = np.arange(n_classes)
    out: dict[str, float] = {"accuracy": skm.accuracy_score(y, p)}
    kwargs: dict[str, Any] = {"zero_division": np.nan}
    if n_classes == 2:
        kwargs["pos_label"] = 1
    else:
        kwargs["average"] = "macro"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["precision"] = skm.precision_score(y, p, **kwargs)
        out["recall"] = skm.recall_score(y, p, **kwargs)
        out["f1"] = skm.f1_score(y, p, **kwargs)
        out["log_loss"] = skm.log_loss(y, proba, labels=classes)
    present = np.unique(y)
    if len(present) < 2:
        out["roc_auc"] = math.nan
    elif n_classes == 2:
        out["roc_auc"] = skm.roc_auc_score(y, proba[:, 1])
    elif len(present) == n_classes:
        out["roc_auc"] = skm.roc_auc_score(y, proba, multi_class="ovr", labels=classes)
    else:  # one-vs-rest over the classes present, each a binary AUC
        out["roc_auc"] = float(np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in present]))
    if n_classes == 2:
        out["calibration_error"] = sk_ece(y == 1, proba[:, 1])
    else:
        top = proba.argmax(axis=1)
        out["calibration_error"] = sk_ece(top == y, proba[np.arange(len(y)), top])
    return out


def sk_regression(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r2 = skm.r2_score(y, p, force_finite=False) if len(y) >= 2 else math.nan
    return {
        "mae": skm.mean_absolute_error(y, p),
        "rmse": skm.root_mean_squared_error(y, p),
        "r2": r2 if math.isfinite(r2) else math.nan,
    }


def assert_matches(got: dict[str, float | None], want: dict[str, float], rel: float = REL) -> None:
    for name, value in want.items():
        assert close(got[name], value, rel), (name, got[name], value)


# ---- metric functions on synthetic data ------------------------------------------------------


def random_classifier(
    rng: np.random.Generator, n: int, n_classes: int, skill: float = 1.5, ties: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + skill * np.eye(n_classes)[y]
    if ties:
        logits = np.round(logits)  # many identical scores
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba.argmax(axis=1), proba


@pytest.mark.parametrize("n_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_sklearn(n_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, p, proba = random_classifier(rng, 300, n_classes, ties=seed % 2 == 1)
    got = classification_metrics(y, p, proba)
    assert list(got) == list(CLASSIFICATION_METRICS)
    assert_matches(got, sk_classification(y, p, proba))


@pytest.mark.parametrize("seed", range(4))
def test_classification_metrics_on_small_and_lopsided_slices(seed: int) -> None:
    # Subsets where classes are missing from the truth, the predictions, or both.
    rng = np.random.default_rng(100 + seed)
    y, p, proba = random_classifier(rng, 200, 3, skill=0.5)
    for mask in (y != 2, (y == 0) | (p == 1), y == 1, p == 0, np.arange(200) < 7):
        if mask.sum() == 0:
            continue
        got = classification_metrics(y[mask], p[mask], proba[mask])
        assert_matches(got, sk_classification(y[mask], p[mask], proba[mask]))
    yb, pb, probab = random_classifier(rng, 100, 2, skill=0.3)
    for mask in (yb == 0, pb == 0, (yb == 0) & (pb == 0), np.arange(100) < 3):
        if mask.sum() == 0:
            continue
        got = classification_metrics(yb[mask], pb[mask], probab[mask])
        assert_matches(got, sk_classification(yb[mask], pb[mask], probab[mask]))


def test_undefined_classification_metrics_are_none() -> None:
    y = np.zeros(4, dtype=np.int64)
    got = classification_metrics(y, y, np.tile([0.9, 0.1], (4, 1)))
    assert got["accuracy"] == 1.0
    assert got["precision"] is None and got["recall"] is None and got["f1"] is None
    assert got["roc_auc"] is None
    assert classification_metrics(y[:0], y[:0], np.empty((0, 2))) == dict.fromkeys(
        CLASSIFICATION_METRICS
    )
    # Certain and wrong: the loss is finite (probabilities are clipped), as scikit-learn's.
    wrong = classification_metrics(np.array([0, 1]), np.array([1, 0]), np.array([[0, 1], [1, 0]]))
    assert close(wrong["log_loss"], skm.log_loss([0, 1], [[0.0, 1.0], [1.0, 0.0]]))


def test_roc_auc_with_ties_and_ece_bins() -> None:
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.8, 0.8, 0.2, 0.6])
    truth = np.array([0, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    assert close(roc_auc(truth, scores), skm.roc_auc_score(truth, scores))
    assert roc_auc(np.ones(3, dtype=bool), np.arange(3.0)) is None
    # A probability on an inner edge goes to the lower bin, as in calibration_curve.
    probability = np.array([0.1, 0.1, 0.2, 0.30000000000000004, 0.5, 0.9, 1.0, 0.0])
    outcome = np.array([0, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    assert close(expected_calibration_error(outcome, probability), sk_ece(outcome, probability))
    assert expected_calibration_error(outcome[:0], probability[:0]) is None


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(100, 30, 250)
    p = y + rng.normal(0, 10 + 5 * seed, 250)
    assert_matches(regression_metrics(y, p), sk_regression(y, p))
    assert_matches(regression_metrics(y[:2], p[:2]), sk_regression(y[:2], p[:2]))
    assert list(regression_metrics(y, p)) == list(REGRESSION_METRICS)


def test_undefined_regression_metrics_are_none() -> None:
    one = regression_metrics(np.array([3.0]), np.array([2.5]))
    assert one == {"mae": 0.5, "rmse": 0.5, "r2": None}
    constant = regression_metrics(np.full(5, 2.0), np.arange(5.0))
    assert constant["r2"] is None  # scikit-learn: NaN/-inf without force_finite
    assert regression_metrics(np.empty(0), np.empty(0)) == dict.fromkeys(REGRESSION_METRICS)


# ---- real models ----------------------------------------------------------------------------


def labelled(name: str) -> pd.DataFrame:
    _, X, y = TRAINERS[name]()
    frame = X.copy()
    frame["target"] = y
    return frame


SLICES = {
    "logreg": ["size"],
    "forest": ["alcohol_band", "ash_band"],
    "mixed": ["alcohol_level", "color_band"],
    "regressor": ["sex", "age_band"],
}


def with_slice_columns(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    if name == "logreg":
        frame["size"] = pd.qcut(frame["mean radius"], 3, labels=["s", "m", "l"]).astype(str)
    if name == "forest":
        frame["alcohol_band"] = pd.qcut(frame["alcohol"], 2, labels=["lo", "hi"]).astype(str)
        frame["ash_band"] = pd.qcut(frame["ash"], 3, labels=["a", "b", "c"]).astype(str)
    if name == "regressor":
        frame["age_band"] = pd.qcut(frame["age"], 4, labels=["q1", "q2", "q3", "q4"]).astype(str)
    return frame


def onnx_outputs(model: Any, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    from edgewise.runtime.package.schema import frame_to_inputs

    return model.run(frame_to_inputs(model.manifest, frame))


@pytest.mark.parametrize("name", ["logreg", "forest", "mixed", "regressor"])
def test_real_models_overall_and_slices_match_sklearn(model_repo: Path, name: str) -> None:
    model = load_package(model_repo / name / "1")
    frame = with_slice_columns(name, labelled(name))
    evaluation = evaluate_models(model, frame, "target", slice_by=SLICES[name], min_slice_size=20)
    outputs = onnx_outputs(model, frame)
    y = frame["target"].to_numpy()
    assert evaluation.rows == len(frame)
    results = evaluation.all_slices()
    assert results[0].key == "overall"
    for result in results:
        mask = np.ones(len(frame), dtype=bool)
        for column, level in result.columns.items():
            mask &= frame[column].astype(str).to_numpy() == level
        assert result.count == mask.sum() > 0
        assert result.judged == (result.count >= 20)
        if evaluation.task == "regression":
            want = sk_regression(y[mask], outputs["predictions"].reshape(-1)[mask].astype(float))
        else:
            proba = np.clip(outputs["probabilities"].astype(np.float64), 0, 1)[mask]
            classes = list(evaluation.classes)
            want = sk_classification(
                np.searchsorted(classes, y[mask]),
                np.searchsorted(classes, outputs["label"][mask]),
                proba,
            )
            assert sum(result.label_counts.values()) == result.count
        assert_matches(result.metrics, want)
    # And close to scikit-learn on the original (unconverted) model's own predictions.
    estimator = TRAINERS[name]()[0]
    X = TRAINERS[name]()[1]
    if evaluation.task == "classification":
        sk_proba = estimator.predict_proba(X)
        assert evaluation.overall.metrics["log_loss"] == pytest.approx(
            skm.log_loss(y, sk_proba), rel=1e-4
        )
        assert evaluation.overall.metrics["accuracy"] == skm.accuracy_score(y, estimator.predict(X))
    else:
        assert evaluation.overall.metrics["rmse"] == pytest.approx(
            skm.root_mean_squared_error(y, estimator.predict(X)), rel=1e-5
        )


def test_string_and_float_labels(model_repo: Path) -> None:
    model = load_package(model_repo / "logreg" / "1")
    frame = labelled("logreg")
    as_float = frame.assign(target=frame["target"].astype(float))
    a = evaluate_models(model, frame, "target")
    b = evaluate_models(model, as_float, "target")
    assert a.overall.metrics == b.overall.metrics
    unknown = frame.assign(target=frame["target"].replace({1: 7}))
    with pytest.raises(InvalidInput, match="does not know as classes: 7"):
        evaluate_models(model, unknown, "target")
    # Rows without a label are left out and counted.
    missing = frame.assign(target=frame["target"].astype(float))
    missing.loc[:9, "target"] = np.nan
    c = evaluate_models(model, missing, "target")
    assert (c.rows, c.unlabelled_rows) == (len(frame) - 10, 10)


def test_slices_levels_crossing_and_bins() -> None:
    frame = pd.DataFrame(
        {
            "region": ["n", "s", "n", None, "s", "n"],
            "tier": [1.0, 2.0, 1.0, 1.0, 2.0, 2.0],
            "score": np.arange(6) * 1.5,
        }
    )
    slices = build_slices(frame, ["region", "tier"])
    keys = [s.key for s in slices]
    assert keys[:5] == ["region=n", "region=s", "region=null", "tier=1", "tier=2"]
    assert keys[5:] == [
        "region=n & tier=1",
        "region=n & tier=2",
        "region=s & tier=2",
        "region=null & tier=1",
    ]
    assert [s.rows.tolist() for s in slices[5:]] == [[0, 2], [5], [1, 4], [3]]
    many = pd.DataFrame({"x": np.arange(100.0)})
    binned = build_slices(many, ["x"], numeric_bins=4)
    assert [s.key for s in binned] == [
        "x=[0, 24.75)",
        "x=[24.75, 49.5)",
        "x=[49.5, 74.25)",
        "x=[74.25, 99]",
    ]
    assert [len(s.rows) for s in binned] == [25, 25, 25, 25]
    with pytest.raises(InvalidInput, match="not in the data: 'nope'"):
        build_slices(frame, ["nope"])


def test_baseline_deltas_and_json_round_trip(fresh_repo: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from edgewise.runtime.convert.converter import convert

    _, X, y = train_logreg()
    weaker = Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=0.001))]).fit(X, y)
    convert(weaker, X, name="logreg", repo=fresh_repo, version=2)
    frame = with_slice_columns("logreg", labelled("logreg"))
    evaluation = evaluate_models(
        load_package(fresh_repo / "logreg" / "2"),
        frame,
        "target",
        baseline=load_package(fresh_repo / "logreg" / "1"),
        slice_by=["size"],
    )
    assert evaluation.baseline == ("logreg", 1)
    overall = evaluation.overall
    assert overall.baseline_metrics is not None
    for name, delta in overall.delta.items():
        assert delta == pytest.approx(overall.metrics[name] - overall.baseline_metrics[name])
    assert "log_loss" in overall.worse()  # C=0.001 is far less confident
    text = json.dumps(evaluation.to_json(), allow_nan=False)
    again = Evaluation.from_json(json.loads(text))
    assert again.to_json() == evaluation.to_json()


def test_version_resolution_and_default_baseline(fresh_repo: Path) -> None:
    for version in (2, 3):
        convert_model("regressor", fresh_repo, version=version)
    assert resolve_version(fresh_repo, ModelRef.parse("regressor")) == 3
    assert resolve_version(fresh_repo, ModelRef.parse("regressor:2")) == 2
    with pytest.raises(ModelNotFound, match="no version 9"):
        resolve_version(fresh_repo, ModelRef.parse("regressor:9"))
    assert default_baseline_version(fresh_repo, "regressor", 3) == 2
    assert default_baseline_version(fresh_repo, "regressor", 1) is None
    write_model_config(fresh_repo / "regressor", ModelConfig(VersionPolicy(), default_version=1))
    assert default_baseline_version(fresh_repo, "regressor", 3) == 1
    assert default_baseline_version(fresh_repo, "regressor", 1) is None
    with pytest.raises(InvalidInput):
        ModelRef.parse("bad name:1")
    with pytest.raises(InvalidInput, match="VERSION"):
        ModelRef.parse("regressor:0")


# ---- HTML and CLI ---------------------------------------------------------------------------


def test_html_is_self_contained(model_repo: Path) -> None:
    model = load_package(model_repo / "mixed" / "1")
    frame = labelled("mixed")
    frame["note"] = np.where(frame.index % 2 == 0, "<script>alert(1)</script>", "plain & simple")
    evaluation = evaluate_models(
        model, frame, "target", baseline=model, slice_by=["alcohol_level", "note"]
    )
    page = render_html(evaluation)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # no JS, and slice values are escaped
    assert "&lt;script&gt;" in page
    assert not re.search(r"(src|href)\s*=", page)  # nothing loaded from anywhere
    assert page.count("<svg") == len(CLASSIFICATION_METRICS)
    assert "alcohol_level=high" in page and "calibration_error" in page


def test_cli_evaluate_writes_json_and_html(
    fresh_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert_model("regressor", fresh_repo, version=2)
    data = tmp_path / "diabetes.parquet"
    frame = labelled("regressor")
    frame.to_parquet(data)
    out_json, out_html = tmp_path / "e.json", tmp_path / "e.html"
    argv = ["evaluate", "--repo", str(fresh_repo), "--model", "regressor", "--data", str(data)]
    argv += ["--label", "target", "--slice-by", "sex", "--json", str(out_json)]
    argv += ["--html", str(out_html)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "regressor version 2 against regressor version 1" in printed
    document = json.loads(out_json.read_text())
    assert document["format"] == "edgewise.evaluation/1"
    assert document["baseline"] == {"model": "regressor", "version": 1}
    assert document["data"]["sha256"] and document["rows"] == len(frame)
    assert len(document["slices"]) == 2
    y = frame["target"].to_numpy()
    estimator = train_regressor()[0]
    assert document["overall"]["metrics"]["mae"] == pytest.approx(
        skm.mean_absolute_error(y, estimator.predict(train_regressor()[1])), rel=1e-5
    )
    assert "<svg" in out_html.read_text()


def test_cli_evaluate_errors(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "wine.csv"
    labelled("forest").to_csv(data, index=False)
    base = ["evaluate", "--repo", str(model_repo), "--data", str(data), "--label", "target"]
    assert main([*base, "--model", "forest:x"]) == 2
    assert "VERSION must be an integer" in capsys.readouterr().err
    assert main([*base, "--model", "forest", "--baseline", "forest"]) == 2
    assert main([*base, "--model", "forest", "--baseline", "forest:1"]) == 2  # itself
    assert main([*base, "--model", "forest", "--min-slice-size", "0"]) == 2
    assert main([*base, "--model", "nosuch"]) == 1
    assert "no versions" in capsys.readouterr().err
    assert main([*base, "--model", "forest", "--slice-by", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main([*base[:-1], "nope", "--model", "forest"]) == 1
    assert "label column 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--repo", str(model_repo)])
    assert exit_info.value.code == 2


def test_cli_evaluate_refuses_unwritable_outputs_before_writing_anything(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "wine.csv"
    labelled("forest").to_csv(data, index=False)
    out_json = tmp_path / "e.json"
    argv = ["evaluate", "--repo", str(model_repo), "--model", "forest", "--data", str(data)]
    argv += ["--label", "target", "--no-baseline", "--json", str(out_json)]
    assert main([*argv, "--html", str(tmp_path / "missing" / "e.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing does not exist" in err, err
    assert not out_json.exists()
    out_json.write_text("the previous result\n")
    assert main([*argv, "--html", str(tmp_path)]) == 1  # a folder is no file to write
    assert "is a folder" in capsys.readouterr().err
    assert out_json.read_text() == "the previous result\n"
    assert main([*argv, "--html", str(tmp_path / "e.html")]) == 0
    assert json.loads(out_json.read_text())["format"] == "edgewise.evaluation/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.html", "e.json", "wine.csv"]


def test_json_to_stdout(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(model_repo / "forest", tmp_path / "repo" / "forest")
    data = tmp_path / "wine.parquet"
    labelled("forest").to_parquet(data)
    argv = ["evaluate", "--repo", str(tmp_path / "repo"), "--model", "forest", "--data", str(data)]
    assert main([*argv, "--label", "target", "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["baseline"] is None and document["classes"] == [0, 1, 2]
