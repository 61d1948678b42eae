"""The promotion gate: thresholds on a candidate's quality and latency, judged in one verdict.

A gate specification is a small TOML file (or the same structure as JSON, by the ``.json``
suffix)::

    # edgewise promotion gate
    format = 1                          # optional; the only format so far

    [data]                              # optional: the labelled data to judge on
    path = "holdout.parquet"            # relative to this file; --data overrides
    label = "target"                    # --label overrides
    slice_by = ["region", "segment"]    # --slice-by overrides

    [baseline]
    required = true                     # default true: a rule against the baseline fails
                                        # when there is no baseline; false: it is skipped

    [overall]                           # rules on all labelled rows
    accuracy = { min = 0.90, max_degradation = 0.01 }
    log_loss = { max = 0.35, max_relative_degradation = 0.10 }

    [slices]                            # rules on every judged slice
    min_size = 30                       # smaller slices are reported, not judged (default 30)
    columns = ["region"]                # optional: only slices over these columns
    accuracy = { min = 0.80, max_degradation = 0.05 }

    [latency]                           # measured on the candidate: batch 1, server settings
    p50_ms = 2.0
    p99_ms = 10.0
    calls = 300                         # timed calls (default 300)
    warmup = 30                         # untimed calls first (default 30)

Rules, per metric (any of them, each optional):

``min`` / ``max``
    absolute bounds on the candidate's value.
``max_degradation``
    how much worse than the baseline the candidate may be, in the metric's own units; "worse"
    follows the metric's direction (lower for accuracy, higher for log loss; see
    :data:`edgewise.runtime.evaluation.evaluate.LOWER_IS_BETTER`).
``max_relative_degradation``
    the same as a fraction of the baseline's value (0.05: at most 5% worse).

Metrics are those of :mod:`edgewise.runtime.evaluation.evaluate` (classifiers: accuracy, precision,
recall, f1, roc_auc, log_loss, calibration_error; regressors: mae, rmse, r2); naming one that
does not apply to the model is an error. A metric undefined for the data fails an overall
rule and skips a slice rule. The latency budget is measured on the candidate with the
onnxruntime session settings the server would use here (``EDGEWISE_*`` variables and the
cgroup budget), at batch 1: ``calls`` timed ``LoadedModel.run`` calls on rows of the data.

:func:`evaluate_gate` runs the whole gate on package folders and returns a
:class:`GateVerdict` (JSON-serialisable with :meth:`GateVerdict.to_json`); ``edgewise gate``
prints it and exits 0 (passed) or 1 (failed).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from edgewise.runtime.config.values import known_keys, names
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.evaluation.evaluate import (
    CLASSIFICATION_METRICS,
    DEFAULT_MIN_SLICE_SIZE,
    LOWER_IS_BETTER,
    REGRESSION_METRICS,
    Evaluation,
    SliceResult,
    data_info,
    evaluate_models,
    load_package,
)
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.model import LoadedModel, SessionSettings

__all__ = [
    "GATE_FORMAT",
    "VERDICT_FORMAT",
    "Check",
    "GateSpec",
    "GateVerdict",
    "LatencyBudget",
    "LatencyResult",
    "Rule",
    "check_gate",
    "evaluate_gate",
    "measure_latency",
    "server_session_settings",
]

GATE_FORMAT: Final = 1
VERDICT_FORMAT: Final = "edgewise.gate-verdict/1"
RULES: Final = ("min", "max", "max_degradation", "max_relative_degradation")
ALL_METRICS: Final = frozenset(CLASSIFICATION_METRICS) | frozenset(REGRESSION_METRICS)
DEFAULT_CALLS: Final = 300
DEFAULT_WARMUP: Final = 30
_TOLERANCE: Final = 1e-12  # rounding slack when a value sits exactly on a threshold

Status = Literal["pass", "fail", "skip"]


# ---- the specification ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """The thresholds on one metric (None: not checked)."""

    metric: str
    min: float | None = None
    max: float | None = None
    max_degradation: float | None = None
    max_relative_degradation: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric}
        for name in RULES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class LatencyBudget:
    p50_ms: float | None = None
    p99_ms: float | None = None
    calls: int = DEFAULT_CALLS
    warmup: int = DEFAULT_WARMUP


@dataclass(frozen=True)
class GateSpec:
    """A parsed gate specification (module docstring)."""

    overall: tuple[Rule, ...] = ()
    slices: tuple[Rule, ...] = ()
    min_slice_size: int = DEFAULT_MIN_SLICE_SIZE
    slice_columns: tuple[str, ...] | None = None
    latency: LatencyBudget | None = None
    require_baseline: bool = True
    data_path: Path | None = None
    label: str | None = None
    slice_by: tuple[str, ...] = ()
    source: str = ""
    sha256: str = ""

    @property
    def needs_baseline(self) -> bool:
        return any(
            r.max_degradation is not None or r.max_relative_degradation is not None
            for r in (*self.overall, *self.slices)
        )

    @classmethod
    def load(cls, path: Path | str) -> GateSpec:
        """Read a gate specification file (TOML, or JSON when the name ends in ``.json``)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise InvalidInput(f"gate spec {path}: no such file") from None
        except OSError as exc:
            raise InvalidInput(f"gate spec {path}: cannot read: {exc.strerror}") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(raw)
            else:
                data = tomllib.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"gate spec {path}: cannot parse: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"gate spec {path}: expected a table (object) at the top")
        return cls.from_mapping(
            data,
            base_dir=path.parent,
            source=str(path),
            sha256=hashlib.sha256(raw).hexdigest(),
        )

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: Path | None = None,
        source: str = "<mapping>",
        sha256: str = "",
    ) -> GateSpec:
        """Build a spec from its parsed form; :class:`InvalidInput` names the bad entry."""
        where = f"gate spec {source}"
        _known(data, {"format", "data", "baseline", "overall", "slices", "latency"}, where)
        version = data.get("format", GATE_FORMAT)
        if version != GATE_FORMAT:
            raise InvalidInput(f"{where}: format {version!r} is not known (expected 1)")
        section = _table(data, "data", where)
        _known(section, {"path", "label", "slice_by"}, f"{where}: [data]")
        data_path: Path | None = None
        if "path" in section:
            data_path = Path(_text(section["path"], f"{where}: [data] path"))
            if not data_path.is_absolute() and base_dir is not None:
                data_path = base_dir / data_path
        label = _text(section["label"], f"{where}: [data] label") if "label" in section else None
        slice_by = names(f"{where}: [data] slice_by", section.get("slice_by", []))
        baseline = _table(data, "baseline", where)
        _known(baseline, {"required"}, f"{where}: [baseline]")
        required = baseline.get("required", True)
        if not isinstance(required, bool):
            raise InvalidInput(f"{where}: [baseline] required must be true or false")
        overall = _rules(_table(data, "overall", where), set(), f"{where}: [overall]")
        slices_table = _table(data, "slices", where)
        slice_rules = _rules(slices_table, {"min_size", "columns"}, f"{where}: [slices]")
        min_size = slices_table.get("min_size", DEFAULT_MIN_SLICE_SIZE)
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
            raise InvalidInput(f"{where}: [slices] min_size must be an integer >= 1")
        columns = (
            names(f"{where}: [slices] columns", slices_table["columns"])
            if "columns" in slices_table
            else None
        )
        latency: LatencyBudget | None = None
        if "latency" in data:
            table = _table(data, "latency", where)
            _known(table, {"p50_ms", "p99_ms", "calls", "warmup"}, f"{where}: [latency]")
            p50 = (
                _number(table["p50_ms"], f"{where}: [latency] p50_ms")
                if "p50_ms" in table
                else None
            )
            p99 = (
                _number(table["p99_ms"], f"{where}: [latency] p99_ms")
                if "p99_ms" in table
                else None
            )
            if p50 is None and p99 is None:
                raise InvalidInput(f"{where}: [latency] needs p50_ms or p99_ms")
            calls = table.get("calls", DEFAULT_CALLS)
            warmup = table.get("warmup", DEFAULT_WARMUP)
            for name, value, low in (("calls", calls, 1), ("warmup", warmup, 0)):
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise InvalidInput(f"{where}: [latency] {name} must be an integer >= {low}")
            latency = LatencyBudget(p50, p99, calls, warmup)
        if not overall and not slice_rules and latency is None:
            raise InvalidInput(f"{where}: no rules (give [overall], [slices] or [latency])")
        return cls(
            overall=overall,
            slices=slice_rules,
            min_slice_size=min_size,
            slice_columns=columns,
            latency=latency,
            require_baseline=required,
            data_path=data_path,
            label=label,
            slice_by=slice_by,
            source=source,
            sha256=sha256,
        )


