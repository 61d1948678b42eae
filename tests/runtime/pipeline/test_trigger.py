"""The trigger: a stateful property test of its policy against a model (alerts, cooldown, one
run at a time, crashed and stale runs), the lock's O_EXCL creation, and the CLI from a schedule
and from an alert."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgewise.runtime.pipeline.records import SqliteRunLog
from edgewise.runtime.pipeline.trigger import Decision, Trigger, TriggerConfig
from tests.runtime.pipeline.conftest import RunCli, Workspace

COOLDOWN = 100.0
STALE = 1000.0
KINDS = ("data_drift", "quality_drift")


class TriggerMachine(RuleBasedStateMachine):
    """The file-backed trigger against the policy written out plainly."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="trigger-"))
        self.now = 1_000_000.0
        self.alive: set[int] = set()
        self.trigger = Trigger(
            self.folder,
            TriggerConfig(cooldown_s=COOLDOWN, stale_after_s=STALE, kinds=KINDS, model="m"),
            clock=lambda: self.now,
            alive=lambda pid: pid in self.alive,
        )
        self.next_pid = 100
        self.holder: int | None = None  # the pid the lock names (alive or crashed)
        self.holder_since = 0.0
        self.last_start: float | None = None
        self.starts: list[float] = []
        self.running: list[tuple[int, float]] = []  # (pid, started) of live runs

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _expected(self, kind: str, model: str) -> Decision:
        if kind not in KINDS or model != "m":
            return Decision.IGNORED
        live = (
            self.holder is not None
            and self.holder in self.alive
            and self.now - self.holder_since <= STALE
        )
        if live:
            return Decision.RUNNING
        if self.last_start is not None and self.now - self.last_start < COOLDOWN:
            return Decision.COOLDOWN
        return Decision.START

    @rule(
        kind=st.sampled_from([*KINDS, "other"]),
        model=st.sampled_from(["m", "m", "m", "other"]),
    )
    def alert(self, kind: str, model: str) -> None:
        pid = self.next_pid
        self.next_pid += 1
        expected = self._expected(kind, model)
        got = self.trigger.fire({"kind": kind, "model": model}, pid)
        assert got is expected, (got, expected)
        if got is Decision.START:
            self.alive.add(pid)
            self.holder, self.holder_since = pid, self.now
            self.last_start = self.now
            self.starts.append(self.now)
            self.running = [(p, t) for p, t in self.running if p in self.alive]
            self.running.append((pid, self.now))

    @rule()
    def schedule(self) -> None:
        self.alert("data_drift", "m")  # a scheduled start follows the same policy

    @precondition(lambda self: self.holder is not None and self.holder in self.alive)
    @rule()
    def finish(self) -> None:
        assert self.holder is not None
        assert self.trigger.release(self.holder)
        self.alive.discard(self.holder)
        self.holder = None

    @precondition(lambda self: self.holder is not None and self.holder in self.alive)
    @rule()
    def crash(self) -> None:
        assert self.holder is not None
        self.alive.discard(self.holder)  # killed: its lock stays behind, stale

    @precondition(lambda self: self.holder is not None and self.holder in self.alive)
    @rule()
    def hand_over(self) -> None:
        assert self.holder is not None
        child = self.next_pid
        self.next_pid += 1
        assert self.trigger.hand_over(self.holder, child)
        assert not self.trigger.hand_over(self.holder, child + 1)  # no longer its lock
        self.alive.discard(self.holder)
        self.alive.add(child)
        self.running = [(child if p == self.holder else p, t) for p, t in self.running]
        self.holder = child

    @rule(seconds=st.floats(min_value=0, max_value=3 * COOLDOWN))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def starts_are_a_cooldown_apart(self) -> None:
        for earlier, later in zip(self.starts, self.starts[1:], strict=False):
            assert later - earlier >= COOLDOWN

    @invariant()
    def at_most_one_run_at_a_time(self) -> None:
        # live runs younger than the stale age: at most one
        young = [p for p, t in self.running if p in self.alive and self.now - t <= STALE]
        assert len(young) <= 1

    @invariant()
    def the_state_file_counts_the_starts(self) -> None:
        state = self.trigger.read_state()
        assert state.started == len(self.starts)
        assert state.last_started == self.last_start


TestTriggerMachine = TriggerMachine.TestCase
TestTriggerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_the_lock_is_created_exclusively(tmp_path: Path) -> None:
    trigger = Trigger(tmp_path, TriggerConfig(cooldown_s=0))
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
    assert trigger.fire(None, 1) is Decision.RUNNING  # a live holder: declined
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    # a lock of a process that is gone is stale: removed and retaken, and counted
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 2**22 + 12345, "started": time.time()}))
    assert trigger.fire(None, os.getpid()) is Decision.START
    assert trigger.notes and "stale" in trigger.notes[0]
    assert trigger.read_state().stale_locks_removed == 1
    # garbage in the lock (no writer leaves one half-written): nobody owns it, it is stale
    trigger.release(os.getpid())
    (tmp_path / "run.lock").write_text("{half")
    assert trigger.fire(None, 7) is Decision.START
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == 7
    # the lock is taken with O_EXCL: one that appears outside the guard is respected
    trigger.release(7)
    real_create = trigger._create_lock

    def racing_create(pid: int, now: float) -> None:
        (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "started": now}))
        real_create(pid, now)

    trigger._create_lock = racing_create  # type: ignore[method-assign]
    assert trigger.fire(None, 8) is Decision.RUNNING
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_schedule_runs_in_the_foreground_then_cools_down(workspace: Workspace, cli: RunCli) -> None:
    pipeline = workspace.pipeline()
    code, out, err = cli("pipeline", "trigger", pipeline, "--foreground", "--cooldown", "3600")
    assert code == 0, err
    assert "start" in out and "succeeded" in out
    code, out, _ = cli("pipeline", "trigger", pipeline, "--foreground", "--cooldown", "3600")
    assert code == 0 and "cooldown: no run started" in out
    assert len(workspace.calls_made()) == 1
    assert not (workspace.root / ".edgewise-pipeline" / "trigger" / "run.lock").exists()


