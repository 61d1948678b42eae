"""The drift timer's looks: a growing window is judged at the doublings of ``min_rows`` and once
when it closes, with ``alpha`` split across the looks, so that a window without drift is flagged
at *any* look with probability at most ``alpha`` (not at each tick)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import datasets

from edgewise.runtime.package.reference_profile import build_profile
from edgewise.runtime.package.schema import frame_to_inputs, infer_features
from edgewise.runtime.serving.monitor import ModelMonitor
from edgewise.runtime.serving.monitor_config import (
    MonitorConfig,
    look_alpha_share,
    look_level,
    planned_looks,
)

#: Null windows replayed, their size, the rows between two ticks, the reference's rows.
NULL_WINDOWS = 300
WINDOW_ROWS = 800
BATCH_ROWS = 25
REFERENCE_ROWS = 1_000


def test_look_levels_are_the_doublings_of_min_rows() -> None:
    assert [look_level(rows, 100) for rows in (0, 99, 100, 199, 200, 399, 400, 6_400)] == [
        -1,
        -1,
        0,
        0,
        1,
        1,
        2,
        6,
    ]
    assert look_level(5, 0) == 2  # min_rows 0 counts as 1


@pytest.mark.parametrize(
    ("window_rows", "min_rows", "looks"),
    [(10_000, 100, 8), (6_400, 100, 7), (100, 100, 1), (50, 100, 1), (60, 20, 3), (4, 0, 3)],
)
def test_planned_looks_count_the_levels_below_the_window_and_its_close(
    window_rows: int, min_rows: int, looks: int
) -> None:
    config = MonitorConfig(window_rows=window_rows, min_rows=min_rows)
    assert planned_looks(config) == looks
    below = {look_level(rows, min_rows) for rows in range(min_rows, window_rows)} - {-1}
    assert len(below) + 1 == looks  # the levels a growing window can look at, and the close
    assert look_alpha_share(config, 0) == 1 / looks


def test_without_a_row_limit_the_shares_halve_and_sum_below_one() -> None:
    config = MonitorConfig(window_rows=0, window_seconds=60)
    assert planned_looks(config) == 0
    shares = [look_alpha_share(config, level) for level in range(40)]
    assert shares[:3] == [0.5, 0.25, 0.125]
    assert sum(shares) < 1


def test_looks_without_a_row_limit_use_the_halved_rates() -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(rng.normal(size=(REFERENCE_ROWS, 2)), columns=["a", "b"])
    features = infer_features(frame)
    profile = build_profile(frame_to_inputs(features, frame), features)
    monitor = ModelMonitor("m", "1", profile, MonitorConfig(window_rows=0, min_rows=100))
    rows = frame_to_inputs(features, frame)["features"]
    alphas = []
    for start in range(0, 500, 50):
        monitor.observe({"features": rows[start : start + 50]})
        judged = monitor.evaluate()
        assert judged is not None
        alphas.append((judged.report.rows, judged.report.thresholds["alpha"]))
    # Looks at 100, 200 and 400 rows; in between the last look's judgement stays.
    assert alphas == [
        (50, 0.005),  # too few rows: not judged (shown with the first look's rates)
        (100, 0.005),
        (100, 0.005),
        (200, 0.0025),
        (200, 0.0025),
        (200, 0.0025),
        (200, 0.0025),
        (400, 0.00125),
        (400, 0.00125),
        (400, 0.00125),
    ]


def null_window_flags(seed: int, data: pd.DataFrame) -> tuple[bool, bool]:
    """(drifting, warning or drifting) at any tick of one window without drift: reference and
    window drawn from one Gaussian (the breast-cancer data's mean and covariance), the window
    fed in small batches with a timer tick after each, as the server's timer sees it."""
    rng = np.random.default_rng([19, seed])
    mean, cov = data.mean().to_numpy(), np.cov(data.to_numpy(), rowvar=False)
    reference = pd.DataFrame(
        rng.multivariate_normal(mean, cov, REFERENCE_ROWS), columns=data.columns
    )
    features = infer_features(reference)
    profile = build_profile(frame_to_inputs(features, reference), features)
    window = pd.DataFrame(rng.multivariate_normal(mean, cov, WINDOW_ROWS), columns=data.columns)
    rows = frame_to_inputs(features, window)["features"]
    # The test alone (no minimum effect), the strictest case for the false-alarm rate.
    config = MonitorConfig(window_rows=WINDOW_ROWS, min_rows=100, reservoir_rows=0, thresholds={})
    monitor = ModelMonitor("null", "1", profile, config)
    drifting = warning = False
    for start in range(0, WINDOW_ROWS + BATCH_ROWS, BATCH_ROWS):  # one tick after the close
        monitor.observe({"features": rows[start : start + BATCH_ROWS]})
        judged = monitor.evaluate()
        assert judged is not None
        drifting = drifting or judged.report.drifting
        warning = warning or any(f.warning or f.drifting for f in judged.report.features)
    assert monitor.previous is not None and monitor.previous.rows == WINDOW_ROWS
    return drifting, warning


def test_a_window_without_drift_is_flagged_at_any_look_at_most_alpha_of_the_time() -> None:
    data = datasets.load_breast_cancer(as_frame=True).data
    flags = np.array([null_window_flags(seed, data) for seed in range(NULL_WINDOWS)])
    config = MonitorConfig()
    # Binomial bounds at the nominal rates (one-sided, 99.9 %): judged afresh at each of the 33
    # ticks, about 8 % of the windows were flagged drifting, far above this bound.
    drifting_bound = stats.binom.ppf(0.999, NULL_WINDOWS, config.alpha)
    warning_bound = stats.binom.ppf(0.999, NULL_WINDOWS, config.warning_alpha)
    assert flags[:, 0].sum() <= drifting_bound, flags.sum(axis=0)
    assert flags[:, 1].sum() <= warning_bound, flags.sum(axis=0)


def test_the_served_report_of_the_growing_window_is_the_timers_last_look() -> None:
    """GetDriftReport's answer (``served_report``) for the current window: the verdict and the
    scores of the timer's last look (its rows, time and share of alpha), the statistics live;
    before the first look the live scores without a verdict; on demand while no timer runs, and
    with ``exact``. Asking again and again never judges anew."""
    rng = np.random.default_rng(8)
    frame = pd.DataFrame(rng.normal(size=(REFERENCE_ROWS, 2)), columns=["a", "b"])
    features = infer_features(frame)
    profile = build_profile(frame_to_inputs(features, frame), features)
    config = MonitorConfig(window_rows=1_000, min_rows=100)
    monitor = ModelMonitor("m", "1", profile, config)

    def feed(rows: int, shift: float = 0.0) -> None:
        values = rng.normal(size=(rows, 2)) + np.array([shift, 0.0])
        monitor.observe(frame_to_inputs(features, pd.DataFrame(values, columns=["a", "b"])))

    feed(150, shift=2.0)
    untimed = monitor.served_report()  # no timer: one judgement on demand, at the full rates
    assert untimed.drifting and untimed.thresholds["alpha"] == config.alpha
    assert untimed.rows == 150 and not untimed.reason
    looked = monitor.evaluate()  # the timer's look at level 0
    assert looked is not None and looked.report.drifting
    feed(60, shift=2.0)
    served = monitor.served_report()
    assert served.drifting and served.rows == 150  # the look's rows...
    assert served.computed_at == looked.report.computed_at
    assert served.thresholds["alpha"] == pytest.approx(config.alpha / planned_looks(config))
    by_name = {f.name: f for f in served.features}
    assert by_name["a"].scores == {f.name: f for f in looked.report.features}["a"].scores
    assert by_name["a"].statistics["count"] == 210  # ...the statistics live
    assert "last look, at 150 rows" in served.reason and "210 rows now" in served.reason
    assert monitor.served_report().features[0].scores == served.features[0].scores  # pure
    exact = monitor.served_report(exact=True)  # judged now, at the full rates
    assert exact.rows == 210 and exact.thresholds["alpha"] == config.alpha
    assert monitor.served_report(window="lifetime").rows == 210  # other windows: on demand
    monitor.reset()
    feed(120)
    fresh = monitor.served_report()  # the new window has no look yet: scores, no verdict
    assert fresh.rows == 120 and not fresh.drifting and not fresh.insufficient_data
    assert fresh.features[0].scores and not fresh.features[0].reasons
    assert "not judged yet" in fresh.reason
    monitor.evaluate()
    assert monitor.served_report().reason.startswith("verdict and scores")
