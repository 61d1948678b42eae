"""The drift history as a text table and as an HTML time series (``edgewise drift-history``).

The page uses the one style of every report (:mod:`~edgewise.runtime.html_style`) and its rules:
colours and axes are absolute, never relative to the other windows on the page.

* **Verdict strip**: one row per feature, one cell per closed window, oldest left: red where the
  feature was drifting, amber where it warned, white where it was judged fine, grey where the
  window was not judged (too few rows). The colour is the verdict the monitor gave, nothing
  derived.
* **Per entry (feature, output column, multivariate error), charts over the windows**: the PSI
  on a fixed 0..0.5 axis (a value beyond is drawn at the top with a cut mark and its number),
  with the minimum effect (``thresholds.psi``) as a dashed line, for entries that have one; and
  the Holm-adjusted p-value of the entry's test on a log axis fixed from 1 (bottom) to 1e-8
  (top), with the window's ``alpha`` as a dashed line. Points are coloured by the verdict.
* **The windows**: when each was recorded, by which process, its rows, verdict and the features
  that drifted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Final

from edgewise.runtime.html_style import BASELINE, CANDIDATE, DRIFT, esc, page, swatch
from edgewise.runtime.serving.drift_history import HistoryEntry

__all__ = ["PSI_AXIS_TOP", "P_AXIS_TOP", "format_history", "render_history_html"]

PSI_AXIS_TOP: Final = 0.5
"""The PSI axis: 0..0.5 on every page."""
P_AXIS_TOP: Final = 8.0
"""The p-value axis: -log10 p from 0 (p = 1) to 8 (p = 1e-8) on every page."""
WARN: Final = "#d97706"
UNJUDGED: Final = "#e5e7eb"
_OK_CELL: Final = "#ffffff"


def _when(entry: HistoryEntry) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.recorded_ns / 1e9))


def _verdict(entry: HistoryEntry) -> str:
    report = entry.report
    if report.insufficient_data:
        return "not judged"
    if report.drifting:
        return "DRIFTING"
    if any(f.warning for f in report.features):
        return "warning"
    return "ok"


def format_history(entries: Sequence[HistoryEntry]) -> str:
    """One line per closed window, oldest first."""
    lines = [
        f"{'recorded (UTC)':<19} {'version':>7} {'process':>8} {'rows':>8}  {'verdict':<10} "
        "features drifting (warning)"
    ]
    for entry in entries:
        report = entry.report
        drifting = [f.name for f in report.features if f.drifting]
        warning = [f.name for f in report.features if f.warning]
        names = ", ".join(drifting)
        if warning:
            names += f" ({', '.join(warning)})" if names else f"({', '.join(warning)})"
        lines.append(
            f"{_when(entry):<19} {report.version:>7} {entry.writer[:8]:>8} {report.rows:>8}  "
            f"{_verdict(entry):<10} {names}"
        )
    return "\n".join(lines)


def _feature_state(entry: HistoryEntry, name: str) -> tuple[str, str]:
    """(colour, word) of a feature's verdict in one window."""
    if entry.report.insufficient_data:
        return UNJUDGED, "not judged"
    feature = next((f for f in entry.report.features if f.name == name), None)
    if feature is None:
        return UNJUDGED, "absent"
    if feature.drifting:
        return DRIFT, "drifting"
    if feature.warning:
        return WARN, "warning"
    return _OK_CELL, "ok"


def _feature_names(entries: Sequence[HistoryEntry]) -> list[str]:
    names: dict[str, None] = {}
    for entry in entries:
        for feature in entry.report.features:
            names.setdefault(feature.name, None)
    return list(names)


def _strip(entries: Sequence[HistoryEntry], names: Sequence[str]) -> str:
    head = "".join(
        f'<th title="{esc(_when(e))}">{index + 1}</th>' for index, e in enumerate(entries)
    )
    rows = []
    for name in names:
        cells = []
        for entry in entries:
            colour, word = _feature_state(entry, name)
            cells.append(
                f'<td style="background:{colour}" title="{esc(name)}, window recorded '
                f'{esc(_when(entry))}: {esc(word)}"></td>'
            )
        rows.append(f'<tr><td class="name">{esc(name)}</td>{"".join(cells)}</tr>')
    return (
        '<table class="strip"><tr><th class="name">feature \\ window</th>'
        f"{head}</tr>{''.join(rows)}</table>"
    )


