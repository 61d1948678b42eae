"""``edgewise pipeline run|runs|show|reproduce|trigger`` (registered by
:func:`edgewise.runtime.cli.main.build_parser`). Reference: docs/pipeline.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.runtime.cli.argtypes import positive_int, seconds
from edgewise.runtime.cli.verdict import errors_exit_2
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.pipeline.trigger import ALERT_KINDS

if TYPE_CHECKING:
    from edgewise.runtime.pipeline.records import RunRecord
    from edgewise.runtime.store.uri import StoreURI

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_pipeline"]

EXIT_DIFFERS = 1
EXIT_FAILED = 1
ALERT_FIELDS = ("kind", "model", "version", "window", "time", "rows")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="URI",
        help="the metadata store (sqlite:///path, mlflow://host:port; default: the pipeline "
        "file's store, else the embedded ~/.edgewise/store.db)",
    )


def add_pipeline(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run, list, show and reproduce training pipeline runs",
        description="The automated run: data -> train (your command) -> convert -> evaluate "
        "(sliced) -> gate against what the alias serves now -> register with lineage -> move "
        "the alias. Every run is recorded in the metadata store (SQLite or MLflow) with its code "
        "version, arguments, environment, data fingerprint, step timings, metrics and outcome.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    run = actions.add_parser(
        "run",
        help="run a pipeline file",
        description="Run PIPELINE.toml. Steps whose inputs are unchanged are skipped; a failed "
        "step stops the run (recorded), and nothing is registered or moved. Exit 0 when the run "
        "succeeded, 1 when it failed.",
    )
    run.add_argument("pipeline", type=Path, help="the pipeline file (TOML)")
    _store_args(run)
    run.add_argument(
        "--no-cache", action="store_true", help="run every step (their outputs refresh the cache)"
    )
    run.add_argument(
        "--json", action="store_true",
        help="print the run's record as JSON (a failed run's too; its error goes to stderr)",
    )  # fmt: skip
    run.add_argument("--trigger-folder", type=Path, help=argparse.SUPPRESS)
    run.add_argument("--trigger-alert", help=argparse.SUPPRESS)
    run.set_defaults(handler=_cmd_run)

    runs = actions.add_parser(
        "runs", help="list recorded runs", description="List recorded runs, newest first."
    )
    _store_args(runs)
    runs.add_argument("--pipeline", type=Path, help="take the store from this pipeline file")
    runs.add_argument("--model", help="only this model's runs")
    runs.add_argument(
        "--limit", type=positive_int, default=20, help="at most this many (default 20)"
    )
    runs.add_argument("--json", action="store_true", help="JSON lines, one record each")
    runs.set_defaults(handler=_cmd_runs)

    show = actions.add_parser("show", help="show one recorded run")
    show.add_argument("run", help="the run id")
    _store_args(show)
    show.add_argument("--pipeline", type=Path, help="take the store from this pipeline file")
    show.add_argument("--json", action="store_true", help="the whole record as JSON")
    show.set_defaults(handler=_cmd_show)

    rep = actions.add_parser(
        "reproduce",
        help="rerun a recorded run and compare",
        description="Rerun RUN with its recorded code version, arguments and data (no cache, "
        "nothing registered or moved) and compare the trained model, the ONNX model (sha256) "
        "and every metric. Refused when the training code or the data no longer match the "
        "record. Exit 0 when identical, 1 when something differs (listed), 2 when it could "
        "not be compared (refused, or the rerun failed).",
    )
    rep.add_argument("run", help="the run id")
    _store_args(rep)
    rep.add_argument("--pipeline", type=Path, help="take the store from this pipeline file")
    rep.add_argument(
        "--data", type=Path, help="the run's data at another path (its fingerprint is checked)"
    )
    rep.add_argument("--json", action="store_true", help="print the reproduction's record")
    rep.set_defaults(handler=_cmd_reproduce)

    trig = actions.add_parser(
        "trigger",
        help="start a run from an alert or a schedule (cooldown, one at a time)",
        description="Start a run of PIPELINE.toml unless one is running or the last one "
        "started less than --cooldown seconds ago. As serve's alert command (`serve "
        "--alert-command 'edgewise pipeline trigger PIPELINE.toml'`) it reads the alert (JSON) "
        "on standard input and starts the run detached; from a schedule, use --foreground. "
        "Prints the decision: start, running, cooldown or ignored (exit 0 for each).",
    )
    trig.add_argument("pipeline", type=Path, help="the pipeline file (TOML)")
    _store_args(trig)
    trig.add_argument(
        "--cooldown", type=seconds, default=900.0,
        help="seconds after a run starts before another may start (default 900)",
    )  # fmt: skip
    trig.add_argument(
        "--stale-after", type=seconds, default=6 * 3600.0,
        help="a run lock older than this many seconds is stale (default 21600)",
    )  # fmt: skip
    trig.add_argument(
        "--on", action="append", default=[], metavar="KIND", choices=ALERT_KINDS,
        help=f"alert kinds that start a run ({', '.join(ALERT_KINDS)}; repeatable; default: "
        "any)",
    )  # fmt: skip
    trig.add_argument(
        "--state-dir", type=Path, help="lock and cooldown state (default: WORKDIR/trigger)"
    )
    trig.add_argument(
        "--foreground", action="store_true",
        help="run in this process and wait (schedules); no alert is read",
    )  # fmt: skip
    trig.set_defaults(handler=_cmd_trigger)


# ---- output ------------------------------------------------------------------------------------


def _step_line(step: dict[str, Any]) -> str:
    extra = step.get("detail") or ""
    if step.get("command_seconds") is not None:
        extra = f"your command {step['command_seconds']:.2f} s"
    return f"  {step['name']:<9} {step['status']:<8} {step.get('seconds', 0.0):8.3f} s  {extra}"


def _print_record(record: RunRecord) -> None:
    print(f"run {record.run_id}: {record.outcome} ({record.kind}, model {record.model})")
    print(f"  started {record.started_at}, finished {record.finished_at or '-'}")
    code = record.code
    commit = str(code.get("commit", "unknown"))
    changes = str(code.get("diff_sha256", ""))[:12]
    if commit == "unknown":
        where = f"not in git, files sha256 {changes}"
    else:
        where = commit + (f" with uncommitted changes {changes}" if code.get("dirty") else "")
    print(f"  code {code.get('folder', '')}: {where}")
    if record.data:
        print(
            f"  data {record.data.get('path')} {str(record.data.get('fingerprint', ''))[:19]} "
            f"({record.data.get('rows')} rows: {record.data.get('train_rows')} train, "
            f"{record.data.get('holdout_rows')} holdout)"
        )
    print(f"  command {' '.join(record.arguments.get('train.command', []))}")
    for step in record.steps:
        print(_step_line(step))
    if record.metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(record.metrics.items()))
        print(f"  metrics {shown}")
    if record.artifacts.get("onnx_sha256"):
        print(f"  model sha256 {record.artifacts['onnx_sha256']}")
    if record.gate:
        print(f"  {record.gate.get('summary')}")
    if record.registered.get("version") is not None:
        alias = record.registered.get("alias")
        moved = f", {alias} -> version {record.registered['version']}" if alias else ""
        print(f"  registered {record.model} version {record.registered['version']}{moved}")
    if record.failed_step:
        print(f"  failed at {record.failed_step}: {record.reason}")
    if record.reproduces:
        print(f"  reproduces {record.reproduces}")
        for line in record.comparison.get("differences", []):
            print(f"  differs: {line}")


# ---- verbs -------------------------------------------------------------------------------------


def _credentials(uri: StoreURI) -> StoreURI:
    """MLflow credentials from ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` when the URI has none."""
    return uri.with_credentials(
        os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    )


def _reader_store(args: argparse.Namespace) -> StoreURI:
    from edgewise.runtime.pipeline.runner import pipeline_store
    from edgewise.runtime.pipeline.spec import load_spec
    from edgewise.runtime.store.uri import parse_store_uri

    if getattr(args, "pipeline", None) is not None and not args.store:
        return _credentials(pipeline_store(load_spec(args.pipeline), None))
    return _credentials(parse_store_uri(args.store))


def _cmd_run(args: argparse.Namespace) -> int:
    from edgewise.runtime.pipeline.runner import PipelineFailed, pipeline_store, run_pipeline
    from edgewise.runtime.pipeline.spec import load_spec

    trigger: dict[str, Any] = {"by": "cli"}
    if args.trigger_folder is not None:
        trigger = {"by": "trigger", "alert": json.loads(args.trigger_alert or "null")}
    try:
        spec = load_spec(args.pipeline)
        uri = _credentials(pipeline_store(spec, args.store))
        record = run_pipeline(spec, store=uri, trigger=trigger, use_cache=not args.no_cache)
    except PipelineFailed as exc:
        if not args.json:
            raise
        print(json.dumps(exc.record.to_json(), sort_keys=True))  # the failed run's record
        print(f"edgewise pipeline: error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if args.trigger_folder is not None:
            from edgewise.runtime.pipeline.trigger import Trigger, TriggerConfig

            Trigger(args.trigger_folder, TriggerConfig()).release(os.getpid())
    if args.json:
        print(json.dumps(record.to_json(), sort_keys=True))
    else:
        _print_record(record)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from edgewise.runtime.pipeline.records import open_run_log

    log = open_run_log(_reader_store(args), create=False)
    try:
        records = log.list_runs(args.model, limit=args.limit)
    finally:
        log.close()
    if args.json:
        for record in records:
            print(json.dumps(record.to_json(), sort_keys=True))
        return 0
    if not records:
        print("no pipeline runs recorded")
        return 0
    print(f"{'RUN':<26} {'MODEL':<20} {'KIND':<9} {'OUTCOME':<10} {'SECONDS':>8}  DETAIL")
    for r in records:
        detail = (
            f"failed at {r.failed_step}: {r.reason}"[:80]
            if r.failed_step
            else (f"version {r.registered.get('version')}" if r.registered else r.reproduces)
        )
        print(
            f"{r.run_id:<26} {r.model:<20} {r.kind:<9} {r.outcome:<10} {r.seconds:8.2f}  {detail}"
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from edgewise.runtime.pipeline.records import open_run_log

    log = open_run_log(_reader_store(args), create=False)
    try:
        record = log.get_run(args.run)
    finally:
        log.close()
    if args.json:
        print(json.dumps(record.to_json(), sort_keys=True, indent=2))
    else:
        _print_record(record)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    return errors_exit_2(args, _reproduce)  # exit 1 is the verdict: differs


def _reproduce(args: argparse.Namespace) -> int:
    from edgewise.runtime.pipeline.reproduce import reproduce

    record = reproduce(args.run, _reader_store(args), data=args.data)
    if args.json:
        print(json.dumps(record.to_json(), sort_keys=True))
    elif record.outcome == "identical":
        print(
            f"reproduction {record.run_id} of {args.run}: identical (model sha256 "
            f"{record.artifacts.get('onnx_sha256')}, {len(record.metrics)} metrics and "
            f"{len(record.slices)} slices equal)"
        )
    else:
        print(f"reproduction {record.run_id} of {args.run}: differs")
        for line in record.comparison.get("differences", []):
            print(f"  {line}")
    return 0 if record.outcome == "identical" else EXIT_DIFFERS


def _child_store(uri: StoreURI) -> str:
    """The resolved store as the detached run's ``--store`` (an absolute database path; an
    MLflow URL without its credentials)."""
    if uri.kind == "sqlite" and uri.path is not None:
        return f"sqlite:///{uri.path.absolute()}"
    return uri.base_url


def _read_alert() -> dict[str, Any] | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    text = sys.stdin.read()
    if not text.strip():
        return None
    try:
        alert = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"alert on standard input: not JSON: {exc}") from None
    if not isinstance(alert, dict):
        raise InvalidInput("alert on standard input: expected a JSON object")
    return alert


def _cmd_trigger(args: argparse.Namespace) -> int:
    from edgewise.runtime.pipeline.runner import pipeline_store, run_pipeline
    from edgewise.runtime.pipeline.spec import load_spec
    from edgewise.runtime.pipeline.trigger import Decision, Trigger, TriggerConfig

    spec = load_spec(args.pipeline)  # a bad file is refused before any state changes
    uri = _credentials(pipeline_store(spec, args.store))  # and so is a bad --store
    alert = None if args.foreground else _read_alert()
    config = TriggerConfig(
        cooldown_s=args.cooldown, stale_after_s=args.stale_after, kinds=tuple(args.on),
        model=spec.model,
    )  # fmt: skip
    folder = args.state_dir or spec.workdir / "trigger"
    trigger = Trigger(folder, config)
    me = os.getpid()
    decision = trigger.fire(alert, me)
    for note in trigger.notes:
        print(f"trigger: {note}")
    if decision is not Decision.START:
        print(f"trigger: {decision.value}: no run started")
        return 0
    if args.foreground:
        print("trigger: start: running in the foreground")
        try:
            record = run_pipeline(spec, store=uri, trigger={"by": "schedule"})
        finally:
            trigger.release(me)
        _print_record(record)
        return 0
    # what the run records of the alert: which one, not its details (a drift alert lists every
    # drifting feature's scores)
    summary = None if alert is None else {k: alert[k] for k in ALERT_FIELDS if k in alert}
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "run", str(args.pipeline),
        "--trigger-folder", str(folder), "--trigger-alert", json.dumps(summary, default=str),
        "--store", _child_store(uri),
    ]  # fmt: skip
    env = dict(os.environ)
    if uri.username is not None:  # credentials travel in the environment, never in argv
        env.update(
            MLFLOW_TRACKING_USERNAME=uri.username, MLFLOW_TRACKING_PASSWORD=uri.password or ""
        )
    try:
        with (folder / "last-run.log").open("wb") as log:
            child = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the alert hook's timeout
            )
    except OSError:
        trigger.release(me)
        raise
    trigger.hand_over(me, child.pid)
    print(f"trigger: start: run started (pid {child.pid}, log {folder / 'last-run.log'})")
    return 0
