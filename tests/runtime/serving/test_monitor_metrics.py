"""Drift gauges follow every transition of a monitor: the timer's judgement, a window reset and
a version unload publish at once, and a series of a dropped window never outlives it."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.monitor import DriftReport, FeatureReport
from tests import models
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import RunningServer, start_server

DRIFT_FAMILIES = (
    "edgewise_drift_score",
    "edgewise_feature_drifting",
    "edgewise_model_drifting",
    "edgewise_schema_skew",
    "edgewise_monitored_rows",
)


def series(text: str, family: str, **labels: str) -> dict[str, float]:
    """The samples of one metric family whose labels include ``labels``: line -> value."""
    found = {}
    for line in text.splitlines():
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head, value = line.rsplit(" ", 1)
            found[head] = float(value)
    return found


def live_series(text: str, family: str, **labels: str) -> dict[str, float]:
    """As :func:`series`, leaving out series set to NaN (a cleared value)."""
    return {k: v for k, v in series(text, family, **labels).items() if not math.isnan(v)}


@pytest.fixture
def monitored(tmp_path: Path, model_repo: Path) -> Iterator[tuple[RunningServer, Path]]:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    server = start_server(repo, tmp_path / "server", ["--drift-interval-seconds", "0.1"])
    yield server, repo
    assert server.stop() == 0, server.log()


def shifted_inputs(repo: Path) -> dict[str, np.ndarray]:
    _, frame, _ = models.train_mixed()
    inputs = frame_to_inputs(read_manifest(repo / "mixed" / "1"), frame)
    inputs["features"][:, 0] += 3.0  # alcohol moves by ~4 standard deviations
    return inputs


def wait_for_drift(server: RunningServer) -> str:
    deadline = time.monotonic() + 30
    while True:
        text = metrics_text(server)
        if metric_value(text, "edgewise_model_drifting", model="mixed") == 1.0:
            return text
        assert time.monotonic() < deadline, "the drift timer never published"
        time.sleep(0.05)


def test_reset_clears_the_dropped_windows_series_at_once(
    monitored: tuple[RunningServer, Path],
) -> None:
    server, repo = monitored
    with server.client() as client:
        client.infer("mixed", shifted_inputs(repo))
        text = wait_for_drift(server)
        assert live_series(text, "edgewise_drift_score", model="mixed", feature="alcohol")
        client.reset_window("mixed")
        after = metrics_text(server)  # no wait: the reset itself publishes
    assert not live_series(after, "edgewise_drift_score", model="mixed")
    assert metric_value(after, "edgewise_model_drifting", model="mixed") == 0.0
    assert metric_value(after, "edgewise_monitored_rows", model="mixed") == 0.0
    assert set(series(after, "edgewise_feature_drifting", model="mixed").values()) <= {0.0}
    assert "model mixed version 1 is no longer drifting" in server.log()


def test_unload_drops_the_versions_series_at_once(monitored: tuple[RunningServer, Path]) -> None:
    server, repo = monitored
    with server.client() as client:
        client.infer("mixed", shifted_inputs(repo))
        wait_for_drift(server)
        client.unload_model("mixed")
        after = metrics_text(server)
    for family in DRIFT_FAMILIES:
        assert not live_series(after, family, model="mixed"), family


def report_with(scores: dict[str, float], rows: int) -> DriftReport:
    feature = FeatureReport("x", "numeric", scores, False, False, [], {"missing": 0.0})
    return DriftReport("m", "1", "current", True, rows=rows, features=[feature])


def test_statistics_missing_from_a_new_report_leave_no_series() -> None:
    metrics = ServerMetrics()
    metrics.publish_drift(report_with({"psi": 0.7, "ks_exact": 0.4}, rows=500))
    metrics.publish_drift(report_with({"psi": 0.01}, rows=300))
    samples = {
        s.labels["statistic"]: s.value
        for family in metrics.registry.collect()
        if family.name == "edgewise_drift_score"
        for s in family.samples
    }
    assert samples == {"psi": 0.01}
    metrics.publish_drift(report_with({}, rows=0))
    assert (
        metrics.registry.get_sample_value(
            "edgewise_drift_score",
            {"model": "m", "version": "1", "feature": "x", "statistic": "psi"},
        )
        is None
    )
    assert (
        metrics.registry.get_sample_value("edgewise_monitored_rows", {"model": "m", "version": "1"})
        == 0
    )


def shown(metrics: ServerMetrics, family: str) -> dict[tuple[str, ...], float]:
    """The samples of a family this registry shows: label values -> value."""
    return {
        tuple(s.labels.values()): s.value
        for metric in metrics.registry.collect()
        if metric.name == family
        for s in metric.samples
    }


def quality_snapshot(version: str, error: float) -> dict[str, object]:
    return {
        "model": "m",
        "version": version,
        "error": error,
        "recent_error": error / 2,
        "labelled": 10,
        "drifts": 1,
    }


def test_forgetting_a_version_clears_its_series_only() -> None:
    metrics = ServerMetrics()
    for version in ("1", "2"):
        metrics.publish_drift(
            DriftReport("m", version, "current", True, rows=5, features=report_with({}, 5).features)
        )
        metrics.publish_quality(quality_snapshot(version, 0.25))
    metrics.forget_drift("m", "1")
    metrics.forget_quality("m", "1")
    assert shown(metrics, "edgewise_monitored_rows") == {("m", "2"): 5.0}
    assert shown(metrics, "edgewise_quality_error") == {
        ("m", "2", "all"): 0.25,
        ("m", "2", "recent"): 0.125,
    }
    metrics.forget_quality("m", "1")  # again: nothing left to clear
    metrics.publish_quality(quality_snapshot("1", 0.5))  # a reload publishes afresh
    assert shown(metrics, "edgewise_quality_labelled") == {("m", "1"): 10.0, ("m", "2"): 10.0}
    metrics.forget_quality("m", "2")
    metrics.forget_drift("m", "2")
    assert shown(metrics, "edgewise_monitored_rows") == {}
    assert shown(metrics, "edgewise_quality_error") == {
        ("m", "1", "all"): 0.5,
        ("m", "1", "recent"): 0.25,
    }
