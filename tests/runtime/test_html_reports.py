"""Every HTML report (``evaluate --html``, ``gate --html``, the batch drift report) in the one
shared style, with colours and axes that do not mislead: the colour of a change does not depend
on the other slices of the page, bars are proportional on a stated axis that starts at zero, and
a 0.95 against 1.0 is plainly visible.

The pages come from real models (tests/models.py): the breast-cancer logistic regression as the
candidate against a random forest trained on the same rows as the baseline, scored on slices
picked so that the candidate's accuracy is exactly 0.95, 1.0 or 0.5 where the baseline's is 1.0.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

import edgewise.runtime as runtime_package
from edgewise.runtime import html_style
from edgewise.runtime.convert.converter import convert
from edgewise.runtime.evaluation.evaluate import Evaluation, evaluate_models, load_package
from edgewise.runtime.evaluation.gate import evaluate_gate
from edgewise.runtime.evaluation.report import render_html
from edgewise.runtime.package.schema import frame_to_inputs
from tests.models import train_logreg
from tests.runtime.batch.helpers import batch

CHANGE_AXIS_PX = 200  # the width of the difference chart (evaluate_report._CHANGE_W)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> dict[str, Any]:
    """The candidate (logreg 1), the baseline (a forest, logreg 2), the data, and which rows the
    candidate gets wrong where the baseline gets them right (and which both get right)."""
    repo = tmp_path_factory.mktemp("html") / "repo"
    _, X, y = train_logreg()
    forest = RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0).fit(X, y)
    convert(forest, X, name="logreg", repo=repo, version=2)
    candidate = load_package(model_repo / "logreg" / "1")
    baseline = load_package(repo / "logreg" / "2")
    right = {}
    for name, model in (("candidate", candidate), ("baseline", baseline)):
        right[name] = model.run(frame_to_inputs(model.manifest, X))["label"] == y
    both = np.flatnonzero(right["candidate"] & right["baseline"])
    only_baseline = np.flatnonzero(~right["candidate"] & right["baseline"])
    assert len(both) >= 60 and len(only_baseline) >= 2, "the scenario needs such rows"
    return {
        "candidate": candidate,
        "baseline": baseline,
        "folders": (model_repo / "logreg" / "1", repo / "logreg" / "2"),
        "X": X,
        "y": y,
        "both": both,
        "only_baseline": only_baseline,
    }


def _frame(models: dict[str, Any], slices: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """Labelled rows whose slice ``part=name`` holds ``(right, wrong)`` rows: ``right`` rows both
    models get right, ``wrong`` rows only the baseline gets right (accuracy right/(right+wrong)
    for the candidate, 1.0 for the baseline)."""
    both, only = list(models["both"]), list(models["only_baseline"])
    rows, keys = [], []
    for name, (n_right, n_wrong) in slices.items():
        rows += [both.pop() for _ in range(n_right)] + [only.pop() for _ in range(n_wrong)]
        keys += [name] * (n_right + n_wrong)
    frame = models["X"].iloc[rows].reset_index(drop=True)
    frame["part"] = keys
    frame["diagnosis"] = models["y"][rows]
    return frame


def _evaluation(models: dict[str, Any], slices: dict[str, tuple[int, int]]) -> Evaluation:
    return evaluate_models(
        models["candidate"],
        _frame(models, slices),
        "diagnosis",
        baseline=models["baseline"],
        slice_by=["part"],
        min_slice_size=1,
    )


class _Report(HTMLParser):
    """The overview table's cells (slice, metric) -> style attribute, and per chart (metric) its
    rectangles and its texts with their x."""

    def __init__(self) -> None:
        super().__init__()
        self.styles: dict[tuple[str, str], str] = {}
        self.rects: dict[str, list[dict[str, str]]] = {}
        self.texts: dict[str, list[tuple[float, str]]] = {}
        self.style_blocks: list[str] = []
        self._header: list[str] = []
        self._cells: list[list[str]] = []  # [style, text] per cell of the current row
        self._in: str | None = None
        self._text_x: float | None = None
        self._svg: str | None = None
        self._tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._tables += 1
        elif tag == "svg":
            self._svg = a["aria-label"].removesuffix(" by slice")
        elif tag == "rect" and self._svg is not None:
            self.rects.setdefault(self._svg, []).append(a)
        elif tag == "text" and self._svg is not None:
            self._text_x = float(a["x"])
        elif tag == "style":
            self._in = tag
        elif tag in ("td", "th") and self._tables == 1:
            self._in = tag
            if tag == "th":
                self._header.append("")
            else:
                self._cells.append([a.get("style", ""), ""])

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        elif tag == "text":
            self._text_x = None
        elif tag in ("td", "th", "style"):
            self._in = None
        elif tag == "tr" and self._cells:
            key = self._cells[0][1]
            for (style, _), metric in zip(self._cells[2:], self._header[2:], strict=True):
                self.styles[key, metric] = style
            self._cells = []

    def handle_data(self, data: str) -> None:
        if self._in == "style":
            self.style_blocks.append(data)
        elif self._svg is not None and self._text_x is not None:
            self.texts.setdefault(self._svg, []).append((self._text_x, data))
        elif self._in == "th":
            self._header[-1] += data
        elif self._in == "td":
            self._cells[-1][1] += data


def _parse(text: str) -> _Report:
    report = _Report()
    report.feed(text)
    report.close()
    return report


def test_the_colour_of_a_change_does_not_depend_on_the_other_slices(
    models: dict[str, Any],
) -> None:
    # Candidate accuracy 0.95 (baseline 1.0) beside 1.0 on one page, beside 0.5 on the other.
    first = _evaluation(models, {"a": (20, 0), "b": (19, 1)})
    second = _evaluation(models, {"b": (19, 1), "c": (1, 1)})
    for evaluation, accuracies in ((first, {"a": 1.0}), (second, {"c": 0.5})):
        accuracies["b"] = 0.95
        for key, want in accuracies.items():
            result = evaluation.slice(f"part={key}")
            assert result.metrics["accuracy"] == want
            assert result.baseline_metrics == {**result.baseline_metrics, "accuracy": 1.0}
    one, two = _parse(render_html(first)), _parse(render_html(second))
    colour = one.styles["part=b", "accuracy"]
    assert colour, "a change of -0.05 is coloured"
    assert two.styles["part=b", "accuracy"] == colour
    assert one.styles["part=a", "accuracy"] == ""  # no change, no colour
    assert two.styles["part=c", "accuracy"] != colour  # -0.5 is a stronger red than -0.05
    # The fixed scale: half of the full colour for half of FULL_CHANGE, whatever the page.
    want = html_style.change_background(0.05 / html_style.FULL_CHANGE, worse=True)
    assert colour == want.removeprefix(' style="').removesuffix('"')
    # The slice's own table and the legend's 0.05 step show that same colour (3 places in all).
    assert render_html(first).count(colour) == 3


def test_change_strength_is_fixed_and_linear() -> None:
    strength = html_style.change_strength
    assert strength("accuracy", -0.05, 1.0) == pytest.approx(0.5)
    assert strength("accuracy", 0.05, 0.2) == strength("accuracy", -0.05, 0.9)
    assert strength("accuracy", -0.3, 1.0) == 1.0  # capped at FULL_CHANGE
    assert strength("accuracy", 0.0, 1.0) == 0.0 and strength("f1", None, 1.0) == 0.0
    assert strength("log_loss", 0.01, 0.02) == pytest.approx(0.1)  # nats, not relative
    assert strength("mae", 2.0, 40.0) == pytest.approx(0.5)  # 5 % of the baseline
    assert strength("rmse", 1.0, 0.0) == 1.0 and strength("rmse", 1.0, None) == 0.0


def _bars(report: _Report, metric: str, who: str) -> list[tuple[float, float]]:
    return [
        (float(r["data-value"]), float(r["width"]))
        for r in report.rects[metric]
        if r.get("class") == who
    ]


def _tick_x(report: _Report, metric: str, label: str) -> list[float]:
    return [x for x, text in report.texts[metric] if text == label]


def test_bars_are_proportional_on_a_stated_axis_from_zero(models: dict[str, Any]) -> None:
    evaluation = _evaluation(models, {"a": (20, 0), "b": (19, 1), "c": (1, 1)})
    report = _parse(render_html(evaluation))
    # The value axis of accuracy is 0..1 whatever the values: ticks 0 and 1 are drawn, and
    # every bar starts at zero, so its width is proportional to its value.
    (zero, *_), (one, *_) = _tick_x(report, "accuracy", "0"), _tick_x(report, "accuracy", "1")
    per_unit = one - zero
    for who in ("candidate", "baseline"):
        for value, width in _bars(report, "accuracy", who):
            assert width == pytest.approx(value * per_unit, abs=0.01), (who, value)
    candidate = dict(_bars(report, "accuracy", "candidate"))
    assert {0.95, 1.0, 0.5} <= set(candidate)
    # The differences: a fixed axis of ±FULL_CHANGE; -0.05 is a quarter of it, plainly visible.
    changes = _bars(report, "accuracy", "change")
    per_change = CHANGE_AXIS_PX / (2 * html_style.FULL_CHANGE)
    widths = {round(value, 6): width for value, width in changes}
    assert widths[-0.05] == pytest.approx(0.05 * per_change, abs=0.01)
    assert widths[-0.05] >= CHANGE_AXIS_PX / 4 - 0.01
    # -0.5 lies beyond the axis: drawn to its end (never longer) and marked as cut.
    assert widths[-0.5] == pytest.approx(CHANGE_AXIS_PX / 2, abs=0.01)
    page = render_html(evaluation)
    assert page.count('class="cut"') >= 2  # two strokes per cut bar
    assert "-0.5000" in page  # its number says how far


def _pages(models: dict[str, Any], model_repo: Path, tmp_path: Path) -> dict[str, str]:
    evaluation = _evaluation(models, {"a": (20, 0), "b": (19, 1)})
    spec = tmp_path / "gate.toml"
    spec.write_text("[slices]\nmin_size = 1\naccuracy = { max_degradation = 0.01 }\n")
    candidate, baseline = models["folders"]
    verdict = evaluate_gate(
        spec,
        candidate,
        baseline=baseline,
        data=_frame(models, {"a": (20, 0), "b": (19, 1)}),
        label="diagnosis",
        slice_by=["part"],
    )
    assert not verdict.passed and verdict.evaluation is not None
    source = tmp_path / "rows.parquet"
    frame = models["X"].copy()
    frame.insert(0, "row_id", np.arange(len(frame), dtype=np.int64))
    frame.to_parquet(source, index=False)
    batch(model_repo, "logreg", source, tmp_path / "out")
    return {
        "evaluate": render_html(evaluation),
        "gate": render_html(verdict.evaluation, verdict),
        "batch": (tmp_path / "out" / "_drift_report.html").read_text(encoding="utf-8"),
    }


def test_every_report_uses_the_one_shared_stylesheet(
    models: dict[str, Any], model_repo: Path, tmp_path: Path
) -> None:
    pages = _pages(models, model_repo, tmp_path)
    assert "gate" in pages["gate"] and "Batch drift report" in pages["batch"]
    for name, text in pages.items():
        report = _parse(text)
        assert report.style_blocks == [html_style.STYLESHEET], name
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>"), name
        assert "<script" not in text.lower(), name
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text), name
        assert "@import" not in text and "url(" not in text, name
    # One definition: no other module of the runtime writes a stylesheet or a page frame.
    root = Path(runtime_package.__file__).parent
    writers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"<style|<!DOCTYPE", path.read_text(encoding="utf-8"), re.IGNORECASE)
    )
    assert writers == ["html_style.py"]


def test_distribution_axes_are_fixed_steps_from_zero() -> None:
    assert [html_style.share_axis(s, 0, 1).high for s in (0.0, 0.1, 0.25, 0.3, 0.5, 0.51)] == [
        0.25,
        0.25,
        0.25,
        0.5,
        0.5,
        1.0,
    ]
    axis = html_style.Axis.for_metric("mae", [33.0, 40.1], 0, 100)
    assert (axis.low, axis.high) == (0.0, 50.0)
    axis = html_style.Axis.for_metric("r2", [0.7, -0.3], 0, 100)
    assert (axis.low, axis.high) == (-0.5, 1.0)
    assert html_style.Axis.for_metric("accuracy", [0.96, 0.99], 0, 100).low == 0.0


def test_without_a_baseline_there_is_no_difference_chart_and_no_colour(
    models: dict[str, Any],
) -> None:
    frame = _frame(models, {"a": (20, 0), "b": (19, 1)})
    evaluation = evaluate_models(models["candidate"], frame, "diagnosis", slice_by=["part"])
    page = render_html(evaluation)
    report = _parse(page)
    assert not _bars(report, "accuracy", "change") and not _bars(report, "accuracy", "baseline")
    assert set(dict(_bars(report, "accuracy", "candidate"))) == {39 / 40, 1.0, 0.95}
    assert all(style == "" for style in report.styles.values())
    assert "candidate − baseline" not in page


def test_frame_of_a_page_is_valid_and_escaped() -> None:
    text = html_style.page("a <b> & c", ["<p>x</p>"])
    assert "<title>a &lt;b&gt; &amp; c</title>" in text
    assert text.count("<style>") == 1
