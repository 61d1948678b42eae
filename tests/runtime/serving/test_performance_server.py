"""CBPE in the server: a classifier converted with ``--labels`` shows its estimated accuracy and
ROC-AUC per closed estimate window (``edgewise_estimated_performance``), close to the realized
metrics scikit-learn computes on the same rows; an unload drops the series; a model without a
calibration shows none."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgewise.runtime.convert.converter import convert
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.performance_estimation import estimate, read_calibration
from edgewise.runtime.package.schema import frame_to_inputs
from tests.runtime.frontends.test_server import metrics_text
from tests.servers import RunningServer, start_server

WINDOW = 50
GAUGE = "edgewise_estimated_performance"


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, np.ndarray]:
    """A repo with ``bc`` (calibrated on its own labelled rows) and ``plain`` (no labels), both
    monitored with ``WINDOW``-row windows; the traffic rows and their labels."""
    data = load_breast_cancer(as_frame=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        data.data, data.target.to_numpy(), train_size=0.4, stratify=data.target, random_state=3
    )
    x_calib, x_new, y_calib, y_new = train_test_split(
        x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=3
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    repo = tmp_path_factory.mktemp("cbpe") / "repo"
    convert(model, x_train, name="bc", repo=repo, held_out=x_calib, labels=y_calib)
    convert(model, x_train, name="plain", repo=repo)
    for name in ("bc", "plain"):
        config = {"monitoring": {"window_rows": WINDOW}}
        (repo / name / "config.json").write_text(json.dumps(config))
    return repo, x_new, y_new


@pytest.fixture(scope="module")
def server(
    traffic: tuple[Path, object, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = start_server(
        traffic[0],
        tmp_path_factory.mktemp("cbpe-server"),
        ["--monitoring", "on", "--front-end", "grpcio"],
    )
    yield running
    assert running.stop() == 0, running.log()


def estimates(text: str, model: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(GAUGE + "{") and f'model="{model}"' in line:
            metric = line.split('metric="', 1)[1].split('"', 1)[0]
            found[metric] = float(line.rsplit(" ", 1)[1])
    return found


def send(
    server: RunningServer, repo: Path, model: str, frame: object, label_only: int = 0
) -> tuple[list, np.ndarray]:
    """One-row requests of ``frame``'s rows; the labels and the probabilities answered. The
    first ``label_only`` requests ask for the label alone (their probabilities rows are NaN):
    the estimate reads the probabilities all the same, and they are not answered."""
    manifest = read_manifest(repo / model / "1")
    labels, probabilities = [], np.full((len(frame), 2), np.nan)  # type: ignore[arg-type]
    with server.client() as client:
        for i in range(len(frame)):  # type: ignore[arg-type]
            inputs = frame_to_inputs(manifest, frame.iloc[i : i + 1])  # type: ignore[attr-defined]
            if i < label_only:
                answer = client.infer(model, inputs, outputs=["label"])
                assert set(answer.outputs) == {"label"}
            else:
                answer = client.infer(model, inputs, outputs=["label", "probabilities"])
                probabilities[i] = answer.outputs["probabilities"][0]
            labels.append(int(answer.outputs["label"].reshape(-1)[0]))
    return labels, probabilities


def test_the_estimate_tracks_the_realized_metrics_and_goes_with_the_version(
    server: RunningServer, traffic: tuple[Path, object, np.ndarray]
) -> None:
    repo, x_new, y_new = traffic
    assert estimates(metrics_text(server), "bc") == {}  # nothing before a window closes
    rows = 3 * WINDOW + 7  # three closed windows, and a few rows of the fourth
    predicted, probabilities = send(server, repo, "bc", x_new.iloc[:rows], label_only=30)
    send(server, repo, "plain", x_new.iloc[:rows])
    text = metrics_text(server)
    shown = estimates(text, "bc")
    assert set(shown) == {"accuracy", "roc_auc"}
    last = slice(2 * WINDOW, 3 * WINDOW)  # the last closed window (the label-only rows count)
    # The same window estimated row by row from the package's calibration: the accuracy is a
    # plain sum, the ROC-AUC binned (1000 bins).
    manifest = read_manifest(repo / "bc" / "1")
    calibration = read_calibration(repo / "bc" / "1", (manifest.profile or {})["calibration"])
    assert calibration is not None
    exact = estimate(probabilities[last], calibration)
    assert shown["accuracy"] == pytest.approx(exact["accuracy"], abs=1e-9)
    assert shown["roc_auc"] == pytest.approx(exact["roc_auc"], abs=0.01)
    realized_accuracy = accuracy_score(y_new[last], predicted[last])
    realized_auc = roc_auc_score(y_new[last], probabilities[last, 1])
    assert abs(shown["accuracy"] - realized_accuracy) < 0.1, (shown, realized_accuracy)
    assert abs(shown["roc_auc"] - realized_auc) < 0.1, (shown, realized_auc)
    assert estimates(text, "plain") == {}  # no calibration, no estimate
    assert estimates(metrics_text(server), "bc") == shown  # a scrape changes nothing

    with server.client() as client:
        client.reset_window("bc")  # starts the estimate window over: nothing from before shows
    assert estimates(metrics_text(server), "bc") == {}
    _, probabilities = send(server, repo, "bc", x_new.iloc[: WINDOW + 1])
    exact = estimate(probabilities[:WINDOW], calibration)
    assert estimates(metrics_text(server), "bc")["accuracy"] == pytest.approx(exact["accuracy"])

    with server.client() as client:
        client.unload_model("bc")
    assert estimates(metrics_text(server), "bc") == {}


def test_the_quality_report_checks_the_estimate_against_the_labels(
    server: RunningServer, traffic: tuple[Path, object, np.ndarray]
) -> None:
    """GetQuality and ``edgewise quality``: estimated vs realized accuracy on exactly the rows
    whose labels came back (oracle: scikit-learn's accuracy on them), the gauge pair beside."""
    repo, x_new, y_new = traffic
    manifest = read_manifest(repo / "bc" / "1")
    rows = 60
    inputs = frame_to_inputs(manifest, x_new.iloc[:rows])  # type: ignore[attr-defined]
    with server.client() as client:
        client.load_model("bc")  # the test before unloads it
        predicted = []
        for i in range(rows):
            one = {name: value[i : i + 1] for name, value in inputs.items()}
            answer = client.infer("bc", one, request_id=f"q{i}")
            predicted.append(int(answer.outputs["label"].reshape(-1)[0]))
        labelled = [i for i in range(rows) if i % 4 != 0]  # some labels never come back
        joined = client.submit_feedback("bc", [(f"q{i}", 0, int(y_new[i])) for i in labelled])
        assert joined.joined == len(labelled)
        report = client.quality_report("bc")
        plain = client.quality_report("plain")
    assert report.checked and report.checked_rows == len(labelled)
    want = accuracy_score(y_new[labelled], np.asarray(predicted)[labelled])
    assert report.realized_accuracy == pytest.approx(want)
    assert abs(report.realized_accuracy - report.estimated_accuracy) <= (
        3 * report.accuracy_chance + 0.05
    )
    assert not plain.checked and "--labels" in plain.check_reason
    text = metrics_text(server)
    shown = {
        line.split('source="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgewise_labelled_accuracy{") and 'model="bc"' in line
    }
    assert shown == pytest.approx(
        {"estimated": report.estimated_accuracy, "realized": report.realized_accuracy}
    )
    printed = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "quality", "bc", "--server", server.target],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"on the {len(labelled)} labelled rows" in printed
    assert f"realized {report.realized_accuracy:.4f}" in printed
