"""The batch drift report: the monitor's scores for the batch, as JSON and as an HTML page that
parses, holds one chart per feature and a table of scores, and shows what moved."""

from __future__ import annotations

import io
import json
import logging
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.runtime.batch.progress import Progress, format_count, format_duration
from edgewise.runtime.batch.stats import batch_monitor_config
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.reference_profile import read_profile
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.serving.monitor import ModelMonitor
from tests.runtime.batch.helpers import ID, Inputs, batch


class _Page(HTMLParser):
    """What the tests look at in the page: figures (with their SVG shapes), table rows, links."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict[str, Any]] = []
        self.rows: list[dict[str, str]] = []
        self.scripts = 0
        self.remote: list[str] = []
        self._figure: dict[str, Any] | None = None
        self._row: dict[str, str] | None = None
        self._cell: str | None = None
        self.verdict = ""
        self._in_verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value.startswith(("http:", "https:", "//")):
                self.remote.append(value)
        if tag == "figure":
            self._figure = {"feature": a.get("data-feature"), "class": a.get("class"), "svg": 0}
            self._figure.update(rects={"reference": 0, "batch": 0}, id=a.get("id"))
        elif tag == "svg" and self._figure is not None:
            self._figure["svg"] += 1
        elif tag == "rect" and self._figure is not None:
            self._figure["rects"][a.get("class")] += 1
        elif tag == "tr" and a.get("class"):
            self._row = {"class": a["class"] or ""}
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class") or f"c{len(self._row)}"
            self._row[self._cell] = ""
        elif tag == "div" and "verdict" in (a.get("class") or ""):
            self._in_verdict = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure" and self._figure is not None:
            self.figures.append(self._figure)
            self._figure = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "td":
            self._cell = None
        elif tag == "div":
            self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data
        if self._in_verdict:
            self.verdict += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


SHIFTED = ("mean radius", "worst area")


@pytest.fixture(scope="module")
def drifted(model_repo: Path, inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job over the cancer data with two features moved."""
    frame = inputs.cancer.copy()
    frame["mean radius"] = frame["mean radius"] * 1.6
    frame["worst area"] = frame["worst area"] + 900.0
    folder = tmp_path_factory.mktemp("drifted")
    source = folder / "moved.parquet"
    frame.to_parquet(source, index=False)
    out = folder / "out"
    summary = batch(model_repo, "logreg", source, out, chunk_rows=2000)
    assert summary.drift["drifting"] is True
    return out


def test_report_flags_the_moved_features_only(drifted: Path, model_repo: Path) -> None:
    report = json.loads((drifted / "_drift_report.json").read_text())
    assert report["format"] == "edgewise.batch-drift/1"
    assert report["drifting"] is True and report["rows"] == 569 * 20
    assert sorted(report["drifting_features"]) == sorted(SHIFTED)
    assert report["sha256"] == read_manifest(model_repo / "logreg" / "1").model_sha256
    by_name = {f["name"]: f for f in report["features"]}
    assert [f["kind"] for f in report["features"]] == 30 * ["numeric"] + [
        "prediction",
        "multivariate",
    ]
    # The model's outputs moved with its inputs, and the rows left the reference's structure.
    assert report["drifting_predictions"] == ["probabilities[1]"]
    assert report["multivariate_drifting"] is True and report["unavailable"] == {}
    output = by_name["probabilities[1]"]
    assert sum(output["distribution"]["batch"]) == 569 * 20
    assert sum(output["distribution"]["reference"]) == output["reference_statistics"]["count"]
    multivariate = by_name["pca_reconstruction"]
    assert multivariate["distribution"] is None
    assert (
        multivariate["scores"]["reconstruction_error"]
        > multivariate["reference_statistics"]["mean"]
    )
    moved = by_name["worst area"]
    assert moved["scores"]["psi"] > 0.25 and moved["reasons"]
    assert moved["statistics"]["mean"] == pytest.approx(
        moved["reference_statistics"]["mean"] + 900, rel=1e-6
    )
    assert moved["distribution"]["batch"][-2] > 0  # "above range" bin filled
    still = by_name["mean texture"]
    assert not still["drifting"] and still["scores"]["psi"] == pytest.approx(0, abs=1e-6)
    assert sum(still["distribution"]["reference"]) == 569
    # The batch is the training data tiled 20 times: the same share in every bin.
    assert still["distribution"]["batch"] == [20 * c for c in still["distribution"]["reference"]]
    assert sum(still["distribution"]["batch"]) == 569 * 20


