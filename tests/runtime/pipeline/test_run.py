"""``edgewise pipeline run`` on a real training workspace with the embedded store: lineage, the
run record, skipped steps, and every way a run is refused or fails (nothing registered or
moved)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.pipeline.conftest import FEATURES, RunCli, Workspace, git


def _fingerprint(path: Path) -> str:
    """The data fingerprint, computed here from its definition (index, name, size, sha256)."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    line = f"0\0{path.name}\0{path.stat().st_size}\0{sha}\n"
    return "sha256:" + hashlib.sha256(line.encode()).hexdigest()


def test_a_run_registers_the_model_with_its_lineage_and_records_itself(
    workspace: Workspace, cli: RunCli
) -> None:
    code, out, err = cli("pipeline", "run", workspace.pipeline())
    assert code == 0, err
    assert "succeeded" in out
    store = SqliteStore(workspace.store, create=False)
    try:
        production = store.resolve_alias("cancer", "production")
    finally:
        store.close()
    (record,) = workspace.runs()
    assert record.outcome == "succeeded" and record.kind == "run"
    assert production.version == record.registered["version"] == 1
    # lineage of the version: the run, the code's commit, the data fingerprint, the metrics
    lineage = production.lineage
    assert lineage.params["pipeline.run_id"] == record.run_id
    commit = git(workspace.root, "rev-parse", "HEAD")
    assert lineage.code_version == commit == record.code["commit"]
    assert record.code["dirty"] is False  # data, store, pipeline file and work folder are not code
    assert lineage.data_fingerprint == _fingerprint(workspace.data) == record.data["fingerprint"]
    assert production.model_sha256 == record.artifacts["onnx_sha256"]
    assert record.arguments["train.command"][1:] == ["train.py", "--C", "1.0"]
    assert record.environment["packages"]["scikit-learn"]
    assert [s["name"] for s in record.steps] == [
        "data", "train", "convert", "evaluate", "gate", "register", "alias"
    ]  # fmt: skip
    assert all(s["status"] == "ran" for s in record.steps)
    assert all(s["seconds"] >= 0 for s in record.steps)
    # the metrics are the trained model's on the holdout rows (sklearn as the oracle)
    frame = pd.read_parquet(workspace.data)
    order = np.random.default_rng(0).permutation(len(frame))
    holdout = frame.iloc[np.sort(order[: round(len(frame) * 0.25)])]
    trained = _trained_model(workspace, record.artifacts["model_sha256"])
    predicted = trained.predict(holdout[FEATURES])
    assert record.metrics["accuracy"] == pytest.approx(
        accuracy_score(holdout["target"], predicted), abs=1e-12
    )
    assert record.metrics["roc_auc"] == pytest.approx(
        roc_auc_score(holdout["target"], trained.predict_proba(holdout[FEATURES])[:, 1]), abs=1e-6
    )
    assert {s["key"] for s in record.slices} == {"size=large", "size=small"}
    assert lineage.metrics["accuracy"] == record.metrics["accuracy"]


def _trained_model(workspace: Workspace, sha: str) -> object:
    for path in (workspace.root / ".edgewise-pipeline" / "cache").glob("train-*/model.joblib"):
        if hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            return joblib.load(path)
    raise AssertionError("the trained model is not in the cache")


