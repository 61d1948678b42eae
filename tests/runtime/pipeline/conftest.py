"""A training workspace for the pipeline tests: a git repository holding the user's train script,
the breast-cancer data (five features and a slice column) and a pipeline file writer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgewise.runtime.pipeline.records import RunRecord, SqliteRunLog
from tests.mlflow_server import mlflow_server

__all__ = ["Workspace", "mlflow_server", "workspace"]

FEATURES = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area", "mean_smoothness"]

TRAIN_SCRIPT = '''\
"""The user's training code: a scaled logistic regression on EDGEWISE_TRAIN_DATA."""
import json, os, sys
import joblib, pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

args = sys.argv[1:]
with open(os.environ["CALLS_FILE"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
if "--fail" in args:
    print("training blew up: not enough memory", file=sys.stderr)
    sys.exit(3)
C = float(args[args.index("--C") + 1]) if "--C" in args else 1.0
frame = pd.read_parquet(os.environ["EDGEWISE_TRAIN_DATA"])
features = json.loads(os.environ["EDGEWISE_FEATURES"])
model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
model.fit(frame[features], frame[os.environ["EDGEWISE_LABEL"]])
if "--no-model" not in args:
    joblib.dump(model, os.environ["EDGEWISE_MODEL_OUT"])
'''


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=tester", "-c", "user.email=t@example.com",
         *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def breast_cancer_frame() -> object:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    frame = frame[[*FEATURES, "target"]].copy()
    frame["size"] = (frame["mean_radius"] > 14).map({True: "large", False: "small"})
    return frame


@dataclass
class Workspace:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data.parquet"

    @property
    def calls(self) -> Path:
        return self.root.parent / "calls.txt"  # outside the code folder: not code

    @property
    def store(self) -> Path:
        return self.root / "store.db"

    def calls_made(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def runs(self) -> list[RunRecord]:
        """The run records in the workspace's store, newest first."""
        log = SqliteRunLog(self.store, create=False)
        try:
            return log.list_runs()
        finally:
            log.close()

    def pipeline(
        self,
        *,
        args: tuple[str, ...] = ("--C", "1.0"),
        store: str = "sqlite:///store.db",
        alias: str = "production",
        extra: str = "",
        name: str = "pipeline.toml",
    ) -> Path:
        command = ", ".join(f'"{a}"' for a in (sys.executable, "train.py", *args))
        text = f"""\
model = "cancer"
store = "{store}"

[data]
path = "data.parquet"
label = "target"
features = [{", ".join(f'"{f}"' for f in FEATURES)}]

[train]
command = [{command}]
env = {{ CALLS_FILE = "{self.calls}" }}

[convert]

[evaluate]
slice_by = ["size"]
min_slice_size = 10

[gate]
baseline = {{ required = false }}
overall = {{ accuracy = {{ min = 0.8, max_degradation = 0.02 }} }}

[register]
alias = "{alias}"
{extra}
"""
        path = self.root / name
        path.write_text(text)
        return path


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "training"
    root.mkdir()
    (root / "train.py").write_text(TRAIN_SCRIPT)
    (root / ".gitignore").write_text("__pycache__/\n")
    git(root, "init", "-q")
    git(root, "add", "train.py", ".gitignore")
    git(root, "commit", "-q", "-m", "train")
    breast_cancer_frame().to_parquet(root / "data.parquet", index=False)  # type: ignore[attr-defined]
    return Workspace(root)


RunCli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """``edgewise ARGS`` in this process: (exit code, stdout, stderr)."""
    from edgewise.runtime.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
