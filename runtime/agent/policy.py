"""A rollout policy: the steps a new version of an alias goes through before it is the default,
and the analysis that judges each step (docs/rollout.md).

Stored with the alias in the metadata store (a model tag ``edgewise.rollout.policy.<alias>``)::

    {"steps": [{"mode": "shadow", "seconds": 600},
               {"mode": "canary", "weight": 10, "seconds": 600},
               {"mode": "canary", "weight": 50, "seconds": 600}],
     "analysis": {"min_requests": 100, "max_error_rate": 0.01, "max_latency_ratio": 2.0,
                  "min_agreement": 0.95, "fail_on_drift": true},
     "sticky_key": "request_id"}

After the last step the version takes 100 % (the agent's switch and watch). Unknown keys and
impossible thresholds are refused with one line naming the field.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from edgewise.runtime.agent.waves import Wave
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.rollout import check_sticky_key
from edgewise.runtime.store.base import Store, validate_alias

__all__ = [
    "DECISION_PREFIX",
    "POLICY_PREFIX",
    "Analysis",
    "RolloutPolicy",
    "Step",
    "parse_policy",
    "read_policy",
    "write_policy",
]

POLICY_PREFIX: Final = "edgewise.rollout.policy."
DECISION_PREFIX: Final = "edgewise.rollout.decision."

_TOP: Final = frozenset({"steps", "analysis", "sticky_key", "waves"})
_WAVE: Final = frozenset({"nodes", "share"})
_STEP: Final = frozenset({"mode", "seconds", "weight", "rate"})
_MODES: Final = ("shadow", "canary", "label")


@dataclass(frozen=True)
class Step:
    mode: str  # shadow | canary | label
    seconds: float  # at least this long, and until min_requests were judged
    weight: int = 0  # canary: percent of the requests naming no version
    rate: float = 1.0  # shadow: share of answered requests copied

    def describe(self) -> str:
        if self.mode == "shadow":
            return f"shadow {self.rate:g} for {self.seconds:g} s"
        if self.mode == "label":
            return f"label canary for {self.seconds:g} s"
        return f"canary {self.weight} % for {self.seconds:g} s"


@dataclass(frozen=True)
class Analysis:
    """Thresholds of a step's verdict (None: not judged)."""

    min_requests: int = 100  # requests (canary) or copies (shadow) before a step is judged
    max_error_rate: float = 0.01
    max_latency_ratio: float | None = 2.0  # candidate / stable latency quantile (canary)
    latency_quantile: float = 0.99  # the quantile compared (canary and label steps)
    max_p99_seconds: float | None = None  # candidate p99 (shadow and canary)
    min_agreement: float | None = 0.95  # shadow: share of equal labels
    max_score_difference: float | None = None  # shadow: mean |score difference|
    fail_on_drift: bool = True  # the candidate's drift report says drifting
    max_quality_error: float | None = None  # online quality, once min_labels labels arrived
    min_labels: int = 20
    max_wait_seconds: float = 3600.0  # a step without min_requests by then fails


@dataclass(frozen=True)
class RolloutPolicy:
    steps: tuple[Step, ...]
    analysis: Analysis = field(default_factory=Analysis)
    sticky_key: str = ""
    waves: tuple[Wave, ...] = ()  # fleet waves (waves.py); none: every node at once

    def to_json(self) -> dict[str, Any]:
        steps = []
        for step in self.steps:
            item: dict[str, Any] = {"mode": step.mode, "seconds": step.seconds}
            if step.mode == "canary":
                item["weight"] = step.weight
            elif step.mode == "shadow":
                item["rate"] = step.rate
            steps.append(item)
        document: dict[str, Any] = {
            "steps": steps,
            "analysis": asdict(self.analysis),
            "sticky_key": self.sticky_key,
        }
        if self.waves:
            document["waves"] = [
                {"nodes": w.nodes} if w.nodes else {"share": w.share} for w in self.waves
            ]
        return document


