"""Monitoring in a real server: drift reports over gRPC, Prometheus gauges, the drift CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.convert.converter import convert
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import RunningServer, running_server, start_server


@pytest.fixture(scope="module")
def monitored(
    tmp_path_factory: pytest.TempPathFactory, model_repo: Path
) -> Iterator[tuple[RunningServer, Path]]:
    repo = tmp_path_factory.mktemp("monitored") / "repo"
    shutil.copytree(model_repo, repo)
    model, frame, _ = models.train_forest()
    convert(model, frame, name="unprofiled", repo=repo, reference_profile=False)
    server = start_server(
        repo, tmp_path_factory.mktemp("monitored-server"), ["--drift-interval-seconds", "0.2"]
    )
    yield server, repo
    assert server.stop() == 0


def mixed_inputs(repo: Path) -> dict[str, np.ndarray]:
    _, frame, _ = models.train_mixed()
    return frame_to_inputs(read_manifest(repo / "mixed" / "1"), frame)


def test_drift_report_over_grpc_and_metrics(monitored: tuple[RunningServer, Path]) -> None:
    server, repo = monitored
    inputs = mixed_inputs(repo)
    with server.client() as client:
        client.reset_window("mixed")
        for start in range(0, 178, 4):
            client.infer("mixed", {k: v[start : start + 4] for k, v in inputs.items()})
        calm = client.drift_report("mixed")
        assert calm.available and not calm.drifting and not calm.insufficient_data
        # The timer's last look at the window (or, before its first look at it, the live scores
        # unjudged): its rows, the statistics live; before the timer's first tick at all, one
        # judgement on demand of the 178 rows.
        assert 100 <= calm.rows <= 178
        assert calm.reason.startswith(("verdict and scores", "not judged yet")) or (
            not calm.reason and calm.rows == 178
        )
        assert {f.statistics.count for f in calm.features if f.kind == "numeric"} == {178}
        assert calm.reference_rows == 178
        assert {f.name for f in calm.features} >= {"alcohol", "alcohol_level", "color_band"}
        client.reset_window("mixed")
        shifted = {k: v.copy() for k, v in inputs.items()}
        shifted["features"][:, 0] += 3.0  # alcohol moves by ~4 standard deviations
        shifted["color_band"][:50, 0] = b"ultraviolet"
        for start in range(0, 178, 4):
            client.infer("mixed", {k: v[start : start + 4] for k, v in shifted.items()})
        report = client.drift_report("mixed", exact=True)
        assert report.drifting
        by_name = {f.name: f for f in report.features}
        assert by_name["alcohol"].drifting
        assert by_name["alcohol"].statistics.out_of_range > 100
        assert by_name["alcohol"].scores["ks_exact_pvalue"] < 1e-6
        assert by_name["color_band"].statistics.unseen == 50
        assert by_name["color_band"].drifting
        assert not by_name["magnesium"].drifting
        stats_only = client.feature_statistics("mixed")
        assert stats_only.rows == 178 and not stats_only.features[0].scores
    deadline = time.monotonic() + 20
    while metric_value(metrics_text(server), "edgewise_model_drifting", model="mixed") != 1.0:
        assert time.monotonic() < deadline, "the drift timer never published"
        time.sleep(0.05)
    text = metrics_text(server)
    assert (
        metric_value(
            text, "edgewise_drift_score", model="mixed", feature="alcohol", statistic="psi"
        )
        >= 0.25
    )
    assert (
        metric_value(
            text, "edgewise_schema_skew", model="mixed", feature="color_band", kind="unseen"
        )
        == 50
    )
    log = server.log()
    assert "feature 'alcohol' is drifting" in log
    assert log.count("model mixed version 1 is DRIFTING") == 1  # once per transition


def test_wrong_types_are_counted_per_input(monitored: tuple[RunningServer, Path]) -> None:
    server, _ = monitored
    with server.client() as client:
        with pytest.raises(ServerError):
            client.infer("logreg", {"features": np.zeros((1, 30), np.float64)})
        assert client.drift_report("logreg").wrong_type["features"] >= 1


def test_models_without_a_profile_are_served_unmonitored(
    monitored: tuple[RunningServer, Path],
) -> None:
    server, _ = monitored
    _, frame, _ = models.train_forest()
    with server.client() as client:
        result = client.infer("unprofiled", {"features": frame.to_numpy(np.float32)[:3]})
        assert result.outputs["label"].shape == (3,)
        report = client.drift_report("unprofiled")
        assert not report.available
        assert "no reference profile" in report.reason
        with pytest.raises(ServerError) as info:
            client.reset_window("unprofiled")
        assert info.value.status == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ServerError) as missing:
            client.drift_report("nope")
        assert missing.value.status == grpc.StatusCode.NOT_FOUND


def test_drift_cli_prints_a_table(monitored: tuple[RunningServer, Path]) -> None:
    server, _ = monitored
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "drift", "mixed", "--server", server.target],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "model mixed version 1, window current" in done.stdout
    assert "alcohol_level" in done.stdout
    assert done.stdout.count("\n") >= 16


def test_monitoring_off(model_repo: Path, tmp_path: Path) -> None:
    with running_server(model_repo, tmp_path, ["--monitoring", "off"]) as server:
        with server.client() as client:
            client.infer("logreg", {"features": np.zeros((2, 30), np.float32)})
            report = client.drift_report("logreg")
        assert not report.available
        assert "monitoring is off" in report.reason
        assert "monitoring kernels ready" not in server.log()
