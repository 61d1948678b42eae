"""How close the CBPE estimates come to the realized metrics: prints ONE JSON line per case.

Run from the repository root::

    .venv/bin/python benchmarks/cbpe.py              # 100 random splits
    .venv/bin/python benchmarks/cbpe.py --splits 20  # a few seconds

Protocol (scikit-learn's breast-cancer data, 569 rows): each random split (stratified) trains a
``StandardScaler + LogisticRegression`` on one third, fits the calibration
(:func:`edgewise.runtime.performance_estimation.fit_calibration`) on the second third with its
labels, and scores the last third in 50-row chunks (the full chunks: 3 per split). Per chunk the
estimated accuracy and ROC-AUC are compared with the realized ones (``sklearn.metrics`` on the
chunk's labels; a chunk with one class only has no ROC-AUC and is left out of that metric). The
figure is the mean absolute error over all chunks of all splits, for the exact estimate (row by
row, :func:`estimate`) and the streaming one the server keeps (:class:`PerformanceWindow`, 1000
bins), and for the raw scores without calibration.

``floor`` is the error no estimator of this kind can go below on these chunks: labels drawn at
random from the calibrated probabilities themselves (a model calibrated exactly), 50 draws per
chunk, scored against the same estimate. A 50-row chunk's realized accuracy moves by about
sqrt(a (1 - a) / 50) from chance alone (0.024 at a = 0.97), so an estimate cannot come much closer
than the floor, whatever the method.

The baseline is the issue's figure for NannyML 0.13.1's CBPE on the same data at 50-row chunks
(MAE 0.017 accuracy, 0.0023 ROC-AUC; NannyML is not installed here, about 2 GB). ``ratio`` is
``baseline / mae`` (> 1: smaller error than the baseline). The splits, models and chunks of the
baseline run are not known to us, so the ratio compares protocols alike in data and chunk size,
not identical rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgewise.runtime.performance_estimation import (
    Calibration,
    ClassMap,
    PerformanceWindow,
    estimate,
    fit_calibration,
)

NANNYML_MAE = {"accuracy": 0.017, "roc_auc": 0.0023}  # NannyML 0.13.1, from issue 19
CHUNK = 50


def split_chunks(seed: int) -> tuple[Calibration, list[tuple[np.ndarray, np.ndarray]]]:
    """One random split: the fitted calibration and the analysis part's (probabilities, labels)
    in ``CHUNK``-row chunks."""
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=1 / 3, stratify=y, random_state=seed
    )
    x_ref, x_analysis, y_ref, y_analysis = train_test_split(
        x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=seed
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x_train, y_train)
    calibration = fit_calibration(model.predict_proba(x_ref), y_ref, model.classes_, seed=seed)
    scores = model.predict_proba(x_analysis)
    chunks = [
        (scores[start : start + CHUNK], y_analysis[start : start + CHUNK])
        for start in range(0, len(y_analysis) - CHUNK + 1, CHUNK)
    ]
    return calibration, chunks


def realized(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    auc = roc_auc_score(labels, scores[:, 1]) if len(set(labels)) == 2 else float("nan")
    return {"accuracy": accuracy_score(labels, scores.argmax(axis=1)), "roc_auc": float(auc)}


def windowed(scores: np.ndarray, calibration: Calibration) -> dict[str, float]:
    window = PerformanceWindow(calibration)
    window.update(scores)
    return window.estimate()


def floor_errors(
    scores: np.ndarray, calibration: Calibration, rng: np.random.Generator, draws: int = 50
) -> dict[str, list[float]]:
    """Errors of the estimate against labels drawn from the calibrated probabilities."""
    guess = estimate(scores, calibration)
    positive = calibration.calibrate(scores)[:, 1]
    out: dict[str, list[float]] = {"accuracy": [], "roc_auc": []}
    for _ in range(draws):
        labels = (rng.random(positive.size) < positive).astype(np.int64)
        for metric, value in realized(scores, labels).items():
            if not np.isnan(value):
                out[metric].append(abs(guess[metric] - value))
    return out


def run(splits: int) -> list[dict[str, Any]]:
    errors: dict[str, dict[str, list[float]]] = {
        kind: {"accuracy": [], "roc_auc": []}
        for kind in ("exact", "window", "uncalibrated", "floor")
    }
    rng = np.random.default_rng(0)
    isotonic_maps = 0
    for seed in range(splits):
        calibration, chunks = split_chunks(seed)
        isotonic_maps += calibration.method.count("isotonic")
        identity = Calibration(
            calibration.classes, (ClassMap.identity(),), 0, "none", ("identity",)
        )
        for scores, labels in chunks:
            truth = realized(scores, labels)
            estimates = {
                "exact": estimate(scores, calibration),
                "window": windowed(scores, calibration),
                "uncalibrated": estimate(scores, identity),
            }
            for kind, guess in estimates.items():
                for metric, value in truth.items():
                    if not np.isnan(value):
                        errors[kind][metric].append(abs(guess[metric] - value))
            for metric, values in floor_errors(scores, calibration, rng).items():
                errors["floor"][metric].extend(values)
    machine = {"python": platform.python_version(), "numpy": np.__version__}
    lines = []
    for kind, metrics in errors.items():
        for metric, values in metrics.items():
            mae = float(np.mean(values))
            lines.append(
                {
                    "case": f"cbpe_breast_cancer_{kind}",
                    "metric": metric,
                    "chunk_rows": CHUNK,
                    "splits": splits,
                    "chunks": len(values),
                    "isotonic_share": isotonic_maps / splits,
                    "mae": round(mae, 5),
                    "p90_abs_error": round(float(np.quantile(values, 0.9)), 5),
                    "baseline": "nannyml 0.13.1 (issue 19)",
                    "baseline_mae": NANNYML_MAE[metric],
                    "ratio": round(NANNYML_MAE[metric] / mae, 3) if mae > 0 else None,
                    **machine,
                }
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--splits", type=int, default=100, help="random splits (default 100)")
    args = parser.parse_args(argv)
    for line in run(args.splits):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
