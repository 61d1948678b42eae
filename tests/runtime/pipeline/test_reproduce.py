"""``edgewise pipeline reproduce``: the same code, arguments and data give the same model bytes
and metrics; changed code or data is refused before anything runs."""

from __future__ import annotations

import json
import shutil

import pandas as pd

from edgewise.runtime.pipeline.records import SqliteRunLog
from tests.runtime.pipeline.conftest import RunCli, Workspace, git


def test_reproduce_gives_the_same_model_and_metrics(workspace: Workspace, cli: RunCli) -> None:
    assert cli("pipeline", "run", workspace.pipeline())[0] == 0
    log = SqliteRunLog(workspace.store, create=False)
    (original,) = log.list_runs()
    log.close()
    code, out, err = cli("pipeline", "reproduce", original.run_id, "--store", workspace.store,
                         "--json")  # fmt: skip
    assert code == 0, err
    again = json.loads(out)
    assert again["outcome"] == "identical" and again["reproduces"] == original.run_id
    assert again["comparison"] == {"identical": True, "differences": []}
    assert again["artifacts"]["onnx_sha256"] == original.artifacts["onnx_sha256"]
    assert again["artifacts"]["model_sha256"] == original.artifacts["model_sha256"]
    assert again["metrics"] == original.metrics and again["metrics"]
    assert len(workspace.calls_made()) == 2  # it really trained again (no cache)
    # nothing registered or moved by a reproduction
    assert [s["name"] for s in again["steps"]] == ["data", "train", "convert", "evaluate"]

    # the data moved: refused, then accepted with --data at its new place
    moved = workspace.root.parent / "elsewhere.parquet"
    shutil.move(workspace.data, moved)
    code, _, err = cli("pipeline", "reproduce", original.run_id, "--store", workspace.store)
    assert code == 2 and "no such file" in err and "--data" in err  # refused: exit 2
    # the data changed: refused with the fingerprints
    frame = pd.read_parquet(moved)
    frame.iloc[:-1].to_parquet(workspace.data, index=False)
    code, _, err = cli("pipeline", "reproduce", original.run_id, "--store", workspace.store)
    assert code == 2 and err.count("\n") == 1 and "fingerprint" in err and "differs" in err
    code, out, err = cli("pipeline", "reproduce", original.run_id, "--store", workspace.store,
                         "--data", moved)  # fmt: skip
    assert code == 0, err
    assert "identical" in out

    # the code changed: refused, naming the versions
    (workspace.root / "train.py").write_text((workspace.root / "train.py").read_text() + "#\n")
    git(workspace.root, "commit", "-q", "-am", "tweak")
    calls = len(workspace.calls_made())
    code, _, err = cli("pipeline", "reproduce", original.run_id, "--store", workspace.store,
                       "--data", moved)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "check out " + original.code["commit"] in err
    assert len(workspace.calls_made()) == calls


def test_a_reproduction_that_differs_says_what(workspace: Workspace, cli: RunCli) -> None:
    """Training that is not deterministic (a seed from the clock) is caught."""
    script = workspace.root / "train.py"
    script.write_text(
        script.read_text().replace(
            "model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))",
            "import time\nfrom sklearn.ensemble import RandomForestClassifier\n"
            "model = RandomForestClassifier(n_estimators=5, random_state=time.time_ns() % 1000)",
        )
    )
    git(workspace.root, "commit", "-q", "-am", "forest")
    assert cli("pipeline", "run", workspace.pipeline())[0] == 0
    log = SqliteRunLog(workspace.store, create=False)
    (original,) = log.list_runs()
    log.close()
    code, out, _ = cli("pipeline", "reproduce", original.run_id, "--store", workspace.store)
    assert code == 1
    assert "differs" in out and "ONNX model sha256" in out and "trained model sha256" in out
