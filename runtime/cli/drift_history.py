"""``edgewise drift-history MODEL``: the recorded closed windows of a model, as a table, JSON or
an HTML time series. Reads the history folder only (no server needed); never creates it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgewise.runtime.errors import InvalidInput

__all__ = ["add_drift_history", "history_folder"]


def history_folder(repo: Path, override: Path | None) -> Path:
    """Where the history is read: ``--history-dir``, else ``EDGEWISE_DRIFT_HISTORY`` (as the
    server writes it), else ``REPO/.edgewise-history``."""
    from edgewise.runtime.serving.drift_history import DEFAULT_DIR, ENV_DIR

    if override is not None:
        return override
    configured = os.environ.get(ENV_DIR, "").strip()
    if configured.lower() == "off":
        raise InvalidInput(f"{ENV_DIR}=off: the drift history is turned off; give --history-dir")
    return Path(configured) if configured else repo / DEFAULT_DIR


def add_drift_history(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "drift-history",
        help="the recorded drift reports of a model's closed windows",
        description="Print (or render as an HTML time series) each closed window's drift report "
        "that the server recorded, oldest first, from every server process.",
    )
    p.add_argument("model", help="model name")
    p.add_argument("--version", default="", help="one version (default: every version recorded)")
    p.add_argument(
        "--repo",
        type=Path,
        default=Path("model-repo"),
        help="the server's model repository (default model-repo): the history is in "
        "REPO/.edgewise-history unless EDGEWISE_DRIFT_HISTORY names another folder",
    )
    p.add_argument("--history-dir", type=Path, help="read this history folder instead")
    p.add_argument("--last", type=int, default=0, help="only the last N windows (default all)")
    p.add_argument("--html", type=Path, help="also write the HTML time series here")
    p.add_argument("--json", action="store_true", help="print the windows as JSON lines")
    p.set_defaults(handler=_cmd_drift_history)


def _cmd_drift_history(args: argparse.Namespace) -> int:
    from edgewise.runtime._fs import write_text_atomic
    from edgewise.runtime.evaluation.drift_history_report import format_history, render_history_html
    from edgewise.runtime.serving.drift_history import read_history, report_to_json

    if args.last < 0:
        raise InvalidInput(f"--last must be at least 0, not {args.last}")
    if args.html is not None and (args.html.is_dir() or not args.html.parent.is_dir()):
        raise InvalidInput(f"--html {args.html}: not a file in an existing folder")
    root = history_folder(args.repo, args.history_dir)
    if not root.is_dir():
        raise InvalidInput(f"no drift history at {root} (the folder does not exist)")
    found = read_history(root, args.model, args.version or None)
    entries = found.entries[-args.last :] if args.last else found.entries
    if args.html is not None:
        write_text_atomic(args.html, render_history_html(args.model, entries))
    if args.json:
        for entry in entries:
            line = {
                "writer": entry.writer,
                "recorded_ns": entry.recorded_ns,
                "report": report_to_json(entry.report),
            }
            print(json.dumps(line, allow_nan=False))
    elif entries:
        print(format_history(entries))
    else:
        which = f" version {args.version}" if args.version else ""
        print(f"no closed window of model {args.model}{which} is recorded in {root}")
    for path, why in found.skipped.items():
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0