def _known(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    known_keys(where, table, allowed)


def _table(data: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [{name}] must be a table")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where} must be a non-empty string")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _rules(table: Mapping[str, Any], reserved: set[str], where: str) -> tuple[Rule, ...]:
    rules = []
    for metric, body in table.items():
        if metric in reserved:
            continue
        if metric not in ALL_METRICS:
            raise InvalidInput(
                f"{where}: {metric!r} is not a metric (metrics: "
                f"{', '.join((*CLASSIFICATION_METRICS, *REGRESSION_METRICS))})"
            )
        if not isinstance(body, dict) or not body:
            raise InvalidInput(f"{where} {metric}: expected a table such as {{ min = 0.9 }}")
        _known(body, set(RULES), f"{where} {metric}")
        values = {name: _number(body[name], f"{where} {metric}.{name}") for name in body}
        for name in ("max_degradation", "max_relative_degradation"):
            if values.get(name, 0.0) < 0:
                raise InvalidInput(f"{where} {metric}.{name} must not be negative")
        rules.append(Rule(metric, **values))
    return tuple(rules)


# ---- latency ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """``LoadedModel.run`` wall time at batch 1 (milliseconds)."""

    calls: int
    warmup: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    intra_op_threads: int
    inter_op_threads: int
    batch: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "calls": self.calls,
            "warmup": self.warmup,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "max_ms": self.max_ms,
            "session": {
                "intra_op_threads": self.intra_op_threads,
                "inter_op_threads": self.inter_op_threads,
            },
        }


