"""A pipeline whose data is what a server captured, joined with the labels sent back: served
requests -> capture folder -> feedback -> ``[data] capture`` -> train -> register."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from edgewise.runtime.pipeline.records import SqliteRunLog
from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.pipeline.conftest import RunCli, Workspace
from tests.servers import start_server


def test_a_run_trains_on_captured_labelled_requests(
    model_repo: Path, workspace: Workspace, cli: RunCli, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    manifest = json.loads((repo / "logreg" / "1" / "manifest.json").read_text())
    width = int(manifest["inputs"][0]["shape"][1])
    features = [f["name"] for f in manifest["features"]]
    captured = tmp_path / "captured"
    server = start_server(repo, tmp_path / "server", [
        "--front-end", "grpcio", "--capture-dir", str(captured), "--capture-flush-seconds", "0.05",
    ])  # fmt: skip
    rng = np.random.default_rng(7)
    sent: dict[str, np.ndarray] = {}
    try:
        with server.client() as client:
            for index in range(120):
                rows = rng.normal(size=(2, width)).astype(np.float32)
                sent[f"r{index}"] = rows
                client.infer("logreg", {"features": rows}, request_id=f"r{index}")
            # labels for 100 of the 120 requests: the sign of the first feature
            truth = [
                (f"r{i}", row, int(sent[f"r{i}"][row, 0] > 0)) for i in range(100) for row in (0, 1)
            ]
            assert client.submit_feedback("logreg", truth).joined == len(truth)
    finally:
        assert server.stop() == 0
    pipeline = workspace.root / "captured.toml"
    pipeline.write_text(f"""\
model = "logreg-retrained"
store = "sqlite:///store.db"

[data]
capture = {{ dir = "{captured}", model = "logreg", repo = "{repo}" }}

[train]
command = ["{sys.executable}", "train.py"]
env = {{ CALLS_FILE = "{workspace.calls}" }}

[convert]

[evaluate]

[register]
alias = "candidate"
""")
    code, out, err = cli("pipeline", "run", pipeline, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["data"]["source"] == "capture"
    assert record["data"]["rows"] == len(truth)  # the labelled rows only
    assert record["data"]["features"] == features  # named by the package, without the ids
    export = Path(record["data"]["path"])
    frame = pd.read_parquet(export)  # kept with the run: the capture folder rotates
    for place, (request_id, row) in enumerate(zip(frame["request_id"], frame["row"], strict=True)):
        assert frame["label"][place] == int(sent[request_id][row, 0] > 0)
        values = frame.loc[place, features].to_numpy(dtype=np.float32)
        np.testing.assert_array_equal(values, sent[request_id][row])
    assert record["metrics"]["accuracy"] > 0.8  # the label is learnable from the features
    store = SqliteStore(workspace.store, create=False)
    assert store.resolve_alias("logreg-retrained", "candidate").version == 1
    store.close()
    # reproducible from the kept export, though the capture folder is gone
    shutil.rmtree(captured)
    code, out, err = cli("pipeline", "reproduce", record["run_id"], "--store", workspace.store)
    assert code == 0, err
    assert "identical" in out
    log = SqliteRunLog(workspace.store, create=False)
    assert [r.kind for r in log.list_runs()] == ["reproduce", "run"]
    log.close()