def test_unchanged_inputs_skip_their_steps(workspace: Workspace, cli: RunCli) -> None:
    pipeline = workspace.pipeline()
    assert cli("pipeline", "run", pipeline)[0] == 0
    assert cli("pipeline", "run", pipeline)[0] == 0
    assert len(workspace.calls_made()) == 1  # the user's command ran once
    second, first = workspace.runs()
    status = {s["name"]: s["status"] for s in second.steps}
    # the baseline moved (production names version 1 now): evaluate judges again
    assert status["evaluate"] == "ran" and status["train"] == status["convert"] == "skipped"
    assert cli("pipeline", "run", pipeline)[0] == 0
    second = workspace.runs()[0]
    status = {s["name"]: s["status"] for s in second.steps}
    assert status == {
        "data": "ran", "train": "skipped", "convert": "skipped", "evaluate": "skipped",
        "gate": "ran", "register": "skipped", "alias": "skipped",
    }  # fmt: skip
    assert second.registered["version"] == first.registered["version"] == 1
    assert second.metrics == first.metrics
    # other arguments: train runs again (and a new model is a new version)
    code, _, err = cli("pipeline", "run", workspace.pipeline(args=("--C", "3.0")))
    assert code == 0, err
    assert len(workspace.calls_made()) == 2
    third = workspace.runs()[0]
    assert {s["name"]: s["status"] for s in third.steps}["train"] == "ran"
    assert third.registered["version"] == 2
    # the gate names the candidate as such, not by its package's number (1, the baseline's)
    summary = third.gate["summary"]
    assert summary.startswith("gate PASSED: cancer candidate against cancer version 1:")
    # an uncommitted change of the training code too
    (workspace.root / "train.py").write_text(
        (workspace.root / "train.py").read_text() + "# tuned\n"
    )
    code, _, err = cli("pipeline", "run", workspace.pipeline(args=("--C", "3.0")))
    assert code == 0, err
    fourth = workspace.runs()[0]
    assert fourth.code["dirty"] is True and fourth.code["diff_sha256"]
    assert {s["name"]: s["status"] for s in fourth.steps}["train"] == "ran"
    assert len(workspace.calls_made()) == 3


def _versions(workspace: Workspace) -> list[int]:
    if not workspace.store.exists():
        return []
    store = SqliteStore(workspace.store, create=False)
    try:
        return [v.version for v in store.list_versions("cancer")]
    except Exception:
        return []
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--fail",), "failed at train: command exited with 3: training blew up"),
        (("--no-model",), "failed at train: command exited 0 but wrote no model"),
    ],
)
def test_a_failed_train_is_recorded_and_moves_nothing(
    workspace: Workspace, cli: RunCli, args: tuple[str, ...], expected: str
) -> None:
    assert cli("pipeline", "run", workspace.pipeline())[0] == 0  # production -> version 1
    code, _, err = cli("pipeline", "run", workspace.pipeline(args=args))
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert expected in err and "nothing registered or moved" in err
    assert _versions(workspace) == [1]
    store = SqliteStore(workspace.store, create=False)
    assert store.resolve_alias("cancer", "production").version == 1
    store.close()
    failed = workspace.runs()[0]
    assert failed.outcome == "failed" and failed.failed_step == "train"
    assert expected.split(": ", 1)[1] in failed.reason
    assert {s["name"]: s["status"] for s in failed.steps}["register"] == "not_run"


def test_a_changed_schema_is_refused(workspace: Workspace, cli: RunCli) -> None:
    assert cli("pipeline", "run", workspace.pipeline())[0] == 0
    frame = pd.read_parquet(workspace.data)
    frame["mean_area"] = frame["mean_area"].round().astype("int64")
    frame.to_parquet(workspace.data, index=False)
    code, _, err = cli("pipeline", "run", workspace.pipeline())
    assert code == 1 and err.count("\n") == 1
    assert "failed at data" in err and "retyped mean_area float64 -> int64" in err
    assert _versions(workspace) == [1]
    assert workspace.calls_made() == ["--C 1.0"]  # train never ran again
    # a missing feature column is one line as well
    frame.drop(columns=["mean_texture"]).to_parquet(workspace.data, index=False)
    code, _, err = cli("pipeline", "run", workspace.pipeline())
    assert code == 1 and "missing feature column(s) mean_texture" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[deploy]\nnow = true\n", "unknown key(s) 'deploy'"),
        ("", "missing step(s) [train]"),
        ("[register.x]\n", "[register]: unknown key(s) 'x'"),
    ],
)
def test_bad_pipeline_files_are_one_line_and_change_nothing(
    workspace: Workspace, cli: RunCli, extra: str, message: str
) -> None:
    path = workspace.pipeline(extra=extra)
    if message.startswith("missing step"):
        text = path.read_text()
        start = text.index("[train]")
        path.write_text(text[:start] + text[text.index("[convert]") :])
    code, _, err = cli("pipeline", "run", path)
    assert code == 1 and err.count("\n") == 1, err
    assert message in err
    assert not workspace.store.exists() and workspace.calls_made() == []