def server_session_settings() -> SessionSettings:
    """The onnxruntime session settings ``edgewise serve`` would use on this machine."""
    from edgewise.runtime.config.settings import ServerSettings

    return SessionSettings.of(ServerSettings.from_sources({}))


def measure_latency(
    model: LoadedModel,
    frame: Any,
    *,
    calls: int = DEFAULT_CALLS,
    warmup: int = DEFAULT_WARMUP,
    settings: SessionSettings | None = None,
) -> LatencyResult:
    """Time ``calls`` batch-1 runs of ``model`` on rows of ``frame`` (cycling through at most 64
    of them), after ``warmup`` untimed runs. Inputs are built before timing."""
    if len(frame) == 0:
        raise InvalidInput("latency: the data has no rows")
    feeds = [
        frame_to_inputs(model.manifest, frame.iloc[i : i + 1]) for i in range(min(len(frame), 64))
    ]
    for i in range(warmup):
        model.run(feeds[i % len(feeds)])
    times = np.empty(calls, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(calls):
        feed = feeds[i % len(feeds)]
        start = clock()
        model.run(feed)
        times[i] = clock() - start
    times /= 1e6
    used = settings or SessionSettings()
    return LatencyResult(
        calls=calls,
        warmup=warmup,
        p50_ms=float(np.percentile(times, 50)),
        p99_ms=float(np.percentile(times, 99)),
        mean_ms=float(times.mean()),
        max_ms=float(times.max()),
        intra_op_threads=used.intra_op_threads,
        inter_op_threads=used.inter_op_threads,
    )


# ---- checks and the verdict ------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One rule applied to one slice (or to the latency)."""

    scope: Literal["overall", "slice", "latency"]
    target: str  # "overall", a slice key, or "latency"
    metric: str
    rule: str  # min | max | max_degradation | max_relative_degradation | budget | min_size
    threshold: float | None
    value: float | None
    baseline: float | None
    status: Status
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "target": self.target,
            "metric": self.metric,
            "rule": self.rule,
            "threshold": self.threshold,
            "value": self.value,
            "baseline": self.baseline,
            "status": self.status,
            "message": self.message,
        }


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4g}"


def _degradation(metric: str, value: float, base: float) -> float:
    return value - base if metric in LOWER_IS_BETTER else base - value


