"""Cold start: where the time from process start to SERVING goes, and what onnxruntime's
optimized-model file would save.

    .venv/bin/python benchmarks/coldstart.py [--starts 5] [--loads 9]

Models: a logistic regression, a 100-tree random forest and an MLP (64 hidden units), all on 32
features of scikit-learn's digits data, converted with edgewise convert.

Prints one JSON line per case (medians):
- ``session_create``: per model, creating the onnxruntime session the way the server does (graph
  optimisation level "all", from the package's bytes) against creating it from onnxruntime's
  saved optimized model (``optimized_model_filepath``, written once) with optimisation off, which
  is all a cache of optimized models could save; ``ratio`` = cached / fresh.
- ``import``: a fresh interpreter importing the server module (no numba: it loads lazily).
- ``start_to_serving``: ``edgewise serve`` from process start until its gRPC health check says
  SERVING, with monitoring on (numba kernels loaded from numba's warm cache) and off (the
  baseline); each start's log gives the kernels' share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

N_FEATURES = 32


def build_models(repo: Path) -> dict[str, Path]:
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
    frame = pd.DataFrame(
        digits.data[:, :N_FEATURES].astype(np.float64),
        columns=[f"px{i}" for i in range(N_FEATURES)],
    )
    estimators = {
        "logreg32": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        "forest100": RandomForestClassifier(n_estimators=100, random_state=0),
        "mlp32": make_pipeline(
            StandardScaler(), MLPClassifier((64,), max_iter=300, random_state=0)
        ),
    }
    paths = {}
    for name, estimator in estimators.items():
        estimator.fit(frame, digits.target)
        paths[name] = convert(estimator, frame, name=name, repo=repo).path / "model.onnx"
    return paths


def session_seconds(source: bytes | str, optimize: bool, save_to: str | None = None) -> float:
    import onnxruntime as ort

    from edgewise.runtime.serving.model import SessionSettings

    options = SessionSettings(graph_optimization="all" if optimize else "disabled")
    session_options = options.session_options()
    if save_to is not None:
        session_options.optimized_model_filepath = save_to
    started = time.perf_counter()
    ort.InferenceSession(source, session_options, providers=["CPUExecutionProvider"])
    return time.perf_counter() - started


def wait_serving(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    # Reconnect at once while the port is still closed (gRPC's default backoff is a second).
    options = [
        ("grpc.initial_reconnect_backoff_ms", 5),
        ("grpc.min_reconnect_backoff_ms", 5),
        ("grpc.max_reconnect_backoff_ms", 20),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.005)
    raise RuntimeError("server not SERVING in time")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_seconds(repo: Path, monitoring: str, workdir: Path) -> tuple[float, float | None]:
    """Process start to SERVING, and the kernels' warm-up as the server logged it."""
    port = free_port()
    log_file = workdir / f"serve-{monitoring}-{port}.log"
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "INFO", "serve",
        "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
        "--monitoring", monitoring,
    ]  # fmt: skip
    with log_file.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_serving(port, process)
            seconds = time.perf_counter() - started
        finally:
            process.terminate()
            process.wait(timeout=30)
    found = re.search(r"monitoring kernels ready in ([0-9.]+) s", log_file.read_text())
    return seconds, float(found.group(1)) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=5, help="server starts per case")
    parser.add_argument("--loads", type=int, default=9, help="session creations per case")
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}

    work = Path(tempfile.mkdtemp(prefix="edgewise-coldstart-"))
    repo = work / "repo"
    paths = build_models(repo)

    for name, path in paths.items():
        content = path.read_bytes()
        optimized = str(work / f"{name}.optimized.onnx")
        session_seconds(content, optimize=True, save_to=optimized)  # written once
        cached = Path(optimized).read_bytes()
        fresh_times, cached_times = [], []
        for _ in range(args.loads):  # alternating, so drift on a shared machine hits both
            fresh_times.append(session_seconds(content, optimize=True))
            cached_times.append(session_seconds(cached, optimize=False))
        fresh, from_cache = statistics.median(fresh_times), statistics.median(cached_times)
        line: dict[str, Any] = {
            "case": "session_create",
            "model": name,
            "model_bytes": len(content),
            "fresh_ms": round(fresh * 1e3, 2),
            "from_optimized_file_ms": round(from_cache * 1e3, 2),
            "ratio": round(from_cache / fresh, 3),
            **machine,
        }
        print(json.dumps(line), flush=True)

    imports = []
    for _ in range(args.starts):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import edgewise.runtime.app.server"], check=True)
        imports.append(time.perf_counter() - started)
    print(
        json.dumps({"case": "import", "median_s": round(statistics.median(imports), 3), **machine}),
        flush=True,
    )

    results: dict[str, list[tuple[float, float | None]]] = {"on": [], "off": []}
    for _ in range(args.starts):
        for monitoring in ("off", "on"):
            results[monitoring].append(start_seconds(repo, monitoring, work))
    off = statistics.median(s for s, _ in results["off"])
    for monitoring in ("off", "on"):
        seconds = statistics.median(s for s, _ in results[monitoring])
        kernels = [k for _, k in results[monitoring] if k is not None]
        print(
            json.dumps(
                {
                    "case": "start_to_serving",
                    "monitoring": monitoring,
                    "models": len(paths),
                    "median_s": round(seconds, 3),
                    "kernels_warmup_s": round(statistics.median(kernels), 3) if kernels else None,
                    "ratio_vs_monitoring_off": round(seconds / off, 3),
                    "target_s": 1.5,
                    **machine,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
