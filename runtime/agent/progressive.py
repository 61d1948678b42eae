"""The agent's progressive rollout: a candidate goes through its alias's policy steps (shadow,
canary shares) on the server, each judged by an analysis over the server's own signals, before
it becomes the default; a failed step takes it out of traffic at once (docs/rollout.md).

Signals, read from the server: request counts and latency histograms per version (its Prometheus
endpoint), the shadow's figures (``GetRollout``: agreement, score difference, errors, p99), the
candidate's drift report (``GetDriftReport``) and online quality (``GetQuality``, once labels
arrived). Every verdict is written to the store (a model tag
``edgewise.rollout.decision.<node>.<version>.<step>``) with its evidence, counted in
``edgewise_agent_rollout_decisions_total{verdict}``, and shown by ``edgewise models show``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from edgewise.runtime.agent.policy import DECISION_PREFIX, Analysis, RolloutPolicy, Step
from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.errors import EdgewiseError, Unavailable
from edgewise.runtime.store.base import Store
from edgewise.runtime.store.lineage import utc_now

__all__ = [
    "Decision",
    "Progressive",
    "RolloutAborted",
    "RolloutStopped",
    "Snapshot",
    "histogram_quantile",
    "read_decisions",
]

log = logging.getLogger(__name__)

_OK = "OK"
_POLL_SECONDS = 0.2


class RolloutStopped(Exception):
    """The agent was asked to stop in the middle of a step: the candidate is out of traffic, no
    verdict is recorded and nothing is refused (the next start begins the rollout again)."""


class RolloutAborted(Exception):
    """The rollout was aborted from outside (``edgewise rollback`` while it runs): the candidate
    is out of traffic; the agent records the abort (:meth:`Progressive.abort`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Snapshot:
    """Cumulative counts of one scrape, per version of the model."""

    requests: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # le -> cumulative


def scrape(url: str, model: str, timeout: float = 5.0) -> Snapshot:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unavailable(f"server metrics at {url}: {exc}") from None
    snapshot = Snapshot()
    for family in text_string_to_metric_families(text):
        if family.name not in ("edgewise_requests", "edgewise_request_duration_seconds"):
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model:
                continue
            version = labels.get("version", "")
            if sample.name == "edgewise_requests_total":
                snapshot.requests[version] = snapshot.requests.get(version, 0.0) + sample.value
                if labels.get("code") != _OK:
                    snapshot.errors[version] = snapshot.errors.get(version, 0.0) + sample.value
            elif sample.name == "edgewise_request_duration_seconds_bucket":
                le = float(labels["le"])
                snapshot.buckets.setdefault(version, {})[le] = sample.value
    return snapshot


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The ``q`` quantile of the observations between two scrapes of a histogram, interpolated
    linearly within its bucket as Prometheus's histogram_quantile does (NaN without
    observations; the largest finite bound when it falls past it)."""
    bounds = sorted(after)
    deltas = [(le, after[le] - before.get(le, 0.0)) for le in bounds]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in deltas:
        if cumulative >= rank:
            if not math.isfinite(le):
                return lower
            inside = cumulative - below
            share = (rank - below) / inside if inside > 0 else 1.0
            return lower + (le - lower) * share
        lower, below = le, cumulative
    return math.nan


@dataclass(frozen=True)
class Decision:
    node: str
    model: str
    alias: str
    candidate: int
    stable: int
    step: int  # index in the policy; len(steps) for the promotion
    description: str
    verdict: str  # pass | fail | promote | abort | withdrawn
    reasons: tuple[str, ...]
    evidence: dict[str, Any]
    at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "model": self.model,
            "alias": self.alias,
            "candidate": self.candidate,
            "stable": self.stable,
            "step": self.step,
            "description": self.description,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "evidence": self.evidence,
            "at": self.at,
        }


def read_decisions(store: Store, name: str) -> list[dict[str, Any]]:
    """Every rollout decision recorded for ``name``, oldest first."""
    decisions = []
    for text in store.model_tags(name, DECISION_PREFIX).values():
        try:
            decisions.append(json.loads(text))
        except ValueError:
            continue
    return sorted(decisions, key=lambda d: (str(d.get("at", "")), d.get("step", 0)))


def _p99_over(analysis: Analysis, p99: float) -> list[str]:
    most = analysis.max_p99_seconds
    if most is None or math.isnan(p99) or p99 <= most:
        return []
    return [f"p99 latency {p99 * 1000:.3g} ms > {most * 1000:g} ms"]


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


class Progressive:
    """Runs one alias's policy for a candidate on the server (see the module's docstring)."""

    def __init__(
        self,
        client: EdgewiseClient,
        store: Store,
        model: str,
        alias: str,
        node: str,
        metrics_url: Callable[[], str | None],
        registry: CollectorRegistry,
        wait: Callable[[float], bool],
        guard: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.client = client
        self.store = store
        self.model = model
        self.alias = alias
        self.node = node
        self.metrics_url = metrics_url
        self.wait = wait  # sleep up to n seconds; True when the agent is stopping
        # Held around each change of the candidate's traffic: raises RolloutAborted when the
        # rollout was aborted meanwhile (the agent's state lock, held for the change only).
        self.guard = guard
        # The step the last run reached: (index, description, epoch seconds it began).
        self.reached: tuple[int, str, float] | None = None
        self.step_gauge = Gauge(
            "edgewise_agent_rollout_step",
            "The policy step the candidate is in (1-based; 0: no rollout running).",
            registry=registry,
        )
        self.decisions = Counter(
            "edgewise_agent_rollout_decisions",
            "Rollout verdicts by outcome (pass, fail, promote; abort: edgewise rollback; "
            "withdrawn: a rollout that ended with no verdict, the agent stopped or failed).",
            ["verdict"],
            registry=registry,
        )
        for verdict in ("pass", "fail", "promote", "abort", "withdrawn"):
            self.decisions.labels(verdict)

    # ---- the steps -----------------------------------------------------------------------------

    def run(self, policy: RolloutPolicy, stable: int, candidate: int) -> str:
        """Take ``candidate`` through the steps; "" when every step passed (the caller switches
        the default, then calls :meth:`finish`), else why it failed (it is out of traffic).
        Raises :class:`RolloutStopped` when the agent stops meanwhile (out of traffic too)."""
        client, model = self.client, self.model
        self.reached = None
        try:
            with self.guard():
                # What an earlier attempt left (an agent stopped mid-rollout): start from nothing.
                client.set_traffic_split(model, [])
                client.set_shadow(model, "")
                client.set_version_label(model, "stable", str(stable))
                client.set_version_label(model, "canary", str(candidate))
            for index, step in enumerate(policy.steps):
                self.reached = (index, step.describe(), time.time())
                self.step_gauge.set(index + 1)
                reasons, evidence = self._step(policy, step, stable, candidate)
                verdict = "fail" if reasons else "pass"
                if reasons:
                    # An abort recorded before this verdict is the outcome (RolloutAborted):
                    # never both a fail and an abort for one rollout.
                    with self.guard():
                        pass
                self._record(
                    policy, index, step.describe(), stable, candidate, verdict, reasons, evidence
                )
                if reasons:
                    self.withdraw(stable, candidate)
                    return f"rollout step {index + 1} ({step.describe()}): {'; '.join(reasons)}"
        except BaseException:
            self.withdraw(stable, candidate)
            raise
        return ""

    def abort(self, stable: int, candidate: int, reason: str, evidence: dict[str, Any]) -> bool:
        """Record an abort from outside (out of traffic already): its decision in the store with
        ``evidence``, counted in the decisions' ``abort`` verdict; False when the store could not
        take it (nothing counted: the caller tries again)."""
        self.step_gauge.set(0)
        step = evidence.get("step")
        index = step - 1 if isinstance(step, int) and step > 0 else 0
        description = str(evidence.get("step_description", "before the steps"))
        return self._record(
            None, index, description, stable, candidate, "abort", (reason,), evidence, "abort"
        )

    def withdrawn(self, stable: int, candidate: int, why: str, evidence: dict[str, Any]) -> None:
        """Record a rollout that ended with no verdict (the agent stopped, failed or died in it;
        the candidate is out of traffic): its decision in the store, counted in the decisions'
        ``withdrawn`` verdict (a store that cannot take it: logged, counted all the same)."""
        self.step_gauge.set(0)
        step = evidence.get("step")
        index = step - 1 if isinstance(step, int) and step > 0 else 0
        description = str(evidence.get("step_description", "before the steps"))
        self._record(
            None, index, description, stable, candidate, "withdrawn", (why,), evidence, "withdrawn"
        )

    def finish(self, policy: RolloutPolicy, stable: int, candidate: int) -> None:
        """After the switch: no split or shadow, ``stable`` names the candidate."""
        self.client.set_traffic_split(self.model, [])
        self.client.set_shadow(self.model, "")
        self.client.set_version_label(self.model, "stable", str(candidate))
        self.client.set_version_label(self.model, "canary", str(candidate))
        self._record(policy, len(policy.steps), "100 %", stable, candidate, "promote", (), {})
        self.step_gauge.set(0)

    def withdraw(self, stable: int, candidate: int) -> bool:
        """Out of traffic at once: no split, no shadow (the default version answers), and the
        clients that ask for "canary" get ``stable`` (none of their requests fails). False when
        the server did not take all of it (logged): the candidate may still get traffic."""
        self.step_gauge.set(0)
        done = True
        client, model = self.client, self.model
        undo: list[tuple[Callable[..., object], tuple[object, ...]]] = [
            (client.set_traffic_split, (model, [])),
            (client.set_shadow, (model, "")),
            (client.set_version_label, (model, "canary", str(stable))),
        ]
        for call, args in undo:
            try:
                call(*args)
            except EdgewiseError as exc:
                log.error("model %s: withdrawing version %d: %s", self.model, candidate, exc)
                done = False
        return done

    def _step(
        self, policy: RolloutPolicy, step: Step, stable: int, candidate: int
    ) -> tuple[list[str], dict[str, Any]]:
        analysis = policy.analysis
        url = self.metrics_url()
        with self.guard():
            if step.mode == "shadow":
                self.client.set_shadow(self.model, str(candidate), step.rate)
            elif step.mode == "label":  # only the clients that ask for "canary"
                self.client.set_traffic_split(self.model, [])
                self.client.set_shadow(self.model, "")
            else:
                weights = [(str(stable), 100 - step.weight), (str(candidate), step.weight)]
                self.client.set_traffic_split(self.model, weights, policy.sticky_key)
        before = scrape(url, self.model) if url and step.mode != "shadow" else None
        started = time.monotonic()
        if self.wait(step.seconds):
            raise RolloutStopped()
        while True:
            seen = self._seen(step, before, url, candidate)
            if seen >= analysis.min_requests:
                break
            if time.monotonic() - started > analysis.max_wait_seconds:
                return [
                    f"only {seen:g} of the {analysis.min_requests} requests needed in "
                    f"{analysis.max_wait_seconds:g} s"
                ], {"requests": seen}
            if self.wait(_POLL_SECONDS):
                raise RolloutStopped()
        if step.mode == "shadow":
            reasons, evidence = self._judge_shadow(analysis)
        else:
            assert before is not None and url is not None
            reasons, evidence = self._judge_canary(
                analysis, before, scrape(url, self.model), stable, candidate
            )
        more, extra = self._judge_monitors(analysis, candidate)
        evidence.update(extra)
        return reasons + more, evidence

    def _seen(self, step: Step, before: Snapshot | None, url: str | None, candidate: int) -> float:
        if step.mode == "shadow":
            return float(self.client.get_rollout(self.model).shadow.requests)
        if before is None or url is None:
            raise Unavailable(f"a {step.mode} step needs the server's metrics (--server-metrics)")
        now = scrape(url, self.model)
        key = str(candidate)
        return now.requests.get(key, 0.0) - before.requests.get(key, 0.0)

    def _judge_shadow(self, analysis: Analysis) -> tuple[list[str], dict[str, Any]]:
        figures = self.client.get_rollout(self.model).shadow
        evidence: dict[str, Any] = {
            "copies": figures.requests,
            "errors": figures.errors,
            "dropped": figures.dropped,
            "agreement": _finite(figures.agreement),
            "mean_abs_difference": _finite(figures.mean_abs_difference),
            "p99_seconds": _finite(figures.p99_latency_seconds),
        }
        reasons = []
        rate = figures.errors / figures.requests if figures.requests else 0.0
        evidence["error_rate"] = round(rate, 6)
        if rate > analysis.max_error_rate:
            reasons.append(f"error rate {rate:.3g} > {analysis.max_error_rate:g}")
        agreement = figures.agreement
        low = analysis.min_agreement
        if low is not None and figures.labelled_rows and agreement < low:
            reasons.append(f"agreement with stable {agreement:.3g} < {low:g}")
        difference = figures.mean_abs_difference
        most = analysis.max_score_difference
        if most is not None and not math.isnan(difference) and difference > most:
            reasons.append(f"mean score difference {difference:.3g} > {most:g}")
        reasons.extend(_p99_over(analysis, figures.p99_latency_seconds))
        return reasons, evidence

    def _judge_canary(
        self, analysis: Analysis, before: Snapshot, after: Snapshot, stable: int, candidate: int
    ) -> tuple[list[str], dict[str, Any]]:
        key, base = str(candidate), str(stable)
        total = after.requests.get(key, 0.0) - before.requests.get(key, 0.0)
        errors = after.errors.get(key, 0.0) - before.errors.get(key, 0.0)
        rate = errors / total if total else 0.0
        mine, theirs = before.buckets.get(key, {}), after.buckets.get(key, {})
        p99 = histogram_quantile(mine, theirs, 0.99)
        q = analysis.latency_quantile
        latency = histogram_quantile(mine, theirs, q)
        latency_stable = histogram_quantile(
            before.buckets.get(base, {}), after.buckets.get(base, {}), q
        )
        evidence: dict[str, Any] = {
            "requests": total,
            "errors": errors,
            "error_rate": round(rate, 6),
            "p99_seconds": _finite(p99),
            "latency_quantile": q,
            "latency_seconds": _finite(latency),
            "stable_latency_seconds": _finite(latency_stable),
        }
        reasons = []
        if rate > analysis.max_error_rate:
            reasons.append(f"error rate {rate:.3g} > {analysis.max_error_rate:g}")
        usable = latency_stable > 0 and not math.isnan(latency_stable)
        ratio = latency / latency_stable if usable else math.nan
        evidence["latency_ratio"] = _finite(ratio)
        most = analysis.max_latency_ratio
        if most is not None and not math.isnan(ratio) and ratio > most:
            reasons.append(
                f"latency (quantile {q:g}) {latency * 1000:.3g} ms is {ratio:.3g} x stable's "
                f"{latency_stable * 1000:.3g} ms (> {most:g} x)"
            )
        reasons.extend(_p99_over(analysis, p99))
        return reasons, evidence

    def _judge_monitors(
        self, analysis: Analysis, candidate: int
    ) -> tuple[list[str], dict[str, Any]]:
        """The candidate's drift report and online quality (where the server has them)."""
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        if analysis.fail_on_drift:
            report = self.client.drift_report(self.model, str(candidate))
            if report.available and not report.insufficient_data:
                drifting = sorted(f.name for f in report.features if f.drifting)
                evidence["drift"] = {"rows": report.rows, "drifting": drifting[:10]}
                if report.drifting:
                    named = ", ".join(drifting[:3]) or "multivariate"
                    more = ", ..." if len(drifting) > 3 else ""
                    reasons.append(f"inputs drift against its reference ({named}{more})")
            else:
                evidence["drift"] = {"rows": report.rows, "judged": False}
        if analysis.max_quality_error is not None:
            quality = self.client.quality_report(self.model, str(candidate))
            if quality.available and quality.labelled >= analysis.min_labels:
                evidence["quality"] = {
                    "labelled": quality.labelled,
                    "error": round(quality.error, 6),
                }
                if quality.error > analysis.max_quality_error:
                    most = analysis.max_quality_error
                    reasons.append(f"online {quality.metric} {quality.error:.3g} > {most:g}")
            else:
                evidence["quality"] = {"labelled": quality.labelled, "judged": False}
        return reasons, evidence

    def _record(
        self,
        policy: RolloutPolicy | None,
        index: int,
        description: str,
        stable: int,
        candidate: int,
        verdict: str,
        reasons: list[str] | tuple[str, ...],
        evidence: dict[str, Any],
        key_suffix: str = "",
    ) -> bool:
        """Record a verdict in the store and count it; False (nothing counted) when the store
        refused an abort, which its caller retries (any other verdict stands and is counted)."""
        decision = Decision(
            self.node,
            self.model,
            self.alias,
            candidate,
            stable,
            index,
            description,
            verdict,
            tuple(reasons),
            evidence,
            utc_now(),
        )
        key = f"{DECISION_PREFIX}{self.node}.{candidate}.{key_suffix or f'{index:02d}'}"
        try:
            self.store.set_model_tag(
                self.model, key, json.dumps(decision.to_json(), sort_keys=True)
            )
        except EdgewiseError as exc:  # the verdict stands (an abort is tried again)
            log.error("model %s: recording a rollout decision: %s", self.model, exc)
            if verdict == "abort":
                return False
        self.decisions.labels(verdict).inc()
        log.info(
            "model %s version %d: rollout %s %s%s",
            self.model,
            candidate,
            description,
            verdict,
            f": {'; '.join(reasons)}" if reasons else "",
        )
        return True