def test_report_scores_are_the_monitors(drifted: Path, model_repo: Path, inputs: Inputs) -> None:
    """The same numbers as the server's monitor fed the same rows in one go."""
    folder = model_repo / "logreg" / "1"
    manifest = read_manifest(folder)
    profile = read_profile(folder, manifest)
    assert profile is not None
    monitor = ModelMonitor("logreg", "1", profile, batch_monitor_config(model_repo / "logreg"))
    frame = inputs.cancer.copy()
    frame["mean radius"] = frame["mean radius"] * 1.6
    frame["worst area"] = frame["worst area"] + 900.0
    feeds = frame_to_inputs(manifest, frame)
    model = load_model("logreg", 1, folder, SessionSettings())
    monitor.observe(feeds, model.run(feeds))
    direct = {f.name: f for f in monitor.report("current").features}
    report = json.loads((drifted / "_drift_report.json").read_text())
    for feature in report["features"]:
        want = direct[feature["name"]]
        for key, value in want.scores.items():
            assert feature["scores"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert feature["statistics"]["count"] == want.statistics["count"]
        assert feature["statistics"]["mean"] == pytest.approx(want.statistics["mean"], rel=1e-12)
        assert feature["drifting"] == want.drifting


def test_html_page_has_one_chart_per_feature_and_the_score_table(drifted: Path) -> None:
    page = _parse(drifted / "_drift_report.html")
    report = json.loads((drifted / "_drift_report.json").read_text())
    names = [f["name"] for f in report["features"]]
    charted = [f["name"] for f in report["features"] if f["kind"] != "multivariate"]
    assert sorted(f["feature"] for f in page.figures) == sorted(charted)
    for figure, feature in ((f, next(x for x in report["features"] if x["name"] == f["feature"]))
                            for f in page.figures):  # fmt: skip
        bins = len(feature["distribution"]["labels"])
        assert figure["svg"] == 1
        assert figure["rects"] == {"reference": bins, "batch": bins}
        assert ("drift" in figure["class"]) == feature["drifting"]
    assert len(page.rows) == len(names)
    flagged = (*SHIFTED, "probabilities[1]", "pca_reconstruction")
    first = page.rows[: len(flagged)]  # drifting entries are listed first
    assert sorted(r["name"] for r in first) == sorted(flagged)
    assert all(r["class"] == "drift" and r["status"].startswith("DRIFT") for r in first)
    assert all(r["class"] in ("ok", "warn") for r in page.rows[len(flagged) :])
    assert "DRIFTING: 4 of 32 tests" in page.verdict
    assert page.scripts == 0 and page.remote == [], "the page must not need the network"


def test_html_page_of_a_job_without_drift(model_repo: Path, inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    batch(model_repo, "mixed", inputs.mixed_parquet, out, chunk_rows=2000)
    page = _parse(out / "_drift_report.html")
    report = json.loads((out / "_drift_report.json").read_text())
    outputs = [f["name"] for f in report["features"] if f["kind"] == "prediction"]
    assert outputs and len(page.figures) == 15 + len(outputs)  # 13 numeric + 2 categorical
    categorical = next(f for f in page.figures if f["feature"] == "color_band")
    assert categorical["rects"]["batch"] == 4  # low, mid, high, unseen
    assert "No drift" in page.verdict


def test_too_few_rows_are_reported_but_not_judged(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    source = tmp_path / "few.parquet"
    moved = inputs.cancer.iloc[:40].copy()
    moved["worst area"] += 5000
    moved.to_parquet(source, index=False)
    summary = batch(model_repo, "logreg", source, tmp_path / "out")
    assert summary.drift["insufficient_data"] is True and summary.drift["drifting"] is False
    page = _parse(tmp_path / "out" / "_drift_report.html")
    assert "too few" in page.verdict and len(page.figures) == 31  # 30 inputs + the output


# ---- progress --------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal() -> None:
    stream = _Terminal()
    progress = Progress([1000, 3000], [10, 30], mode="auto", stream=stream)
    assert progress.mode == "bar"
    progress.already_done(1000)
    progress.advance(1500, 1, 15)
    progress.tick()
    text = stream.getvalue()
    assert text.startswith("\r[") and "62.5%" in text and "2.5k/4k rows" in text
    assert "rows/s" in text and "ETA" in text
    progress.finish()
    assert stream.getvalue().endswith("\n")


def test_progress_log_lines_elsewhere_measured_in_bytes_for_csv(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    progress = Progress([None, 500], [4000, 1000], mode="auto", stream=stream, log_interval=0)
    assert progress.mode == "log" and not progress.by_rows
    with caplog.at_level(logging.INFO, logger="edgewise.runtime.batch"):
        progress.advance(100, 0, 2000)
        progress.tick()
        progress.file_done(0)
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert "40.0%" in lines[0] and "rows/s" in lines[0] and "ETA" in lines[0]
    assert "80.0%" in lines[-1]
    assert stream.getvalue() == ""


def test_progress_formats() -> None:
    assert [format_count(v) for v in (12, 1234, 2_500_000, 3e9)] == ["12", "1.23k", "2.5M", "3G"]
    assert [format_duration(s) for s in (5, 125, 3725)] == ["0:05", "2:05", "1:02:05"]
    assert np.isclose(Progress([0], [0]).fraction(), 1.0)


def test_id_columns_in_report_are_not_features(drifted: Path) -> None:
    report = json.loads((drifted / "_drift_report.json").read_text())
    assert ID not in {f["name"] for f in report["features"]}
