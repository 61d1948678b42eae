"""The promotion gate: spec parsing, rules, latency, and a degraded slice the gate must catch.

The scenario: breast cancer, version 1 the reference logistic regression; version 2 an honest
retrain (a random forest on the true labels); version 3 the same forest trained with the labels
of one slice (the top decile of "mean texture", 57 rows) flipped. Overall, version 3 loses less
than 10 points of accuracy, which an overall-only gate would let through; its slice collapses,
and the gate must fail on that slice and nothing else, while version 2 passes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

from edgewise.runtime.cli.main import main
from edgewise.runtime.convert.converter import convert
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.evaluation.evaluate import Evaluation, SliceResult, load_package
from edgewise.runtime.evaluation.gate import (
    GateSpec,
    GateVerdict,
    LatencyResult,
    check_gate,
    evaluate_gate,
    measure_latency,
    server_session_settings,
)
from edgewise.runtime.serving.model import SessionSettings
from tests.models import train_logreg, train_regressor

DEGRADED = "texture_band=t10"

SPEC = """
# The gate of the degraded-slice scenario.
[data]
path = "cancer.parquet"
label = "diagnosis"
slice_by = ["texture_band"]

[overall]
accuracy = { min = 0.85, max_degradation = 0.10 }
roc_auc = { min = 0.90 }

[slices]
min_size = 30
accuracy = { min = 0.80, max_degradation = 0.05 }

