"""The benchmark suite: edgewise against the onnxruntime floor and MLServer, in one run.

    .venv/bin/python benchmarks/suite.py [--quick] [--seconds S] [--rounds R] [--no-mlserver]
                                         [--write-results]

Models (all from scikit-learn, 32 real pixel features of the bundled digits data): a logistic
regression, a 100-tree random forest and a small MLP pipeline. Servers, each started fresh:

- edgewise, one process, batching off (the default), with its default front end: the native one
  (gRPC's C++ server, runtime/frontends/native/binding.py) where it is built, else grpcio;
- edgewise_grpcio: the same with ``--front-end grpcio`` (Python's grpc.aio server on the port);
- edgewise, one process, dynamic batching on (max 32 rows, 500 us);
- edgewise, two processes on one port (SO_REUSEPORT), batching off;
- MLServer with mlserver-sklearn serving the original scikit-learn models (joblib files) as its
  users deploy them, installed by this script into its own virtual environment
  (.build/mlserver-venv), never into the project's;
- the grpcio ceiling: a bare grpc.aio server whose ModelInfer returns a canned answer for any
  model (gRPC parses the request; no tensor decoding, no model, no metrics), driven by the same
  clients: the most a server built on Python's grpcio could answer with this client here.

Clients: tritonclient[grpc] (aio) in separate processes, batch 1, at concurrency 1, 8 and 32 for a
bounded time each. Figures per case: p50/p99 latency, throughput, server CPU per request (read
from /proc over the measurement window, the server's whole process tree), the ratio to MLServer
and to the in-process onnxruntime floor; per server: time from start to ready and idle RSS.
Prints a table and one JSON line per case; `--write-results` also rewrites benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))

import serving  # noqa: E402  (benchmarks/serving.py: drive, Server, floors)

MLSERVER_VENV = PROJECT / ".build" / "mlserver-venv"
# uvloop 0.22+ breaks MLServer 1.7.1 ("no current event loop" at start-up).
MLSERVER_PACKAGES = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22"]
CONCURRENCIES = (1, 8, 32)


def build_models(repo: Path, joblib_dir: Path) -> dict[str, Path]:
    import joblib
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgewise.runtime.convert.converter import convert

    digits = load_digits()
    columns = [f"px{i}" for i in range(serving.N_FEATURES)]
    frame = pd.DataFrame(digits.data[:, : serving.N_FEATURES].astype(np.float64), columns=columns)
    estimators = {
        "logreg32": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        "forest100": RandomForestClassifier(n_estimators=100, random_state=0),
        "mlp32": make_pipeline(
            StandardScaler(), MLPClassifier((64, 32), max_iter=400, random_state=0)
        ),
    }
    paths = {}
    for name, estimator in estimators.items():
        estimator.fit(frame.to_numpy(np.float32), digits.target)  # arrays: MLServer sends arrays
        paths[name] = convert(estimator, frame, name=name, repo=repo).path
        folder = joblib_dir / name
        folder.mkdir(parents=True)
        joblib.dump(estimator, folder / "model.joblib")
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": "./model.joblib", "version": "1"},
                }
            )
        )
    return paths


def ensure_mlserver() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        print(f"installing MLServer into {MLSERVER_VENV} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MLSERVER_PACKAGES], check=True)
    return MLSERVER_VENV / "bin" / "mlserver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MLServer:
    def __init__(self, models_dir: Path) -> None:
        self.grpc_port, self.http_port, metrics_port = free_port(), free_port(), free_port()
        (models_dir / "settings.json").write_text(
            json.dumps(
                {
                    "http_port": self.http_port,
                    "grpc_port": self.grpc_port,
                    "metrics_port": metrics_port,
                    "host": "127.0.0.1",
                }
            )
        )
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(ensure_mlserver()), "start", str(models_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=models_dir,
        )
        deadline = time.monotonic() + 180
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"MLServer exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("MLServer not ready within 180 s")
            time.sleep(0.1)
        self.ready_seconds = time.perf_counter() - started

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class TimedServer:
    """A server started with serving.Server (``command`` writes ``port_file`` once ready),
    timed from launch to ready."""

    def __init__(self, command: list[str], port_file: Path) -> None:
        started = time.perf_counter()
        self.server = serving.Server(command, port_file)
        self.ready_seconds = time.perf_counter() - started
        self.process = self.server.process

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


def bare_server(work: Path) -> TimedServer:
    """benchmarks/serving.py's bare grpc.aio server: answers every ModelInfer, doing nothing."""
    port_file = work / "bare.port"
    return TimedServer(
        [sys.executable, str(HERE / "serving.py"), "--bare", "aio", str(port_file)], port_file
    )


