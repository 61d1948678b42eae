"""The model-level detectors of the drift monitor: prediction drift (the model's outputs against
the reference's, profiled at convert time) and multivariate drift (NannyML's PCA reconstruction
error), in the request path's monitor, judged in one Holm family with the input features.

Oracles: scikit-learn (StandardScaler + PCA, ``inverse_transform``), SciPy (Welch's statistic),
and a plain Holm step-down written here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.reference_profile import (
    BEFORE_MULTIVARIATE,
    BEFORE_OUTPUTS,
    ReferenceOutputs,
    ReferenceProfile,
    build_profile,
    fit_reconstruction,
    read_profile,
)
from edgewise.runtime.package.schema import frame_to_inputs, infer_features
from edgewise.runtime.serving.dataplane import DataPlane, PreparedRequest
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.serving.monitor import (
    MULTIVARIATE_NAME,
    DriftReport,
    FeatureReport,
    ModelMonitor,
    MonitorConfig,
    reconstruction_test,
)

# ---- helpers ---------------------------------------------------------------------------------


class Split:
    """A scikit-learn data set split as convert sees it: a model fitted on ``fit`` rows, the
    reference profile of the ``fit`` rows with the model's outputs on the ``held`` rows (rows it
    was not fitted on), and the rest as traffic."""

    def __init__(self, frame: pd.DataFrame, target: np.ndarray, seed: int, classifier: bool):
        order = np.random.default_rng(seed).permutation(len(frame))
        third = len(frame) // 3
        self.fit, self.held, self.rest = order[:third], order[third : 2 * third], order[2 * third :]
        self.frame = frame
        self.target = target
        self.classifier = classifier
        estimator: Any = LogisticRegression(max_iter=500) if classifier else Ridge()
        self.model = make_pipeline(StandardScaler(), estimator).fit(
            frame.iloc[self.fit].to_numpy(), target[self.fit]
        )
        self.features = infer_features(frame)
        outputs = ReferenceOutputs(
            self.outputs(frame.iloc[self.held]),
            "classification" if classifier else "regression",
            tuple(str(c) for c in getattr(self.model, "classes_", ())),
            "held_out",
        )
        reference = frame.iloc[self.fit]
        self.profile = build_profile(
            frame_to_inputs(self.features, reference), self.features, outputs=outputs, seed=seed
        )

    def outputs(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        rows = frame.to_numpy()
        if self.classifier:
            return {"probabilities": self.model.predict_proba(rows).astype(np.float32)}
        return {"predictions": self.model.predict(rows).astype(np.float32).reshape(-1, 1)}

    def monitor(self, **config: Any) -> ModelMonitor:
        settings = {"window_rows": 0, "reservoir_rows": 0, **config}
        return ModelMonitor("m", "1", self.profile, MonitorConfig(**settings))

    def report(self, window: pd.DataFrame, **config: Any) -> DriftReport:
        monitor = self.monitor(**config)
        monitor.observe(frame_to_inputs(self.features, window), self.outputs(window))
        return monitor.report("current")


def of_kind(report: DriftReport, *kinds: str) -> list[FeatureReport]:
    return [f for f in report.features if f.kind in kinds]


def cancer() -> tuple[pd.DataFrame, np.ndarray]:
    bunch = load_breast_cancer(as_frame=True)
    return bunch.data, np.asarray(bunch.target)


# ---- the profile -------------------------------------------------------------------------------


def test_the_profile_stores_the_outputs_binned_and_reads_them_back() -> None:
    frame, target = cancer()
    split = Split(frame, target, 0, classifier=True)
    outputs = split.profile.outputs
    assert outputs is not None and outputs.source == "held_out"
    # A binary classifier: the positive class's probability only (the other is 1 - it).
    assert outputs.output == "probabilities" and outputs.columns == (1,)
    assert outputs.values.names == ("probabilities[1]",)
    held = split.outputs(frame.iloc[split.held])["probabilities"][:, 1].astype(np.float64)
    assert outputs.rows == len(split.held)
    edges = outputs.values.edges.edges_of(0)
    assert edges[0] == held.min() and edges[-1] == held.max()
    inner = np.histogram(held, bins=edges)[0]
    counts = outputs.values.counts[0]
    assert counts.sum() == len(held) and counts[1 : len(inner) + 1].sum() == inner.sum()
    again = ReferenceProfile.from_json(json.loads(json.dumps(split.profile.to_json())))
    assert again.outputs is not None and again.multivariate is not None
    np.testing.assert_array_equal(again.outputs.values.counts, outputs.values.counts)
    assert again.outputs.columns == (1,) and again.unavailable == {}
    assert split.profile.multivariate is not None
    np.testing.assert_allclose(
        again.multivariate.components, split.profile.multivariate.components, rtol=1e-15
    )


def test_multiclass_and_regression_outputs() -> None:
    wine = load_wine(as_frame=True)
    split = Split(wine.data, np.asarray(wine.target), 1, classifier=True)
    assert split.profile.outputs is not None
    assert split.profile.outputs.values.names == tuple(f"probabilities[{c}]" for c in range(3))
    diabetes = load_diabetes(as_frame=True)
    split = Split(diabetes.data, np.asarray(diabetes.target), 1, classifier=False)
    assert split.profile.outputs is not None
    assert split.profile.outputs.values.names == ("predictions",)


def test_the_pca_is_scikit_learns() -> None:
    """Standardisation + PCA keeping 65 % of the variance, as NannyML fits them: the same
    number of components spanning the same subspace, the same reconstruction errors."""
    frame, _ = cancer()
    data = frame.to_numpy()
    model, reason = fit_reconstruction("features", data)
    assert model is not None and not reason
    scaler = StandardScaler().fit(data)
    pca = PCA(n_components=0.65).fit(scaler.transform(data))
    assert model.components.shape == pca.components_.shape
    np.testing.assert_allclose(model.mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(model.scale, scaler.scale_, rtol=1e-12)
    projection = model.components.T @ model.components
    np.testing.assert_allclose(projection, pca.components_.T @ pca.components_, atol=1e-9)
    assert model.explained_variance == pytest.approx(pca.explained_variance_ratio_.sum())


def test_the_reference_errors_are_cross_fitted() -> None:
    """Each reference row's error comes from a PCA fitted without it (5 folds): the oracle
    refits scikit-learn's scaler and PCA per fold with the same folds."""
    frame, _ = cancer()
    data = frame.to_numpy()
    model, _ = fit_reconstruction("features", data, seed=3)
    assert model is not None
    k = model.components.shape[0]
    order = np.random.default_rng(3).permutation(len(data))
    errors = np.empty(len(data))
    for fold in np.array_split(order, 5):
        rest = np.setdiff1d(order, fold)
        scaler = StandardScaler().fit(data[rest])
        pca = PCA(n_components=k).fit(scaler.transform(data[rest]))
        z = scaler.transform(data[fold])
        errors[fold] = np.linalg.norm(pca.inverse_transform(pca.transform(z)) - z, axis=1)
    assert model.error_rows == len(data) and model.folds == 5
    assert model.error_mean == pytest.approx(errors.mean(), rel=1e-9)
    assert model.error_variance == pytest.approx(errors.var(ddof=1), rel=1e-9)
    # Scored in-sample the errors are smaller: the reason for cross-fitting.
    scaler = StandardScaler().fit(data)
    pca = PCA(n_components=k).fit(scaler.transform(data))
    z = scaler.transform(data)
    in_sample = np.linalg.norm(pca.inverse_transform(pca.transform(z)) - z, axis=1)
    assert in_sample.mean() < model.error_mean


