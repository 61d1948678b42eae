"""Serving, the sync agent's validation and batch scoring run with only pyproject's core
dependencies (plus pyarrow for batch): real processes in an interpreter where numba, llvmlite,
onnx, ml_dtypes, SciPy and scikit-learn cannot be imported (tests/deps/blocked.py).

An ``import onnx`` (or numba, or scipy...) added anywhere on these paths fails these tests: the
process gets ModuleNotFoundError, as a node installed from requirements/serve.txt would.
Monitoring needs the ahead-of-time compiled kernels here (``make native``): without numba they
are what computes the statistics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edgewise.runtime.convert.converter import convert
from edgewise.runtime.package.manifest import MODEL_FILE, read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models
from tests.deps.blocked import BLOCKED, blocked_environment, installed_in, refused
from tests.prerequisites import native_kernels_missing, unmet
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.runtime.store.helpers import refresh_manifest
from tests.servers import RunningServer, start_server


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    reason = native_kernels_missing()
    if reason is not None:
        unmet(f"monitoring without numba needs the ahead-of-time compiled kernels: {reason}")
    return blocked_environment(tmp_path_factory.mktemp("blocked"))


@pytest.fixture
def no_kernels(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Neither numba nor the ahead-of-time kernels: a node installed from the core
    dependencies alone (EDGEWISE_NATIVE_KERNELS=0 stands in for a module not built)."""
    env, log = blocked_environment(tmp_path / "blocked")
    return {**env, "EDGEWISE_NATIVE_KERNELS": "0"}, log


