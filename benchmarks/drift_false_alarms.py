"""False alarms and power of the drift verdict: prints ONE JSON line per case.

Run from the repository root::

    .venv/bin/python benchmarks/drift_false_alarms.py            # 100 splits per case
    .venv/bin/python benchmarks/drift_false_alarms.py --quick    # 20 splits
    .venv/bin/python benchmarks/drift_false_alarms.py --dataset wine --splits 400

For each of scikit-learn's breast-cancer, wine, digits and diabetes data (shipped inside
scikit-learn, no download), many random splits: the reference profile is built from one part the
way ``edgewise convert`` builds it (:func:`infer_features`, :func:`frame_to_inputs`,
:func:`build_profile`), the other part is observed as one window by a :class:`ModelMonitor`
(no server) and judged by its verdict (``report().drifting``: the model, any feature).

Cases (``shift``):

* ``none``: the held-out rows as they are (in distribution): the figure is the share of splits
  flagged, a false alarm; target <= 1 % at the default window (100 rows, ``min_rows``);
* ``plus_1sd``: one feature (``feature``) moved by +1 reference standard deviation;
* ``scale_1.5``: that feature spread x1.5 around the reference mean;
* ``other_class``: the reference from rows of the other classes, the window from one class;
* ``older_age`` (diabetes): the reference from rows with age <= median, the window from older
  rows;
* ``decorrelated``: every feature of the window shuffled on its own across the window's rows,
  so each feature keeps its values (the univariate tests see nothing to flag) while the rows
  leave the reference's correlation structure (what the multivariate detector is for).

Each split also has a model, so that the model's other detectors are measured in the same
verdict: a scikit-learn model (logistic regression on standardised inputs; ridge regression for
diabetes) fitted on half of the reference rows, its outputs on the other half stored in the
profile as convert stores a held-out part's (prediction drift; in the group cases, whose
reference holds one group only, the model is fitted on the rows in neither part and its
reference outputs are those of the whole reference), and its outputs on the window
observed with the window's rows; the profile also has the PCA of the reference (multivariate
drift). ``value`` is the verdict of the whole family (inputs, outputs and the multivariate error
under one Holm correction); ``inputs_value``, ``prediction_value`` and ``multivariate_value`` are
the shares of splits in which an entry of that kind was flagged drifting.

For the shifted cases the figure is the power (share of splits flagged). Each line also has, on
the same windows, the ``baseline``: the old rule (fixed thresholds PSI >= 0.25, JS >= 0.2,
binned KS >= 0.2, L-inf >= 0.2 on PSI with 1e-4 clipping), and the ``oracle``: SciPy's exact
``ks_2samp`` on the raw rows per feature with a Bonferroni correction at the same alpha (0.01).
``ratio`` is ``value / baseline_value`` (its meaning is on the line). Windows below 100 rows are
judged here too (``min_rows`` 0) to show the power curve; the server reports them unjudged.

``--sequential``: the server's drift timer sees a window *grow* and judges it at each tick. Per
case (``drift_sequential_false_alarms`` / ``drift_sequential_power``), many windows: a reference
and a window drawn from one Gaussian (the breast-cancer data's mean and covariance, so that both
are samples of one distribution), the window fed to a :class:`ModelMonitor` in batches of
``--batch-rows`` with ``evaluate()`` after each (a tick) until it closes at ``--window-rows``
(and one tick more). The figure is the share of windows flagged drifting (``value``) or warned
(``warning_value``) at *any* tick: the timer's looks (the doublings of ``min_rows`` and the
close, rates split across them). The ``baseline`` is the timer before the looks: at each tick the
window judged afresh at the full rates. Cases: ``thresholds`` default (PSI >= 0.1) and ``{}``
(the test alone); ``plus_1sd`` moves the first feature by +1 sd in the window (power), with the
median rows at the first flag.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import datasets
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from edgewise.kernels import drift_scores
from edgewise.runtime.package.reference_profile import (
    ReferenceOutputs,
    ReferenceProfile,
    build_profile,
)
from edgewise.runtime.package.schema import frame_to_inputs, infer_features
from edgewise.runtime.serving.monitor import ModelMonitor
from edgewise.runtime.serving.monitor_config import DEFAULT_ALPHA, MonitorConfig, planned_looks

WINDOWS = (50, 100, 200, 500)
DEFAULT_WINDOW = 100
#: The reference keeps at least this many rows in the in-distribution splits.
MIN_REFERENCE_ROWS = 50
#: Share of the other group's rows the group cases build the reference from.
GROUP_REFERENCE_SHARE = 0.8
TARGET_FALSE_ALARMS = 0.01
OLD_THRESHOLDS = {"psi": 0.25, "jensenshannon": 0.2, "ks": 0.2, "linf": 0.2}


@dataclass(frozen=True)
class Dataset:
    name: str
    frame: pd.DataFrame  # features only
    target: np.ndarray
    feature: str  # the feature the +1 sd and x1.5 cases move
    classifier: bool


def load(name: str) -> Dataset:
    loaders: dict[str, tuple[Callable[..., Any], str, bool]] = {
        "breast_cancer": (datasets.load_breast_cancer, "mean radius", True),
        "wine": (datasets.load_wine, "alcohol", True),
        "digits": (datasets.load_digits, "pixel_5_3", True),
        "diabetes": (datasets.load_diabetes, "bmi", False),
    }
    loader, feature, classifier = loaders[name]
    bunch = loader(as_frame=True)
    return Dataset(name, bunch.data, np.asarray(bunch.target), feature, classifier)


@dataclass(frozen=True)
class Split:
    reference: np.ndarray  # row indices
    window: np.ndarray
    transform: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame] | None = None


def _identity_split(n: int, rows: int, rng: np.random.Generator) -> Split | None:
    if n - rows < MIN_REFERENCE_ROWS:
        return None
    order = rng.permutation(n)
    return Split(order[rows:], order[:rows])


def _group_split(group: np.ndarray, rows: int, rng: np.random.Generator) -> Split | None:
    inside = np.flatnonzero(group)
    outside = np.flatnonzero(~group)
    if inside.size < rows:
        return None
    reference = rng.permutation(outside)[: round(outside.size * GROUP_REFERENCE_SHARE)]
    return Split(reference, rng.permutation(inside)[:rows])


def _moved(feature: str, how: str) -> Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]:
    def move(reference: pd.DataFrame, window: pd.DataFrame) -> pd.DataFrame:
        out = window.copy()
        mean = float(reference[feature].mean())
        sd = float(reference[feature].std(ddof=0))
        column = out[feature].astype(np.float64)
        out[feature] = column + sd if how == "plus_1sd" else mean + 1.5 * (column - mean)
        return out

    return move


def splits(data: Dataset, shift: str, rows: int, seed: int) -> Split | None:
    rng = np.random.default_rng([seed, rows, len(shift)])
    n = len(data.frame)
    if shift == "none":
        return _identity_split(n, rows, rng)
    if shift in ("plus_1sd", "scale_1.5"):
        split = _identity_split(n, rows, rng)
        return (
            None
            if split is None
            else Split(split.reference, split.window, _moved(data.feature, shift))
        )
    if shift == "decorrelated":
        split = _identity_split(n, rows, rng)
        return None if split is None else Split(split.reference, split.window, _decorrelated(seed))
    if shift == "other_class":
        return _group_split(data.target == 0, rows, rng)
    if shift == "older_age":
        age = data.frame["age"].to_numpy()
        return _group_split(age > np.median(age), rows, rng)
    raise ValueError(shift)


def _decorrelated(seed: int) -> Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]:
    def shuffle(reference: pd.DataFrame, window: pd.DataFrame) -> pd.DataFrame:
        rng = np.random.default_rng([seed, 7])
        return pd.DataFrame(
            {name: rng.permutation(window[name].to_numpy()) for name in window.columns},
            index=window.index,
        )

    return shuffle


def shifts(data: Dataset) -> tuple[str, ...]:
    extra = ("other_class",) if data.classifier else ("older_age",)
    return ("none", "plus_1sd", "scale_1.5", *extra, "decorrelated")


# ---- the three verdicts -----------------------------------------------------------------------


def profile_of(
    frame: pd.DataFrame, outputs: ReferenceOutputs | None = None
) -> tuple[ReferenceProfile, Any]:
    """The reference profile as ``edgewise convert`` builds it, and the model's features."""
    features = infer_features(frame)
    return build_profile(frame_to_inputs(features, frame), features, outputs=outputs), features


