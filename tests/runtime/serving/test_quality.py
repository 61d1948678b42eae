"""Online quality from delayed labels: the join, the error, the detectors, alerts, and the
feedback path through a real server."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edgewise.kernels import ADWIN, DDM
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.alerts import AlertHook
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.quality import OnlineQuality, QualityConfig
from tests import models
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import running_server


def classifier(**config: object) -> OnlineQuality:
    return OnlineQuality("m", "1", True, "label", QualityConfig(**config))  # type: ignore[arg-type]


def test_join_errors_unknown_and_duplicates() -> None:
    quality = classifier(slice_by=("color",))
    for i in range(4):
        quality.remember(
            f"r{i}",
            {"color": np.array([[b"red"], [b"blue"]], dtype=object)},
            {"label": np.array([1, 0], dtype=np.int64)},
        )
    joined, unknown, duplicate = quality.feedback(
        [("r0", 0, 1), ("r0", 1, 1), ("r1", 0, 1), ("nope", 0, 1), ("r0", 0, 1), ("r2", 5, 0)]
    )
    assert (joined, unknown, duplicate) == (3, 2, 1)
    report = quality.report()
    assert report["labelled"] == 3
    assert report["error"] == pytest.approx(1 / 3)
    assert report["slices"] == {
        "color=blue": {"count": 1, "error": 1.0},
        "color=red": {"count": 2, "error": 0.0},
    }
    with pytest.raises(InvalidInput, match="predicts int labels; got a str label"):
        quality.feedback([("r3", 0, "yes")])


def test_the_join_is_bounded_oldest_first() -> None:
    quality = classifier(join_size=5)
    for i in range(8):
        quality.remember(f"r{i}", {}, {"label": np.array([0])})
    assert quality.report()["kept_predictions"] == 5
    joined, unknown, _ = quality.feedback([(f"r{i}", 0, 0) for i in range(8)])
    assert (joined, unknown) == (5, 3)


def test_detectors_fire_like_the_kernels_on_the_same_error_stream() -> None:
    rng = np.random.default_rng(3)
    errors = np.concatenate([rng.random(800) < 0.05, rng.random(800) < 0.5]).astype(np.int64)
    quality = classifier()
    truth = []
    for i, error in enumerate(errors):
        quality.remember(f"r{i}", {}, {"label": np.array([1])})
        truth.append((f"r{i}", 0, 0 if error else 1))
    for start in range(0, len(truth), 100):  # labels arrive in chunks
        quality.feedback(truth[start : start + 100])
    expected = DDM().update(errors.astype(np.float64)).size
    expected += ADWIN().update(errors.astype(np.float64)).size
    report = quality.report()
    assert expected >= 1
    assert report["drifts"] == expected
    assert report["drifting"] is True
    assert report["recent_error"] > 0.3


def test_regressor_mean_absolute_error() -> None:
    quality = OnlineQuality("r", "1", False, "predictions", QualityConfig())
    quality.remember("a", {}, {"predictions": np.array([[10.0], [20.0]], dtype=np.float32)})
    quality.feedback([("a", 0, 12.5), ("a", 1, 19.0)])
    assert quality.report()["error"] == pytest.approx((2.5 + 1.0) / 2)
    assert quality.metric == "mean_absolute_error"


def test_config_validation() -> None:
    assert QualityConfig.from_json({"join_size": 7, "slice_by": ["a"]}).join_size == 7
    for bad in ({"join_size": 0}, {"window": 3}, {"ddm": {"warm_start": -1}}):
        with pytest.raises(InvalidInput):
            QualityConfig.from_json(bad)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"enabled": "false"}, "enabled"),  # bool("false") is True
        ({"enabled": 0}, "enabled"),
        ({"join_size": 2.7}, "join_size"),  # int(2.7) was 2
        ({"join_size": "100"}, "join_size"),
        ({"join_size": True}, "join_size"),
        ({"slice_by": "color"}, "slice_by"),  # was ('c', 'o', 'l', 'o', 'r')
        ({"slice_by": ["color", 3]}, "slice_by"),
        ({"slice_by": [""]}, "slice_by"),
        ({"ddm": [["warm_start", 5]]}, "ddm"),  # dict() of pairs was accepted
        ({"ddm": {"warm_start": True}}, "warm_start"),  # int(True) was 1
        ({"adwin": {"delta": "0.01"}}, "delta"),
        ({"adwin": 0.01}, "adwin"),
    ],
)
def test_config_refuses_settings_that_would_silently_misbehave(
    setting: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        QualityConfig.from_json(setting)


def test_config_accepts_json_values() -> None:
    config = QualityConfig.from_json(
        {
            "enabled": False,
            "join_size": 50,
            "slice_by": ["color", "region"],
            "ddm": {"warm_start": 10, "drift_threshold": 2.5},
            "adwin": {"delta": 0.01},
        }
    )
    assert config == QualityConfig(
        enabled=False,
        join_size=50,
        slice_by=("color", "region"),
        ddm={"warm_start": 10, "drift_threshold": 2.5},
        adwin={"delta": 0.01},
    )


def test_alert_command_receives_json(tmp_path: Path) -> None:
    target = tmp_path / "alert.json"
    script = tmp_path / "hook.py"
    script.write_text(f"import sys; open({str(target)!r}, 'wb').write(sys.stdin.buffer.read())\n")
    hook = AlertHook(command=f"{sys.executable} {script}")
    thread = hook.fire("quality_drift", {"model": "m", "version": "1"})
    assert thread is not None
    thread.join(30)
    alert = json.loads(target.read_text())
    assert alert["kind"] == "quality_drift" and alert["model"] == "m"
    assert hook.sent == 1
    failing = AlertHook(command=f"{sys.executable} -c 'raise SystemExit(3)'")
    thread = failing.fire("x", {})
    assert thread is not None
    thread.join(30)
    assert failing.failed == 1  # logged and counted, never raised


def test_feedback_through_a_real_server(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "mixed", repo / "mixed")
    (repo / "mixed" / "config.json").write_text(
        json.dumps({"quality": {"slice_by": ["alcohol_level"]}})
    )
    alerts = tmp_path / "alerts.jsonl"
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import sys\n"
        f"with open({str(alerts)!r}, 'ab') as f:\n"
        "    f.write(sys.stdin.buffer.read() + b'\\n')\n"
    )
    _, frame, y = models.train_mixed()
    inputs = frame_to_inputs(read_manifest(repo / "mixed" / "1"), frame)
    args = ["--alert-command", f"{sys.executable} {hook}", "--drift-interval-seconds", "0.2"]
    with running_server(repo, tmp_path, args) as server, server.client() as client:
        predicted = []
        for round_ in range(6):  # 6 x 178 requests, one row each, with ids
            for i in range(len(frame)):
                result = client.infer(
                    "mixed",
                    {k: v[i : i + 1] for k, v in inputs.items()},
                    request_id=f"{round_}-{i}",
                    outputs=["probabilities"],  # the label is kept even when not asked for
                )
                predicted.append(int(np.argmax(result.outputs["probabilities"][0])))
        truth = np.tile(y, 6)
        labels = [
            (f"{r}-{i}", 0, int(truth[r * len(frame) + i]))
            for r in range(3)
            for i in range(len(frame))
        ]
        response = client.submit_feedback("mixed", labels)
        assert (response.joined, response.unknown, response.duplicate) == (534, 0, 0)
        calm = client.quality_report("mixed")
        expected_error = np.mean(np.array(predicted[:534]) != truth[:534])
        assert calm.error == pytest.approx(expected_error)
        assert calm.drifts == 0
        assert {s.slice for s in calm.slices} == {
            "alcohol_level=low",
            "alcohol_level=mid",
            "alcohol_level=high",
        }
        # Labels change: the world now disagrees with the model on every second row.
        wrong = [
            (
                f"{r}-{i}",
                0,
                int((truth[r * len(frame) + i] + 1) % 3)
                if i % 2
                else int(truth[r * len(frame) + i]),
            )
            for r in range(3, 6)
            for i in range(len(frame))
        ]
        assert client.submit_feedback("mixed", wrong).joined == 534
        again = client.submit_feedback("mixed", wrong[:10])
        assert again.duplicate == 10
        drifted = client.quality_report("mixed")
        assert drifted.drifting and drifted.drifts >= 1
        assert drifted.recent_error > calm.error + 0.2
        deadline = time.monotonic() + 30
        while not alerts.exists() or "quality_drift" not in alerts.read_text():
            assert time.monotonic() < deadline, "the alert hook never ran"
            time.sleep(0.05)
        # The hook also hears of data drift (the rows arrive in the dataset's class order), so
        # the quality alert is not necessarily the first line.
        lines = alerts.read_text().splitlines()
        alert = json.loads(next(line for line in lines if '"quality_drift"' in line))
        assert alert["kind"] == "quality_drift"
        assert alert["model"] == "mixed" and alert["metric"] == "error_rate"
        while metric_value(metrics_text(server), "edgewise_quality_labelled", model="mixed") < 1068:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done = subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "quality", "mixed",
             "--server", server.target],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "1068 labelled predictions" in done.stdout
        assert "alcohol_level=mid" in done.stdout
        table = tmp_path / "labels.csv"
        pd.DataFrame({"request_id": ["0-0", "zzz"], "label": [0, 1]}).to_csv(table, index=False)
        done = subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "feedback", "mixed",
             "--labels", str(table), "--server", server.target],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "joined 0, unknown 1, duplicate 1" in done.stdout


def drifted_classifier() -> OnlineQuality:
    """A classifier whose detectors have fired: right for 300 labels, then wrong on every one."""
    quality = classifier()
    for i in range(600):
        quality.remember(f"r{i}", {}, {"label": np.array([1])})
    quality.feedback([(f"r{i}", 0, 1 if i < 300 else 0) for i in range(600)])
    return quality


def test_reading_the_report_never_clears_drifting_only_reset_does() -> None:
    quality = drifted_classifier()
    first = quality.report()
    assert first["drifting"] is True and first["drifts"] >= 1
    for _ in range(3):
        assert quality.report() == first
    quality.reset()
    after = quality.report()
    assert after["drifting"] is False
    # The reset acknowledges the detections; the totals stay.
    assert {k: v for k, v in after.items() if k != "drifting"} == {
        k: v for k, v in first.items() if k != "drifting"
    }


def test_a_refused_batch_marks_no_row_labelled() -> None:
    quality = classifier(slice_by=("color",))
    quality.remember(
        "r0",
        {"color": np.array([[b"red"], [b"blue"]], dtype=object)},
        {"label": np.array([1, 0], dtype=np.int64)},
    )
    before = quality.report()
    with pytest.raises(InvalidInput, match=r"label 1 .*request 'r0' row 1.*str label"):
        quality.feedback([("r0", 0, 1), ("r0", 1, "benign")])
    assert quality.report() == before
    assert quality.feedback([("r0", 0, 1)]) == (1, 0, 0)  # not a duplicate: nothing was marked


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.5])
def test_a_classifier_refuses_labels_that_are_no_class_index(bad: float) -> None:
    quality = classifier()
    quality.remember("r0", {}, {"label": np.array([1, 0], dtype=np.int64)})
    before = quality.report()
    with pytest.raises(InvalidInput, match=r"label 1 .*request 'r0' row 1"):
        quality.feedback([("r0", 0, 1), ("r0", 1, bad)])
    assert quality.report() == before
    assert quality.feedback([("r0", 0, 1.0), ("r0", 1, 0)]) == (2, 0, 0)  # integral floats are
    assert quality.report()["error"] == 0.0  # class indices


def test_a_classifier_refuses_a_class_the_model_does_not_have() -> None:
    quality = OnlineQuality("m", "1", True, "label", QualityConfig(), classes=(0, 1))
    quality.remember("r0", {}, {"label": np.array([1, 0], dtype=np.int64)})
    before = quality.report()
    with pytest.raises(
        InvalidInput, match=r"label 0 .*: 7 is not a class of model 'm' \(classes: 0, 1\)"
    ):
        quality.feedback([("r0", 0, 7), ("r0", 1, 0)])
    # A label for an id no longer kept is checked too: it is bad whether or not it joins.
    with pytest.raises(InvalidInput, match="7 is not a class"):
        quality.feedback([("gone", 0, 7)])
    assert quality.report() == before
    named = OnlineQuality("s", "1", True, "label", QualityConfig(), classes=("no", "yes"))
    named.remember("r0", {}, {"label": np.array([b"yes"], dtype=object)})
    with pytest.raises(InvalidInput, match="'maybe' is not a class"):
        named.feedback([("r0", 0, "maybe")])
    with pytest.raises(InvalidInput, match="predicts str labels; got a int label"):
        named.feedback([("r0", 0, 1)])
    assert named.feedback([("r0", 0, "yes")]) == (1, 0, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "ten"])
def test_a_regressor_refuses_a_label_that_is_no_finite_number(bad: float | str) -> None:
    quality = OnlineQuality("r", "1", False, "predictions", QualityConfig())
    quality.remember("a", {}, {"predictions": np.array([[10.0], [20.0]], dtype=np.float32)})
    before = quality.report()
    with pytest.raises(InvalidInput, match=r"label 1 .*request 'a' row 1"):
        quality.feedback([("a", 0, 12.5), ("a", 1, bad)])
    assert quality.report() == before
    assert quality.feedback([("a", 0, 12.5), ("a", 1, 19)]) == (2, 0, 0)
    assert quality.report()["error"] == pytest.approx((2.5 + 1.0) / 2)


def test_close_drops_the_versions_series_and_nothing_is_published_after_it() -> None:
    """A version's quality publishes where its totals change and is forgotten where it goes
    (the repository closes it at unload); labels that still reach it publish nothing again."""
    metrics = ServerMetrics()
    versions = {
        v: OnlineQuality("m", v, True, "label", QualityConfig(), publisher=metrics) for v in "12"
    }
    for version, quality in versions.items():
        quality.remember(f"r{version}", {}, {"label": np.array([0, 1])})
        assert quality.feedback([(f"r{version}", 0, 0)]) == (1, 0, 0)
    series = {v: quality_series(metrics, v) for v in "12"}
    assert series["2"] == {
        ("edgewise_quality_error", "all"): 0.0,
        ("edgewise_quality_error", "recent"): 0.0,
        ("edgewise_quality_labelled", ""): 1.0,
        ("edgewise_quality_drifts", ""): 0.0,
    }
    versions["2"].close()
    assert quality_series(metrics, "2") == {}
    assert quality_series(metrics, "1") == series["1"]
    assert versions["2"].feedback([("r2", 1, 1)]) == (1, 0, 0)  # an in-flight batch
    assert quality_series(metrics, "2") == {}


def quality_series(metrics: ServerMetrics, version: str) -> dict[tuple[str, str], float]:
    """The ``edgewise_quality_*`` samples of model ``m`` ``version``: (name, window) -> value."""
    return {
        (sample.name, sample.labels.get("window", "")): sample.value
        for family in metrics.registry.collect()
        if family.name.startswith("edgewise_quality_")
        for sample in family.samples
        if sample.labels.get("model") == "m" and sample.labels.get("version") == version
    }