def test_no_pca_without_two_varying_features() -> None:
    flat = np.column_stack([np.arange(50.0), np.full(50, 3.0)])
    assert fit_reconstruction("features", flat) == (
        None,
        "fewer than two numeric features vary in the reference",
    )


def test_an_old_profile_reports_both_detectors_unavailable(model_repo: Path) -> None:
    folder = model_repo / "logreg" / "1"
    data = json.loads((folder / "profile.json").read_text())
    for key in ("outputs", "multivariate", "unavailable"):
        data.pop(key, None)
    profile = ReferenceProfile.from_json(data)
    assert profile.unavailable == {
        "prediction": BEFORE_OUTPUTS,
        "multivariate": BEFORE_MULTIVARIATE,
    }
    monitor = ModelMonitor("logreg", "1", profile, MonitorConfig(window_rows=0))
    assert monitor.prediction_output is None
    manifest = read_manifest(folder)
    rows = np.random.default_rng(0).normal(10, 5, size=(150, 30)).astype(np.float32)
    monitor.observe({"features": rows}, {"probabilities": np.full((150, 2), 0.5, np.float32)})
    report = monitor.report("current")
    assert report.unavailable["prediction"] == "prediction drift unavailable: " + BEFORE_OUTPUTS
    assert "package converted before" in report.unavailable["multivariate"]
    assert [f.kind for f in report.features] == ["numeric"] * len(manifest.features)


# ---- the monitor -------------------------------------------------------------------------------


