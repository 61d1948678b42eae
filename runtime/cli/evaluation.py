"""``edgewise evaluate`` and ``edgewise gate``: argv -> :mod:`edgewise.runtime.evaluation.evaluate`
and
:mod:`edgewise.runtime.evaluation.gate`.

Exit codes: ``evaluate``: 0 success, 1 an error, 2 bad usage. ``gate``: 0 the gate passed, 1 it
failed (its verdict is printed), 2 an error or bad usage (it could not judge). Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from edgewise.runtime.cli.verdict import errors_exit_2
from edgewise.runtime.errors import InvalidInput

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_evaluate", "add_gate"]

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class _UsageError(Exception):
    """Arguments that parse but do not make sense together (exit 2)."""


def _common(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    p.add_argument("--repo", type=Path, required=True, help="model repository folder")
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME[:VERSION]",
        help="the candidate (default version: the one the server serves by default: "
        "config.json's default_version, else the highest its version policy selects)",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=data_required,
        help="labelled data (.parquet, .csv or .npy)"
        + ("" if data_required else " (default: the spec's [data] path)"),
    )
    p.add_argument(
        "--label",
        required=data_required,
        help="the label column" + ("" if data_required else " (default: the spec's)"),
    )
    p.add_argument(
        "--slice-by",
        action="extend",
        nargs="+",
        default=[],
        metavar="COL",
        help="slice by this column (repeatable; several give crossed slices too)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--baseline",
        metavar="NAME:VERSION",
        help="compare with this version (default: the model's pinned default version if it is "
        "another one, else the highest version below the candidate)",
    )
    group.add_argument("--no-baseline", action="store_true", help="compare with nothing")
    p.add_argument(
        "--json", type=Path, metavar="PATH", help="write the result as JSON ('-': stdout)"
    )
    p.add_argument("--html", type=Path, metavar="PATH", help="write the HTML report")


def add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "evaluate",
        help="quality metrics of a model version on labelled data, overall and per slice",
        description="Run a model version on labelled data and report its metrics (classifiers: "
        "accuracy, precision, recall, F1, ROC AUC, log loss, calibration error; regressors: "
        "MAE, RMSE, R²) overall and per slice, with the difference from a baseline version.",
    )
    _common(p, data_required=True)
    p.add_argument(
        "--min-slice-size",
        type=int,
        default=None,
        help="slices with fewer rows are reported but not judged (default 30)",
    )
    p.add_argument(
        "--numeric-bins",
        type=int,
        default=None,
        help="quantile bins for a numeric slice column with more than 20 values (default 4)",
    )
    p.set_defaults(handler=_cmd_evaluate)


def add_gate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "gate",
        help="judge a candidate version against a promotion gate (exit 0 pass, 1 fail, 2 error)",
        description="Evaluate a candidate version on labelled data and judge it against the "
        "thresholds of a gate specification (TOML or JSON): metrics overall and per slice, "
        "absolute and relative to a baseline, and a latency budget measured on the candidate. "
        "Prints the verdict; exits 0 when the gate passes, 1 when it fails, and 2 when it "
        "cannot judge (bad arguments, a spec, model or data that does not load).",
    )
    p.add_argument("--spec", type=Path, required=True, help="the gate specification file")
    _common(p, data_required=False)
    p.add_argument("--verbose", action="store_true", help="print every check, not only failures")
    p.set_defaults(handler=_cmd_gate)


def _resolve(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The candidate's and the baseline's package folders."""
    from edgewise.runtime.evaluation.evaluate import (
        ModelRef,
        default_baseline_version,
        package_folder,
        resolve_version,
    )

    try:
        candidate = ModelRef.parse(args.model)
        baseline = ModelRef.parse(args.baseline) if args.baseline else None
    except InvalidInput as exc:
        raise _UsageError(exc.message) from None
    if baseline is not None and baseline.version is None:
        raise _UsageError(f"--baseline {args.baseline!r}: give NAME:VERSION")
    if not args.repo.is_dir():
        raise InvalidInput(f"model repository {args.repo} is not a folder")
    version = resolve_version(args.repo, candidate)
    folder = package_folder(args.repo, candidate.name, version)
    if args.no_baseline:
        return folder, None
    if baseline is not None:
        base_version = resolve_version(args.repo, baseline)
        if (baseline.name, base_version) == (candidate.name, version):
            raise _UsageError("the baseline is the candidate itself")
        return folder, package_folder(args.repo, baseline.name, base_version)
    default = default_baseline_version(args.repo, candidate.name, version)
    return folder, None if default is None else package_folder(args.repo, candidate.name, default)


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _json_to_stdout(args: argparse.Namespace) -> bool:
    return args.json is not None and str(args.json) == "-"


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written, before any work is done."""
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path is None or (flag == "--json" and _json_to_stdout(args)):
            continue
        if path.is_dir():
            raise InvalidInput(f"{flag} {path}: is a folder")
        if not path.parent.is_dir():
            raise InvalidInput(f"{flag} {path}: folder {path.parent} does not exist")


def _write_outputs(args: argparse.Namespace, json_text: str | None, html: str | None) -> None:
    """Write each rendered output atomically (old file or new, never a part); then JSON to
    stdout if asked for. Rendering is done before anything is written."""
    from edgewise.runtime._fs import write_text_atomic

    files = [(args.json, json_text), (args.html, html)]
    if _json_to_stdout(args):
        files = files[1:]
    for path, text in files:
        if path is None or text is None:
            continue
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot write: {exc.strerror or exc}") from None
    if json_text is not None and _json_to_stdout(args):
        sys.stdout.write(json_text)


def _run(args: argparse.Namespace, body: Any) -> int:
    try:
        return int(body(args))
    except _UsageError as exc:
        print(f"edgewise {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _cmd_evaluate(args: argparse.Namespace) -> int:
    return _run(args, _evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from edgewise.runtime.evaluation.evaluate import (
        DEFAULT_MIN_SLICE_SIZE,
        DEFAULT_NUMERIC_BINS,
        data_info,
        evaluate_models,
        format_summary,
        load_package,
    )
    from edgewise.runtime.evaluation.report import render_html
    from edgewise.runtime.package.tabular import load_table

    min_size = DEFAULT_MIN_SLICE_SIZE if args.min_slice_size is None else args.min_slice_size
    bins = DEFAULT_NUMERIC_BINS if args.numeric_bins is None else args.numeric_bins
    if min_size < 1:
        raise _UsageError("--min-slice-size must be at least 1")
    if bins < 2:
        raise _UsageError("--numeric-bins must be at least 2")
    _check_outputs(args)
    candidate, baseline = _resolve(args)
    frame = load_table(args.data)
    evaluation = evaluate_models(
        load_package(candidate),
        frame,
        args.label,
        baseline=None if baseline is None else load_package(baseline),
        slice_by=args.slice_by,
        min_slice_size=min_size,
        numeric_bins=bins,
        data_info=data_info(args.data),
    )
    json_text = None if args.json is None else _json_text(evaluation.to_json())
    html = None if args.html is None else render_html(evaluation)
    _write_outputs(args, json_text, html)
    if not _json_to_stdout(args):
        print(format_summary(evaluation))
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    return errors_exit_2(args, lambda a: _run(a, _gate))  # exit 1 is the verdict


def _gate(args: argparse.Namespace) -> int:
    from edgewise.runtime.evaluation.gate import GateSpec, evaluate_gate
    from edgewise.runtime.evaluation.report import render_html

    spec = GateSpec.load(args.spec)
    if args.data is None and spec.data_path is None:
        raise _UsageError("no labelled data: give --data, or [data] path in the gate spec")
    if args.label is None and spec.label is None:
        raise _UsageError("no label column: give --label, or [data] label in the gate spec")
    _check_outputs(args)
    candidate, baseline = _resolve(args)
    verdict = evaluate_gate(
        spec,
        candidate,
        baseline=baseline,
        data=args.data,
        label=args.label,
        slice_by=args.slice_by or None,
    )
    json_text = None if args.json is None else _json_text(verdict.to_json(include_evaluation=True))
    html = None
    if args.html is not None and verdict.evaluation is not None:
        html = render_html(verdict.evaluation, verdict)
    _write_outputs(args, json_text, html)
    if not _json_to_stdout(args):
        print(verdict.format(verbose=args.verbose))
    return 0 if verdict.passed else EXIT_FAILED