def _apply(
    rule: Rule,
    result: SliceResult,
    scope: Literal["overall", "slice"],
    has_baseline: bool,
    require_baseline: bool,
) -> list[Check]:
    metric = rule.metric
    value = result.metrics.get(metric)
    base = None if result.baseline_metrics is None else result.baseline_metrics.get(metric)
    where = "overall" if scope == "overall" else f"slice {result.key}"
    undefined: Status = "fail" if scope == "overall" else "skip"
    checks: list[Check] = []

    def add(rule_name: str, threshold: float, status: Status, message: str) -> None:
        checks.append(
            Check(scope, result.key, metric, rule_name, threshold, value, base, status, message)
        )

    if rule.min is not None:
        if value is None:
            add("min", rule.min, undefined, f"{where}: {metric} is undefined here")
        else:
            ok = value >= rule.min - _TOLERANCE
            sign = ">=" if ok else "<"
            add(
                "min",
                rule.min,
                "pass" if ok else "fail",
                f"{where}: {metric} {_fmt(value)} {sign} min {_fmt(rule.min)}",
            )
    if rule.max is not None:
        if value is None:
            add("max", rule.max, undefined, f"{where}: {metric} is undefined here")
        else:
            ok = value <= rule.max + _TOLERANCE
            sign = "<=" if ok else ">"
            add(
                "max",
                rule.max,
                "pass" if ok else "fail",
                f"{where}: {metric} {_fmt(value)} {sign} max {_fmt(rule.max)}",
            )
    for rule_name in ("max_degradation", "max_relative_degradation"):
        threshold = getattr(rule, rule_name)
        if threshold is None:
            continue
        relative = rule_name == "max_relative_degradation"
        if not has_baseline:
            status: Status = "fail" if require_baseline else "skip"
            add(rule_name, threshold, status, f"{where}: {metric}: no baseline to compare with")
            continue
        if value is None or base is None:
            which = "candidate" if value is None else "baseline"
            status = undefined if value is None else "skip"
            add(rule_name, threshold, status, f"{where}: {metric} undefined for the {which}")
            continue
        worse = _degradation(metric, value, base)
        if relative:
            amount = worse / abs(base) if base != 0 else (math.inf if worse > 0 else 0.0)
            shown = f"{amount:.1%}" if math.isfinite(amount) else "infinitely"
            limit = f"{threshold:.1%}"
        else:
            amount = worse
            shown = f"{amount:.4g}"
            limit = f"{threshold:.4g}"
        ok = amount <= threshold + _TOLERANCE
        if worse > 0:
            text = (
                f"{where}: {metric} {_fmt(value)} is {shown} worse than the baseline's "
                f"{_fmt(base)} ({'within' if ok else 'over'} the allowed {limit})"
            )
        else:
            text = f"{where}: {metric} {_fmt(value)} is not worse than the baseline's {_fmt(base)}"
        add(rule_name, threshold, "pass" if ok else "fail", text)
    return checks


def _slice_selected(result: SliceResult, columns: tuple[str, ...] | None) -> bool:
    return columns is None or set(result.columns) <= set(columns)


def check_gate(
    spec: GateSpec, evaluation: Evaluation, latency: LatencyResult | None = None
) -> list[Check]:
    """Apply every rule of ``spec`` to ``evaluation`` (and ``latency``), in the order: overall,
    slices, latency. A slice under the spec's ``min_size`` gives one ``skip`` check."""
    applicable = set(evaluation.metric_names)
    for rule in (*spec.overall, *spec.slices):
        if rule.metric not in applicable:
            raise InvalidInput(
                f"gate spec {spec.source}: metric {rule.metric!r} does not apply to a "
                f"{evaluation.task} model (its metrics: {', '.join(evaluation.metric_names)})"
            )
    has_baseline = evaluation.baseline is not None
    checks: list[Check] = []
    for rule in spec.overall:
        checks.extend(
            _apply(rule, evaluation.overall, "overall", has_baseline, spec.require_baseline)
        )
    if spec.slices:
        for result in evaluation.slices:
            if not _slice_selected(result, spec.slice_columns):
                continue
            if result.count < spec.min_slice_size:
                checks.append(
                    Check(
                        "slice",
                        result.key,
                        "count",
                        "min_size",
                        float(spec.min_slice_size),
                        float(result.count),
                        None,
                        "skip",
                        f"slice {result.key}: {result.count} rows < {spec.min_slice_size}, "
                        "reported but not judged",
                    )
                )
                continue
            for rule in spec.slices:
                checks.extend(_apply(rule, result, "slice", has_baseline, spec.require_baseline))
    if spec.latency is not None:
        if latency is None:
            raise InvalidInput("the gate has a latency budget but no latency was measured")
        for name, budget, measured in (
            ("p50_ms", spec.latency.p50_ms, latency.p50_ms),
            ("p99_ms", spec.latency.p99_ms, latency.p99_ms),
        ):
            if budget is None:
                continue
            ok = measured <= budget
            checks.append(
                Check(
                    "latency",
                    "latency",
                    name,
                    "budget",
                    budget,
                    measured,
                    None,
                    "pass" if ok else "fail",
                    f"latency {name[:3]} {measured:.3f} ms {'<=' if ok else '>'} budget "
                    f"{budget:g} ms ({latency.calls} calls at batch 1)",
                )
            )
    return checks


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class GateVerdict:
    """The outcome of a gate: passed when no check failed. JSON: :meth:`to_json`."""

    passed: bool
    model: str
    version: int
    baseline: tuple[str, int] | None
    checks: list[Check]
    latency: LatencyResult | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    evaluated_at: str = field(default_factory=_now)
    evaluation: Evaluation | None = field(default=None, repr=False, compare=False)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "skip": 0}
        for check in self.checks:
            out[check.status] += 1
        return out

    def summary(self) -> str:
        """One line: the outcome and the counts."""
        counts = self.counts()
        outcome = "PASSED" if self.passed else "FAILED"
        against = (
            f" against {self.baseline[0]} version {self.baseline[1]}"
            if self.baseline
            else " (no baseline)"
        )
        return (
            f"gate {outcome}: {self.model} version {self.version}{against}: "
            f"{counts['fail']} failed, {counts['pass']} passed, {counts['skip']} skipped"
        )

    def format(self, *, verbose: bool = False) -> str:
        """The readable verdict: the summary, then every failed check (every check when
        ``verbose``), then the latency figures."""
        lines = [self.summary()]
        source = self.data.get("path")
        if source:
            lines.append(f"  data: {source} ({self.rows} labelled rows)")
        shown = self.checks if verbose else self.failures
        for check in shown:
            lines.append(f"  {check.status.upper():<4}  {check.message}")
        if self.latency is not None:
            lat = self.latency
            lines.append(
                f"  latency at batch 1: p50 {lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms, "
                f"max {lat.max_ms:.3f} ms over {lat.calls} calls "
                f"({lat.intra_op_threads} intra-op thread(s))"
            )
        return "\n".join(lines)

    def to_json(self, *, include_evaluation: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": VERDICT_FORMAT,
            "passed": self.passed,
            "summary": self.summary(),
            "model": self.model,
            "version": self.version,
            "baseline": (
                None
                if self.baseline is None
                else {"model": self.baseline[0], "version": self.baseline[1]}
            ),
            "spec": dict(self.spec),
            "data": dict(self.data),
            "rows": self.rows,
            "counts": self.counts(),
            "checks": [c.to_json() for c in self.checks],
            "latency": None if self.latency is None else self.latency.to_json(),
            "evaluated_at": self.evaluated_at,
        }
        if include_evaluation and self.evaluation is not None:
            data["evaluation"] = self.evaluation.to_json()
        return data