class Model:
    """The split's model, fitted on ``fit`` rows; its outputs on the ``held`` rows (rows it was
    not fitted on) are the profile's reference outputs, as convert's held-out rows."""

    def __init__(self, data: Dataset, fit: np.ndarray, held: np.ndarray) -> None:
        classifier = data.classifier
        estimator: Any = LogisticRegression(max_iter=300) if classifier else Ridge(alpha=1.0)
        self.classifier = classifier
        self.model = make_pipeline(StandardScaler(), estimator).fit(
            data.frame.iloc[fit].to_numpy(), data.target[fit]
        )
        classes = tuple(str(c) for c in getattr(self.model, "classes_", ()))
        self.reference = ReferenceOutputs(
            self.outputs(data.frame.iloc[held]),
            "classification" if classifier else "regression",
            classes,
            "held_out",
        )

    def outputs(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The model's outputs as the served ONNX model gives them (float32)."""
        rows = frame.to_numpy()
        if self.classifier:
            return {"probabilities": self.model.predict_proba(rows).astype(np.float32)}
        return {"predictions": self.model.predict(rows).astype(np.float32).reshape(-1, 1)}


@dataclass(frozen=True)
class Verdict:
    new: bool  # the whole family (inputs, outputs, multivariate)
    old: bool  # the old fixed-threshold rule (inputs)
    oracle: bool  # KS + Bonferroni (inputs)
    inputs: bool  # an input feature flagged drifting
    prediction: bool  # a model output column flagged drifting
    multivariate: bool  # the reconstruction error flagged drifting


def verdicts(reference: pd.DataFrame, window: pd.DataFrame, alpha: float, model: Model) -> Verdict:
    """The verdicts of one window."""
    profile, features = profile_of(reference, model.reference)
    monitor = ModelMonitor(
        "bench", "1", profile, MonitorConfig(window_rows=0, reservoir_rows=0, min_rows=0)
    )
    inputs = frame_to_inputs(features, window)
    monitor.observe(inputs, model.outputs(window))
    report = monitor.report("current")
    kinds = {f.kind for f in report.features if f.drifting}
    snapshot = monitor.snapshot("current")
    assert snapshot is not None and snapshot.numeric is not None and profile.numeric is not None
    old = old_rule(profile, snapshot.numeric.histogram.counts)
    # The oracle sees the model's input tensors (float32), as the monitor does.
    ref_values = frame_to_inputs(features, reference)["features"].astype(np.float64)
    win_values = inputs["features"].astype(np.float64)
    return Verdict(
        report.drifting,
        old,
        ks_bonferroni(ref_values, win_values, alpha),
        bool(kinds & {"numeric", "categorical"}),
        "prediction" in kinds,
        "multivariate" in kinds,
    )


def old_rule(profile: ReferenceProfile, counts: np.ndarray) -> bool:
    """The verdict before issue 19: any statistic at or above its fixed threshold."""
    numeric = profile.numeric
    assert numeric is not None
    table = drift_scores(numeric.counts, counts, numeric.edges)
    values = {
        "psi": table.psi,
        "jensenshannon": table.jensenshannon,
        "ks": table.ks,
        "linf": table.linf,
    }
    return any(
        bool(np.any(np.nan_to_num(values[name], nan=-1.0) >= limit))
        for name, limit in OLD_THRESHOLDS.items()
    )


def ks_bonferroni(reference: np.ndarray, window: np.ndarray, alpha: float) -> bool:
    """SciPy's exact two-sample KS per feature, Bonferroni over the features."""
    m = reference.shape[1]
    for j in range(m):
        if stats.ks_2samp(reference[:, j], window[:, j], method="exact").pvalue * m <= alpha:
            return True
    return False


# ---- cases ------------------------------------------------------------------------------------


def model_rows(split: Split, shift: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows the model is fitted on, rows of its reference outputs): halves of the reference
    for the identity splits; for the group cases (the reference is one group, e.g. one class
    only) the rows in neither part, its outputs on the whole reference."""
    if shift in ("other_class", "older_age"):
        neither = np.setdiff1d(np.arange(n), np.concatenate([split.reference, split.window]))
        return neither, split.reference
    order = np.random.default_rng(len(split.reference)).permutation(split.reference)
    half = len(order) // 2
    return order[:half], order[half:]


def run_case(data: Dataset, shift: str, rows: int, n_splits: int) -> dict[str, Any] | None:
    counts = np.zeros(6, dtype=np.int64)
    reference_rows = []
    started = time.perf_counter()
    for seed in range(n_splits):
        split = splits(data, shift, rows, seed)
        if split is None:
            return None
        reference = data.frame.iloc[split.reference]
        window = data.frame.iloc[split.window]
        if split.transform is not None:
            window = split.transform(reference, window)
        model = Model(data, *model_rows(split, shift, len(data.frame)))
        verdict = verdicts(reference, window, DEFAULT_ALPHA, model)
        counts += np.array(astuple(verdict), dtype=np.int64)
        reference_rows.append(len(split.reference))
    new, old, oracle, by_inputs, by_prediction, by_multivariate = (
        float(c) / n_splits for c in counts
    )
    null = shift == "none"
    row: dict[str, Any] = {
        "case": f"drift_{'false_alarms' if null else 'power'}",
        "dataset": data.name,
        "shift": shift,
        "feature": data.feature if shift in ("plus_1sd", "scale_1.5") else None,
        "window_rows": rows,
        "reference_rows": int(np.median(reference_rows)),
        "features": data.frame.shape[1],
        "splits": n_splits,
        "unit": "share of splits flagged drifting" + (" (false alarms)" if null else " (power)"),
        "value": round(new, 4),
        "inputs_value": round(by_inputs, 4),
        "prediction_value": round(by_prediction, 4),
        "multivariate_value": round(by_multivariate, 4),
        "baseline": "old rule: psi>=0.25 | js>=0.2 | ks>=0.2 | linf>=0.2 (eps 1e-4)",
        "baseline_value": round(old, 4),
        "ratio": round(new / old, 3) if old else None,
        "ratio_meaning": "new/baseline share ("
        + ("<1: fewer false alarms" if null else ">=1: at least the baseline's power")
        + ")",
        "oracle": f"scipy ks_2samp exact + Bonferroni at {DEFAULT_ALPHA:g}",
        "oracle_value": round(oracle, 4),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if null:
        # A one-sided binomial 95 % upper bound on the true rate, from the splits measured.
        row["upper_95"] = round(_upper_bound(int(counts[0]), n_splits), 4)
        if rows == DEFAULT_WINDOW:
            row["target"] = f"<= {TARGET_FALSE_ALARMS:g} at {DEFAULT_WINDOW} rows"
            row["meets_target"] = new <= TARGET_FALSE_ALARMS
    return row


def _upper_bound(flagged: int, n: int, confidence: float = 0.95) -> float:
    """Clopper-Pearson one-sided upper bound of a binomial proportion."""
    if flagged >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, flagged + 1, n - flagged))


# ---- the timer's looks at a growing window ------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    window_rows: int
    batch_rows: int
    reference_rows: int
    thresholds: dict[str, float] | None  # None: the default minimum effects
    shift: str  # "none" or "plus_1sd"


@dataclass
class StreamFlags:
    drifting: bool = False
    warning: bool = False
    first_rows: int | None = None  # rows of the window at its first drifting flag

    def see(self, report: Any) -> None:
        if report.drifting and self.first_rows is None:
            self.first_rows = report.rows
        self.drifting = self.drifting or report.drifting
        self.warning = self.warning or any(f.warning or f.drifting for f in report.features)


def stream_window(stream: Stream, seed: int, data: pd.DataFrame) -> tuple[StreamFlags, StreamFlags]:
    """(the timer's looks, the old timer: each tick at the full rates) on one growing window."""
    rng = np.random.default_rng([19, seed, stream.window_rows])
    mean, cov = data.mean().to_numpy(), np.cov(data.to_numpy(), rowvar=False)
    reference = pd.DataFrame(
        rng.multivariate_normal(mean, cov, stream.reference_rows), columns=data.columns
    )
    profile, features = profile_of(reference)
    window = pd.DataFrame(
        rng.multivariate_normal(mean, cov, stream.window_rows), columns=data.columns
    )
    if stream.shift == "plus_1sd":
        column = data.columns[0]
        window[column] += float(reference[column].std(ddof=0))
    rows = frame_to_inputs(features, window)["features"]
    settings: dict[str, Any] = {"window_rows": stream.window_rows, "reservoir_rows": 0}
    if stream.thresholds is not None:
        settings["thresholds"] = stream.thresholds
    monitor = ModelMonitor("bench", "1", profile, MonitorConfig(**settings))
    looks, old = StreamFlags(), StreamFlags()
    for start in range(0, stream.window_rows + stream.batch_rows, stream.batch_rows):
        monitor.observe({"features": rows[start : start + stream.batch_rows]})
        judged = monitor.evaluate()
        assert judged is not None
        looks.see(judged.report)
        old.see(monitor.report(old_timer_window(monitor)))
    return looks, old


def old_timer_window(monitor: ModelMonitor) -> str:
    """The window the timer judged before the looks: the current one once it has min_rows,
    else the last closed one."""
    if monitor.current.rows >= monitor.config.min_rows or monitor.previous is None:
        return "current"
    return "previous"


def sequential_case(stream: Stream, windows: int) -> dict[str, Any]:
    data = load("breast_cancer").frame
    started = time.perf_counter()
    runs = [stream_window(stream, seed, data) for seed in range(windows)]
    null = stream.shift == "none"
    share = {
        name: [sum(getattr(run[i], name) for run in runs) / windows for i in (0, 1)]
        for name in ("drifting", "warning")
    }
    first = [r[0].first_rows for r in runs if r[0].first_rows is not None]
    config = MonitorConfig(window_rows=stream.window_rows)
    row: dict[str, Any] = {
        "case": f"drift_sequential_{'false_alarms' if null else 'power'}",
        "dataset": "gaussian(breast_cancer mean, cov)",
        "shift": stream.shift,
        "thresholds": stream.thresholds if stream.thresholds is not None else "default",
        "window_rows": stream.window_rows,
        "batch_rows": stream.batch_rows,
        "ticks_per_window": -(-stream.window_rows // stream.batch_rows) + 1,
        "min_rows": config.min_rows,
        "planned_looks": planned_looks(config),
        "reference_rows": stream.reference_rows,
        "windows": windows,
        "unit": "share of windows flagged drifting at any tick",
        "value": round(share["drifting"][0], 4),
        "warning_value": round(share["warning"][0], 4),
        "baseline": "each tick judged afresh at the full rates (before the looks)",
        "baseline_value": round(share["drifting"][1], 4),
        "baseline_warning_value": round(share["warning"][1], 4),
        "nominal": {"alpha": config.alpha, "warning_alpha": config.warning_alpha},
        "seconds": round(time.perf_counter() - started, 2),
    }
    if null:
        flagged = round(share["drifting"][0] * windows)
        row["upper_95"] = round(_upper_bound(flagged, windows), 4)
    else:
        row["median_rows_at_first_flag"] = float(np.median(first)) if first else None
    return row


def sequential_cases(windows: int, window_rows: int, batch_rows: int) -> Iterator[dict[str, Any]]:
    for thresholds, shift in (({}, "none"), (None, "none"), (None, "plus_1sd")):
        stream = Stream(window_rows, batch_rows, 2_000, thresholds, shift)
        yield sequential_case(stream, windows)


def cases(
    names: list[str], n_splits: int, windows: tuple[int, ...] = WINDOWS
) -> Iterator[dict[str, Any]]:
    for name in names:
        data = load(name)
        for shift in shifts(data):
            for rows in windows:
                row = run_case(data, shift, rows, n_splits)
                if row is not None:
                    yield row


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 splits per case")
    parser.add_argument("--splits", type=int, default=100, help="random splits per case")
    parser.add_argument(
        "--dataset",
        action="append",
        choices=["breast_cancer", "wine", "digits", "diabetes"],
        help="only these data sets (repeatable)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="the timer's looks at growing windows instead of the splits",
    )
    parser.add_argument(
        "--window",
        action="append",
        type=int,
        help=f"only these window sizes (repeatable; default {', '.join(map(str, WINDOWS))})",
    )
    parser.add_argument("--windows", type=int, default=300, help="windows per sequential case")
    parser.add_argument("--window-rows", type=int, default=1_600, help="sequential window size")
    parser.add_argument("--batch-rows", type=int, default=25, help="rows between two ticks")
    args = parser.parse_args(argv)
    # One BLAS thread: each split's fits (a PCA, a small model) are tiny, and threads only
    # contend (seven times slower on a loaded two-core machine).
    threadpool_limits(1)
    n_splits = 20 if args.quick else args.splits
    env = environment()
    if args.sequential:
        windows = 50 if args.quick else args.windows
        for row in sequential_cases(windows, args.window_rows, args.batch_rows):
            row["quick"] = args.quick
            row["env"] = env
            print(json.dumps(row), flush=True)
        return 0
    names = args.dataset or ["breast_cancer", "wine", "digits", "diabetes"]
    for row in cases(names, n_splits, tuple(args.window or WINDOWS)):
        row["quick"] = args.quick
        row["env"] = env
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