def run_blocked(
    env: dict[str, str], args: list[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_nothing_refused(log: Path) -> None:
    assert installed_in(log) > 0, "the import blocker never ran (sitecustomize not picked up)"
    assert not refused(log), "imports of " + ", ".join(BLOCKED) + ":\n" + "\n".join(refused(log))


@pytest.fixture(scope="module")
def server(
    blocked: tuple[dict[str, str], Path],
    model_repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    env, _ = blocked
    repo = tmp_path_factory.mktemp("serve-deps") / "repo"
    for name in ("logreg", "mixed"):
        shutil.copytree(model_repo / name, repo / name)
    # A classifier calibrated at convert time (scikit-learn, here): the server's CBPE estimate
    # reads the calibration with numpy alone.
    model, frame, labels = models.train_logreg()
    convert(model, frame, name="calibrated", repo=repo, labels=labels)
    (repo / "calibrated" / "config.json").write_text(
        json.dumps({"monitoring": {"window_rows": 50}})
    )
    running = start_server(
        repo,
        tmp_path_factory.mktemp("serve-deps-server"),
        ["--drift-interval-seconds", "0.2"],
        env=env,
    )
    yield running
    assert running.stop() == 0, running.log()


def test_a_server_serves_and_monitors_without_them(
    server: RunningServer, blocked: tuple[dict[str, str], Path], model_repo: Path
) -> None:
    _, log = blocked
    assert "ahead-of-time compiled kernels: loaded" in server.log()
    _, frame, labels = models.train_mixed()
    inputs = frame_to_inputs(read_manifest(model_repo / "mixed" / "1"), frame)
    shifted = {k: v.copy() for k, v in inputs.items()}
    shifted["features"][:, 0] += 3.0  # alcohol moves by ~4 standard deviations
    with server.client() as client:
        client.reset_window("mixed")
        ids = []
        for start in range(0, len(frame), 8):
            request_id = f"r{start}"
            result = client.infer(
                "mixed",
                {k: v[start : start + 8] for k, v in shifted.items()},
                request_id=request_id,
            )
            assert result.outputs["label"].shape == (min(8, len(frame) - start),)
            ids.append((request_id, start))
        report = client.drift_report("mixed", exact=True)
        assert report.available and report.rows == len(frame)
        by_name = {f.name: f for f in report.features}
        assert by_name["alcohol"].drifting
        assert by_name["alcohol"].scores["ks_exact_pvalue"] < 1e-6
        assert not by_name["magnesium"].drifting
        # Online quality: labels for the rows served above (the DDM/ADWIN detectors run).
        feedback = client.submit_feedback(
            "mixed",
            [(rid, row, int(labels[start + row])) for rid, start in ids for row in range(2)],
        )
        assert feedback.joined == 2 * len(ids)
        quality = client.quality_report("mixed")
        assert quality.available and quality.labelled == 2 * len(ids) and quality.window > 0
    # The drift timer (every 0.2 s) judges the window and publishes its gauges.
    deadline = time.monotonic() + 20
    while True:
        text = metrics_text(server)
        drifting = metric_value(text, "edgewise_model_drifting", model="mixed")
        labels = {"model": "mixed", "feature": "alcohol", "statistic": "psi"}
        if drifting == 1.0 and metric_value(text, "edgewise_drift_score", **labels) >= 0.25:
            break
        assert time.monotonic() < deadline, "the drift timer never published the drift"
        time.sleep(0.05)
    # CBPE: the calibrated classifier's estimated accuracy over closed 50-row windows.
    _, frame, _ = models.train_logreg()
    calibrated = frame_to_inputs(read_manifest(server_repo(server) / "calibrated" / "1"), frame)
    with server.client() as client:
        for start in range(0, 200, 10):
            client.infer("calibrated", {k: v[start : start + 10] for k, v in calibrated.items()})
    deadline = time.monotonic() + 20
    while True:
        text = metrics_text(server)
        estimate = metric_value(
            text, "edgewise_estimated_performance", model="calibrated", metric="accuracy"
        )
        if estimate > 0:
            break
        assert time.monotonic() < deadline, "no CBPE estimate was published"
        time.sleep(0.05)
    assert 0.5 < estimate <= 1.0
    assert_nothing_refused(log)


def server_repo(server: RunningServer) -> Path:
    """The repository a test server serves (its --repo argument)."""
    args = list(server.process.args)  # type: ignore[arg-type]
    return Path(args[args.index("--repo") + 1])


def test_the_agent_validates_without_them(
    blocked: tuple[dict[str, str], Path], model_repo: Path, tmp_path: Path
) -> None:
    """validate_package uses onnx's checker only where onnx is installed; here onnxruntime's
    load is the check, and a model it cannot load is a ModelLoadError naming onnxruntime."""
    env, log = blocked
    good = tmp_path / "repo" / "logreg" / "1"
    shutil.copytree(model_repo / "logreg" / "1", good)
    broken = tmp_path / "repo" / "logreg" / "2"
    shutil.copytree(model_repo / "logreg" / "1", broken)
    (broken / MODEL_FILE).write_bytes(b"\x08\x07 not an ONNX graph")
    refresh_manifest(broken)
    script = """
import json, sys
from pathlib import Path
from edgewise.runtime.agent.sync import validate_package
from edgewise.runtime.errors import ModelLoadError
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.store.base import Lineage, VersionRecord

out = {}
for folder in map(Path, sys.argv[1:]):
    record = VersionRecord("logreg", int(folder.name), read_manifest(folder).model_sha256, (),
                           Lineage())
    try:
        validation = validate_package(folder, record, None, require_golden=True)
        out[folder.name] = ["ok", validation.golden_requests, validation.local_load_seconds]
    except ModelLoadError as exc:
        out[folder.name] = ["ModelLoadError", str(exc)]
print(json.dumps(out))
"""
    done = run_blocked(env, ["-c", script, str(good), str(broken)], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["1"][0] == "ok" and result["1"][1] > 0 and result["1"][2] is not None
    assert result["2"][0] == "ModelLoadError" and "onnxruntime cannot load it" in result["2"][1]
    # Only validate_package's optional use of onnx's checker asked for a blocked package.
    asked = refused(log)
    assert asked and all(" blocked onnx <- " in line and "sync.py" in line for line in asked), asked
    log.unlink()


def test_batch_scores_without_them(
    blocked: tuple[dict[str, str], Path], model_repo: Path, tmp_path: Path
) -> None:
    env, log = blocked
    if log.exists():
        log.unlink()
    _, frame, _ = models.train_logreg()
    data = tmp_path / "rows.parquet"
    frame.iloc[:300].to_parquet(data)
    out = tmp_path / "scores"
    done = run_blocked(
        env,
        ["-m", "edgewise.runtime.cli", "batch", "--repo", str(model_repo), "--model", "logreg",
         "--input", str(data), "--output", str(out), "--progress", "off"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scores = pd.read_parquet(out)
    assert len(scores) == 300
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == 300
    report = json.loads((out / "_drift_report.json").read_text())
    assert report["rows"] == 300
    oracle = models.train_logreg()[0].predict(frame.iloc[:300])
    assert np.array_equal(scores["label"].to_numpy(), oracle)
    assert_nothing_refused(log)


def test_without_any_kernels_a_server_serves_unmonitored_and_says_why(
    no_kernels: tuple[dict[str, str], Path], model_repo: Path, tmp_path: Path
) -> None:
    """No AOT build and no numba: the server starts, logs one warning, answers, and every drift
    report says monitoring is unavailable and how to get it; a batch job scores without its
    drift report, saying the same."""
    env, _ = no_kernels
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    running = start_server(repo, tmp_path / "server", env=env)
    try:
        _, frame, _ = models.train_logreg()
        with running.client() as client:
            rows = frame.to_numpy(np.float32)[:5]
            assert client.infer("logreg", {"features": rows}).outputs["label"].shape == (5,)
            report = client.drift_report("logreg")
            assert not report.available
            assert "monitoring is unavailable" in report.reason
            assert "pip install 'edgewise[jit]'" in report.reason
    finally:
        assert running.stop() == 0, running.log()
    warnings = [line for line in running.log().splitlines() if "monitoring and online" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], running.log()
    data = tmp_path / "rows.parquet"
    frame.iloc[:50].to_parquet(data)
    out = tmp_path / "scores"
    done = run_blocked(
        env,
        ["-m", "edgewise.runtime.cli", "batch", "--repo", str(repo), "--model", "logreg",
         "--input", str(data), "--output", str(out), "--progress", "off"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(pd.read_parquet(out)) == 50
    report_json = json.loads((out / "_drift_report.json").read_text())
    assert "edgewise[jit]" in json.dumps(report_json)
    assert "batch: no drift report: the drift kernels need" in done.stderr
