"""What ``edgewise pipeline run`` costs over the user's own training command: prints ONE JSON line
per case.

Run from the repository root::

    .venv/bin/python benchmarks/pipeline_overhead.py                # 3 rounds, both models
    .venv/bin/python benchmarks/pipeline_overhead.py --rounds 5 --models forest

Protocol (scikit-learn's breast-cancer data, 569 rows, all 30 features; the pipeline's default
split: 427 training rows, 142 holdout rows): in each round, in alternating order,

- ``alone``: the training script by itself (``python train.py``, a fresh interpreter), given the
  same training rows and the same ``EDGEWISE_*`` variables the pipeline gives it;
- ``pipeline``: ``python -m edgewise.runtime.cli pipeline run --no-cache`` (a fresh interpreter)
  on a fresh embedded store: data, train (the same script), convert, evaluate (sliced), gate,
  register, alias, the run recorded twice;
- ``unchanged``: the same pipeline again on that store with the cache (every step but data and
  the gate skipped): what a scheduled run costs when nothing changed.

The wall time of each is measured around the subprocess. A line gives the medians over rounds,
``ratio`` = pipeline / alone (the baseline is the user's command alone, measured in the same
round), ``overhead_s`` = pipeline - alone, ``unchanged_ratio`` = unchanged / alone, and the
pipeline's own step timings (median seconds per step; ``train_command_s`` is the user's command
as timed inside the pipeline).

Models: ``logreg`` (``StandardScaler + LogisticRegression``: training takes well under a second,
so the ratio is mostly the pipeline's fixed cost) and ``forest`` (a 300-tree random forest, which
makes the conversion and evaluation heavier too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer

TRAIN = """\
import json, os, sys
import joblib, pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
frame = pd.read_parquet(os.environ["EDGEWISE_TRAIN_DATA"])
features = json.loads(os.environ["EDGEWISE_FEATURES"])
if sys.argv[1] == "forest":
    model = RandomForestClassifier(n_estimators=300, max_depth=8, random_state=0, n_jobs=1)
else:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
model.fit(frame[features], frame[os.environ["EDGEWISE_LABEL"]])
joblib.dump(model, os.environ["EDGEWISE_MODEL_OUT"])
"""

PIPELINE = """\
model = "cancer"
store = "sqlite:///{store}"
workdir = "{workdir}"

[data]
path = "data.parquet"
label = "target"

[train]
command = ["{python}", "train.py", "{model}"]

[convert]

[evaluate]
slice_by = ["size"]

[gate]
baseline = {{ required = false }}
overall = {{ accuracy = {{ min = 0.8, max_degradation = 0.02 }} }}

[register]
alias = "production"
"""


def _workspace(root: Path) -> list[str]:
    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    frame["size"] = (frame["mean_radius"] > 14).map({True: "large", False: "small"})
    frame.to_parquet(root / "data.parquet", index=False)
    (root / "train.py").write_text(TRAIN)
    # the training rows the pipeline gives the command (its default split: seed 0, 25 % holdout)
    order = np.random.default_rng(0).permutation(len(frame))
    train_rows = np.sort(order[round(len(frame) * 0.25) :])
    frame.iloc[train_rows].reset_index(drop=True).to_parquet(root / "train.parquet", index=False)
    return [c for c in frame.columns if c not in ("target", "size")] + ["size"]


def _alone(root: Path, model: str, features: list[str]) -> float:
    out = root / "alone.joblib"
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "EDGEWISE_TRAIN_DATA": str(root / "train.parquet"),
        "EDGEWISE_MODEL_OUT": str(out),
        "EDGEWISE_LABEL": "target",
        "EDGEWISE_FEATURES": json.dumps([f for f in features if f != "size"]),
        "EDGEWISE_RUN_ID": "alone",
        "EDGEWISE_SEED": "0",
    }
    started = time.perf_counter()
    subprocess.run([sys.executable, "train.py", model], cwd=root, env=env, check=True)
    seconds = time.perf_counter() - started
    assert out.is_file()
    out.unlink()
    return seconds


def _pipeline(root: Path, name: str, *, cache: bool) -> tuple[float, dict[str, Any]]:
    command = [sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "run", name, "--json"]
    if not cache:
        command.append("--no-cache")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pipeline run failed: {done.stderr.strip()}")
    record = json.loads(done.stdout)
    assert record["outcome"] == "succeeded"
    return seconds, record


def _case(model: str, rounds: int) -> dict[str, Any]:
    alone: list[float] = []
    full: list[float] = []
    unchanged: list[float] = []
    steps: dict[str, list[float]] = {}
    command_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edgewise-bench-pipeline-") as scratch:
        root = Path(scratch)
        features = _workspace(root)
        for index in range(rounds):
            # [data] features default to every column but the label: drop the slice column
            name = f"pipeline-{index}.toml"
            text = PIPELINE.format(
                store=root / f"store-{index}.db", workdir=root / f"work-{index}",
                python=sys.executable, model=model,
            )  # fmt: skip
            text = text.replace(
                'label = "target"\n',
                'label = "target"\nfeatures = ['
                + ", ".join(f'"{f}"' for f in features if f != "size")
                + "]\n",
            )
            (root / name).write_text(text)
            order = ("alone", "pipeline") if index % 2 == 0 else ("pipeline", "alone")
            for which in order:
                if which == "alone":
                    alone.append(_alone(root, model, features))
                    continue
                seconds, record = _pipeline(root, name, cache=False)
                full.append(seconds)
                for step in record["steps"]:
                    steps.setdefault(step["name"], []).append(float(step["seconds"]))
                    if step["name"] == "train":
                        command_s.append(float(step.get("command_seconds", 0.0)))
            unchanged.append(_pipeline(root, name, cache=True)[0])
    alone_s = statistics.median(alone)
    pipeline_s = statistics.median(full)
    return {
        "benchmark": "pipeline_overhead",
        "case": model,
        "rounds": rounds,
        "rows": 569,
        "alone_s": round(alone_s, 4),
        "pipeline_s": round(pipeline_s, 4),
        "ratio": round(pipeline_s / alone_s, 3),
        "overhead_s": round(pipeline_s - alone_s, 4),
        "unchanged_s": round(statistics.median(unchanged), 4),
        "unchanged_ratio": round(statistics.median(unchanged) / alone_s, 3),
        "train_command_s": round(statistics.median(command_s), 4),
        "steps_s": {k: round(statistics.median(v), 4) for k, v in steps.items()},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--models", nargs="+", choices=["logreg", "forest"], default=["logreg", "forest"]
    )
    args = parser.parse_args()
    for model in args.models:
        print(json.dumps(_case(model, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