def test_an_alert_starts_one_detached_run(workspace: Workspace) -> None:
    """As serve's alert command: the alert on stdin, the run detached, a flapping alert declined."""
    pipeline = workspace.pipeline()
    command = [sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "trigger",
               str(pipeline), "--on", "data_drift"]  # fmt: skip
    alert = json.dumps({"kind": "data_drift", "model": "cancer", "time": time.time()})

    def trigger(alert: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, input=alert, capture_output=True, text=True, timeout=60, check=False
        )

    first = trigger(alert)
    assert first.returncode == 0, first.stderr
    assert "run started" in first.stdout
    again = trigger(alert)
    assert again.returncode == 0
    assert "running: no run started" in again.stdout or "cooldown: no run started" in again.stdout
    other = json.dumps({"kind": "quality_drift", "model": "cancer"})
    ignored = trigger(other)
    assert "ignored: no run started" in ignored.stdout
    lock = workspace.root / ".edgewise-pipeline" / "trigger" / "run.lock"
    deadline = time.monotonic() + 120
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the detached run removes its lock when it ends
    assert not lock.exists(), (
        workspace.root / ".edgewise-pipeline/trigger/last-run.log"
    ).read_text()
    log = SqliteRunLog(workspace.store, create=False)
    (run,) = log.list_runs()
    log.close()
    assert run.outcome == "succeeded"
    assert run.trigger["by"] == "trigger" and run.trigger["alert"]["kind"] == "data_drift"
    assert len(workspace.calls_made()) == 1


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_config_refuses_bad_numbers(value: float) -> None:
    with pytest.raises(Exception, match="cooldown_s"):
        TriggerConfig(cooldown_s=value)


@pytest.mark.parametrize("foreground", [True, False])
def test_a_bad_store_is_refused_before_the_trigger_fires(
    workspace: Workspace, cli: RunCli, monkeypatch: pytest.MonkeyPatch, foreground: bool
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"kind": "data_drift"})))
    pipeline = workspace.pipeline()
    mode = ["--foreground"] if foreground else []
    code, out, err = cli("pipeline", "trigger", pipeline, "--store", "bogus://x", *mode)
    assert code == 1 and err.count("\n") == 1 and "unknown scheme 'bogus'" in err, err
    assert "start" not in out
    folder = workspace.root / ".edgewise-pipeline" / "trigger"
    assert not (folder / "run.lock").exists() and not (folder / "state.json").exists()
    assert not (folder / "last-run.log").exists()  # no child started


def test_the_detached_run_gets_the_resolved_store(
    workspace: Workspace, cli: RunCli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--store relative to where the trigger ran, and MLflow credentials kept out of argv."""
    import io

    from edgewise.runtime.cli import pipeline as cli_pipeline

    started: list[tuple[list[str], dict[str, str]]] = []

    class Child:
        pid = os.getpid()

    def popen(command: list[str], **kwargs: object) -> Child:
        started.append((command, dict(kwargs["env"])))  # type: ignore[call-overload]
        return Child()

    monkeypatch.setattr(cli_pipeline.subprocess, "Popen", popen)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("{}"))
    code, _, err = cli("pipeline", "trigger", workspace.pipeline(), "--store", "elsewhere.db")
    assert code == 0, err
    command, _ = started[-1]
    assert command[command.index("--store") + 1] == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    (workspace.root / ".edgewise-pipeline" / "trigger" / "run.lock").unlink()
    (workspace.root / ".edgewise-pipeline" / "trigger" / "state.json").unlink()
    monkeypatch.setattr(sys, "stdin", io.StringIO("{}"))
    code, _, err = cli(
        "pipeline", "trigger", workspace.pipeline(), "--store", "http://me:secret@127.0.0.1:5000"
    )
    assert code == 0, err
    command, env = started[-1]
    assert command[command.index("--store") + 1] == "http://127.0.0.1:5000"
    assert "secret" not in " ".join(command)
    assert env["MLFLOW_TRACKING_USERNAME"] == "me" and env["MLFLOW_TRACKING_PASSWORD"] == "secret"


def test_on_takes_only_the_kinds_serve_emits(workspace: Workspace, cli: RunCli) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli("pipeline", "trigger", workspace.pipeline(), "--on", "data_drif", "--foreground")
    assert exit_.value.code == 2
    assert not (workspace.root / ".edgewise-pipeline" / "trigger").exists()
    with pytest.raises(Exception, match="unknown alert kind 'data_drif'"):
        TriggerConfig(kinds=("data_drift", "data_drif"))


def test_the_kinds_are_those_serve_emits() -> None:
    """The trigger's list against the alerts serve's monitors fire (their source, read here)."""
    import inspect
    import re

    from edgewise.runtime.pipeline.trigger import ALERT_KINDS
    from edgewise.runtime.serving import monitor, quality

    fired = set()
    for module in (monitor, quality):
        fired |= set(re.findall(r"_on_alert\(\s*\"(\w+)\"", inspect.getsource(module)))
    assert fired == set(ALERT_KINDS)
