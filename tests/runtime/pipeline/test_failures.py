"""How a run ends when something other than a step's own check stops it: a slice column the data
lacks (refused at the data step, before training), an unexpected error (an OSError, a bug) or a
SIGTERM. Whatever ends it, the run is recorded ``failed`` with the reason, never left
``running``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.runtime.pipeline.conftest import RunCli, Workspace


def test_a_slice_column_missing_from_the_data_fails_the_data_step(
    workspace: Workspace, cli: RunCli
) -> None:
    path = workspace.pipeline()
    path.write_text(path.read_text().replace('slice_by = ["size"]', 'slice_by = ["region"]'))
    code, _, err = cli("pipeline", "run", path)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "failed at data" in err and "'region'" in err and "slice_by" in err
    assert workspace.calls_made() == []  # train never ran
    (run,) = workspace.runs()
    assert run.outcome == "failed" and run.failed_step == "data" and "'region'" in run.reason


def test_a_slice_column_missing_from_the_holdout_file_fails_the_data_step(
    workspace: Workspace, cli: RunCli
) -> None:
    frame = pd.read_parquet(workspace.data)
    frame.drop(columns=["size"]).head(100).to_parquet(workspace.root / "holdout.parquet")
    path = workspace.pipeline()
    holdout = 'label = "target"\nholdout = "holdout.parquet"'
    path.write_text(path.read_text().replace('label = "target"', holdout))
    code, _, err = cli("pipeline", "run", path)
    assert code == 1 and "Traceback" not in err, err
    assert "failed at data: holdout" in err and "'size'" in err
    assert workspace.calls_made() == []
    assert workspace.runs()[0].outcome == "failed"


def test_an_unexpected_error_is_recorded_and_printed_as_one_line(
    workspace: Workspace, cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgewise.runtime.pipeline import runner

    def disk_full(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "_evaluate", disk_full)
    code, _, err = cli("pipeline", "run", workspace.pipeline())
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err
    (run,) = workspace.runs()
    assert run.outcome == "failed" and run.failed_step == "evaluate"
    assert "OSError" in run.reason and "No space left on device" in run.reason
    assert run.finished_at
    assert {s["name"]: s["status"] for s in run.steps}["register"] == "not_run"


def test_a_bug_is_recorded_before_it_propagates(
    workspace: Workspace, cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgewise.runtime.pipeline import runner

    def bug(*args: object, **kwargs: object) -> object:
        raise KeyError("nosuch")

    monkeypatch.setattr(runner, "_evaluate", bug)
    with pytest.raises(KeyError):
        cli("pipeline", "run", workspace.pipeline())
    (run,) = workspace.runs()
    assert run.outcome == "failed" and run.reason == "KeyError: 'nosuch'"


def test_sigterm_during_a_run_records_it_failed(workspace: Workspace, tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('x'); time.sleep(120)"
    path = workspace.pipeline()
    text = path.read_text()
    start, end = text.index("command = ["), text.index("env = ")
    path.write_text(
        text[:start]
        + f"command = [{sys.executable!r}, '-c', {script!r}, {str(started)!r}]\n"
        + text[end:]
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "run", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not started.exists():  # the train command is running
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    (run,) = workspace.runs()
    assert run.outcome == "failed" and run.failed_step == "train" and run.reason == "terminated"


def test_a_failed_run_with_json_prints_its_record(workspace: Workspace, cli: RunCli) -> None:
    code, out, err = cli("pipeline", "run", workspace.pipeline(args=("--fail",)), "--json")
    assert code == 1 and err.count("\n") == 1 and "failed at train" in err, err
    record = json.loads(out)
    assert record["outcome"] == "failed" and record["failed_step"] == "train"
    assert record["run_id"] == workspace.runs()[0].run_id