def test_the_multivariate_test_is_welchs() -> None:
    frame, target = cancer()
    split = Split(frame, target, 2, classifier=True)
    model = split.profile.multivariate
    assert model is not None
    window = frame.iloc[split.rest]
    report = split.report(window)
    entry = of_kind(report, "multivariate")[0]
    assert entry.name == MULTIVARIATE_NAME
    errors = np.linalg.norm(_sklearn_residuals(window.to_numpy(), model), axis=1)
    scores = entry.scores
    assert scores["reconstruction_error"] == pytest.approx(errors.mean(), rel=1e-5)
    welch = stats.ttest_ind_from_stats(
        errors.mean(),
        errors.std(ddof=1),
        len(errors),
        model.error_mean,
        math.sqrt(model.error_variance),
        model.error_rows,
        equal_var=False,
        alternative="greater",
    )
    assert scores["reconstruction_error_z"] == pytest.approx(welch.statistic, rel=1e-4)
    assert scores["reconstruction_error_pvalue"] == pytest.approx(
        stats.norm.sf(welch.statistic), rel=1e-3
    )
    again = reconstruction_test(errors.mean(), errors.var(ddof=1), len(errors), model)
    assert again["reconstruction_error_z"] == pytest.approx(welch.statistic, rel=1e-4)


def _sklearn_residuals(rows: np.ndarray, model: Any) -> np.ndarray:
    """The float32 input tensor's rows through the profile's scaler and PCA, as scikit-learn's
    ``inverse_transform(transform(z)) - z``."""
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = model.mean, model.scale
    scaler.var_, scaler.n_features_in_ = model.scale**2, len(model.mean)
    z = scaler.transform(rows.astype(np.float32).astype(np.float64)[:, list(model.columns)])
    pca = PCA(n_components=model.components.shape[0])
    pca.components_, pca.mean_ = model.components, np.zeros(len(model.mean))
    pca.n_features_in_ = len(model.mean)
    return np.asarray(pca.inverse_transform(pca.transform(z)) - z)


def test_one_holm_family_over_inputs_outputs_and_the_multivariate_error() -> None:
    frame, target = cancer()
    split = Split(frame, target, 4, classifier=True)
    window = frame.iloc[split.rest].copy()
    window["worst area"] += 300.0
    report = split.report(window)
    kinds = [f.kind for f in report.features]
    assert kinds == ["numeric"] * 30 + ["prediction", "multivariate"]
    keys = ["chi2_pvalue"] * 31 + ["reconstruction_error_pvalue"]
    raw = np.array([f.scores[key] for f, key in zip(report.features, keys, strict=True)])
    for feature, key, want in zip(report.features, keys, _holm(raw), strict=True):
        assert feature.scores[f"{key}_adjusted"] == pytest.approx(want, rel=1e-12)
    assert report.drifting and "worst area" in {f.name for f in report.features if f.drifting}


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, written out."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "diabetes"])
def test_in_distribution_windows_rarely_flag_and_shifts_are_caught(name: str) -> None:
    """False alarms: held-out rows of the same data (100-row windows, 30 random splits) flag the
    model (any entry) in at most one split at alpha 0.01. Power: rows of another class flag the
    predictions, and rows whose features were shuffled independently (the same values per
    feature, the correlations gone) flag the multivariate error and no input feature."""
    loaders: dict[str, Any] = {
        "breast_cancer": load_breast_cancer,
        "wine": load_wine,
        "diabetes": load_diabetes,
    }
    bunch = loaders[name](as_frame=True)
    frame, target = bunch.data, np.asarray(bunch.target)
    classifier = name != "diabetes"
    flagged = {"any": 0, "prediction": 0, "multivariate": 0}
    splits = 30
    for seed in range(splits):
        split = Split(frame, target, seed, classifier)
        rows = np.random.default_rng(seed).permutation(split.rest)[:100]
        report = split.report(frame.iloc[rows], min_rows=0)
        flagged["any"] += report.drifting
        for kind in ("prediction", "multivariate"):
            flagged[kind] += any(f.drifting for f in of_kind(report, kind))
    assert flagged["any"] <= 1, flagged
    split = Split(frame, target, 99, classifier)
    rng = np.random.default_rng(99)
    window = frame.iloc[rng.permutation(split.rest)[:100]]
    shuffled = pd.DataFrame(
        {c: rng.permutation(window[c].to_numpy()) for c in frame.columns}, index=window.index
    )
    report = split.report(shuffled, min_rows=0)  # wine's traffic: 60 rows
    assert of_kind(report, "multivariate")[0].drifting
    assert not any(f.drifting for f in of_kind(report, "numeric"))
    if classifier:
        other = np.flatnonzero(target == 0)
        report = split.report(frame.iloc[other[:100]], min_rows=0)
        assert [f.drifting for f in of_kind(report, "prediction")] == [True] * len(
            of_kind(report, "prediction")
        ) or name == "wine"  # wine: one of three class columns may stay (class 0 vs 1 and 2)
        assert any(f.drifting for f in of_kind(report, "prediction"))