def edgewise_server(repo: Path, work: Path, label: str, extra: list[str]) -> TimedServer:
    port_file = work / f"{label}.port"
    return TimedServer(
        [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
         "--repo", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--port-file", str(port_file), *extra],
        port_file,
    )  # fmt: skip


def tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def set_batching(repo: Path, enabled: bool) -> None:
    for model_dir in repo.iterdir():
        config = model_dir / "config.json"
        if enabled:
            config.write_text(
                json.dumps({"batching": {"max_batch_size": 32, "max_queue_delay_us": 500}})
            )
        elif config.exists():
            config.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows")
    parser.add_argument("--seconds", type=float, default=3.0, help="window per case")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per case (median)")
    parser.add_argument("--no-mlserver", action="store_true", help="skip MLServer")
    parser.add_argument("--write-results", action="store_true", help="rewrite RESULTS.md")
    args = parser.parse_args()
    seconds = 1.5 if args.quick else args.seconds

    work = Path(tempfile.mkdtemp(prefix="edgewise-suite-"))
    repo, joblib_dir = work / "repo", work / "mlserver-models"
    paths = build_models(repo, joblib_dir)
    floors = {name: serving.onnxruntime_floor(path, 5000) * 1e6 for name, path in paths.items()}
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    from edgewise.runtime.frontends.native.binding import front_status

    native = front_status()
    print(f"native front end: {native}", file=sys.stderr)
    setups: list[tuple[str, Any]] = [
        ("edgewise", lambda: edgewise_server(repo, work, "single", [])),
        (
            "edgewise_grpcio",
            lambda: edgewise_server(repo, work, "grpcio", ["--front-end", "grpcio"]),
        ),
        ("edgewise_batching", lambda: edgewise_server(repo, work, "batching", [])),
        ("edgewise_2proc", lambda: edgewise_server(repo, work, "multi", ["--processes", "2"])),
    ]
    if not args.no_mlserver:
        setups.append(("mlserver", lambda: MLServer(joblib_dir)))
    setups.append(("bare_grpc_ceiling", lambda: bare_server(work)))
    rows: list[dict[str, Any]] = []
    servers_info: dict[str, dict[str, float]] = {}
    for label, start in setups:
        set_batching(repo, label == "edgewise_batching")
        server = start()
        try:
            time.sleep(1.0)  # settle before reading idle memory
            servers_info[label] = {
                "ready_seconds": round(server.ready_seconds, 2),
                "idle_rss_mb": round(tree_rss_mb(server.process.pid), 1),
            }
            for name in paths:
                for concurrency in CONCURRENCIES:
                    results = [
                        serving.drive(server.url, name, concurrency, seconds, server.process.pid)
                        for _ in range(args.rounds)
                    ]
                    row = {
                        "server": label,
                        "model": name,
                        "concurrency": concurrency,
                        **{
                            key: statistics.median(r[key] for r in results)
                            for key in ("p50_us", "p99_us", "rps", "server_cpu_us_per_req")
                        },
                        # CPU seconds the server used per second of the window (median round).
                        "server_cores": statistics.median(
                            r["rps"] * r["server_cpu_us_per_req"] / 1e6 for r in results
                        ),
                        "errors": sum(r["errors"] for r in results),
                        "requests": sum(r["requests"] for r in results),
                    }
                    rows.append(row)
        finally:
            server.stop()
    set_batching(repo, False)
    by_key = {(r["server"], r["model"], r["concurrency"]): r for r in rows}
    for row in rows:
        baseline = by_key.get(("mlserver", row["model"], row["concurrency"]))
        row["rps_vs_mlserver"] = (
            round(row["rps"] / baseline["rps"], 2) if baseline and baseline["rps"] else None
        )
        row["p50_vs_onnxruntime_floor"] = round(row["p50_us"] / floors[row["model"]], 1)
        row["onnxruntime_floor_us"] = round(floors[row["model"]], 2)
        row.update(servers_info[row["server"]])
        row.update(machine)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    table = render_table(rows, servers_info, floors, seconds, args.rounds, native)
    print(table)
    if args.write_results:
        (HERE / "RESULTS.md").write_text(table)
    return 0


def render_table(
    rows: list[dict[str, Any]],
    servers: dict[str, dict[str, float]],
    floors: dict[str, float],
    seconds: float,
    rounds: int,
    native: str,
) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; client and server on the same machine. "
        f"Command: `.venv/bin/python benchmarks/suite.py {' '.join(sys.argv[1:])}` "
        f"({seconds:g} s per case, {rounds} round(s), batch 1, tritonclient aio clients). "
        f"Native front end: {native} (the edgewise rows other than edgewise_grpcio use it "
        "when loaded).",
        "",
        "| server | ready (s) | idle RSS (MB) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v['ready_seconds']} | {v['idle_rss_mb']} |" for k, v in servers.items()]
    lines += [
        "",
        "In-process onnxruntime floor (batch 1): "
        + ", ".join(f"{k} {v:.1f} us" for k, v in floors.items()),
        "",
        "| server | model | conc. | p50 (us) | p99 (us) | req/s | server CPU/req (us) "
        "| server cores | req/s vs MLServer | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = [
        "",
        "errors: calls that did not answer OK (RESOURCE_EXHAUSTED from shedding included).",
        "",
        "bare_grpc_ceiling: a grpc.aio server whose ModelInfer returns a canned answer (gRPC",
        "parses the request; no model, no tensor decoding): its req/s vs MLServer is the most",
        "a server built on Python's grpcio could reach with this client on this machine. The",
        "native front end is above it: gRPC's C++ server reads and answers the call, and only",
        "the model's work (decode, run, monitor, encode) runs in Python.",
        "",
        "edgewise_batching with the native front end: requests for a batching model are relayed",
        "to the process's grpc.aio server, where the batch queue lives, so they pay for both.",
        "",
        "server cores: CPU seconds the server used per second (req/s x CPU/req). A grpcio",
        "process serves from one event loop, so it stays near 1.0 (gRPC's C threads add a",
        "little); what the server leaves of the machine's cores is what the clients get.",
    ]
    for r in rows:
        versus = r.get("rps_vs_mlserver")
        lines.append(
            f"| {r['server']} | {r['model']} | {r['concurrency']} | {r['p50_us']:.0f} | "
            f"{r['p99_us']:.0f} | {r['rps']:.0f} | {r['server_cpu_us_per_req']:.0f} | "
            f"{r['server_cores']:.2f} | {'' if versus is None else f'{versus:.2f}x'} | "
            f"{r['errors']} |"
        )
    return "\n".join(lines + notes) + "\n"


if __name__ == "__main__":
    sys.exit(main())
