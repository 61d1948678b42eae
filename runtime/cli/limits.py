"""``edgewise limits``: the CPU and memory limits found (or a container profile's) and the
runtime budget split from them, as a table or JSON. The rules live in config/limits.py; this is
their command, which may read the container profiles of resources/."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from edgewise.runtime.config.limits import detect_limits, format_report
from edgewise.runtime.config.settings import BUDGET_FIELDS, ServerSettings

__all__ = ["add_limits"]


def add_limits(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "limits",
        help="print the CPU and memory limits found and how they are split",
        description="Find the CPU and memory limits this process runs under (cgroup v1 or v2, "
        "else the host), derive the runtime budget from them, and print both, with the rule "
        "behind each value. With --profile, show what a profile's limits would give.",
    )
    p.add_argument("--profile", help="split a profile's limits instead of the detected ones")
    p.add_argument(
        "--profiles-dir",
        type=Path,
        help="folder of profiles (default: ./containers/profiles, then the installed ones)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_limits)


def _cmd_limits(args: argparse.Namespace) -> int:
    if args.profile:
        # Imported here: the other verbs never read container profiles.
        from edgewise.runtime.resources.container_profiles import load_profile

        profile = load_profile(args.profile, [args.profiles_dir] if args.profiles_dir else None)
        limits = profile.limits()
        budget = profile.budget()
        split: dict[str, int | bool] = budget.split()
        explicit: frozenset[str] = frozenset()
        title = f"edgewise limits: profile {profile.name} ({profile.description})"
    else:
        limits = detect_limits()
        settings = ServerSettings.from_sources({}, limits=limits)
        assert settings.budget is not None
        budget = settings.budget
        split = budget.split()
        split.update({name: getattr(settings, name) for name in BUDGET_FIELDS})
        explicit = budget.overridden
        title = f"edgewise limits: this process (pid {os.getpid()})"
    if args.json:
        data = {
            "limits": {
                **{k: v for k, v in asdict(limits).items() if k != "sources"},
                "sources": dict(limits.sources),
                "cpu_budget": limits.cpu_budget,
                "memory_bytes": limits.memory_bytes,
            },
            "budget": budget.as_dict(),
            "split": split,
        }
        print(json.dumps(data, indent=2))
    else:
        print(format_report(limits, budget, split, title, explicit))
    return 0