def test_train_step_keys_are_checked(workspace: Workspace, cli: RunCli) -> None:
    path = workspace.pipeline()
    path.write_text(path.read_text().replace("[train]\n", "[train]\ntimeout = 5\n"))
    code, _, err = cli("pipeline", "run", path)
    assert code == 1 and "[train]: unknown key(s) 'timeout'" in err
    path = workspace.pipeline()
    text = path.read_text()
    path.write_text(text[: text.index("[gate]")] + text[text.index("[register]") :])
    code, _, err = cli("pipeline", "run", path)
    assert code == 1 and "alias = 'production' needs a [gate]" in err


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


def test_a_store_that_is_down_stops_the_run_before_any_work(
    workspace: Workspace, cli: RunCli
) -> None:
    path = workspace.pipeline(store=f"http://127.0.0.1:{_dead_port()}")
    code, _, err = cli("pipeline", "run", path)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot connect" in err
    assert workspace.calls_made() == []  # train never ran
    assert not (workspace.root / ".edgewise-pipeline" / "cache").exists()


def test_runs_and_show_read_without_creating_the_store(workspace: Workspace, cli: RunCli) -> None:
    code, _, err = cli("pipeline", "runs", "--store", f"sqlite:///{workspace.store}")
    assert code == 1 and "does not exist" in err
    assert not workspace.store.exists()
    assert cli("pipeline", "run", workspace.pipeline())[0] == 0
    code, out, _ = cli("pipeline", "runs", "--pipeline", workspace.pipeline())
    assert code == 0 and "succeeded" in out
    run_id = workspace.runs()[0].run_id
    code, out, _ = cli("pipeline", "show", run_id, "--store", str(workspace.store), "--json")
    shown = json.loads(out)
    assert shown["run_id"] == run_id and shown["outcome"] == "succeeded"
    code, _, err = cli("pipeline", "show", "20200101T000000Z-00000000", "--store",
                       str(workspace.store))  # fmt: skip
    assert code == 1 and "no pipeline run" in err


def test_a_candidate_worse_than_production_fails_the_gate(
    workspace: Workspace, cli: RunCli
) -> None:
    assert cli("pipeline", "run", workspace.pipeline())[0] == 0
    code, _, err = cli("pipeline", "run", workspace.pipeline(args=("--C", "0.00001")))
    assert code == 1 and err.count("\n") == 1
    assert "failed at gate: gate FAILED: cancer candidate against cancer version 1" in err
    assert "nothing registered or moved" in err
    assert _versions(workspace) == [1]
    failed = workspace.runs()[0]
    assert failed.gate["passed"] is False and failed.gate["failures"]
    assert failed.metrics["accuracy"] < 0.8  # evaluated, judged, refused


def test_an_alias_moved_since_the_gate_is_not_moved_again(
    workspace: Workspace, cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgewise.runtime.pipeline import steps

    assert cli("pipeline", "run", workspace.pipeline())[0] == 0  # version 1
    assert cli("pipeline", "run", workspace.pipeline(args=("--C", "0.5")))[0] == 0  # version 2
    read = steps.current_version
    calls: list[int] = []

    def moved_after_the_gate(store: SqliteStore, model: str, alias: str | None) -> object:
        calls.append(1)
        if len(calls) == 2:  # the alias step's read: someone rolled production back meanwhile
            store.set_alias(model, "production", 1)
        return read(store, model, alias)

    monkeypatch.setattr(steps, "current_version", moved_after_the_gate)
    code, _, err = cli("pipeline", "run", workspace.pipeline(args=("--C", "2.0")))
    assert code == 1 and "production moved since the gate (version 2 -> 1); rerun" in err, err
    assert len(calls) == 2
    store = SqliteStore(workspace.store, create=False)
    try:
        assert store.resolve_alias("cancer", "production").version == 1  # not moved again
    finally:
        store.close()
