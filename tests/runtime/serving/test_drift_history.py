"""The drift history (bounded, whole files, pure reads), its CLI and HTML page, and reports merged
over several processes' windows (oracle: one monitor fed every row)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime._fs import TEMP_PREFIX
from edgewise.runtime.cli.main import main
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.evaluation.drift_history_report import render_history_html
from edgewise.runtime.html_style import DRIFT
from edgewise.runtime.package.manifest import Feature
from edgewise.runtime.package.reference_profile import build_profile
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.drift_history import (
    DEFAULT_DIR,
    DriftHistory,
    RecordingPublisher,
    history_from_environment,
    read_history,
    report_from_json,
    report_to_json,
)
from edgewise.runtime.serving.drift_merge import (
    WorkerWindow,
    decode_window,
    encode_window,
    local_window,
    merged_report,
)
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.monitor import (
    DriftPublisher,
    DriftReport,
    ModelMonitor,
    MonitorConfig,
)
from tests.runtime.serving.test_monitor import monitor_for, synthetic_rows

CONFIG = MonitorConfig(window_rows=200, min_rows=100)


class Shown:
    """A publisher that keeps what it was shown (stands in for the server's gauges)."""

    def __init__(self) -> None:
        self.published: list[DriftReport] = []
        self.forgotten: list[tuple[str, str]] = []

    def publish_drift(self, report: DriftReport) -> None:
        self.published.append(report)

    def forget_drift(self, model: str, version: str) -> None:
        self.forgotten.append((model, version))


def synthetic_monitor(
    rng: np.random.Generator, config: MonitorConfig, publisher: DriftPublisher | None = None
) -> ModelMonitor:
    """test_monitor's synthetic monitor (six features of different shapes), with a publisher."""
    reference = synthetic_rows(rng, 2000)
    features = [
        Feature(f"x{j}", "numeric", "features", j, "float64") for j in range(reference.shape[1])
    ]
    profile = build_profile({"features": reference}, features)
    return ModelMonitor("synthetic", "1", profile, config, publisher)


def feed(monitor: ModelMonitor, rows: np.ndarray, batch: int = 10) -> None:
    for start in range(0, rows.shape[0], batch):
        monitor.observe({"features": np.ascontiguousarray(rows[start : start + batch])})


def closed_window_reports(count: int, shift: float = 0.0) -> list[DriftReport]:
    """The judged reports of ``count`` closed windows of a synthetic monitor (the last
    ``count // 2`` shifted by ``shift`` in the first feature)."""
    rng = np.random.default_rng(7)
    shown = Shown()
    monitor = synthetic_monitor(rng, CONFIG, shown)
    for index in range(count):
        rows = synthetic_rows(rng, 200)
        if index >= count - count // 2:
            rows[:, 0] += shift
        feed(monitor, rows)
        monitor.evaluate()
    return [r for r in shown.published if r.window == "previous"]


def tree(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
    )


# ---- recording -----------------------------------------------------------------------------


def test_a_report_survives_json_non_finite_numbers_included() -> None:
    report = closed_window_reports(1)[0]
    report.features[0].statistics["std"] = math.nan
    report.features[0].scores["psi"] = math.inf
    text = json.dumps(report_to_json(report), allow_nan=False)  # strict JSON
    back = report_from_json(json.loads(text))
    assert back.rows == report.rows and back.drifting == report.drifting
    assert math.isnan(back.features[0].statistics["std"])
    assert math.isnan(back.features[0].scores["psi"])  # non-finite is read as NaN
    assert back.features[1].scores == report.features[1].scores
    assert back.thresholds == report.thresholds


def test_a_damaged_report_is_refused_naming_the_field() -> None:
    data = report_to_json(closed_window_reports(1)[0])
    data["rows"] = "100"
    with pytest.raises(InvalidInput, match=r"report\.rows"):
        report_from_json(data)
    data = report_to_json(closed_window_reports(1)[0])
    data["features"][0]["drifting"] = "false"
    with pytest.raises(InvalidInput, match=r"features\[0\]\.drifting"):
        report_from_json(data)


def test_the_publisher_records_each_closed_window_and_shows_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    shown = Shown()
    history = DriftHistory(tmp_path / "history", writer="w1")
    monitor = synthetic_monitor(rng, CONFIG, RecordingPublisher(shown, history))
    monitor.evaluate()  # nothing yet: the empty window is shown, nothing recorded
    assert not (tmp_path / "history").exists()
    feed(monitor, synthetic_rows(rng, 150))
    monitor.evaluate()  # a look at the current window: shown, not recorded
    assert not (tmp_path / "history").exists()
    feed(monitor, synthetic_rows(rng, 100))  # the window closes at 200 rows
    monitor.evaluate()
    found = read_history(tmp_path / "history", "synthetic")
    assert [e.report.rows for e in found.entries] == [200]
    assert found.entries[0].writer == "w1"
    assert found.entries[0].report.window == "previous"
    closed = [r for r in shown.published if r.window == "previous"]
    assert len(closed) == 1
    assert found.entries[0].report.features[0].scores == closed[0].features[0].scores
    monitor.close()
    assert shown.forgotten == [("synthetic", "1")]


def test_every_window_closed_between_two_ticks_is_recorded(tmp_path: Path) -> None:
    """A fast process closes many windows between two timer ticks: each gets its last look and
    its file (oracle: windows closed = rows // window_rows), oldest first."""
    rng = np.random.default_rng(11)
    config = replace(CONFIG, window_rows=100)
    history = DriftHistory(tmp_path / "history", writer="w1")
    metrics = ServerMetrics()
    monitor = synthetic_monitor(rng, config, RecordingPublisher(metrics, history))
    rows = synthetic_rows(rng, 2_350)
    feed(monitor, rows)
    # One last look per closed window (the current one's 50 rows are below min_rows).
    assert monitor.due_looks() == [("previous", 0)] * (rows.shape[0] // config.window_rows)
    monitor.evaluate()
    found = read_history(tmp_path / "history", "synthetic")
    assert len(found.entries) == rows.shape[0] // config.window_rows
    assert all(e.report.rows == config.window_rows for e in found.entries)
    # Oldest first: the first recorded window holds the first 100 rows.
    first = found.entries[0].report.features[0].statistics["mean"]
    assert first == pytest.approx(float(rows[:100, 0].astype(np.float64).mean()), rel=1e-9)
    last = found.entries[-1].report.features[0].statistics["mean"]
    assert last == pytest.approx(float(rows[2_200:2_300, 0].astype(np.float64).mean()), rel=1e-9)
    assert all(e.report.windows_dropped == 0 for e in found.entries)
    dropped = {"model": "synthetic", "version": "1"}
    assert metrics.registry.get_sample_value("edgewise_drift_windows_dropped", dropped) == 0
    monitor.evaluate()  # drained: nothing more is recorded
    assert len(read_history(tmp_path / "history", "synthetic").entries) == 23


def test_the_closed_window_queue_is_bounded_and_its_drops_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    config = replace(CONFIG, window_rows=100, closed_windows=4)
    history = DriftHistory(tmp_path / "history", writer="w1")
    metrics = ServerMetrics()
    monitor = synthetic_monitor(rng, config, RecordingPublisher(metrics, history))
    rows = synthetic_rows(rng, 1_000)  # 10 windows close before the tick: 6 dropped
    feed(monitor, rows)
    assert monitor.due_looks() == [("previous", 0)] * 4
    judged = monitor.evaluate()
    assert judged is not None and judged.report.windows_dropped == 6
    found = read_history(tmp_path / "history", "synthetic")
    assert len(found.entries) == 4
    assert [e.report.windows_dropped for e in found.entries] == [6] * 4  # kept in the files
    # The newest four were kept: windows 7 to 10.
    means = [e.report.features[0].statistics["mean"] for e in found.entries]
    want = [
        float(rows[start : start + 100, 0].astype(np.float64).mean())
        for start in range(600, 1_000, 100)
    ]
    assert means == pytest.approx(want, rel=1e-9)
    labels = {"model": "synthetic", "version": "1"}
    assert metrics.registry.get_sample_value("edgewise_drift_windows_dropped", labels) == 6
    monitor.close()  # an unloaded version leaves no series behind
    assert metrics.registry.get_sample_value("edgewise_drift_windows_dropped", labels) is None


def test_the_closed_window_bound_is_checked() -> None:
    assert MonitorConfig.from_json({"closed_windows": 8}).closed_windows == 8
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(InvalidInput, match=r"monitoring\.closed_windows"):
            MonitorConfig.from_json({"closed_windows": bad})


def test_a_reset_drops_the_closed_windows_unjudged_and_uncounted(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    config = replace(CONFIG, window_rows=100)
    history = DriftHistory(tmp_path / "history", writer="w1")
    monitor = synthetic_monitor(rng, config, RecordingPublisher(Shown(), history))
    feed(monitor, synthetic_rows(rng, 300))
    judged = monitor.reset()  # start over: nothing from before is judged or recorded
    assert judged.report.windows_dropped == 0
    assert monitor.due_looks() == []
    monitor.evaluate()
    assert read_history(tmp_path / "history", "synthetic").entries == []


def test_a_history_that_cannot_be_written_never_stops_the_gauges(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    shown = Shown()
    rng = np.random.default_rng(5)
    monitor = synthetic_monitor(
        rng, CONFIG, RecordingPublisher(shown, DriftHistory(blocked / "history", writer="w"))
    )
    for _ in range(3):
        feed(monitor, synthetic_rows(rng, 200))
        monitor.evaluate()
    assert len([r for r in shown.published if r.window == "previous"]) == 3
    warnings = [r for r in caplog.records if "drift history" in r.getMessage()]
    assert len(warnings) == 1  # once per model version, not once per window


def test_the_history_is_bounded_oldest_removed(tmp_path: Path) -> None:
    history = DriftHistory(tmp_path, max_windows=3, writer="w1")
    reports = closed_window_reports(5)
    for index, report in enumerate(reports):
        report.rows = 1000 + index  # tells the windows apart
        history.record(report)
    found = read_history(tmp_path, "synthetic", "1")
    assert [e.report.rows for e in found.entries] == [1002, 1003, 1004]
    assert len(list((tmp_path / "synthetic" / "1").iterdir())) == 3


def test_a_write_cut_short_and_a_damaged_file_are_skipped(tmp_path: Path) -> None:
    history = DriftHistory(tmp_path, writer="w1")
    reports = closed_window_reports(2)
    first = history.record(reports[0])
    folder = first.parent
    # A crash during the atomic write leaves at most a temporary file: never a window.
    (folder / f"{TEMP_PREFIX}0123-{first.name}").write_text(first.read_text()[:50])
    # A file damaged by something else (its end torn off) is skipped and named.
    second = history.record(reports[1])
    second.write_text(second.read_text()[:-20])
    found = read_history(tmp_path, "synthetic")
    assert [e.path for e in found.entries] == [first]
    assert list(found.skipped) == [str(second)]


def test_reads_are_pure_and_never_create_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert read_history(missing, "synthetic").entries == []
    assert not missing.exists()
    history = DriftHistory(tmp_path / "h", writer="w1")
    for report in closed_window_reports(2):
        history.record(report)
    before = tree(tmp_path)
    assert len(read_history(tmp_path / "h", "synthetic").entries) == 2
    assert read_history(tmp_path / "h", "other").entries == []
    assert read_history(tmp_path / "h", "synthetic", "7").entries == []
    assert tree(tmp_path) == before


def test_writers_share_a_folder_and_names_are_checked(tmp_path: Path) -> None:
    reports = closed_window_reports(2)
    DriftHistory(tmp_path, writer="100").record(reports[0])
    DriftHistory(tmp_path, writer="200").record(reports[1])
    assert [e.writer for e in read_history(tmp_path, "synthetic").entries] == ["100", "200"]
    bad = replace(reports[0], model="../escape")
    with pytest.raises(InvalidInput, match="model"):
        DriftHistory(tmp_path).record(bad)
    with pytest.raises(InvalidInput, match="model"):
        read_history(tmp_path, "../escape")


def test_where_the_history_lives_is_configured(tmp_path: Path) -> None:
    default = history_from_environment(tmp_path, {})
    assert default is not None and default.root == tmp_path / DEFAULT_DIR
    assert default.max_windows == 1000
    assert history_from_environment(tmp_path, {"EDGEWISE_DRIFT_HISTORY": "off"}) is None
    elsewhere = history_from_environment(
        tmp_path,
        {"EDGEWISE_DRIFT_HISTORY": str(tmp_path / "x"), "EDGEWISE_DRIFT_HISTORY_WINDOWS": "5"},
    )
    assert elsewhere is not None and elsewhere.root == tmp_path / "x"
    assert elsewhere.max_windows == 5
    for bad in ("0", "-1", "2.5", "many"):
        with pytest.raises(InvalidInput, match="EDGEWISE_DRIFT_HISTORY_WINDOWS"):
            history_from_environment(tmp_path, {"EDGEWISE_DRIFT_HISTORY_WINDOWS": bad})
    assert not (tmp_path / DEFAULT_DIR).exists()  # nothing is created before a window closes


# ---- merged across processes -----------------------------------------------------------------


def test_two_processes_windows_merge_to_one_window_over_all_rows() -> None:
    rng = np.random.default_rng(11)
    config = MonitorConfig(window_rows=0, min_rows=100)
    first = synthetic_monitor(rng, config)
    second = ModelMonitor("synthetic", "1", first.reference, config)
    oracle = ModelMonitor("synthetic", "1", first.reference, config)
    rows = synthetic_rows(rng, 900)
    rows[:300, 0] += 1.5  # a shift, so that the verdicts have something to find
    for start in range(0, rows.shape[0], 9):
        chunk = {"features": np.ascontiguousarray(rows[start : start + 9])}
        (first if start % 27 else second).observe(chunk)  # uneven: a third and two thirds
        oracle.observe(chunk)
    first.count_wrong_type("features")
    second.count_wrong_type("features")
    shares = [decode_window(encode_window(local_window(m, "current"))) for m in (first, second)]
    merged = merged_report(first, "current", shares)
    alone = oracle.report("current")
    assert merged.rows == alone.rows == 900
    assert first.report().rows < 900 and second.report().rows < 900
    assert merged.drifting == alone.drifting
    assert merged.wrong_type == {"features": 2}
    for got, want in zip(merged.features, alone.features, strict=True):
        assert got.name == want.name
        # The same counts: the same binned scores; sums of moments merge up to rounding.
        assert got.scores == pytest.approx(want.scores, rel=1e-9, nan_ok=True)
        assert (got.drifting, got.warning, got.reasons) == (
            want.drifting,
            want.warning,
            want.reasons,
        )
        assert got.statistics == pytest.approx(want.statistics, rel=1e-9, nan_ok=True)
    assert any(f.drifting for f in merged.features)


def test_categorical_windows_merge_too(model_repo: Path) -> None:
    first, ctx = monitor_for(model_repo, "mixed")
    second = ModelMonitor("mixed", "1", first.reference, first.config)
    oracle = ModelMonitor("mixed", "1", first.reference, first.config)
    inputs = frame_to_inputs(ctx["manifest"], ctx["frame"])
    inputs["color_band"][:40, 0] = b"ultraviolet"  # unseen
    rows = next(iter(inputs.values())).shape[0]
    for start in range(0, rows, 6):
        chunk = {k: v[start : start + 6] for k, v in inputs.items()}
        (first if start % 12 else second).observe(chunk)
        oracle.observe(chunk)
    shares = [local_window(m, "lifetime") for m in (first, second)]
    merged = merged_report(first, "lifetime", shares)
    alone = oracle.report("lifetime")
    assert merged.window == "lifetime" and merged.rows == rows
    for got, want in zip(merged.features, alone.features, strict=True):
        assert got.scores == pytest.approx(want.scores, rel=1e-9, nan_ok=True)
        assert got.drifting == want.drifting
        assert got.statistics == pytest.approx(want.statistics, rel=1e-9, nan_ok=True)
    band = next(f for f in merged.features if f.name == "color_band")
    assert band.statistics["unseen"] == 40


def test_a_previous_window_not_completed_anywhere_says_so() -> None:
    monitor = synthetic_monitor(np.random.default_rng(2), CONFIG)
    shares = [local_window(monitor, "previous"), WorkerWindow(None)]
    report = merged_report(monitor, "previous", shares)
    assert report.rows == 0 and report.reason == "no window has completed yet"
    with pytest.raises(InvalidInput, match="decayed"):
        local_window(monitor, "decayed")


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_a_window_from_a_sibling_builds_nothing_but_a_window() -> None:
    with pytest.raises(InvalidInput, match="may not hold"):
        decode_window(pickle.dumps((_Boom(), {}, 0)))
    with pytest.raises(InvalidInput, match="not a window"):
        decode_window(pickle.dumps(({"rows": 1}, {}, 0)))
    for count in (-1, 1.5, True, "2"):
        with pytest.raises(InvalidInput, match="dropped-window count is not a count"):
            decode_window(pickle.dumps((None, {}, count)))
    with pytest.raises(InvalidInput):
        decode_window(b"not a pickle")
    with pytest.raises(InvalidInput):
        decode_window(pickle.dumps((None, {})))  # a window from another release


def test_dropped_windows_are_summed_over_the_processes(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    config = replace(CONFIG, window_rows=100, closed_windows=4)
    history = DriftHistory(tmp_path / "history", writer="w1")
    monitor = synthetic_monitor(rng, config, RecordingPublisher(ServerMetrics(), history))
    feed(monitor, synthetic_rows(rng, 1_000))  # 10 windows close before any tick: 6 dropped
    assert monitor.windows_dropped == 6
    sibling = WorkerWindow(None, {}, 3)
    shares = [decode_window(encode_window(s)) for s in (local_window(monitor, "current"), sibling)]
    assert [share.windows_dropped for share in shares] == [6, 3]
    assert merged_report(monitor, "current", shares).windows_dropped == 9
    monitor.close()


# ---- the command and the page ------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_the_history_command_prints_a_table_json_and_an_html_page(tmp_path: Path) -> None:
    history = DriftHistory(tmp_path / "h", writer="4242")
    reports = closed_window_reports(6, shift=2.0)
    for report in reports:
        history.record(report)
    drifting = [r.drifting for r in reports]
    assert drifting[:3] == [False] * 3 and drifting[3:] == [True] * 3
    page = tmp_path / "history.html"
    code, out, err = run_cli(
        "drift-history", "synthetic", "--history-dir", str(tmp_path / "h"), "--html", str(page)
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 6
    assert [("DRIFTING" in line) for line in lines[1:]] == drifting
    assert all("4242" in line and " 200 " in line for line in lines[1:])
    assert "x0" in lines[-1]
    html = page.read_text()
    # Per entry the p-value chart, and the PSI chart for those with a PSI (not the multivariate).
    with_psi = sum("psi" in f.scores for f in reports[0].features)
    assert html.count("<svg") == len(reports[0].features) + with_psi
    # One red cell per feature and window that drifted (x0 in the last three at least).
    cells = sum(f.drifting for r in reports for f in r.features)
    assert cells >= 3 and html.count(f'<td style="background:{DRIFT}"') == cells
    assert ">1e-08<" in html and ">0.5<" in html  # the fixed axes' ends, whatever the values
    code, out, _ = run_cli(
        "drift-history", "synthetic", "--history-dir", str(tmp_path / "h"), "--json", "--last", "2"
    )
    assert code == 0
    parsed = [json.loads(line) for line in out.splitlines()]
    assert [p["report"]["drifting"] for p in parsed] == [True, True]
    assert {p["writer"] for p in parsed} == {"4242"}


def test_the_colours_and_axes_do_not_depend_on_the_other_windows(tmp_path: Path) -> None:
    calm = closed_window_reports(2)
    history = DriftHistory(tmp_path, writer="1")
    for report in calm:
        history.record(report)
    entries = read_history(tmp_path, "synthetic").entries
    alone = render_history_html("synthetic", entries[:1])
    both = render_history_html("synthetic", entries)
    # The first window's PSI point sits at the same height on both pages (a fixed axis).
    psi = entries[0].report.features[0].scores["psi"]
    height = 10 + (150 - 10 - 22) * (1 - psi / 0.5)
    assert f'cy="{height:.1f}"' in alone and f'cy="{height:.1f}"' in both


def test_the_history_command_refuses_a_missing_folder_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "repo"
    code, _, err = run_cli("drift-history", "synthetic", "--repo", str(missing))
    assert code == 1
    assert str(missing / DEFAULT_DIR) in err
    assert not missing.exists()
    code, _, err = run_cli(
        "drift-history", "m", "--history-dir", str(tmp_path), "--html", str(tmp_path / "no/x.html")
    )
    assert code == 1 and "--html" in err
    code, out, _ = run_cli("drift-history", "m", "--history-dir", str(tmp_path))
    assert code == 0 and "no closed window of model m" in out
