"""The batch drift report: the input's statistics and drift scores against the model's reference
profile, as JSON and as one self-contained HTML page.

The page needs nothing but a browser (no script, no stylesheet or font from the network): a
verdict, a table of drift scores (drifting features first, then by PSI) and one inline SVG chart
per feature with the reference and the batch distribution side by side, bin by bin (numeric: the
reference bins plus below range, above range and missing; categorical: each category plus
unseen), so a person sees at a glance what moved.

Everything in it comes from the monitor's :class:`~edgewise.runtime.serving.monitor.DriftReport` and
the counts it merged (:class:`~edgewise.runtime.batch.stats.FeatureDistribution`); nothing is
recomputed here.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from edgewise.runtime.batch.stats import FeatureDistribution
from edgewise.runtime.html_style import BATCH, DRIFT, REFERENCE, page, share_axis, swatch
from edgewise.runtime.package.reference_profile import ReferenceProfile
from edgewise.runtime.serving.monitor import MULTIVARIATE_NAME, DriftReport

__all__ = ["REPORT_FORMAT", "build_report", "render_html", "unavailable_report"]

REPORT_FORMAT: Final = "edgewise.batch-drift/1"

# Scores shown in the table, in order, with their headings.
_SCORE_COLUMNS: Final = (
    ("psi", "PSI"),
    ("jensenshannon", "Jensen-Shannon"),
    ("wasserstein", "Wasserstein"),
    ("ks", "KS"),
    ("chi2_pvalue", "χ² p-value"),
    ("linf", "L∞"),
)


def _number(value: Any) -> float | None:
    number = float(value)
    return None if math.isnan(number) or math.isinf(number) else number


def _numbers(data: Mapping[str, Any]) -> dict[str, float | None]:
    return {str(k): _number(v) for k, v in data.items()}


def _reference_statistics(reference: ReferenceProfile) -> dict[str, dict[str, float | None]]:
    stats: dict[str, dict[str, float | None]] = {}
    binned = [reference.numeric, reference.outputs.values if reference.outputs else None]
    for numeric in binned:
        if numeric is None:
            continue
        count, mean, m2, low, high, nan = (numeric.moments[i] for i in range(6))
        for index, name in enumerate(numeric.names):
            n = float(count[index])
            stats[name] = {
                "count": n,
                "mean": _number(mean[index]),
                "std": _number(np.sqrt(m2[index] / n)) if n > 0 else None,
                "min": _number(low[index]),
                "max": _number(high[index]),
                "missing": _number(nan[index]),
            }
    for cat in reference.categorical:
        stats[cat.name] = {"count": float(cat.counts.sum()), "missing": float(cat.missing)}
    multivariate = reference.multivariate
    if multivariate is not None:
        stats[MULTIVARIATE_NAME] = {
            "count": float(multivariate.error_rows),
            "mean": _number(multivariate.error_mean),
            "std": _number(math.sqrt(multivariate.error_variance)),
        }
    return stats


def build_report(
    report: DriftReport,
    distributions: Sequence[FeatureDistribution],
    reference: ReferenceProfile,
    sha256: str,
) -> dict[str, Any]:
    """The report as JSON-ready data (NaN and infinities become null)."""
    by_name = {d.name: d for d in distributions}
    reference_stats = _reference_statistics(reference)
    features = []
    for feature in report.features:
        distribution = by_name.get(feature.name)
        features.append(
            {
                "name": feature.name,
                "kind": feature.kind,
                "drifting": feature.drifting,
                "warning": feature.warning,
                "reasons": list(feature.reasons),
                "scores": _numbers(feature.scores),
                "statistics": _numbers(feature.statistics),
                "reference_statistics": reference_stats.get(feature.name, {}),
                "distribution": None
                if distribution is None
                else {
                    "labels": list(distribution.labels),
                    "edges": [_number(e) for e in distribution.edges],
                    "reference": list(distribution.reference),
                    "batch": list(distribution.batch),
                },
            }
        )
    return {
        "format": REPORT_FORMAT,
        "available": report.available,
        "reason": report.reason,
        "model": report.model,
        "version": report.version,
        "sha256": sha256,
        "rows": report.rows,
        "reference_rows": report.reference_rows,
        "insufficient_data": report.insufficient_data,
        "drifting": report.drifting,
        # The input features flagged; the model-level detectors have keys of their own.
        "drifting_features": [f.name for f in report.features if f.drifting and _is_input(f)],
        "drifting_predictions": [
            f.name for f in report.features if f.drifting and f.kind == "prediction"
        ],
        "multivariate_drifting": any(
            f.drifting for f in report.features if f.kind == "multivariate"
        ),
        "thresholds": _numbers(report.thresholds),
        "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.computed_at)),
        "features": features,
        "unavailable": dict(report.unavailable),
    }


def _is_input(feature: Any) -> bool:
    return feature.kind in ("numeric", "categorical")


def unavailable_report(model: str, version: str, sha256: str, reason: str) -> dict[str, Any]:
    """The report of a job that could not compute drift (e.g. no reference profile)."""
    return {
        "format": REPORT_FORMAT,
        "available": False,
        "reason": reason,
        "model": model,
        "version": version,
        "sha256": sha256,
        "rows": 0,
        "reference_rows": 0,
        "insufficient_data": True,
        "drifting": False,
        "drifting_features": [],
        "drifting_predictions": [],
        "multivariate_drifting": False,
        "thresholds": {},
        "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "features": [],
        "unavailable": {},
    }


# ---- HTML ------------------------------------------------------------------------------------

# The stylesheet, colours and axes are the shared ones of every report (html_style).
_REFERENCE_COLOR: Final = REFERENCE
_BATCH_COLOR: Final = BATCH
_DRIFT_COLOR: Final = DRIFT


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    number = float(value)
    if math.isnan(number):
        return "–"
    if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
        return f"{number:.{digits - 1}e}"
    return f"{number:.{digits}g}"


def _verdict_rule(thresholds: Mapping[str, Any]) -> str:
    """The drift rule a report was judged by (runtime.monitor.judge), in words."""
    effects = " or ".join(
        f"{k} ≥ {_fmt(v, 3)}" for k, v in thresholds.items() if k not in _RATES and v is not None
    )
    rates = [
        f"Holm-adjusted chi-square p ≤ {_fmt(thresholds[k], 3)} ({k})"
        for k in _RATES
        if thresholds.get(k) is not None
    ]
    return "; ".join(rates) + (f"; minimum effect {effects}" if effects else "")


_RATES = ("alpha", "warning_alpha")


def _status(feature: Mapping[str, Any], judged: bool) -> tuple[str, str]:
    if not feature["scores"]:
        return "na", "no scores"
    if not judged:
        return "na", "not judged (too few rows)"
    if feature["drifting"]:
        return "drift", "DRIFT: " + "; ".join(feature["reasons"])
    if feature["warning"]:
        return "warn", "warning: " + "; ".join(feature["reasons"])
    return "ok", "ok"


def _order(features: Sequence[Mapping[str, Any]]) -> list[int]:
    def key(index: int) -> tuple[int, float]:
        feature = features[index]
        psi = feature["scores"].get("psi")
        return (0 if feature["drifting"] else 1, -(psi if psi is not None else -1.0))

    return sorted(range(len(features)), key=key)


def _detectors(
    features: Sequence[Mapping[str, Any]], unavailable: Mapping[str, str], judged: bool
) -> str:
    """The model-level detectors in words: prediction drift (the model's outputs, rows of kind
    ``prediction`` in the table) and the multivariate PCA reconstruction error; or why not."""
    esc = html.escape
    lines = []
    predictions = [f for f in features if f["kind"] == "prediction"]
    if predictions:
        flagged = [str(f["name"]) for f in predictions if f["drifting"]]
        lines.append(
            f"Prediction drift: {len(flagged)} of {len(predictions)} model output column(s) "
            f"drifting{' (' + ', '.join(flagged) + ')' if flagged else ''}; rows of kind "
            "“prediction” below."
        )
    elif "prediction" in unavailable:
        lines.append(str(unavailable["prediction"]).capitalize())
    multivariate = next((f for f in features if f["kind"] == "multivariate"), None)
    if multivariate is not None and multivariate["scores"]:
        scores = multivariate["scores"]
        status = _status(multivariate, judged)[1]
        lines.append(
            f"Multivariate drift (PCA reconstruction error, "
            f"{_fmt(multivariate['statistics'].get('components'), 2)} components): mean error "
            f"{_fmt(scores.get('reconstruction_error'))} against the reference's "
            f"{_fmt(scores.get('reconstruction_error_reference'))} "
            f"({_fmt(_percent(scores.get('reconstruction_error_change')), 3)} %), "
            f"one-sided p {_fmt(scores.get('reconstruction_error_pvalue'))}: {status}"
        )
    elif "multivariate" in unavailable:
        lines.append(str(unavailable["multivariate"]).capitalize())
    return "".join(f'<div class="meta">{esc(line)}</div>' for line in lines)


def _percent(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def _chart(feature: Mapping[str, Any], index: int, drifting: bool) -> str:
    dist = feature["distribution"]
    labels: list[str] = dist["labels"]
    reference = np.asarray(dist["reference"], dtype=np.float64)
    batch = np.asarray(dist["batch"], dtype=np.float64)
    ref_share = reference / reference.sum() if reference.sum() > 0 else reference
    batch_share = batch / batch.sum() if batch.sum() > 0 else batch
    top = float(max(ref_share.max(initial=0.0), batch_share.max(initial=0.0)))
    # One of three fixed axes (0-25 %, 0-50 %, 0-100 %), from zero: bars are comparable across
    # the charts that share an axis, and every chart states its own.
    nice = share_axis(top, 0.0, 1.0).high
    n = len(labels)
    slot = 34
    left, right, top_pad, bottom = 44, 10, 10, 78
    plot_w = max(slot * n, 240)
    plot_h = 150
    width = left + plot_w + right
    height = top_pad + plot_h + bottom
    step = plot_w / max(n, 1)
    bar = step * 0.36
    batch_color = _DRIFT_COLOR if drifting else _BATCH_COLOR
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(str(feature["name"]))}: reference vs batch distribution">'
    ]
    for tick in range(6):
        share = nice * tick / 5
        y = top_pad + plot_h - plot_h * share / nice
        parts.append(
            f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end" '
            f'fill="#566">{share * 100:g}%</text>'
        )
    for i, label in enumerate(labels):
        x0 = left + i * step + step / 2
        for offset, share, color, who in (
            (-bar, ref_share[i], _REFERENCE_COLOR, "reference"),
            (0.0, batch_share[i], batch_color, "batch"),
        ):
            h = plot_h * float(share) / nice
            y = top_pad + plot_h - h
            parts.append(
                f'<rect class="{who}" x="{x0 + offset:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{html.escape(label)}: {who} '
                f"{share * 100:.2f}%</title></rect>"
            )
        short = label if len(label) <= 16 else label[:15] + "…"
        ty = top_pad + plot_h + 10
        parts.append(
            f'<text x="{x0:.1f}" y="{ty:.1f}" font-size="10" fill="#40464f" '
            f'text-anchor="end" transform="rotate(-40 {x0:.1f} {ty:.1f})">'
            f"{html.escape(short)}</text>"
        )
    parts.append(
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" '
        f'y2="{top_pad + plot_h}" stroke="#8a929c"/></svg>'
    )
    scores = feature["scores"]
    caption = ", ".join(
        f"{heading} {_fmt(scores[key], 3)}"
        for key, heading in _SCORE_COLUMNS[:3]
        if scores.get(key) is not None
    )
    css = "chart drift" if drifting else "chart"
    return (
        f'<figure class="{css}" id="feature-{index}" '
        f'data-feature="{html.escape(str(feature["name"]))}">'
        f"<figcaption>{html.escape(str(feature['name']))} <span>({feature['kind']}; "
        f"{html.escape(caption)})</span></figcaption>{''.join(parts)}</figure>"
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The report (as :func:`build_report` made it) as a self-contained HTML page."""
    esc = html.escape
    features: list[Mapping[str, Any]] = list(report["features"])
    title = f"Batch drift report: {report['model']} version {report['version']}"
    judged = not report["insufficient_data"]
    if not report["available"]:
        verdict = ("na", f"Drift not computed: {report['reason']}")
    elif not judged:
        verdict = ("na", f"Not judged: {report['rows']} rows is too few")
    elif report["drifting"]:
        flagged = [f for f in features if f["drifting"]]
        names = ", ".join(str(f["name"]) for f in flagged)
        verdict = (
            "drift",
            f"DRIFTING: {len(flagged)} of {len(features)} tests ({names})",
        )
    else:
        verdict = ("ok", f"No drift: none of {len(features)} tests differs significantly")
    thresholds = _verdict_rule(report["thresholds"])
    order = _order(features)
    rows = []
    for index in order:
        feature = features[index]
        css, status = _status(feature, judged)
        scores = feature["scores"]
        stats = feature["statistics"]
        ref = feature["reference_statistics"]
        skew = stats.get("out_of_range", stats.get("unseen"))
        cells = "".join(f"<td>{_fmt(scores.get(key))}</td>" for key, _ in _SCORE_COLUMNS)
        rows.append(
            f'<tr class="{css}"><td class="name"><a href="#feature-{index}">'
            f'{esc(str(feature["name"]))}</a></td><td class="kind">{feature["kind"]}</td>'
            f'<td class="status">{esc(status)}</td>{cells}'
            f"<td>{_fmt(stats.get('mean'))}</td><td>{_fmt(ref.get('mean'))}</td>"
            f"<td>{_fmt(stats.get('missing'))}</td><td>{_fmt(skew)}</td></tr>"
        )
    headings = "".join(f"<th>{esc(h)}</th>" for _, h in _SCORE_COLUMNS)
    detectors = _detectors(features, report.get("unavailable", {}), judged)
    charts = "".join(
        _chart(features[i], i, bool(features[i]["drifting"]) and judged)
        for i in order
        if features[i]["distribution"] is not None
    )
    legend = (
        swatch(_REFERENCE_COLOR, "reference")
        + swatch(_BATCH_COLOR, "batch")
        + swatch(_DRIFT_COLOR, "batch (drifting feature)")
        + " · share of rows per bin; each chart's axis starts at zero and ends at 25 %, 50 % or "
        "100 %"
    )
    body = f"""<h1>{esc(title)}</h1>
<div class="meta">{report["rows"]:,} batch rows against a reference of
{report["reference_rows"]:,} rows · model sha256 <code>{esc(str(report["sha256"]))}</code>
· computed {esc(report["computed_at"])} · thresholds: {esc(thresholds) or "–"}</div>
<div class="verdict {verdict[0]}">{esc(verdict[1])}</div>
{detectors}
<h2>Drift scores</h2>
<table class="wide"><thead><tr><th class="name">feature</th><th class="kind">kind</th>
<th class="status">status</th>{headings}<th>batch mean</th><th>reference mean</th><th>missing</th>
<th>out of range / unseen</th></tr></thead><tbody>
{"".join(rows)}
</tbody></table>
<h2>Distributions: reference vs batch</h2>
<div class="legend">{legend}</div>
<div class="charts">
{charts}
</div>"""
    return page(title, [body])
