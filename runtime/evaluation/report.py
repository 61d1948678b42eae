"""The HTML page of an evaluation (and, optionally, of a gate verdict): one self-contained file.

No JavaScript, no external stylesheet, font or CDN: the shared inline stylesheet and inline SVG
charts of :mod:`~edgewise.runtime.html_style`, so the page can be archived as a CI artifact and
opened anywhere. Sections, top to bottom:

* the gate verdict, when there is one: failed checks first;
* an overview table, one row per slice and one column per metric, each cell the candidate's
  value with its difference from the baseline, red where the candidate is worse and green where
  it is better, on the fixed colour scale of ``html_style`` (the same difference has the same
  colour on every page, whatever the other slices); slices too small to be judged are greyed;
* one chart per metric: every slice, baseline and candidate as bars from zero on the metric's
  fixed axis (0..1 for metrics on a 0..1 scale), the values printed beside them, and candidate −
  baseline on a fixed ±0.10 axis (±10 % for MAE and RMSE), so a 0.95 against 1.0 is plain;
* one table per slice: metric, candidate, baseline, difference, and the class counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from edgewise.runtime.evaluation.evaluate import LOWER_IS_BETTER, Evaluation, SliceResult, is_worse
from edgewise.runtime.html_style import (
    BASELINE,
    BETTER,
    CANDIDATE,
    FULL_CHANGE,
    RELATIVE_CHANGE_METRICS,
    UNIT_METRICS,
    WORSE,
    Axis,
    change_background,
    change_legend,
    change_strength,
    esc,
    page,
    relative_change,
    swatch,
)

if TYPE_CHECKING:
    from edgewise.runtime.evaluation.gate import Check, GateVerdict

__all__ = ["render_html"]

_e = esc


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _cell_style(metric: str, delta: float | None, base: float | None) -> str:
    """Background for a difference: red (worse) or green (better), on the fixed scale of
    :func:`~edgewise.runtime.html_style.change_strength` (the same whatever the other cells)."""
    if delta is None:
        return ""
    return change_background(change_strength(metric, delta, base), is_worse(metric, delta))


def _header(evaluation: Evaluation, verdict: GateVerdict | None) -> list[str]:
    title = f"{evaluation.model} version {evaluation.version}"
    against = (
        f"against {evaluation.baseline[0]} version {evaluation.baseline[1]}"
        if evaluation.baseline
        else "no baseline"
    )
    out = [f"<h1>Evaluation of {_e(title)}</h1>"]
    if verdict is not None:
        cls = "pass" if verdict.passed else "fail"
        word = "gate passed" if verdict.passed else "gate failed"
        out.append(f'<p><span class="badge {cls}">{word}</span> {_e(verdict.summary())}</p>')
    source = evaluation.data.get("path", "")
    digest = evaluation.data.get("sha256", "")
    out.append(f'<p class="meta">{_e(evaluation.task)} model, {_e(against)}</p>')
    out.append(
        f'<p class="meta">data: {_e(source)} ({evaluation.rows} labelled rows'
        + (f", {evaluation.unlabelled_rows} without a label" if evaluation.unlabelled_rows else "")
        + f"), label column <code>{_e(evaluation.label)}</code>"
        + (f", sha256 <code>{_e(digest[:16])}…</code>" if digest else "")
        + "</p>"
    )
    if evaluation.slice_by:
        out.append(
            f'<p class="meta">sliced by {_e(", ".join(evaluation.slice_by))}; slices under '
            f"{evaluation.min_slice_size} rows are greyed: reported, not judged</p>"
        )
    out.append(f'<p class="meta">evaluated {_e(evaluation.created_at)}</p>')
    return out


def _verdict_section(verdict: GateVerdict) -> list[str]:
    out = ["<h2>Gate checks</h2>"]
    order = {"fail": 0, "pass": 1, "skip": 2}
    checks = sorted(verdict.checks, key=lambda c: order[c.status])
    shown = [c for c in checks if c.status != "skip"]
    skipped = [c for c in checks if c.status == "skip"]

    def rows(items: Sequence[Check]) -> list[str]:
        return [
            f'<tr><td><span class="badge {c.status}">{_e(c.status)}</span></td>'
            f'<td class="key">{_e(c.message)}</td></tr>'
            for c in items
        ]

    out.append("<table><tr><th>status</th><th class='key'>check</th></tr>")
    out.extend(rows(shown))
    out.append("</table>")
    if skipped:
        out.append(f"<details><summary>{len(skipped)} skipped check(s)</summary><table>")
        out.extend(rows(skipped))
        out.append("</table></details>")
    if verdict.latency is not None:
        lat = verdict.latency
        out.append(
            f'<p class="meta">latency at batch 1 over {lat.calls} calls: p50 '
            f"{lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms, mean {lat.mean_ms:.3f} ms, max "
            f"{lat.max_ms:.3f} ms ({lat.intra_op_threads} intra-op thread(s))</p>"
        )
    return out


def _overview(evaluation: Evaluation) -> list[str]:
    results = evaluation.all_slices()
    has_baseline = evaluation.baseline is not None
    title = "Slices against the baseline" if has_baseline else "Slices"
    out = [f"<h2>{title}</h2>"]
    if has_baseline:
        out.append(
            '<p class="meta">each cell: candidate value, and below it candidate − baseline; '
            "red where the candidate is worse, green where it is better (lower is better for "
            f"{_e(', '.join(m for m in evaluation.metric_names if m in LOWER_IS_BETTER))}); "
            "slices too small to be judged are not coloured</p>"
        )
        out.append(change_legend())
    out.append("<table><tr><th class='key'>slice</th><th>rows</th>")
    out.extend(f"<th>{_e(m)}</th>" for m in evaluation.metric_names)
    out.append("</tr>")
    for result in results:
        cls = "" if result.judged else ' class="small"'
        out.append(f"<tr{cls}><td class='key'>{_e(result.key)}</td><td>{result.count}</td>")
        delta = result.delta
        for metric in evaluation.metric_names:
            value = result.metrics.get(metric)
            change = delta.get(metric)
            base = (result.baseline_metrics or {}).get(metric)
            style = _cell_style(metric, change, base) if result.judged else ""
            extra = f'<br><span class="delta">{_signed(change)}</span>' if has_baseline else ""
            out.append(f"<td{style}>{_num(value)}{extra}</td>")
        out.append("</tr>")
    out.append("</table>")
    return out


_LABEL_W: Final = 260
_VALUE_W: Final = 360
_NUMBER_W: Final = 56
_GAP: Final = 24
_CHANGE_W: Final = 200
_CHANGE_NUMBER_W: Final = 130
_BAR_H: Final = 11
_ROW_GAP: Final = 8
_TOP: Final = 8


def _value_bars(
    metric: str, result: SliceResult, y: float, axis: Axis, has_baseline: bool, opacity: str
) -> list[str]:
    """The baseline (grey) above the candidate (blue; red if worse), from zero, numbers beside."""
    value = result.metrics.get(metric)
    base = (result.baseline_metrics or {}).get(metric)
    worse = value is not None and base is not None and is_worse(metric, value - base)
    bars: list[tuple[float | None, str, str]] = []
    if has_baseline:
        bars.append((base, BASELINE, "baseline"))
    bars.append((value, WORSE if worse else CANDIDATE, "candidate"))
    zero = axis.x(0.0)
    number_x = axis.origin + axis.length + 4
    parts = []
    for j, (amount, colour, who) in enumerate(bars):
        by = y + j * _BAR_H
        if amount is None:
            parts.append(
                f'<text x="{zero + 4:.1f}" y="{by + _BAR_H - 1}" opacity="0.6">'
                f"{who}: undefined</text>"
            )
            continue
        x0, x1 = sorted((zero, axis.x(amount)))
        parts.append(
            f'<rect class="{who}" x="{x0:.1f}" y="{by}" width="{x1 - x0:.2f}" '
            f'height="{_BAR_H - 1}" fill="{colour}" opacity="{opacity}" data-value="{amount!r}">'
            f"<title>{esc(result.key)}: {who} {amount:.4f}</title></rect>"
            f'<text x="{number_x:.1f}" y="{by + _BAR_H - 1}" fill="{colour}">{amount:.3f}</text>'
        )
    return parts


def _change_bar(metric: str, result: SliceResult, y: float, axis: Axis, opacity: str) -> str:
    """candidate − baseline from zero on the fixed difference axis; cut (with a mark) beyond it."""
    value = result.metrics.get(metric)
    base = (result.baseline_metrics or {}).get(metric)
    number_x = axis.origin + axis.length + 6
    if value is None or base is None:
        return f'<text x="{number_x}" y="{y}" opacity="0.6">undefined</text>'
    delta = value - base
    change = relative_change(metric, delta, base)
    assert change is not None  # base is known
    relative = metric in RELATIVE_CHANGE_METRICS
    shown = f"{delta:+.4g} ({change:+.1%})" if relative else f"{delta:+.4f}"
    if delta == 0:
        return f'<text x="{number_x}" y="{y}">{shown}</text>'
    colour = WORSE if is_worse(metric, delta) else BETTER
    x0, x1 = sorted((axis.x(0.0), axis.x(change)))
    top = y - _BAR_H + 1
    parts = [
        f'<rect class="change" x="{x0:.1f}" y="{top}" width="{x1 - x0:.2f}" height="{_BAR_H}" '
        f'fill="{colour}" opacity="{opacity}" data-value="{change!r}">'
        f"<title>{esc(result.key)}: candidate − baseline {shown}</title></rect>"
    ]
    if axis.clipped(change):  # two white strokes across the bar near its cut end
        end = x1 - 8 if change > 0 else x0 + 4
        parts.extend(
            f'<line class="cut" x1="{end + dx:.1f}" y1="{top + _BAR_H + 1}" '
            f'x2="{end + dx + 3:.1f}" y2="{top - 1}" stroke="white" stroke-width="1.5"/>'
            for dx in (0, 4)
        )
    parts.append(f'<text x="{number_x}" y="{y}" fill="{colour}">{shown}</text>')
    return "".join(parts)


def _bar_chart(metric: str, results: Sequence[SliceResult], has_baseline: bool) -> str:
    """Per slice, the values as bars from zero on the metric's fixed axis and (with a baseline)
    candidate − baseline on the fixed difference axis (:mod:`~edgewise.runtime.html_style`)."""
    row_h = (2 * _BAR_H if has_baseline else _BAR_H) + _ROW_GAP
    values = [
        v
        for r in results
        for v in (r.metrics.get(metric), (r.baseline_metrics or {}).get(metric))
        if v is not None
    ]
    axis = Axis.for_metric(metric, values, _LABEL_W, _VALUE_W)
    change_origin = _LABEL_W + _VALUE_W + _NUMBER_W + _GAP
    change_axis = Axis.for_change(change_origin, _CHANGE_W)
    width = change_origin + (_CHANGE_W + _CHANGE_NUMBER_W if has_baseline else 0)
    axis_y = _TOP + row_h * len(results) + 2
    height = axis_y + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(metric)} by slice">',
        axis.svg(axis_y, count=10 if metric in UNIT_METRICS else 5, grid_top=_TOP),
    ]
    if has_baseline:
        relative = metric in RELATIVE_CHANGE_METRICS
        parts.append(change_axis.svg(axis_y, percent=relative, grid_top=_TOP))
        zero = change_axis.x(0.0)
        parts.append(f'<line class="zero" x1="{zero}" y1="{_TOP}" x2="{zero}" y2="{axis_y}"/>')
        parts.append(
            f'<text x="{change_origin + _CHANGE_W / 2}" y="{axis_y + 28}" '
            'text-anchor="middle">candidate − baseline</text>'
        )
    if axis.low < 0:
        zero = axis.x(0.0)
        parts.append(f'<line class="zero" x1="{zero}" y1="{_TOP}" x2="{zero}" y2="{axis_y}"/>')
    parts.append(
        f'<text x="{_LABEL_W + _VALUE_W / 2}" y="{axis_y + 28}" text-anchor="middle">'
        f"{esc(metric)}</text>"
    )
    for i, result in enumerate(results):
        y = _TOP + i * row_h
        key = result.key if len(result.key) <= 40 else result.key[:39] + "…"
        opacity = "1" if result.judged else "0.45"
        parts.append(
            f'<text x="{_LABEL_W - 6}" y="{y + row_h / 2}" text-anchor="end" '
            f'opacity="{opacity}">{esc(key)}<title>{esc(result.key)} ({result.count} rows)'
            "</title></text>"
        )
        parts.extend(_value_bars(metric, result, y, axis, has_baseline, opacity))
        if has_baseline:
            parts.append(_change_bar(metric, result, y + 2 * _BAR_H - 1, change_axis, opacity))
    parts.append("</svg>")
    return "".join(parts)


def _charts(evaluation: Evaluation) -> list[str]:
    has_baseline = evaluation.baseline is not None
    out = ["<h2>Metrics by slice</h2>"]
    legend = swatch(CANDIDATE, "candidate")
    if has_baseline:
        legend = (
            swatch(BASELINE, "baseline")
            + legend
            + swatch(WORSE, "candidate, worse than the baseline")
            + swatch(BETTER, "candidate, better than the baseline")
        )
    out.append(f'<p class="legend">{legend}</p>')
    axes = (
        "Bars start at zero on a fixed axis: 0..1 for "
        + ", ".join(m for m in evaluation.metric_names if m in UNIT_METRICS)
        + ", otherwise 0..a round number above the largest value; the value is printed beside "
        "each bar."
    )
    if has_baseline:
        axes += (
            f" On the right, candidate − baseline on a fixed axis of ±{FULL_CHANGE:g} "
            f"(±{FULL_CHANGE:.0%} of the baseline for mae and rmse): a bar cut by a white "
            "stroke goes beyond it; its number says how far."
        )
    out.append(f'<p class="meta">{esc(axes)}</p>')
    results = evaluation.all_slices()
    for metric in evaluation.metric_names:
        direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        out.append(f"<h3>{esc(metric)} <span class='meta'>({direction})</span></h3>")
        out.append(_bar_chart(metric, results, has_baseline))
    return out


def _slice_tables(evaluation: Evaluation) -> list[str]:
    has_baseline = evaluation.baseline is not None
    out = ["<h2>Per slice</h2>", '<div class="grid">']
    for result in evaluation.all_slices():
        note = "" if result.judged else " — too small to be judged"
        out.append(f'<div class="card"><h3>{_e(result.key)}</h3>')
        out.append(f'<p class="meta">{result.count} rows{note}</p>')
        head = "<th>baseline</th><th>Δ</th>" if has_baseline else ""
        out.append(f"<table><tr><th class='key'>metric</th><th>candidate</th>{head}</tr>")
        delta = result.delta
        for metric in evaluation.metric_names:
            value = result.metrics.get(metric)
            row = f"<tr><td class='key'>{_e(metric)}</td><td>{_num(value)}</td>"
            if has_baseline:
                change = delta.get(metric)
                base = (result.baseline_metrics or {}).get(metric)
                style = _cell_style(metric, change, base) if result.judged else ""
                row += f"<td>{_num(base)}</td><td{style}>{_signed(change) or '–'}</td>"
            out.append(row + "</tr>")
        out.append("</table>")
        if result.label_counts:
            counts = ", ".join(f"{_e(k)}: {v}" for k, v in result.label_counts.items())
            out.append(f'<p class="meta">true classes: {counts}</p>')
        out.append("</div>")
    out.append("</div>")
    return out


def render_html(evaluation: Evaluation, verdict: GateVerdict | None = None) -> str:
    """The self-contained HTML page of ``evaluation`` (and of ``verdict``, if given)."""
    title = f"edgewise evaluation: {evaluation.model} version {evaluation.version}"
    body: list[str] = _header(evaluation, verdict)
    if verdict is not None:
        body.extend(_verdict_section(verdict))
    body.extend(_overview(evaluation))
    body.extend(_charts(evaluation))
    body.extend(_slice_tables(evaluation))
    return page(title, body)