[latency]
p99_ms = 500.0
calls = 40
warmup = 5
"""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Path:
    """A folder with ``repo/`` (logreg 1, 2 honest, 3 degraded), ``cancer.parquet`` and
    ``gate.toml``."""
    root = tmp_path_factory.mktemp("gate")
    repo = root / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    _, X, y = train_logreg()
    band = pd.qcut(X["mean texture"], 10, labels=[f"t{i:02d}" for i in range(1, 11)])
    band = band.astype(str)
    flipped = y.copy()
    in_slice = (band == "t10").to_numpy()
    flipped[in_slice] = 1 - flipped[in_slice]
    for version, labels in ((2, y), (3, flipped)):
        forest = RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0)
        convert(forest.fit(X, labels), X, name="logreg", repo=repo, version=version)
    data = X.copy()
    data["texture_band"] = band
    data["size_band"] = pd.qcut(X["mean radius"], 3, labels=["s", "m", "l"]).astype(str)
    data["diagnosis"] = y
    data.to_parquet(root / "cancer.parquet")
    (root / "gate.toml").write_text(SPEC)
    return root


def run_gate(scenario: Path, version: int, **kwargs: Any) -> GateVerdict:
    repo = scenario / "repo" / "logreg"
    return evaluate_gate(
        scenario / "gate.toml",
        repo / str(version),
        baseline=repo / "1",
        session_settings=SessionSettings(),
        **kwargs,
    )


# ---- the degraded slice ----------------------------------------------------------------------


def test_degraded_slice_fails_the_gate(scenario: Path) -> None:
    verdict = run_gate(scenario, 3)
    assert not verdict.passed
    failed = verdict.failures
    assert failed, verdict.format()
    assert {c.target for c in failed} == {DEGRADED}
    assert {(c.metric, c.rule) for c in failed} == {
        ("accuracy", "min"),
        ("accuracy", "max_degradation"),
    }
    # Overall the damage stays under the overall threshold: an overall-only gate would pass.
    overall = [c for c in verdict.checks if c.scope == "overall"]
    assert overall and all(c.status == "pass" for c in overall)
    evaluation = verdict.evaluation
    assert evaluation is not None
    assert evaluation.slice(DEGRADED).metrics["accuracy"] == 0.0
    assert 0.0 < -(evaluation.overall.delta["accuracy"] or 0.0) < 0.10
    text = verdict.format()
    assert text.startswith("gate FAILED: logreg version 3 against logreg version 1")
    assert f"slice {DEGRADED}: accuracy 0 < min 0.8" in text
    assert "worse than the baseline's" in text


def test_honest_candidate_passes(scenario: Path) -> None:
    verdict = run_gate(scenario, 2)
    assert verdict.passed, verdict.format(verbose=True)
    counts = verdict.counts()
    # 2 overall accuracy rules + roc_auc, 2 rules x 10 slices, p99.
    assert counts == {"pass": 3 + 20 + 1, "fail": 0, "skip": 0}
    assert verdict.latency is not None and verdict.latency.calls == 40
    document = json.loads(json.dumps(verdict.to_json(), allow_nan=False))
    assert document["format"] == "edgewise.gate-verdict/1"
    assert document["passed"] is True
    assert document["baseline"] == {"model": "logreg", "version": 1}
    assert document["spec"]["sha256"] and document["data"]["sha256"]
    assert "evaluation" not in document


def test_crossed_slices_and_small_slices_are_skipped(scenario: Path) -> None:
    verdict = run_gate(scenario, 3, slice_by=["texture_band", "size_band"])
    skipped = [c for c in verdict.checks if c.status == "skip"]
    assert skipped and all(c.rule == "min_size" and (c.value or 0) < 30 for c in skipped)
    failed = {c.target for c in verdict.failures}
    assert {DEGRADED, f"{DEGRADED} & size_band=l"} <= failed
    # Every other texture band passes; the size bands that hold the flipped rows may not.
    assert all(t == DEGRADED or not t.startswith("texture_band=t") or DEGRADED in t for t in failed)
    crossed = [c for c in verdict.checks if " & " in c.target and c.status != "skip"]
    assert all(c.status == "pass" for c in crossed if DEGRADED not in c.target)


def test_cli_gate_exit_codes(
    scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["gate", "--spec", str(scenario / "gate.toml"), "--repo", str(scenario / "repo")]
    # The data and label come from the spec; the baseline is the version below the candidate.
    assert main([*base, "--model", "logreg:2", "--baseline", "logreg:1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gate PASSED: logreg version 2 against logreg version 1")
    verdict_json, report = tmp_path / "verdict.json", tmp_path / "report.html"
    outputs = ["--json", str(verdict_json), "--html", str(report)]
    code = main([*base, "--model", "logreg:3", "--baseline", "logreg:1", *outputs])
    assert code == 1
    out = capsys.readouterr().out
    assert out.startswith("gate FAILED") and DEGRADED in out
    document = json.loads(verdict_json.read_text())
    assert document["passed"] is False and document["evaluation"]["format"]
    page = report.read_text()
    assert "gate failed" in page and DEGRADED in page and "<script" not in page
    # Default baseline: logreg:3's is version 2, which is also better on the degraded slice.
    assert main([*base, "--model", "logreg", "--verbose"]) == 1
    assert "against logreg version 2" in capsys.readouterr().out


def test_cli_gate_usage_and_errors(
    scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.toml"
    bare.write_text("[overall]\naccuracy = { min = 0.5 }\n")
    base = ["gate", "--repo", str(scenario / "repo"), "--model", "logreg:2"]
    assert main([*base, "--spec", str(bare)]) == 2
    assert "no labelled data" in capsys.readouterr().err
    data = ["--data", str(scenario / "cancer.parquet")]
    assert main([*base, "--spec", str(bare), *data]) == 2
    assert "no label column" in capsys.readouterr().err
    assert main([*base, "--spec", str(bare), *data, "--label", "diagnosis", "--no-baseline"]) == 0
    capsys.readouterr()
    broken = tmp_path / "broken.toml"
    broken.write_text("[overall]\naccuracy = { minimum = 0.5 }\n")
    assert main([*base, "--spec", str(broken)]) == 2  # an error, not a verdict: exit 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'minimum'" in err and err.count("\n") == 1
    regression_rule = tmp_path / "mae.toml"
    regression_rule.write_text("[overall]\nmae = { max = 1.0 }\n")
    assert main([*base, "--spec", str(regression_rule), *data, "--label", "diagnosis"]) == 2
    assert "does not apply to a classification model" in capsys.readouterr().err


def test_cli_gate_refuses_unwritable_outputs_before_judging(
    scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verdict_json = tmp_path / "verdict.json"
    argv = ["gate", "--spec", str(scenario / "gate.toml"), "--repo", str(scenario / "repo")]
    argv += ["--model", "logreg:2", "--baseline", "logreg:1", "--json", str(verdict_json)]
    assert main([*argv, "--html", str(tmp_path / "missing" / "report.html")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "does not exist" in captured.err
    assert "gate PASSED" not in captured.out  # refused, not judged
    assert list(tmp_path.iterdir()) == []  # no passing verdict left behind by a failed command


def test_no_baseline_fails_relative_rules_unless_optional(scenario: Path, tmp_path: Path) -> None:
    candidate = scenario / "repo" / "logreg" / "2"
    spec = GateSpec.load(scenario / "gate.toml")
    verdict = evaluate_gate(spec, candidate, session_settings=SessionSettings())
    failed = verdict.failures
    assert failed and all(c.rule == "max_degradation" for c in failed)
    assert all("no baseline" in c.message for c in failed)
    optional = dataclasses.replace(spec, require_baseline=False)
    relaxed = evaluate_gate(optional, candidate, session_settings=SessionSettings())
    assert relaxed.passed
    assert {c.rule for c in relaxed.checks if c.status == "skip"} == {"max_degradation"}


def test_latency_budget(scenario: Path) -> None:
    candidate = scenario / "repo" / "logreg" / "1"
    spec = GateSpec.from_mapping(
        {"latency": {"p50_ms": 1e-6, "p99_ms": 1000.0, "calls": 30, "warmup": 2}},
        base_dir=scenario,
    )
    verdict = evaluate_gate(
        spec,
        candidate,
        data=scenario / "cancer.parquet",
        label="diagnosis",
        session_settings=SessionSettings(),
    )
    by_metric = {c.metric: c for c in verdict.checks}
    assert by_metric["p50_ms"].status == "fail"  # a nanosecond: no model runs that fast
    assert by_metric["p99_ms"].status == "pass"
    assert "latency p50" in by_metric["p50_ms"].message
    model = load_package(candidate)
    frame = pd.read_parquet(scenario / "cancer.parquet")
    result = measure_latency(model, frame, calls=50, warmup=5)
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert result.calls == 50 and result.batch == 1


def test_server_session_settings_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_INTRA_OP_THREADS", "2")
    assert server_session_settings().intra_op_threads == 2
    monkeypatch.delenv("EDGEWISE_INTRA_OP_THREADS")
    assert server_session_settings().intra_op_threads == 1


# ---- regressors ------------------------------------------------------------------------------


def test_regressor_gate(model_repo: Path, tmp_path: Path) -> None:
    _, X, y = train_regressor()
    frame = X.assign(progression=y, sex_band=np.where(X["sex"] > 0, "a", "b"))
    spec = GateSpec.from_mapping(
        {
            "overall": {"mae": {"max": 40.0}, "r2": {"min": 0.6}, "rmse": {"max": 30.0}},
            "slices": {"r2": {"min": 0.5}},
        }
    )
    verdict = evaluate_gate(
        spec,
        model_repo / "regressor" / "1",
        data=frame,
        label="progression",
        slice_by=["sex_band"],
        session_settings=SessionSettings(),
    )
    assert [(c.metric, c.status) for c in verdict.checks] == [
        ("mae", "pass"),
        ("r2", "pass"),
        ("rmse", "fail"),  # about 40 on its training data
        ("r2", "pass"),
        ("r2", "pass"),
    ]
    assert verdict.data == {"path": "<DataFrame>"}


# ---- the rules on hand-made evaluations ------------------------------------------------------


def evaluation_of(
    overall: dict[str, float | None],
    baseline: dict[str, float | None] | None,
    slices: Sequence[tuple[str, int, dict[str, float | None], dict[str, float | None] | None]] = (),
) -> Evaluation:
    names = tuple(overall)
    return Evaluation(
        model="m",
        version=2,
        task="classification" if "accuracy" in names or "log_loss" in names else "regression",
        label="y",
        rows=100,
        metric_names=names,
        overall=SliceResult("overall", {}, 100, True, overall, baseline),
        slices=[
            SliceResult(key, dict([key.split("=")]), count, count >= 30, m, b)
            for key, count, m, b in slices
        ],
        min_slice_size=30,
        baseline=None if baseline is None else ("m", 1),
    )


def test_rule_directions_and_relative_degradation() -> None:
    spec = GateSpec.from_mapping(
        {
            "overall": {
                "accuracy": {"max_degradation": 0.02, "max_relative_degradation": 0.05},
                "log_loss": {"max_degradation": 0.05, "max_relative_degradation": 0.10},
            }
        }
    )
    evaluation = evaluation_of(
        {"accuracy": 0.90, "log_loss": 0.30}, {"accuracy": 0.93, "log_loss": 0.26}
    )
    status = {(c.metric, c.rule): c.status for c in check_gate(spec, evaluation)}
    assert status == {
        ("accuracy", "max_degradation"): "fail",  # 0.03 > 0.02
        ("accuracy", "max_relative_degradation"): "pass",  # 3.2% <= 5%
        ("log_loss", "max_degradation"): "pass",  # 0.04 <= 0.05 (higher is worse)
        ("log_loss", "max_relative_degradation"): "fail",  # 15.4% > 10%
    }
    better = evaluation_of({"accuracy": 0.99, "log_loss": 0.1}, {"accuracy": 0.9, "log_loss": 0.3})
    assert all(c.status == "pass" for c in check_gate(spec, better))
    # On the threshold exactly passes, despite the rounding of 0.93 - 0.91.
    edge = evaluation_of({"accuracy": 0.91, "log_loss": 0.3}, {"accuracy": 0.93, "log_loss": 0.3})
    checks = check_gate(spec, edge)
    assert checks[0].status == "pass"
    zero = GateSpec.from_mapping({"overall": {"log_loss": {"max_relative_degradation": 0.5}}})
    from_zero = evaluation_of({"log_loss": 0.1}, {"log_loss": 0.0})
    assert check_gate(zero, from_zero)[0].status == "fail"


def test_undefined_metrics_small_slices_and_column_filter() -> None:
    spec = GateSpec.from_mapping(
        {
            "overall": {"roc_auc": {"min": 0.5}},
            "slices": {"roc_auc": {"min": 0.5}, "columns": ["a"], "min_size": 30},
        }
    )
    evaluation = evaluation_of(
        {"roc_auc": None},
        None,
        [
            ("a=1", 50, {"roc_auc": None}, None),
            ("a=2", 10, {"roc_auc": 0.1}, None),
            ("b=1", 50, {"roc_auc": 0.1}, None),
        ],
    )
    checks = check_gate(spec, evaluation)
    assert [(c.target, c.rule, c.status) for c in checks] == [
        ("overall", "min", "fail"),  # undefined overall: fail
        ("a=1", "min", "skip"),  # undefined on a slice: skip
        ("a=2", "min_size", "skip"),  # too small: not judged
    ]  # b=1 is not over the columns the rule names


def test_spec_parsing(tmp_path: Path) -> None:
    good = tmp_path / "gate.json"
    good.write_text(
        json.dumps(
            {
                "format": 1,
                "data": {"path": "d.parquet", "label": "y", "slice_by": ["a"]},
                "overall": {"accuracy": {"min": 0.9}},
                "slices": {"f1": {"max_degradation": 0.1}, "min_size": 10},
                "latency": {"p50_ms": 3},
                "baseline": {"required": False},
            }
        )
    )
    parsed = GateSpec.load(good)
    assert parsed.data_path == tmp_path / "d.parquet"
    assert (parsed.label, parsed.slice_by, parsed.min_slice_size) == ("y", ("a",), 10)
    assert parsed.latency is not None and parsed.latency.p99_ms is None
    assert parsed.latency.calls == 300 and not parsed.require_baseline
    assert parsed.needs_baseline and len(parsed.sha256) == 64
    bad_specs = {
        "[overall]\nacc = { min = 1 }\n": "'acc' is not a metric",
        "[overall]\naccuracy = { min = 'x' }\n": "must be a finite number",
        "[overall]\naccuracy = 0.9\n": "expected a table",
        "[overall]\naccuracy = { max_degradation = -0.1 }\n": "must not be negative",
        "[slices]\nmin_size = 0\n": "min_size must be an integer >= 1",
        "[latency]\ncalls = 5\n": "needs p50_ms or p99_ms",
        "[latency]\np50_ms = 1\ncalls = 0\n": "calls must be an integer >= 1",
        "format = 2\n": "format 2 is not known",
        "[data]\nlabel = 'y'\n": "no rules",
        "[wat]\n": "unknown key(s) 'wat'",
        "[baseline]\nrequired = 'yes'\n": "required must be true or false",
        "[overall\n": "cannot parse",
    }
    for text, message in bad_specs.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            GateSpec.load(path)
    with pytest.raises(InvalidInput, match="no such file"):
        GateSpec.load(tmp_path / "missing.toml")


def test_verdict_without_latency_has_no_latency_line() -> None:
    verdict = GateVerdict(True, "m", 1, None, [])
    assert (
        verdict.format() == "gate PASSED: m version 1 (no baseline): 0 failed, 0 passed, 0 skipped"
    )
    latency = LatencyResult(10, 1, 0.1, 0.2, 0.12, 0.3, 1, 1)
    assert "p99 0.200 ms" in GateVerdict(True, "m", 1, None, [], latency=latency).format()


# ---- register --gate ----------------------------------------------------------------------------


def test_register_with_a_gate_moves_the_alias_only_for_a_passing_candidate(
    scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgewise.runtime.store.register import GATE_LINEAGE_KEY
    from edgewise.runtime.store.sqlite import SqliteStore

    store_uri = f"sqlite:///{tmp_path / 'store.db'}"
    repo = scenario / "repo" / "logreg"
    spec = str(scenario / "gate.toml")

    def register(version: int, *extra: str) -> int:
        return main(["register", str(repo / str(version)), "--store", store_uri, *extra])

    assert register(1, "--alias", "production") == 0
    assert register(3, "--alias", "production", "--gate", spec) == 1  # the degraded slice
    out = capsys.readouterr().out
    assert "gate FAILED" in out and DEGRADED in out
    assert "alias production not moved" in out
    store = SqliteStore(tmp_path / "store.db")
    try:
        assert store.resolve_alias("logreg", "production").version == 1
        refused = json.loads(store.get_version("logreg", 2).lineage.extra[GATE_LINEAGE_KEY])
        assert refused["passed"] is False
        assert any(DEGRADED in failure for failure in refused["failures"])
        assert register(2, "--alias", "production", "--gate", spec) == 0  # the honest one
        promoted = store.resolve_alias("logreg", "production")
        assert promoted.version == 3
        assert json.loads(promoted.lineage.extra[GATE_LINEAGE_KEY])["passed"] is True
    finally:
        store.close()
