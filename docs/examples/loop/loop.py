"""The whole loop, end to end, on a fresh workspace with the embedded defaults (docs/loop.md):

    serve -> capture -> labels -> pipeline -> gate -> register -> the agent delivers the new version

1. trains version 1 of a breast-cancer classifier on a few rows, converts it, registers it in an
   embedded SQLite store with the alias ``production``;
2. starts a server (capture on, rate 1) on an empty model repository and an agent that follows
   ``production`` into it: the agent delivers version 1;
3. sends the remaining rows as live traffic over HTTP (each request with an id), then their true
   labels with ``edgewise feedback``; the server writes both to its capture folder;
4. ``edgewise pipeline run``: trains version 2 on the captured, labelled rows, converts it, gates
   it against what ``production`` serves (on rows the training never saw), registers it with its
   lineage and moves the alias;
5. waits until the agent has delivered version 2 to the running server, and shows a request
   answered by it.

Every step is an ``edgewise`` command, as a user would type it (the traffic is the server's
HTTP API, as curl would send it); each prints one line. The agent and the server are stopped at
the end, on a failure and on Ctrl-C. Exit 0 on success, 1 with one line on failure.

    python docs/examples/loop/loop.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
MODEL = "breast-cancer"
T = TypeVar("T")


class LoopFailed(Exception):
    """A step failed: the message is the one line printed."""


def edgewise() -> list[str]:
    """The ``edgewise`` command beside this Python (a virtual environment's), else on PATH."""
    beside = Path(sys.executable).parent / "edgewise"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("edgewise")
    return [found] if found else [sys.executable, "-m", "edgewise.runtime.cli"]


class Loop:
    def __init__(self, workspace: Path, timeout: float) -> None:
        self.ws = workspace
        self.timeout = timeout
        self.log = (workspace / "loop.log").open("a", encoding="utf-8")
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.store = f"sqlite:///{workspace / 'store.db'}"
        self.repo = workspace / "model-repo"
        self.capture = workspace / "capture"
        self.step_no = 0
        self.grpc = ""
        self.http = ""
        self.metrics = ""
        self.agent_metrics = ""
        self.sent = 0  # requests answered (each one captured)

    # ---- helpers ---------------------------------------------------------------------------

    def say(self, name: str, what: str) -> None:
        self.step_no += 1
        print(f"[{self.step_no:2d}] {name:<9} {what}", flush=True)

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run an ``edgewise`` command (or another when ``args[0]`` is a path); its output."""
        command = list(args) if args[0].startswith("/") else [*edgewise(), *args]
        self.log.write(f"$ {' '.join(command)}\n")
        self.log.flush()
        shown = " ".join(args[:2]) if not args[0].startswith("/") else Path(args[-1]).name
        try:
            done = subprocess.run(
                command, check=False, cwd=self.ws, capture_output=True, text=True,
                env={**os.environ, **(env or {})}, timeout=self.timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LoopFailed(f"`{shown}` ran past {self.timeout:.0f} s (--timeout)") from None
        self.log.write(done.stdout + done.stderr)
        self.log.flush()
        if done.returncode != 0:
            lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
            raise LoopFailed(f"`{shown}` exited {done.returncode}: {lines[-1]}")
        return done.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.ws / f"{name}.log").open("wb")
        command = [*edgewise(), *args]
        self.log.write(f"$ {' '.join(command)} &  (output in {name}.log)\n")
        self.log.flush()
        process = subprocess.Popen(command, cwd=self.ws, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append((name, process))
        return process

    def wait_for(
        self, what: str | Callable[[], str], probe: Callable[[], T | None],
        timeout: float | None = None,
    ) -> T:  # fmt: skip
        """Poll ``probe`` until it returns something; fail naming ``what`` after the timeout (or
        at once when a process this loop started has exited)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        delay = 0.05
        while True:
            result = probe()
            if result is not None:
                return result
            for name, process in self.processes:
                if process.poll() is not None:
                    tail = (self.ws / f"{name}.log").read_text(errors="replace").strip()
                    last = tail.splitlines()[-1] if tail else "no output"
                    raise LoopFailed(f"{name} exited {process.returncode} ({last})")
            if time.monotonic() > deadline:
                what = what if isinstance(what, str) else what()
                raise LoopFailed(f"timed out waiting for {what} (see {self.ws}/loop.log)")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def stop_all(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self.log.close()

    def get(self, url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return str(answer.read().decode())
        except (urllib.error.URLError, OSError):
            return None

    def infer(self, request_id: str, row: Sequence[float]) -> dict[str, Any]:
        body = {
            "id": request_id,
            "inputs": [
                {"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": list(row)}
            ],
        }
        request = urllib.request.Request(
            f"http://{self.http}/v2/models/{MODEL}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                self.sent += 1
                return dict(json.loads(answer.read()))
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode(errors="replace")
            raise LoopFailed(f"request {request_id}: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LoopFailed(f"request {request_id}: {exc}") from None

    def metric(self, url: str, name: str, labels: str = "") -> float | None:
        return _metric(self.get(url) or "", name, labels)

    def answered_by(self, version: str, row: Sequence[float]) -> dict[str, Any] | None:
        """An answer from ``version`` to a request of ``row`` (None while the model is not
        served yet, or another version answers)."""
        if self.get(f"http://{self.http}/v2/models/{MODEL}/ready") is None:
            return None  # 404 (not served yet) or 503 (loading)
        answer = self.infer(f"probe-{time.monotonic_ns()}", row)
        return answer if answer.get("model_version") == version else None

    # ---- the loop --------------------------------------------------------------------------

    def main(self, first_rows: int) -> None:
        from sklearn.datasets import load_breast_cancer

        # 1. the data: a few rows for version 1, the rest arrive later as traffic
        frame = load_breast_cancer(as_frame=True).frame
        frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
        frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
        features = [c for c in frame.columns if c != "target"]
        first, later = frame.iloc[:first_rows], frame.iloc[first_rows:]
        probe = [float(v) for v in later[features].iloc[0]]  # the row that asks who answers
        first.to_parquet(self.ws / "first.parquet", index=False)
        first[features].to_parquet(self.ws / "first-features.parquet", index=False)
        self.say(
            "data",
            f"{len(first)} rows to train version 1, {len(later)} held back to "
            f"arrive as traffic (scikit-learn's breast-cancer data) in {self.ws}",
        )

        # 2. version 1: train (the training code in its own git repository), convert, register
        training = self.ws / "training"
        training.mkdir()
        shutil.copy(HERE / "train.py", training / "train.py")
        git = shutil.which("git")
        if git is not None:  # the pipeline records the commit (without git: a hash of the files)
            who = ["-c", "user.name=loop", "-c", "user.email=loop@localhost"]
            for args in (["init", "-q"], ["add", "train.py"], [*who, "commit", "-qm", "train.py"]):
                self.run(git, "-C", str(training), *args)
        self.run(
            sys.executable, str(training / "train.py"),
            env={"EDGEWISE_TRAIN_DATA": str(self.ws / "first.parquet"),
                 "EDGEWISE_LABEL": "target", "EDGEWISE_FEATURES": json.dumps(features),
                 "EDGEWISE_MODEL_OUT": str(self.ws / "v1.joblib")},
        )  # fmt: skip
        self.run(
            "convert", "v1.joblib", "--sample", "first-features.parquet", "--name", MODEL,
            "--out", "build", "--version", "1",
        )  # fmt: skip
        registered = json.loads(self.run(
            "register", f"build/{MODEL}/1", "--store", self.store, "--alias", "production",
            "--data", "first.parquet", "--code-dir", str(training), "--json",
            "--description", f"trained by hand on {len(first)} rows",
        ))  # fmt: skip
        self.say(
            "v1",
            f"trained on {len(first)} rows (training/train.py, a git repository), converted "
            f"(edgewise convert), registered as {MODEL} version {registered['version']} with "
            f"alias production (edgewise register, {self.store})",
        )

        # 3. the server (capture on, every request) on an empty repository, and the agent
        self.repo.mkdir()
        ports = self.ws / "server.ports"
        self.start(
            "server", "serve", "--repo", str(self.repo), "--host", "127.0.0.1", "--port", "0",
            "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--http-port", "0",
            "--port-file", str(ports), "--capture-dir", str(self.capture), "--capture-rate", "1.0",
            "--capture-flush-seconds", "1",
        )  # fmt: skip
        grpc, metrics, http = self.wait_for("the server's ports", lambda: _words(ports, 3))
        self.grpc, self.metrics = f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics"
        self.http = f"127.0.0.1:{http}"
        self.wait_for(
            "the server to be live", lambda: self.get(f"http://{self.http}/v2/health/live")
        )
        self.say(
            "serve",
            f"edgewise serve on gRPC {self.grpc}, HTTP {self.http}, capturing every "
            f"request into {self.capture.name}/; its repository is empty",
        )

        agent_port = self.ws / "agent.port"
        started = time.monotonic()
        self.start(
            "agent", "agent", "--store", self.store, "--model", MODEL, "--alias", "production",
            "--repo", str(self.repo), "--server", self.grpc, "--server-metrics", self.metrics,
            "--interval", "1", "--watch-seconds", "3", "--metrics-host", "127.0.0.1",
            "--metrics-port", "0", "--port-file", str(agent_port), "--node-id", "loop",
        )  # fmt: skip
        (port,) = self.wait_for("the agent's metrics port", lambda: _words(agent_port, 1))
        self.agent_metrics = f"http://127.0.0.1:{port}/metrics"
        self.wait_for(
            "the agent to deliver version 1",
            lambda: self.answered_by("1", probe),
        )
        self.say(
            "agent",
            f"edgewise agent follows production: delivered version 1 to the server "
            f"in {time.monotonic() - started:.1f} s",
        )

        # 4. traffic: each held-back row is a request with an id; then its true label
        correct = 0
        labels = []
        for index, row in later.iterrows():
            request_id = f"req-{index:04d}"
            answer = self.infer(request_id, [float(row[f]) for f in features])
            if answer.get("model_version") != "1" or answer.get("id") != request_id:
                raise LoopFailed(f"request {request_id}: answered {answer}")
            label = next(o for o in answer["outputs"] if o["name"] == "label")["data"][0]
            correct += int(label == int(row["target"]))
            labels.append((request_id, int(row["target"])))
        self.say(
            "traffic",
            f"{len(later)} requests with ids over HTTP, answered by version 1 "
            f"(accuracy {correct / len(later):.3f} against the labels to come)",
        )
        with (self.ws / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["request_id", "label"])
            writer.writerows(labels)
        self.run("feedback", MODEL, "--labels", "labels.csv", "--server", self.grpc)
        self.say("feedback", f"{len(labels)} true labels sent by request id (edgewise feedback)")

        seen: dict[str, float | None] = {}

        def written() -> bool | None:
            # the server's capture counters: everything queued is written (the agent's golden
            # requests are captured too, so at least what this loop sent), and every label
            text = self.get(self.metrics) or ""
            for name in ("records", "written_records", "labels"):
                seen[name] = _metric(text, f"edgewise_capture_{name}_total", f'model="{MODEL}"')
            queued, rows, got = seen["records"], seen["written_records"], seen["labels"]
            done = rows is not None and rows == queued and rows >= self.sent
            return True if done and got == len(labels) else None

        self.wait_for(
            lambda: (
                f"the capture files ({self.sent} requests and {len(labels)} labels sent; "
                f"the server's capture counters: {seen})"
            ),
            written,
        )
        stats = _stats(self.run("capture", "stats", MODEL, "--capture-dir", str(self.capture)))
        self.say(
            "capture",
            f"edgewise capture stats: {stats.get('1', ('?', '?'))[1]} rows "
            f"answered by version 1 in {stats.get('1', ('?', '?'))[0]} Parquet files "
            f"(the traffic, the loop's probes, the agent's golden requests), "
            f"{stats.get('labels', ('?', '?'))[1]} labels beside them",
        )

        # 5. the pipeline: captured + labelled rows -> v2 -> gate against production -> register
        pipeline = self.ws / "pipeline.toml"
        pipeline.write_text(PIPELINE.format(
            model=MODEL, store=self.store, capture=self.capture, repo=self.repo,
            python=sys.executable, train=training / "train.py", code=training,
        ))  # fmt: skip
        record = json.loads(self.run("pipeline", "run", str(pipeline), "--json"))
        returned = time.monotonic()
        registered, data, gate = record["registered"], record["data"], record["gate"]
        self.say(
            "pipeline",
            f"edgewise pipeline run {record['run_id']}: the {data['rows']} "
            f"labelled captured rows, version 2 trained on {data['train_rows']}, evaluated "
            f"on the other {data['holdout_rows']}: accuracy "
            f"{record['metrics']['accuracy']:.3f}",
        )
        counts = gate["counts"]
        self.say(
            "gate",
            f"{'passed' if gate['passed'] else 'FAILED'} against production "
            f"(version {gate['baseline'][1]}) on the same rows: {counts['pass']} rules "
            f"passed, {counts['fail']} failed",
        )
        if registered.get("version") != 2:
            raise LoopFailed(f"the pipeline registered {registered}, expected version 2")
        self.say(
            "register",
            f"{MODEL} version {registered['version']} registered with the run's "
            f"lineage; production {registered['previous_version']} -> "
            f"{registered['version']}",
        )

        # 6. the agent sees the alias move, delivers version 2; a request shows it
        answer = self.wait_for(
            "the agent to deliver version 2",
            lambda: self.answered_by("2", probe),
        )
        self.say(
            "deliver",
            f"the agent delivered version 2 to the running server "
            f"({time.monotonic() - returned:.1f} s after the pipeline returned): a request "
            f"answered by version {answer['model_version']}",
        )

        def promoted() -> bool | None:
            good = self.metric(
                self.agent_metrics, "edgewise_agent_last_good_version", f'model="{MODEL}"'
            )
            if good is None:
                good = self.metric(self.agent_metrics, "edgewise_agent_last_good_version")
            return True if good == 2 else None

        self.wait_for("the agent to promote version 2 after its watch", promoted)
        shown = json.loads(
            self.run(
                "models", "show", MODEL, "--alias", "production", "--store", self.store, "--json"
            )
        )
        lineage = shown["lineage"]
        if shown["version"] != 2 or lineage["params"].get("pipeline.run_id") != record["run_id"]:
            raise LoopFailed(f"production's lineage does not name the pipeline run: {lineage}")
        self.say(
            "lineage",
            f"edgewise models show: production is version 2, from pipeline run "
            f"{record['run_id']}, code {lineage['code_version'][:12]}, data "
            f"{lineage['data_fingerprint'][:19]}; the agent promoted it after its watch",
        )


PIPELINE = """\
# Written by docs/examples/loop/loop.py: retrain on what production saw, with its feedback labels.
format = 1
model = "{model}"
store = "{store}"

[data]
capture = {{ dir = "{capture}", model = "{model}", version = "1", repo = "{repo}" }}
holdout_fraction = 0.25
seed = 0

[train]
command = ["{python}", "{train}"]
code = "{code}"

[convert]

[evaluate]

[gate]
overall = {{ accuracy = {{ min = 0.9, max_degradation = 0.0 }} }}

[register]
alias = "production"
description = "retrained on captured traffic by docs/examples/loop/loop.py"
"""


def _words(path: Path, count: int) -> list[str] | None:
    try:
        words = path.read_text().split()
    except OSError:
        return None
    return words[:count] if len(words) >= count else None


def _metric(text: str, name: str, labels: str = "") -> float | None:
    """A sample's value in Prometheus text (None when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    found = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def _stats(text: str) -> dict[str, tuple[str, str]]:
    """``edgewise capture stats``'s table: version (or ``labels``) -> (files, rows)."""
    rows = [line.split() for line in text.splitlines()[1:]]
    return {row[1]: (row[2], row[3]) for row in rows if len(row) == 5 and row[0] == MODEL}


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="workspace (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    parser.add_argument("--first-rows", type=int, default=40, help="rows version 1 trains on")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per step")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if any(args.workdir.iterdir()):
            print(f"loop: {args.workdir} is not empty (give a new or empty folder)")
            return 1
        workspace = args.workdir.resolve()
    else:
        workspace = Path(tempfile.mkdtemp(prefix="edgewise-loop-"))
    loop = Loop(workspace, args.timeout)
    signal.signal(signal.SIGTERM, _interrupted)  # stop what it started on SIGTERM as on Ctrl-C
    ok = False
    try:
        loop.main(args.first_rows)
        ok = True
    except LoopFailed as exc:
        print(f"loop: failed: {exc} (workspace {workspace})")
    except KeyboardInterrupt:
        print(f"loop: interrupted (workspace {workspace})")
    except Exception as exc:  # one line, not a traceback: loop.log has what each command said
        print(f"loop: failed: {type(exc).__name__}: {exc} (workspace {workspace})")
    finally:
        loop.stop_all()
    if ok:
        print(f"[{loop.step_no + 1:2d}] stop      stopped the agent and the server")
    if ok and args.workdir is None and not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
    elif ok:
        print(f"loop: workspace kept in {workspace}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