def test_outputs_are_checked_before_the_window_changes() -> None:
    frame, target = cancer()
    split = Split(frame, target, 5, classifier=True)
    monitor = split.monitor()
    inputs = frame_to_inputs(split.features, frame.iloc[:10])
    with pytest.raises(InvalidInput, match="9 row"):
        monitor.observe(inputs, {"probabilities": np.full((9, 2), 0.5, np.float32)})
    with pytest.raises(InvalidInput, match="column"):
        monitor.observe(inputs, {"probabilities": np.full((10, 1), 0.5, np.float32)})
    assert monitor.current.rows == 0 and monitor.current.reconstruction is not None
    assert monitor.current.reconstruction.count == 0
    monitor.observe(inputs)  # no outputs: the inputs only
    report = monitor.report("current")
    assert "no model outputs ('probabilities') were observed" in report.unavailable["prediction"]
    assert not of_kind(report, "prediction")


def test_windows_fold_with_their_outputs() -> None:
    frame, target = cancer()
    split = Split(frame, target, 6, classifier=True)
    direct, folded = split.monitor(), split.monitor()
    rows = frame.iloc[split.rest]
    inputs, outputs = frame_to_inputs(split.features, rows), split.outputs(rows)
    direct.observe(inputs, outputs)
    window = folded.new_window()
    folded.observe_window(window, inputs, outputs)
    folded.fold(window)
    want = of_kind(direct.report("current"), "prediction")
    got = of_kind(folded.report("current"), "prediction")
    assert [f.scores for f in want] == [f.scores for f in got] and want


def test_the_server_path_feeds_the_outputs_even_when_a_request_asks_for_the_label(
    model_repo: Path,
) -> None:
    folder = model_repo / "logreg" / "1"
    model = load_model("logreg", 1, folder, SessionSettings())
    profile = read_profile(folder, read_manifest(folder))
    assert profile is not None and profile.outputs is not None
    model.monitor = ModelMonitor("logreg", "1", profile, MonitorConfig(window_rows=0))
    features = np.random.default_rng(0).normal(10, 5, size=(7, 30)).astype(np.float32)
    response = DataPlane.execute(
        PreparedRequest(model, {"features": features}, ["label"], True, "", 7)
    )
    assert [o.name for o in response.outputs] == ["label"]  # answered as asked
    outputs = model.monitor.current.outputs
    assert outputs is not None and int(outputs.moments.count[0]) == 7


def test_a_large_sample_fits_the_pca_on_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgewise.runtime.package import reference_profile as profile

    monkeypatch.setattr(profile, "MULTIVARIATE_MAX_ROWS", 200)
    frame, _ = cancer()
    model, _ = fit_reconstruction("features", frame.to_numpy())
    assert model is not None and model.error_rows == 200


def test_edgewise_drift_prints_the_detectors_and_why_one_is_missing() -> None:
    from edgewise.runtime.cli.main import _format_drift
    from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb

    report = epb.DriftReport(
        model="m", version="1", window="current", available=True, rows=200, drifting=True
    )
    report.unavailable["prediction"] = "prediction drift unavailable: " + BEFORE_OUTPUTS
    report.features.add(name="probabilities[1]", kind="prediction", scores={"psi": 0.05})
    report.features.add(
        name=MULTIVARIATE_NAME,
        kind="multivariate",
        drifting=True,
        reasons=["reconstruction error p 0.0001 (Holm 0.0003) <= 0.01"],
        scores={
            "reconstruction_error": 2.5,
            "reconstruction_error_reference": 2.2,
            "reconstruction_error_change": 0.136,
            "reconstruction_error_pvalue": 1e-4,
        },
    )
    lines = _format_drift(report).splitlines()
    assert lines[2].startswith("probabilities[1]") and "prediction" in lines[2]
    assert lines[3].startswith("multivariate: mean PCA reconstruction error 2.5 against")
    assert "(+13.6 %)" in lines[3] and "DRIFT reconstruction error p" in lines[3]
    assert lines[4] == "prediction drift unavailable: " + BEFORE_OUTPUTS
