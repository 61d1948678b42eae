"""Overload and soak: a real server offered several times its capacity, for a bounded time.

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--processes 3] [--rate 400]
                                        [--max-inflight 16] [--no-shedding] [--json OUT]
                                        [--front-end auto|native|grpcio]

Builds a compute-heavy model (a 200-tree random forest of depth 12 on 16 features; a request of
256 rows costs about 3 ms of onnxruntime) in a temporary repository, serves it with
``edgewise serve --max-inflight N``, and runs ``--processes`` open-loop load generators
(benchmarks/loadgen.py, each at ``--rate`` requests per second with a 2 s deadline, never
retrying). Meanwhile it samples the server's resident memory, threads and CPU every second.

Reports what was offered and sent, what was accepted (OK) and shed (RESOURCE_EXHAUSTED, and how
many carried the retry hint), the accepted requests' latency (overall and per third of the run),
how fast refusals came back (``shed_p50_ms``, ``shed_p99_ms``), the share of calls that met
their deadline instead of an answer, and the server's memory and threads in the first and last
thirds. ``--front-end`` picks what serves the port (default: ``EDGEWISE_FRONT_END``, else auto).
``--no-shedding`` runs the same load against a server without a useful in-flight limit
(100000), for comparison. Used by tests/runtime/serving/test_overload.py and
tests/runtime/frontends/test_grpcio_overload.py with short durations; 10 minutes is the soak of
docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
LOADGEN = HERE.parent / "loadgen.py"


def build_model(repo: Path, trees: int = 200, rows: int = 256) -> Path:
    """The heavy model in ``repo`` and a serialised request of ``rows`` rows; returns the
    request file."""
    import numpy as np
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier

    from edgewise.runtime.convert.converter import convert
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.codecs import encode_inputs

    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(16)]
    X = pd.DataFrame(rng.normal(size=(3000, 16)), columns=columns)
    y = (X["f0"] + X["f1"] * X["f2"] + rng.normal(size=3000) > 0).astype(int).to_numpy()
    model = RandomForestClassifier(n_estimators=trees, max_depth=12, random_state=0, n_jobs=1)
    convert(model.fit(X, y), X, name="heavy", repo=repo)
    request = pb.ModelInferRequest(model_name="heavy", id="soak")
    features = rng.normal(size=(rows, 16)).astype(np.float32)
    encode_inputs(request, {"features": features}, raw=True)
    path = repo.parent / "request.bin"
    path.write_bytes(request.SerializeToString())
    return path


def start_server(
    repo: Path, workdir: Path, max_inflight: int, front_end: str | None = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    port_file = workdir / "ports"
    log = (workdir / "server.log").open("wb")
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
        "--repo", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-host",
        "127.0.0.1", "--metrics-port", "0", "--port-file", str(port_file), "--monitoring", "off",
        "--max-inflight", str(max_inflight), "--worker-threads", "2",
    ]  # fmt: skip
    if front_end is not None:
        command += ["--front-end", front_end]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists() or len(port_file.read_text().split()) != 2:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError((workdir / "server.log").read_text())
        time.sleep(0.1)
    port, metrics_port = (int(x) for x in port_file.read_text().split())
    return process, port, metrics_port


def metric(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def thirds(values: list[float]) -> tuple[float, float]:
    third = max(1, len(values) // 3)
    return statistics.fmean(values[:third]), statistics.fmean(values[-third:])


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="soak-run-", dir=args.workdir) as scratch:
        workdir = Path(scratch)
        repo = workdir / "repo"
        request = build_model(repo, args.trees, args.rows)
        limit = 100000 if args.no_shedding else args.max_inflight
        server, port, metrics_port = start_server(repo, workdir, limit, args.front_end)
        try:
            return measure(args, server, port, metrics_port, request, workdir)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def measure(
    args: argparse.Namespace,
    server: subprocess.Popen[bytes],
    port: int,
    metrics_port: int,
    request: Path,
    workdir: Path,
) -> dict[str, Any]:
    proc = psutil.Process(server.pid)
    shed_before = metric(metrics_port, "edgewise_shed_requests_total")
    commands = [
        [sys.executable, str(LOADGEN), "--target", f"127.0.0.1:{port}", "--request",
         str(request), "--rate", str(args.rate), "--duration", str(args.seconds),
         "--deadline", "2", "--out", str(workdir / f"load-{i}.json")]
        for i in range(args.processes)
    ]  # fmt: skip
    generators = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in commands]
    try:
        return _sample(args, proc, port, metrics_port, generators, shed_before, workdir)
    finally:
        for generator in generators:  # on an error, no generator outlives its folder
            if generator.poll() is None:
                generator.kill()
                generator.wait()


def _sample(
    args: argparse.Namespace,
    proc: psutil.Process,
    port: int,
    metrics_port: int,
    generators: list[subprocess.Popen[bytes]],
    shed_before: float,
    workdir: Path,
) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    health_ms: list[float] = []
    health_failures = 0
    proc.cpu_percent()
    started = time.monotonic()
    next_at = started
    while any(g.poll() is None for g in generators):
        # On a fixed clock: a slow health check below does not stretch the interval.
        next_at += args.sample_interval
        time.sleep(max(0.0, next_at - time.monotonic()))
        if time.monotonic() - started > args.seconds:
            continue  # the tail: generators waiting for their last answers
        info = proc.memory_info()
        samples.append(
            {
                "t": time.monotonic() - started,
                "rss_mib": info.rss / 2**20,
                "threads": proc.num_threads(),
                "cpu_percent": proc.cpu_percent(),
            }
        )
        checked = health_check_ms(port)
        if checked is None:
            health_failures += 1
        else:
            health_ms.append(checked)
    if any(g.returncode != 0 for g in generators):
        raise RuntimeError("a load generator failed")
    loads = [json.loads((workdir / f"load-{i}.json").read_text()) for i in range(args.processes)]
    codes: dict[str, int] = {}
    for load in loads:
        for code, count in load["codes"].items():
            codes[code] = codes.get(code, 0) + count
    ok = codes.get("OK", 0)
    shed = codes.get("RESOURCE_EXHAUSTED", 0)
    sent = sum(load["sent"] for load in loads)
    rss = [s["rss_mib"] for s in samples]
    threads = [s["threads"] for s in samples]
    rss_first, rss_last = thirds(rss)
    per_third = [
        {
            "ok": sum(load["thirds"][i]["ok"] for load in loads),
            "p99_ms": max(load["thirds"][i]["p99_ms"] for load in loads),
        }
        for i in range(3)
    ]
    return {
        "seconds": args.seconds,
        "shedding": not args.no_shedding,
        "max_inflight": None if args.no_shedding else args.max_inflight,
        "offered_rate": args.rate * args.processes,
        "send_rate": sum(load["send_rate"] for load in loads),
        "sent": sent,
        "codes": codes,
        "accepted_rate": ok / args.seconds,
        "shed_rate": shed / args.seconds,
        "shed_fraction": shed / sent if sent else 0.0,
        "deadline_exceeded_fraction": codes.get("DEADLINE_EXCEEDED", 0) / sent if sent else 0.0,
        "shed_p50_ms": max(load["shed_latency_ms"]["p50"] for load in loads),
        "shed_p99_ms": max(load["shed_latency_ms"]["p99"] for load in loads),
        "shed_with_retry_hint": sum(load["resource_exhausted_with_hint"] for load in loads),
        "retry_hints_ms": sorted({h for load in loads for h in load["retry_hints_ms"]}),
        "server_shed_total": metric(metrics_port, "edgewise_shed_requests_total") - shed_before,
        "accepted_p50_ms": max(load["ok_latency_ms"]["p50"] for load in loads),
        "accepted_p99_ms": max(load["ok_latency_ms"]["p99"] for load in loads),
        "accepted_max_ms": max(load["ok_latency_ms"]["max"] for load in loads),
        "thirds": per_third,
        "rss_mib_first_third": rss_first,
        "rss_mib_last_third": rss_last,
        "rss_mib_max": max(rss),
        "threads_min": min(threads),
        "threads_max": max(threads),
        "threads_first_third": thirds([float(t) for t in threads])[0],
        "threads_last_third": thirds([float(t) for t in threads])[1],
        "server_cpu_percent_mean": statistics.fmean(s["cpu_percent"] for s in samples),
        "health_check_ms_max": max(health_ms, default=float("nan")),
        "health_check_failures": health_failures,
        "samples": len(samples),
    }


def health_check_ms(port: int) -> float | None:
    """One health check during the load, on a channel of its own (probes must get through
    while inference is shed): its time in ms, or None when it failed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.perf_counter()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    except grpc.RpcError as exc:
        print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return None
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return None
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="load duration (600)")
    parser.add_argument("--processes", type=int, default=3, help="load generator processes (3)")
    parser.add_argument("--rate", type=float, default=400.0, help="requests/s per process (400)")
    parser.add_argument("--max-inflight", type=int, default=16, help="server in-flight limit")
    parser.add_argument("--no-shedding", action="store_true", help="in-flight limit 100000")
    parser.add_argument("--rows", type=int, default=256, help="rows per request (256)")
    parser.add_argument("--trees", type=int, default=200, help="trees of the model (200)")
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument(
        "--front-end", choices=("auto", "native", "grpcio"), help="serve --front-end (default: env)"
    )
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: the system's)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