def _unknown(section: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    extra = sorted(set(section) - known)
    if extra:
        raise InvalidInput(
            f"rollout policy: {where}: unknown key(s) {', '.join(map(repr, extra))} "
            f"(known: {', '.join(sorted(known))})"
        )


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidInput(f"rollout policy: {where} must be a number, not {value!r}")
    return float(value)


def _step(item: object, index: int) -> Step:
    where = f"steps[{index}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"rollout policy: {where} must be an object")
    _unknown(item, _STEP, where)
    mode = item.get("mode")
    if mode not in _MODES:
        raise InvalidInput(
            f"rollout policy: {where}.mode must be shadow, canary or label, not {mode!r}"
        )
    seconds = _number(item.get("seconds"), f"{where}.seconds")
    if not 0 < seconds < math.inf:
        raise InvalidInput(f"rollout policy: {where}.seconds must be > 0, not {seconds:g}")
    if mode == "canary":
        if "rate" in item:
            raise InvalidInput(f"rollout policy: {where}.rate is for shadow steps")
        weight = item.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 99:
            raise InvalidInput(
                f"rollout policy: {where}.weight must be a whole percent in [1, 99], "
                f"not {weight!r} (100 % is the promotion after the last step)"
            )
        return Step("canary", seconds, weight=weight)
    if "weight" in item:
        raise InvalidInput(f"rollout policy: {where}.weight is for canary steps")
    if mode == "label":  # only clients that ask for the "canary" label reach the candidate
        if "rate" in item:
            raise InvalidInput(f"rollout policy: {where}.rate is for shadow steps")
        return Step("label", seconds)
    rate = _number(item.get("rate", 1.0), f"{where}.rate")
    if not 0 < rate <= 1:
        raise InvalidInput(f"rollout policy: {where}.rate must be in (0, 1], not {rate:g}")
    return Step("shadow", seconds, rate=rate)


def _analysis(section: object) -> Analysis:
    if not isinstance(section, dict):
        raise InvalidInput("rollout policy: analysis must be an object")
    known = frozenset(Analysis.__dataclass_fields__)
    _unknown(section, known, "analysis")
    values: dict[str, Any] = {}
    for key, value in section.items():
        where = f"analysis.{key}"
        if key == "fail_on_drift":
            if not isinstance(value, bool):
                raise InvalidInput(f"rollout policy: {where} must be true or false")
            values[key] = value
        elif key in ("min_requests", "min_labels"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"rollout policy: {where} must be a whole number >= 1")
            values[key] = value
        elif value is None and key not in (
            "max_error_rate",
            "max_wait_seconds",
            "latency_quantile",
        ):
            values[key] = None
        else:
            values[key] = _number(value, where)
    analysis = Analysis(**values)
    for key in ("max_error_rate", "min_agreement", "max_quality_error"):
        bound = getattr(analysis, key)
        if bound is not None and not 0 <= bound <= 1:
            raise InvalidInput(f"rollout policy: analysis.{key} must be in [0, 1], not {bound:g}")
    if not 0 < analysis.latency_quantile < 1:
        raise InvalidInput(
            "rollout policy: analysis.latency_quantile must be in (0, 1), "
            f"not {analysis.latency_quantile:g}"
        )
    ratio = analysis.max_latency_ratio
    if ratio is not None and not ratio >= 1:
        raise InvalidInput(
            f"rollout policy: analysis.max_latency_ratio must be >= 1, not {ratio:g} "
            "(a candidate cannot be asked to beat the version it is compared with)"
        )
    for key in ("max_p99_seconds", "max_score_difference", "max_wait_seconds"):
        bound = getattr(analysis, key)
        if bound is not None and not bound > 0:
            raise InvalidInput(f"rollout policy: analysis.{key} must be > 0, not {bound:g}")
    return analysis


def parse_policy(document: object) -> RolloutPolicy:
    """A policy from its JSON document; InvalidInput (one line naming the field) when invalid."""
    if not isinstance(document, dict):
        raise InvalidInput("rollout policy: a JSON object with steps (and analysis, sticky_key)")
    _unknown(document, _TOP, "top level")
    waves = _waves(document.get("waves", []))
    raw = document.get("steps", [] if waves else None)
    if not isinstance(raw, list) or not (raw or waves):
        raise InvalidInput("rollout policy: steps must be a non-empty list (or give waves)")
    steps = tuple(_step(item, i) for i, item in enumerate(raw))
    weights = [s.weight for s in steps if s.mode == "canary"]
    if any(b <= a for a, b in itertools.pairwise(weights)):
        raise InvalidInput(f"rollout policy: canary weights must increase, not {weights}")
    sticky = document.get("sticky_key", "")
    if not isinstance(sticky, str):
        raise InvalidInput("rollout policy: sticky_key must be a string")
    analysis = _analysis(document.get("analysis", {}))
    return RolloutPolicy(steps, analysis, check_sticky_key(sticky), waves)


def _waves(raw: object) -> tuple[Wave, ...]:
    if not isinstance(raw, list):
        raise InvalidInput("rollout policy: waves must be a list")
    waves = []
    for index, item in enumerate(raw):
        where = f"waves[{index}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise InvalidInput(f'rollout policy: {where} must be {{"nodes": N}} or {{"share": S}}')
        _unknown(item, _WAVE, where)
        if "nodes" in item:
            nodes = item["nodes"]
            if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
                raise InvalidInput(f"rollout policy: {where}.nodes must be a whole number >= 1")
            waves.append(Wave(nodes=nodes))
        else:
            share = _number(item["share"], f"{where}.share")
            if not 0 < share <= 1:
                raise InvalidInput(f"rollout policy: {where}.share must be in (0, 1]")
            waves.append(Wave(share=share))
    if waves and waves[-1] != Wave(share=1.0):
        raise InvalidInput('rollout policy: the last wave must be every node ({"share": 1.0})')
    return tuple(waves)


def policy_text(text: str) -> RolloutPolicy:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"rollout policy: not JSON: {exc}") from None
    return parse_policy(document)


def read_policy(store: Store, name: str, alias: str) -> RolloutPolicy | None:
    """The policy stored with ``alias`` (None: none; the alias switches at once)."""
    key = POLICY_PREFIX + validate_alias(alias)
    text = store.model_tags(name, key).get(key)
    return None if text is None else policy_text(text)


def write_policy(store: Store, name: str, alias: str, policy: RolloutPolicy | None) -> None:
    key = POLICY_PREFIX + validate_alias(alias)
    value = None if policy is None else json.dumps(policy.to_json(), sort_keys=True)
    store.set_model_tag(name, key, value)
