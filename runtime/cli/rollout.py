"""``edgewise repository split | shadow | label | rollout``: a running server's rollout of a
model (docs/rollout.md)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from edgewise.runtime.errors import InvalidInput

__all__ = ["ROLLOUT_ACTIONS", "add_rollout_actions", "parse_weights", "run_rollout"]

ROLLOUT_ACTIONS = frozenset({"split", "shadow", "label", "rollout"})


def add_rollout_actions(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    split = actions.add_parser(
        "split",
        help="share a model's requests that name no version between versions by weight",
        description="Share the requests that name no version: VERSION=WEIGHT pairs (a version "
        "number or label) summing to 100, e.g. 'split iris 1=90 2=10'; no pair clears the split.",
    )
    split.add_argument("name")
    split.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT")
    split.add_argument(
        "--sticky-key",
        default="",
        help="place requests by a hash of this request parameter ('request_id': the request's "
        "id), so a key always lands on the same version (default: at random)",
    )
    shadow = actions.add_parser(
        "shadow",
        help="copy a model's answered requests to a candidate version (answers unchanged)",
    )
    shadow.add_argument("name")
    shadow.add_argument("--version", default="", help="the candidate (number or label)")
    shadow.add_argument("--rate", type=float, default=1.0, help="share copied, in (0, 1]")
    shadow.add_argument("--stop", action="store_true", help="stop the shadow")
    label = actions.add_parser("label", help="point a version label at a served version")
    label.add_argument("name")
    label.add_argument("label", help="e.g. stable, canary")
    label.add_argument("version", nargs="?", default="", help="a version number or label")
    label.add_argument("--remove", action="store_true", help="remove the label")
    show = actions.add_parser("rollout", help="a model's split, shadow (with figures), labels")
    show.add_argument("name")


def parse_weights(pairs: list[str]) -> list[tuple[str, int]]:
    weights = []
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not version or not weight.strip().isascii() or not weight.strip().isdigit():
            raise InvalidInput(f"weights: {pair!r} is not VERSION=WEIGHT (e.g. 2=10)")
        weights.append((version, int(weight)))
    return weights


def run_rollout(args: argparse.Namespace, client: Any) -> int:
    if args.action == "split":
        rollout = client.set_traffic_split(args.name, parse_weights(args.weights), args.sticky_key)
    elif args.action == "shadow":
        if args.stop == bool(args.version):
            raise InvalidInput("shadow: give --version VERSION, or --stop")
        if not args.stop and not 0.0 < args.rate <= 1.0:  # (NaN fails both)
            raise InvalidInput(f"--rate must be in (0, 1], not {args.rate:g}")
        rollout = client.set_shadow(args.name, "" if args.stop else args.version, args.rate)
    elif args.action == "label":
        if args.remove == bool(args.version):
            raise InvalidInput("label: give a VERSION, or --remove")
        rollout = client.set_version_label(args.name, args.label, args.version)
    else:
        rollout = client.get_rollout(args.name)
    print(format_rollout(rollout))
    return 0


def format_rollout(rollout: Any) -> str:
    lines = [f"model {rollout.model}"]
    if rollout.weights:
        shares = ", ".join(f"{w.version}: {w.weight}%" for w in rollout.weights)
        sticky = f" (sticky by {rollout.sticky_key})" if rollout.sticky_key else " (random)"
        lines.append(f"split    {shares}{sticky}")
    else:
        lines.append("split    none (the default version answers)")
    if rollout.shadow_version:
        f = rollout.shadow
        lines.append(
            f"shadow   version {rollout.shadow_version} at rate {rollout.shadow_rate:g}: "
            f"{f.requests} copies, {f.errors} errors, {f.dropped} dropped, "
            f"agreement {_figure(f.agreement)}, mean |score difference| "
            f"{_figure(f.mean_abs_difference)}, p99 {_figure(f.p99_latency_seconds * 1000)} ms"
        )
    else:
        lines.append("shadow   none")
    labels = ", ".join(f"{k} -> {v}" for k, v in sorted(rollout.labels.items()))
    lines.append(f"labels   {labels or 'none'}")
    return "\n".join(lines)


def _figure(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4g}"
