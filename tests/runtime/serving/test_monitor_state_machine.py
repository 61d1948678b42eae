"""The monitor's windows as a state machine (observe, reset, evaluate, report, exact report,
metrics scrape) against a reference model written here: the rows of the current and previous
windows as plain lists, and the timer's looks (a window is judged when its rows reach a new
doubling of MIN_ROWS and once when it closes, each look at alpha / K). Checks that reports and
scrapes change nothing, that a reset empties the window, its reservoir and its series, that
between looks the published judgement stays, that every window closed between two ticks gets its
own last look (oldest first, each published: what the drift history records), and that the exact
tests agree with SciPy on exactly the rows of the window a report names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import generate_latest
from scipy import stats

from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.reference_profile import ReferenceProfile, read_profile
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.monitor import DriftReport, ModelMonitor, MonitorConfig
from tests import models

WINDOW_ROWS = 60
MIN_ROWS = 20
RESERVOIR_ROWS = 25
CHECKED_FEATURES = (0, 3)  # a few of the 30, to keep each step cheap
#: Looks a window can have: levels 0 (20-39 rows) and 1 (40-59 rows), and the closed window.
PLANNED_LOOKS = 3
ALPHA = MonitorConfig().alpha


@dataclasses.dataclass
class Fixture:
    profile: ReferenceProfile
    rows: np.ndarray  # the training rows, float32 as the server receives them


class Shown:
    """The gauges, and the list of every report published to them (the history's view)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.reports: list[DriftReport] = []

    def publish_drift(self, report: DriftReport) -> None:
        self.metrics.publish_drift(report)
        self.reports.append(report)

    def forget_drift(self, model: str, version: str) -> None:
        self.metrics.forget_drift(model, version)


def without_time(report: DriftReport) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    data.pop("computed_at")
    return data


def same(a: object, b: object) -> bool:
    """Equality where NaN equals NaN (statistics of an empty feature are NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class MonitorWindows(RuleBasedStateMachine):
    fixture: ClassVar[Fixture]  # set by the test, on a subclass

    def __init__(self) -> None:
        super().__init__()
        self.metrics = ServerMetrics()
        config = MonitorConfig(
            window_rows=WINDOW_ROWS, min_rows=MIN_ROWS, reservoir_rows=RESERVOIR_ROWS
        )
        self.shown = Shown(self.metrics)
        self.monitor = ModelMonitor("logreg", "1", self.fixture.profile, config, self.shown)
        # The reference model: the rows of each window, in order; None: no window completed.
        self.current: list[np.ndarray] = []
        self.previous: list[np.ndarray] | None = None
        # The windows closed since the last tick, oldest first: (number, rows).
        self.closed: list[tuple[int, list[np.ndarray]]] = []
        self.lifetime = 0
        # The looks: windows opened so far, the window the looks belong to, its last look's
        # level (-1: none).
        self.opened = 0
        self.looked_window = 0
        self.looked_level = -1
        # What the gauges must show: the report of the window judged at the last transition.
        self.published: DriftReport | None = None

    # ---- transitions ----

    @rule(
        start=st.integers(0, 568),
        size=st.integers(1, 40),
        scale=st.sampled_from([1.0, 1.0, 1.8]),
    )
    def observe(self, start: int, size: int, scale: float) -> None:
        batch = (self.fixture.rows[start : start + size] * np.float32(scale)).astype(np.float32)
        self.monitor.observe({"features": batch})
        self.current.extend(batch)
        self.lifetime += len(batch)
        if len(self.current) >= WINDOW_ROWS:
            self.closed.append((self.opened, self.current))
            self.previous, self.current = self.current, []
            self.opened += 1

    @rule()
    def reset(self) -> None:
        judged = self.monitor.reset()
        self.current = []
        self.previous = None
        self.closed = []  # never judged
        self.opened += 1
        self.looked_window, self.looked_level = self.opened, -1
        self.published = self.expect_judgement(judged.report, "current", None)

    @rule()
    def evaluate(self) -> None:
        before = self.state()
        published = len(self.shown.reports)
        judged = self.monitor.evaluate()
        assert judged is not None
        looks = self.due_looks()
        closed, self.closed = self.closed, []
        # Each closed window's last look was published, oldest first, with its own rows.
        last_looks = [r for r in self.shown.reports[published:] if r.window == "previous"]
        assert [r.rows for r in last_looks] == [len(rows) for _, rows in closed]
        for window, level in looks:
            if window == "current":
                self.looked_window, self.looked_level = self.opened, level
            else:
                number, _ = closed.pop(0)
                self.looked_window, self.looked_level = number + 1, -1
        if looks:  # the tick's last look is what it returns and shows
            window, level = looks[-1]
            self.published = self.expect_judgement(judged.report, window, level)
            assert judged.report is self.monitor.last_judgement.report  # type: ignore[union-attr]
        elif self.published is None or self.published.insufficient_data:
            # Nothing judged to keep showing: the current window, too small to judge.
            assert len(self.current) < MIN_ROWS
            self.published = self.expect_judgement(judged.report, "current", None)
        else:  # between looks: the published judgement stays, nothing changes
            assert judged.report is self.monitor.last_judgement.report  # type: ignore[union-attr]
            assert same(without_time(judged.report), without_time(self.published))
            assert not judged.started_drifting
            assert self.state() == before

    def due_looks(self) -> list[tuple[str, int]]:
        """The model's looks for this tick: each closed window's last, then the current one's."""
        looks = []
        for number, _ in self.closed:
            last = self.looked_level if self.looked_window == number else -1
            looks.append(("previous", last + 1))
        rows = len(self.current)
        last = self.looked_level if self.looked_window == self.opened else -1
        if rows >= MIN_ROWS and int(math.log2(rows / MIN_ROWS)) > last:
            looks.append(("current", int(math.log2(rows / MIN_ROWS))))
        return looks

    def expect_judgement(self, report: DriftReport, window: str, level: int | None) -> DriftReport:
        """``report`` is of ``window`` with its rows; a look (``level``) uses alpha / K."""
        assert report.window == window
        assert report.rows == len(self.window_rows(window))
        if report.rows == 0:
            assert all(not f.scores for f in report.features)
        if level is not None and not report.insufficient_data:
            assert report.thresholds["alpha"] == pytest.approx(ALPHA / PLANNED_LOOKS)
        return report

    # ---- reads: each must change nothing ----

    @rule(window=st.sampled_from(["current", "previous", "lifetime", "decayed"]))
    def report(self, window: str) -> None:
        before = self.state()
        first = self.monitor.report(window)
        stats_only = self.monitor.report(window, scores=False)
        second = self.monitor.report(window)
        assert same(without_time(first), without_time(second))
        assert all(not f.scores for f in stats_only.features)
        if window == "lifetime":
            assert first.rows == self.lifetime
        elif window != "decayed":
            assert first.rows == len(self.window_rows(window))
            self.check_statistics(first, window)
        assert self.state() == before

    @rule(window=st.sampled_from(["current", "previous"]))
    def exact_report(self, window: str) -> None:
        before = self.state()
        report = self.monitor.report(window, exact=True)
        assert same(without_time(report), without_time(self.monitor.report(window, exact=True)))
        rows = self.window_rows(window)
        recent = np.array(rows[-RESERVOIR_ROWS:], dtype=np.float64)
        reference = self.fixture.profile.numeric
        assert reference is not None
        for index in CHECKED_FEATURES:
            scores = report.features[index].scores
            if not rows:
                assert "ks_exact" not in scores
                continue
            want = stats.ks_2samp(reference.sample[:, index], recent[:, index])
            assert scores["ks_exact"] == pytest.approx(want.statistic, abs=1e-12)
            assert scores["ks_exact_pvalue"] == pytest.approx(want.pvalue, rel=1e-6, abs=1e-12)
        assert self.state() == before

    @rule()
    def scrape(self) -> None:
        before = self.state()
        first = generate_latest(self.metrics.registry)
        assert generate_latest(self.metrics.registry) == first
        assert self.state() == before

    # ---- checks ----

    @invariant()
    def windows_match_the_model(self) -> None:
        assert self.monitor.current.rows == len(self.current)
        previous = self.monitor.previous
        assert (previous.rows if previous is not None else None) == (
            len(self.previous) if self.previous is not None else None
        )

    @invariant()
    def gauges_show_the_last_judgement_only(self) -> None:
        shown = {
            (sample.labels["feature"], sample.labels["statistic"]): sample.value
            for family in self.metrics.registry.collect()
            if family.name == "edgewise_drift_score"
            for sample in family.samples
        }
        rows = self.metrics.registry.get_sample_value(
            "edgewise_monitored_rows", {"model": "logreg", "version": "1"}
        )
        if self.published is None:
            assert not shown and rows is None
            return
        want = {
            (feature.name, statistic): value
            for feature in self.published.features
            for statistic, value in feature.scores.items()
        }
        assert same(shown, want)
        assert rows == self.published.rows

    @precondition(lambda self: self.published is not None)
    @invariant()
    def a_judged_empty_window_shows_no_scores(self) -> None:
        assert self.published is not None
        if self.published.rows == 0:
            assert (
                self.metrics.registry.get_sample_value(
                    "edgewise_drift_score",
                    {"model": "logreg", "version": "1", "feature": "mean area", "statistic": "psi"},
                )
                is None
            )

    # ---- helpers ----

    def window_rows(self, window: str) -> list[np.ndarray]:
        if window == "current":
            return self.current
        if window == "previous":
            return self.previous or []
        raise AssertionError(window)

    def check_statistics(self, report: DriftReport, window: str) -> None:
        rows = np.array(self.window_rows(window), dtype=np.float64).reshape(-1, 30)
        for index in CHECKED_FEATURES:
            statistics = report.features[index].statistics
            if window == "previous" and self.previous is None:
                assert not statistics
                continue
            assert statistics["count"] == rows.shape[0]
            if rows.shape[0]:
                assert statistics["mean"] == pytest.approx(rows[:, index].mean(), rel=1e-9)

    def state(self) -> tuple[Any, ...]:
        """What a read must leave as it was: window sizes, judged state, every gauge sample."""
        monitor = self.monitor
        previous = monitor.previous.rows if monitor.previous is not None else None
        samples = generate_latest(self.metrics.registry)
        return (
            monitor.current.rows,
            previous,
            monitor.lifetime.rows,
            monitor.drifting,
            frozenset(monitor.drifting_features),
            samples,
        )


def test_monitor_windows_state_machine(model_repo: Path) -> None:
    folder = model_repo / "logreg" / "1"
    manifest = read_manifest(folder)
    profile = read_profile(folder, manifest)
    assert profile is not None
    _, frame, _ = models.train_logreg()
    fixture = Fixture(profile, frame_to_inputs(manifest, frame)["features"])
    run_state_machine_as_test(
        type("MonitorWindowsOfLogreg", (MonitorWindows,), {"fixture": fixture}),
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
