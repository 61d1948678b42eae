"""The HTML page of an evaluation (and, optionally, of a gate verdict): one self-contained file.

No JavaScript, no external stylesheet, font or CDN: inline CSS and inline SVG charts, so the page
can be archived as a CI artifact and opened anywhere. Sections, top to bottom:

* the gate verdict, when there is one: failed checks first;
* an overview table, one row per slice and one column per metric, each cell the candidate's
  value with its difference from the baseline, red where the candidate is worse (the darker the
  worse) and green where it is better; slices too small to be judged are greyed;
* one bar chart per metric: every slice, baseline and candidate side by side;
* one table per slice: metric, candidate, baseline, difference, and the class counts.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from edgewise.runtime.evaluate import LOWER_IS_BETTER, Evaluation, SliceResult, is_worse

if TYPE_CHECKING:
    from edgewise.runtime.gate import Check, GateVerdict

__all__ = ["render_html"]

_CANDIDATE: Final = "#2563eb"
_WORSE: Final = "#dc2626"
_BASELINE: Final = "#9ca3af"

_CSS: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
       margin: 24px auto; max-width: 1200px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.meta { color: #4b5563; margin: 2px 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f9fafb; font-weight: 600; }
td.key, th.key { text-align: left; white-space: normal; max-width: 360px; }
tr.small td { color: #9ca3af; }
.delta { font-size: 12px; color: #4b5563; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; color: white;
         font-weight: 600; }
.pass { background: #16a34a; } .fail { background: #dc2626; } .skip { background: #9ca3af; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
.card { border: 1px solid #e5e7eb; border-radius: 6px; padding: 10px 12px; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px;
               vertical-align: -1px; }
svg text { font: 11px system-ui, sans-serif; fill: #111827; }
details { margin: 6px 0; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _cell_style(metric: str, delta: float | None, scale: float) -> str:
    """Background for a difference: red (worse) or green (better), stronger when larger."""
    if delta is None or delta == 0 or scale <= 0:
        return ""
    strength = min(abs(delta) / scale, 1.0)
    alpha = 0.12 + 0.55 * strength
    rgb = "220,38,38" if is_worse(metric, delta) else "22,163,74"
    return f' style="background: rgba({rgb},{alpha:.2f})"'


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
    scales: dict[str, float] = {}
    for metric in evaluation.metric_names:
        deltas = [abs(d) for r in results if (d := r.delta.get(metric)) is not None]
        scales[metric] = max(deltas, default=0.0)
    title = "Slices against the baseline" if has_baseline else "Slices"
    out = [f"<h2>{title}</h2>"]
    if has_baseline:
        out.append(
            '<p class="meta">each cell: candidate value, and below it candidate − baseline; '
            "red where the candidate is worse, green where it is better (lower is better for "
            f"{_e(', '.join(m for m in evaluation.metric_names if m in LOWER_IS_BETTER))})</p>"
        )
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
            style = _cell_style(metric, change, scales[metric]) if result.judged else ""
            extra = f'<br><span class="delta">{_signed(change)}</span>' if has_baseline else ""
            out.append(f"<td{style}>{_num(value)}{extra}</td>")
        out.append("</tr>")
    out.append("</table>")
    return out


def _bar_chart(metric: str, results: Sequence[SliceResult], has_baseline: bool) -> str:
    """Horizontal bars: per slice the baseline (grey) above the candidate (blue; red if worse)."""
    label_w, plot_w, value_w = 300, 380, 60
    bar_h, gap = 9, 8
    row_h = (2 * bar_h if has_baseline else bar_h) + gap
    top = 8
    height = top + row_h * len(results) + 22
    values = [
        v
        for r in results
        for v in (r.metrics.get(metric), (r.baseline_metrics or {}).get(metric))
        if v is not None
    ]
    low = min([0.0, *values])
    high = max([1.0 if metric not in ("mae", "rmse", "log_loss") else 0.0, *values])
    if high - low <= 0:
        high = low + 1.0
    span = high - low

    def x(value: float) -> float:
        return label_w + (value - low) / span * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + value_w}" '
        f'height="{height}" role="img" aria-label="{_e(metric)} by slice">'
    ]
    zero = x(0.0)
    for i, result in enumerate(results):
        y = top + i * row_h
        key = result.key if len(result.key) <= 46 else result.key[:45] + "…"
        opacity = "1" if result.judged else "0.45"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + row_h / 2}" text-anchor="end" '
            f'opacity="{opacity}">{_e(key)}<title>{_e(result.key)} ({result.count} rows)'
            "</title></text>"
        )
        value = result.metrics.get(metric)
        base = (result.baseline_metrics or {}).get(metric)
        bars: list[tuple[float | None, str, str]] = []
        if has_baseline:
            bars.append((base, _BASELINE, "baseline"))
        worse = value is not None and base is not None and is_worse(metric, value - base)
        bars.append((value, _WORSE if worse else _CANDIDATE, "candidate"))
        for j, (amount, colour, who) in enumerate(bars):
            by = y + j * bar_h
            if amount is None:
                parts.append(
                    f'<text x="{zero + 4}" y="{by + bar_h - 1}" opacity="0.6">'
                    f"{who}: undefined</text>"
                )
                continue
            x0, x1 = sorted((zero, x(amount)))
            parts.append(
                f'<rect x="{x0:.1f}" y="{by}" width="{max(x1 - x0, 0.5):.1f}" '
                f'height="{bar_h - 1}" fill="{colour}" opacity="{opacity}">'
                f"<title>{_e(result.key)}: {who} {amount:.4f}</title></rect>"
            )
            parts.append(
                f'<text x="{label_w + plot_w + 4}" y="{by + bar_h - 1}" '
                f'fill="{colour}">{amount:.3f}</text>'
            )
    axis_y = top + row_h * len(results) + 2
    parts.append(
        f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" '
        'stroke="#9ca3af"/>'
    )
    for tick in range(5):
        value = low + span * tick / 4
        tx = x(value)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 4}" stroke="#9ca3af"/>'
            f'<text x="{tx:.1f}" y="{axis_y + 15}" text-anchor="middle">{value:.3g}</text>'
        )
    if low < 0 < high:
        parts.append(
            f'<line x1="{zero:.1f}" y1="{top}" x2="{zero:.1f}" y2="{axis_y}" stroke="#6b7280" '
            'stroke-dasharray="2,2"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _charts(evaluation: Evaluation) -> list[str]:
    has_baseline = evaluation.baseline is not None
    out = ["<h2>Metrics by slice</h2>"]
    legend = f'<span style="background:{_CANDIDATE}"></span>candidate'
    if has_baseline:
        legend = (
            f'<span style="background:{_BASELINE}"></span>baseline'
            + legend
            + f'<span style="background:{_WORSE}"></span>candidate, worse than the baseline'
        )
    out.append(f'<p class="legend meta">{legend}</p>')
    results = evaluation.all_slices()
    for metric in evaluation.metric_names:
        direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        out.append(f"<h3>{_e(metric)} <span class='meta'>({direction})</span></h3>")
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
                style = _cell_style(metric, change, abs(change or 0.0) or 1.0)
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
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
