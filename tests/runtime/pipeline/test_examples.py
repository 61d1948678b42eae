"""The examples in docs/examples/pipeline/ stay true: the pipeline file parses, and the schedules
(Kubernetes CronJob, systemd service) call arguments the CLI accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import yaml

from edgewise.runtime.cli.main import build_parser
from edgewise.runtime.pipeline.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples" / "pipeline"


def test_the_example_pipeline_parses() -> None:
    spec = load_spec(EXAMPLES / "pipeline.toml")
    assert spec.model == "breast-cancer" and spec.register.alias == "production"
    assert spec.gate is not None and spec.evaluate.slice_by == ("size",)
    assert spec.data.path == EXAMPLES / "data.parquet"


def test_the_cronjob_runs_the_trigger_in_the_foreground() -> None:
    job = yaml.safe_load((EXAMPLES / "pipeline-cronjob.k8s.yaml").read_text())
    assert job["kind"] == "CronJob" and job["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "pipeline" and args.action == "trigger" and args.foreground


def test_the_systemd_service_runs_the_trigger_in_the_foreground() -> None:
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(EXAMPLES / "edgewise-pipeline.service")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert Path(argv[0]).name == "edgewise"
    args = build_parser().parse_args(argv[1:])
    assert args.action == "trigger" and args.foreground and args.cooldown == 3600
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(EXAMPLES / "edgewise-pipeline.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