def evaluate_gate(
    spec: GateSpec | Path | str,
    candidate: Path,
    *,
    baseline: Path | None = None,
    data: Path | str | Any | None = None,
    label: str | None = None,
    slice_by: Sequence[str] | None = None,
    session_settings: SessionSettings | None = None,
) -> GateVerdict:
    """Run the gate ``spec`` on the candidate package folder ``candidate``.

    ``baseline`` is the package folder to compare with (None: no baseline; rules against the
    baseline then fail unless the spec says ``[baseline] required = false``). ``data`` is a
    table file or a pandas DataFrame (default: the spec's ``[data] path``), ``label`` its label
    column and ``slice_by`` the slicing columns (defaults: the spec's). The candidate is loaded
    with ``session_settings`` (default: :func:`server_session_settings`), which the latency
    budget is measured under. Raises :class:`InvalidInput` (and the loading errors of
    :func:`load_package`) when the gate cannot be run at all; a gate that runs returns a
    verdict, passed or not.
    """
    from edgewise.runtime.package.tabular import load_table

    gate = spec if isinstance(spec, GateSpec) else GateSpec.load(spec)
    label = label or gate.label
    if not label:
        raise InvalidInput("no label column: give one, or [data] label in the gate spec")
    source = data if data is not None else gate.data_path
    if source is None:
        raise InvalidInput("no labelled data: give a table, or [data] path in the gate spec")
    info: dict[str, Any] = {}
    if isinstance(source, str | Path):
        path = Path(source)
        frame = load_table(path)
        info = data_info(path)
    else:
        frame = source
        info = {"path": "<DataFrame>"}
    slices = tuple(slice_by) if slice_by else gate.slice_by
    settings = session_settings or server_session_settings()
    model = load_package(candidate, settings)
    base_model = load_package(baseline, settings) if baseline is not None else None
    evaluation = evaluate_models(
        model,
        frame,
        label,
        baseline=base_model,
        slice_by=slices,
        min_slice_size=gate.min_slice_size,
        data_info=info,
    )
    latency = None
    if gate.latency is not None:
        latency = measure_latency(
            model,
            frame,
            calls=gate.latency.calls,
            warmup=gate.latency.warmup,
            settings=settings,
        )
    checks = check_gate(gate, evaluation, latency)
    return GateVerdict(
        passed=not any(c.status == "fail" for c in checks),
        model=model.name,
        version=model.version,
        baseline=evaluation.baseline,
        checks=checks,
        latency=latency,
        spec={"path": gate.source, "sha256": gate.sha256},
        data=info,
        rows=evaluation.rows,
        evaluation=evaluation,
    )
