"""CBPE against the labels that arrive (issue 19 item 4): a real classifier converted with
``--labels`` keeps each served row's calibrated confidence, and the labels that join give the
estimated against the realized accuracy on exactly the labelled rows. Oracles: scikit-learn's
``accuracy_score`` on the joined rows; the estimate within the spread ``LabelCheck`` states
for in-distribution rows. A refused batch changes nothing; the gauges show the pair."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgewise.runtime.convert.converter import convert
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.performance_estimation import read_calibration
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.serving.quality import OnlineQuality, QualityConfig

ROWS_PER_REQUEST = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A breast-cancer classifier calibrated on labelled held-out rows, its answers to new rows
    (requests of ``ROWS_PER_REQUEST``) and the new rows' labels."""
    data = load_breast_cancer(as_frame=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        data.data, data.target.to_numpy(), train_size=0.4, stratify=data.target, random_state=5
    )
    x_calib, x_new, y_calib, y_new = train_test_split(
        x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=5
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    repo = tmp_path_factory.mktemp("label-check") / "repo"
    convert(model, x_train, name="bc", repo=repo, held_out=x_calib, labels=y_calib)
    folder = repo / "bc" / "1"
    manifest = read_manifest(folder)
    calibration = read_calibration(folder, (manifest.profile or {})["calibration"])
    assert calibration is not None
    loaded = load_model("bc", 1, folder, SessionSettings())
    inputs = frame_to_inputs(manifest, x_new)
    answers = []
    for start in range(0, len(y_new), ROWS_PER_REQUEST):
        feeds = {name: value[start : start + ROWS_PER_REQUEST] for name, value in inputs.items()}
        answers.append(loaded.run(feeds))
    return {"calibration": calibration, "answers": answers, "truth": y_new}


def quality_of(served: dict[str, Any], publisher: ServerMetrics | None = None) -> OnlineQuality:
    quality = OnlineQuality(
        "bc",
        "1",
        True,
        "label",
        QualityConfig(),
        classes=[0, 1],
        publisher=publisher,
        calibration=served["calibration"],
    )
    for index, results in enumerate(served["answers"]):
        quality.remember(f"r{index}", {}, results)
    return quality


def labels_of(served: dict[str, Any], keep: np.ndarray) -> list[tuple[str, int, int]]:
    """The labels of the rows ``keep`` marks (as feedback: request id, row, truth)."""
    return [
        (f"r{place // ROWS_PER_REQUEST}", place % ROWS_PER_REQUEST, int(served["truth"][place]))
        for place in np.flatnonzero(keep)
    ]


def predicted(served: dict[str, Any]) -> np.ndarray:
    return np.concatenate([np.asarray(r["label"]).reshape(-1) for r in served["answers"]])


def test_realized_accuracy_is_sklearns_and_the_estimate_within_its_spread(
    served: dict[str, Any],
) -> None:
    metrics = ServerMetrics()
    quality = quality_of(served, metrics)
    truth = served["truth"]
    # Labels come back for some rows only (every row but one in three), in two batches.
    keep = np.arange(truth.size) % 3 != 0
    labels = labels_of(served, keep)
    half = len(labels) // 2
    assert quality.feedback(labels[:half])[0] == half
    assert quality.feedback(labels[half:])[0] == len(labels) - half
    check = quality.report()["label_check"]
    assert check["labelled"] == int(keep.sum())
    assert check["realized_accuracy"] == accuracy_score(truth[keep], predicted(served)[keep])
    # The estimate: the mean confidence of exactly these rows, as the calibration maps the
    # probabilities the model answered.
    confidence = np.concatenate(
        [served["calibration"].confidence(r["probabilities"]) for r in served["answers"]]
    )
    assert check["estimated_accuracy"] == pytest.approx(confidence[keep].mean(), rel=1e-12)
    # In-distribution rows: the estimate holds within the spread chance alone gives, with the
    # calibration's own error (benchmarks/cbpe.py: about 0.02 on this data) beside it.
    assert 0 < check["chance"] < 0.03
    assert abs(check["difference"]) <= 3 * check["chance"] + 0.02
    labels_shown = {"model": "bc", "version": "1"}
    for source, key in (("estimated", "estimated_accuracy"), ("realized", "realized_accuracy")):
        value = metrics.registry.get_sample_value(
            "edgewise_labelled_accuracy", {**labels_shown, "source": source}
        )
        assert value == pytest.approx(check[key])
    quality.close()
    assert (
        metrics.registry.get_sample_value(
            "edgewise_labelled_accuracy", {**labels_shown, "source": "realized"}
        )
        is None
    )


def test_a_refused_batch_changes_nothing(served: dict[str, Any]) -> None:
    quality = quality_of(served)
    good = labels_of(served, np.arange(served["truth"].size) < 20)
    quality.feedback(good[:10])
    before = quality.report()
    with pytest.raises(InvalidInput, match="label 3"):
        quality.feedback([*good[10:13], ("r0", 0, 7)])  # 7 is not a class
    assert quality.report() == before
    assert quality.feedback(good[10:])[0] == 10  # the rows refused before join now


def test_rows_without_probabilities_are_left_out_of_the_check(served: dict[str, Any]) -> None:
    quality = OnlineQuality(
        "bc", "1", True, "label", QualityConfig(), classes=[0, 1], calibration=served["calibration"]
    )
    first = served["answers"][0]
    quality.remember("with", {}, first)
    quality.remember("without", {}, {"label": first["label"]})  # asked for the label only
    truth = [int(t) for t in served["truth"][:ROWS_PER_REQUEST]]
    joined, _, _ = quality.feedback(
        [("with", row, truth[row]) for row in range(ROWS_PER_REQUEST)]
        + [("without", row, truth[row]) for row in range(ROWS_PER_REQUEST)]
    )
    assert joined == 2 * ROWS_PER_REQUEST
    report = quality.report()
    assert report["labelled"] == 2 * ROWS_PER_REQUEST
    assert report["label_check"]["labelled"] == ROWS_PER_REQUEST


def test_no_calibration_no_check_and_the_reason() -> None:
    quality = OnlineQuality("m", "1", True, "label", QualityConfig(), classes=[0, 1])
    report = quality.report()
    assert report["label_check"] is None
    assert "--labels" in report["check_reason"]
    regressor = OnlineQuality("r", "1", False, "variable", QualityConfig())
    assert "classifiers only" in regressor.report()["check_reason"]
