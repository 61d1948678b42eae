"""docs/examples/loop/loop.py stays true: run end to end, it leaves a served version 2 that a
pipeline run trained on the captured, labelled traffic, with that run recorded in the store and
named in the version's lineage; interrupted, it stops the server and the agent it started."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from sklearn.datasets import load_breast_cancer

LOOP = Path(__file__).resolve().parents[2] / "docs" / "examples" / "loop" / "loop.py"
MODEL = "breast-cancer"


def _table(folder: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def test_the_loop_runs_end_to_end(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    done = subprocess.run(
        [sys.executable, str(LOOP), "--workdir", str(ws), "--timeout", "240"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    steps = [line.split("]", 1)[1].split()[0] for line in lines if line.startswith("[")]
    assert steps == [
        "data", "v1", "serve", "agent", "traffic", "feedback", "capture", "pipeline", "gate",
        "register", "deliver", "lineage", "stop",
    ]  # fmt: skip
    assert any("a request answered by version 2" in line for line in lines)

    # the capture: every traffic request (ids req-NNNN, one row each), answered by version 1,
    # and its label, which is the dataset's target for that row (the loop shuffles with seed 0)
    frame = load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=0)
    targets = frame["target"].reset_index(drop=True)
    captured = [
        r for r in _table(ws / "capture" / MODEL / "1") if r["request_id"].startswith("req")
    ]
    labels = _table(ws / "capture" / MODEL / "labels")
    assert len(captured) == len(labels) == len(targets) - 40
    assert {r["version"] for r in captured} == {"1"}
    assert {r["request_id"] for r in captured} == {r["request_id"] for r in labels}
    for label in labels:
        assert int(str(label["label"])) == targets[int(str(label["request_id"])[4:])]

    # the store: one pipeline run, succeeded, that registered version 2 and moved production
    db = sqlite3.connect(ws / "store.db")
    runs = db.execute("SELECT run_id, outcome, record FROM pipeline_runs").fetchall()
    assert [(r[1]) for r in runs] == ["succeeded"]
    run_id, record = runs[0][0], json.loads(runs[0][2])
    assert record["registered"] == {
        "alias": "production", "model": MODEL, "previous_version": 1, "version": 2
    }  # fmt: skip
    assert record["data"]["rows"] == len(labels) and record["data"]["capture_dir"]
    assert record["gate"]["passed"] and record["gate"]["baseline"] == [MODEL, 1]
    assert db.execute(
        "SELECT version FROM aliases WHERE name = ? AND alias = 'production'", (MODEL,)
    ).fetchall() == [(2,)]
    sha, lineage = db.execute(
        "SELECT model_sha256, lineage FROM versions WHERE name = ? AND version = 2", (MODEL,)
    ).fetchone()
    lineage = json.loads(lineage)
    assert lineage["params"]["pipeline.run_id"] == run_id
    assert lineage["data_fingerprint"] == record["data"]["fingerprint"]
    assert sha == record["artifacts"]["onnx_sha256"]

    # the record is enough to rerun it: the same code (training/, a git repository), data
    # (the capture's export kept in the run's folder) and arguments give the same model
    again = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "reproduce", run_id,
         "--store", f"sqlite:///{ws / 'store.db'}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert again.returncode == 0 and ": identical (" in again.stdout, again.stdout + again.stderr

    # the agent delivered those bytes into the server's repository and pinned them
    delivered = ws / "model-repo" / MODEL / "2" / "model.onnx"
    assert hashlib.sha256(delivered.read_bytes()).hexdigest() == sha
    config = json.loads((ws / "model-repo" / MODEL / "config.json").read_text())
    assert config["default_version"] == 2 and config["version_policy"] == {"specific": [2]}
    assert "version 2 is the last good version (pinned)" in (ws / "agent.log").read_text()
    assert "model breast-cancer version 2 loaded" in (ws / "server.log").read_text()
    # and both were stopped
    assert (ws / "server.log").read_text().rstrip().endswith("stopped")
    assert (ws / "agent.log").read_text().rstrip().endswith(f"stopped ({MODEL})")


def test_an_interrupted_loop_stops_what_it_started(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    loop = subprocess.Popen(
        [sys.executable, str(LOOP), "--workdir", str(ws)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (ws / "agent.port").exists():  # the server and the agent are running
            assert loop.poll() is None, loop.communicate()[0]
            assert time.monotonic() < deadline, "the loop did not start the agent"
            time.sleep(0.1)
        grpc_port = int((ws / "server.ports").read_text().split()[0])
        # SIGTERM takes Ctrl-C's path (KeyboardInterrupt); SIGINT itself is ignored by a
        # process started from a shell's background job, as this test may be
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=120)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    assert loop.returncode == 1
    assert out.splitlines()[-1].startswith("loop: interrupted")
    assert (ws / "server.log").read_text().rstrip().endswith("stopped")
    assert (ws / "agent.log").read_text().rstrip().endswith(f"stopped ({MODEL})")
    with socket.socket() as probe:  # nothing listens on the server's port any more
        assert probe.connect_ex(("127.0.0.1", grpc_port)) != 0


def test_the_loop_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    done = subprocess.run(
        [sys.executable, str(LOOP), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.strip() == f"loop: {tmp_path} is not empty (give a new or empty folder)"