def _minus_log10(p: float) -> float:
    if math.isnan(p):
        return math.nan
    return math.inf if p <= 0 else -math.log10(p)


def _series_chart(
    title: str,
    values: Sequence[float],
    colours: Sequence[str],
    top: float,
    line: float | None,
    line_label: str,
    ticks: Sequence[float],
    label: Callable[[float], str],
) -> str:
    """One series over the windows on the fixed axis 0..``top``; values beyond are drawn at the
    top with a cut mark and their number. ``label`` writes a value as the reader reads it."""
    width, height, left, right, above, below = 560, 150, 44, 10, 10, 22
    plot_w, plot_h = width - left - right, height - above - below
    count = max(len(values), 1)

    def x(index: int) -> float:
        return left + (index + 0.5) * plot_w / count

    def y(value: float) -> float:
        return above + plot_h * (1 - min(max(value, 0.0), top) / top)

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">']
    for tick in ticks:
        ty = y(tick)
        parts.append(
            f'<line class="grid" x1="{left}" y1="{ty:.1f}" x2="{width - right}" y2="{ty:.1f}"/>'
            f'<text x="{left - 4}" y="{ty + 4:.1f}" text-anchor="end">'
            f"{esc(label(tick))}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{left}" y1="{above + plot_h}" x2="{width - right}" '
        f'y2="{above + plot_h}"/>'
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle">'
        f"window (oldest left), {len(values)} in all</text>"
    )
    if line is not None and 0 < line <= top:
        ly = y(line)
        parts.append(
            f'<line class="zero" x1="{left}" y1="{ly:.1f}" x2="{width - right}" y2="{ly:.1f}"/>'
            f'<text x="{width - right}" y="{ly - 3:.1f}" text-anchor="end">{esc(line_label)}</text>'
        )
    points = [(x(i), y(v)) for i, v in enumerate(values) if not math.isnan(v)]
    if len(points) > 1:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{BASELINE}"/>')
    for index, value in enumerate(values):
        if math.isnan(value):
            continue
        px, py = x(index), y(value)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colours[index]}"/>')
        if value > top:  # cut at the axis end: a white mark and the number
            parts.append(
                f'<line x1="{px - 4:.1f}" y1="{py + 3:.1f}" x2="{px + 4:.1f}" y2="{py + 1:.1f}" '
                'stroke="white" stroke-width="2"/>'
                f'<text x="{px + 5:.1f}" y="{py + 4:.1f}">{esc(label(value))}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _adjusted_pvalue(scores: dict[str, float]) -> float:
    """The Holm-adjusted p-value of an entry's test (``chi2_pvalue_adjusted`` for a feature or
    an output column, ``reconstruction_error_pvalue_adjusted`` for the multivariate entry)."""
    return next((v for k, v in scores.items() if k.endswith("_pvalue_adjusted")), math.nan)


def _psi_label(value: float) -> str:
    return f"{value:.3g}"


def _p_label(minus_log10: float) -> str:
    """A point of the p-value axis (-log10 p) as the p-value."""
    if math.isinf(minus_log10):
        return "0"
    return "1" if minus_log10 == 0 else f"{10.0**-minus_log10:.2g}"


def _point_colours(entries: Sequence[HistoryEntry], name: str) -> list[str]:
    colours = []
    for entry in entries:
        colour, word = _feature_state(entry, name)
        colours.append(CANDIDATE if word in ("ok", "not judged", "absent") else colour)
    return colours


def _feature_charts(entries: Sequence[HistoryEntry], name: str) -> str:
    psi, pvalues = [], []
    psi_limit: float | None = None
    alpha: float | None = None
    for entry in entries:
        feature = next((f for f in entry.report.features if f.name == name), None)
        scores = feature.scores if feature is not None else {}
        psi.append(scores.get("psi", math.nan))
        pvalues.append(_minus_log10(_adjusted_pvalue(scores)))
        psi_limit = entry.report.thresholds.get("psi", psi_limit)
        alpha = entry.report.thresholds.get("alpha", alpha)
    colours = _point_colours(entries, name)
    drifted = any(_feature_state(e, name)[1] == "drifting" for e in entries)
    alpha_line = _minus_log10(alpha) if alpha else None
    charts, shown = [], []
    if any(not math.isnan(v) for v in psi):  # not every entry has a PSI (a multivariate one)
        shown.append("PSI (0..0.5)")
        charts.append(
            _series_chart(
                f"{name}: PSI",
                psi,
                colours,
                PSI_AXIS_TOP,
                psi_limit,
                f"minimum effect {psi_limit:g}" if psi_limit is not None else "",
                (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
                _psi_label,
            )
        )
    shown.append("Holm-adjusted p-value (1 .. 1e-8, log scale)")
    charts.append(
        _series_chart(
            f"{name}: Holm-adjusted p-value",
            pvalues,
            colours,
            P_AXIS_TOP,
            alpha_line,
            f"alpha {alpha:g} (latest window)" if alpha else "",
            (0.0, 2.0, 4.0, 6.0, 8.0),
            _p_label,
        )
    )
    return (
        f'<figure class="chart{" drift" if drifted else ""}"><figcaption>{esc(name)}'
        f" <span>{esc(' and '.join(shown))}</span></figcaption>{'<br>'.join(charts)}</figure>"
    )


def _window_table(entries: Sequence[HistoryEntry]) -> str:
    rows = []
    for index, entry in enumerate(entries):
        report = entry.report
        verdict = _verdict(entry)
        css = {"DRIFTING": "drift", "warning": "warn"}.get(verdict, "")
        drifting = ", ".join(f.name for f in report.features if f.drifting)
        warning = ", ".join(f.name for f in report.features if f.warning)
        rows.append(
            f'<tr class="{css}"><td>{index + 1}</td><td class="key">{esc(_when(entry))}</td>'
            f"<td>{esc(report.version)}</td><td>{esc(entry.writer)}</td><td>{report.rows}</td>"
            f'<td class="status">{esc(verdict)}</td><td class="key">{esc(drifting)}</td>'
            f'<td class="key">{esc(warning)}</td></tr>'
        )
    return (
        '<table class="wide"><tr><th>window</th><th class="key">recorded (UTC)</th>'
        '<th>version</th><th>process</th><th>rows</th><th class="status">verdict</th>'
        '<th class="key">drifting</th><th class="key">warning</th></tr>'
        f"{''.join(rows)}</table>"
    )


def render_history_html(model: str, entries: Sequence[HistoryEntry]) -> str:
    """The self-contained page of ``model``'s closed windows (oldest first)."""
    title = f"Drift history of {model}"
    body = [f"<h1>{esc(title)}</h1>"]
    if not entries:
        body.append('<p class="verdict na">No closed window is recorded yet.</p>')
        return page(title, body)
    versions = sorted({e.report.version for e in entries})
    writers = sorted({e.writer for e in entries})
    drifting = sum(1 for e in entries if e.report.drifting)
    body.append(
        f'<p class="meta">{len(entries)} closed window(s) of version(s) '
        f"{esc(', '.join(versions))}, recorded {esc(_when(entries[0]))} to "
        f"{esc(_when(entries[-1]))} UTC by {len(writers)} server process(es); "
        f"{drifting} drifting.</p>"
    )
    verdict_class = "drift" if entries[-1].report.drifting else "ok"
    body.append(f'<p class="verdict {verdict_class}">Latest window: {_verdict(entries[-1])}</p>')
    names = _feature_names(entries)
    body.append("<h2>Verdict per feature and window</h2>")
    body.append(
        '<p class="legend">'
        + swatch(DRIFT, "drifting")
        + swatch(WARN, "warning")
        + swatch("#ffffff; border: 1px solid #9ca3af", "ok")
        + swatch(UNJUDGED, "not judged (too few rows)")
        + "</p>"
    )
    body.append(_strip(entries, names))
    body.append("<h2>Scores over the windows</h2>")
    body.append(
        '<p class="legend">points: '
        + swatch(CANDIDATE, "ok")
        + swatch(WARN, "warning")
        + swatch(DRIFT, "drifting")
        + "; the axes are the same on every page</p>"
    )
    body.append('<div class="charts">')
    body.extend(_feature_charts(entries, name) for name in names)
    body.append("</div>")
    body.append("<h2>Windows</h2>")
    body.append(_window_table(entries))
    return page(title, body)
