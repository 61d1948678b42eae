"""Memory over a long run: a real server's resident memory across a million requests of varying
batch size, and its idle RSS.

    .venv/bin/python benchmarks/memory.py [--requests 1000000] [--processes 2] [--concurrency 8]
                                          [--monitoring on|off] [--quick]

Serves a logistic regression and a 100-tree random forest on 32 features of scikit-learn's
digits data (converted with edgewise convert) with ``edgewise serve``'s defaults (monitoring on,
memory arena on), then drives ``--requests`` ModelInfer calls through closed-loop grpc.aio
clients in ``--processes`` processes. Each call is one of 64 pre-built requests, alternating
between the two models, with a batch size drawn log-uniformly from 1 to 1,024 rows (so
onnxruntime sees many shapes, and some requests are large enough to run on a worker thread).
The server's RSS and thread count are sampled every half second.

Prints one JSON line per case:
- ``idle``: memory once SERVING, before any request, with monitoring on and with monitoring
  off (the baseline: the same server without numba), for the logistic regression alone (the
  "one small model" of the 150 MB target) and for both models: RSS, its anonymous part (the
  process's own memory) and its file-backed part (shared libraries mapped from disk, shared
  between processes and reclaimable), and PSS;
- ``long_run``: RSS after the first 10 % of the requests (the warm baseline, measured in the
  same run), at the end, and the largest seen, with the ratio end / warm. Target: within 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
METHOD = "/inference.GRPCInferenceService/ModelInfer"
N_FEATURES = 32
TARGET_GROWTH = 0.05
TARGET_IDLE_MB = 150


# ---- client side (separate processes; grpc only) ------------------------------------------------


def client_main(target: str, request_file: Path, count: int, concurrency: int) -> None:
    import grpc

    blob = request_file.read_bytes()
    requests: list[bytes] = []
    offset = 0
    while offset < len(blob):
        (size,) = struct.unpack_from("<I", blob, offset)
        requests.append(blob[offset + 4 : offset + 4 + size])
        offset += 4 + size

    async def run() -> dict[str, Any]:
        ok = errors = 0
        issued = 0
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        ) as channel:
            call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side protobuf

            async def worker(index: int) -> None:
                nonlocal ok, errors, issued
                i = index
                while issued < count:
                    issued += 1
                    try:
                        await call(requests[i % len(requests)], timeout=30)
                        ok += 1
                    except grpc.aio.AioRpcError:
                        errors += 1
                    i += concurrency

            await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return {"ok": ok, "errors": errors}

    print(json.dumps(asyncio.run(run())))


# ---- orchestration ------------------------------------------------------------------------------


def build_models(repo: Path) -> None:
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgewise.runtime.convert.converter import convert

    digits = load_digits()
    frame = pd.DataFrame(
        digits.data[:, :N_FEATURES].astype(np.float64),
        columns=[f"px{i}" for i in range(N_FEATURES)],
    )
    for name, estimator in {
        "logreg32": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        "forest100": RandomForestClassifier(n_estimators=100, random_state=0),
    }.items():
        estimator.fit(frame, digits.target)
        convert(estimator, frame, name=name, repo=repo)


def write_requests(path: Path, seed: int = 0) -> list[int]:
    """64 serialised ModelInferRequests, length-prefixed; returns their batch sizes."""
    import numpy as np

    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb

    rng = np.random.default_rng(seed)
    sizes = [round(2 ** float(rng.uniform(0, 10))) for _ in range(64)]
    chunks = []
    for index, rows in enumerate(sizes):
        request = pb.ModelInferRequest(
            model_name="logreg32" if index % 2 == 0 else "forest100", id=f"r{index}"
        )
        request.inputs.add(name="features", datatype="FP32", shape=[rows, N_FEATURES])
        data = (rng.random((rows, N_FEATURES)) * 16).astype(np.float32)
        request.raw_input_contents.append(data.tobytes())
        body = request.SerializeToString()
        chunks.append(struct.pack("<I", len(body)) + body)
    path.write_bytes(b"".join(chunks))
    return sizes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def start_server(
    repo: Path, workdir: Path, monitoring: str, tag: str
) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / f"port-{tag}"
    log_file = workdir / f"server-{tag}.log"
    log = log_file.open("wb")
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
        "--repo", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
        "--port-file", str(port_file), "--monitoring", monitoring,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    # The port file is written once every model is loaded and the server is SERVING.
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(log_file.read_text())
        time.sleep(0.05)
    return process, int(port_file.read_text().split()[0])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def memory_breakdown(pid: int) -> dict[str, float]:
    """RSS split into anonymous memory (the process's own) and file-backed pages (shared
    libraries' code and data mapped from disk: shared with other processes, and reclaimable
    under memory pressure), plus PSS (shared pages divided among their users), in MB."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    pss = sum(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        if line.startswith("Pss:")
    )
    return {
        "rss": status["VmRSS"],
        "anon": status["RssAnon"],
        "file": status["RssFile"],
        "pss": pss / 1024,
    }


def idle_memory(process: subprocess.Popen[bytes], settle: float = 2.0) -> dict[str, float]:
    time.sleep(settle)  # let start-up garbage be collected and threads park
    return memory_breakdown(process.pid)


def _median_near(samples: list[tuple[float, float, int]], at: float, width: float) -> float:
    """The median RSS of the samples within ``width`` seconds of ``at`` (the nearest one when
    the run is too short to have several there)."""
    near = [rss for t, rss, _ in samples if abs(t - at) <= width]
    if not near:
        near = [min(samples, key=lambda s: abs(s[0] - at))[1]]
    return statistics.median(near)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight per process")
    parser.add_argument("--monitoring", choices=("on", "off"), default="on")
    parser.add_argument("--quick", action="store_true", help="50,000 requests")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        target, request_file, count, concurrency = args.client
        client_main(target, Path(request_file), int(count), int(concurrency))
        return 0
    total = 50_000 if args.quick else args.requests

    work = Path(tempfile.mkdtemp(prefix="edgewise-memory-"))
    repo = work / "repo"
    build_models(repo)
    request_file = work / "requests.bin"
    sizes = write_requests(request_file)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}

    # Idle: the one small model of the target alone, then both models.
    small = work / "repo-small"
    small.mkdir()
    shutil.copytree(repo / "logreg32", small / "logreg32")
    for models, folder in (("logreg32", small), ("logreg32+forest100", repo)):
        idle: dict[str, dict[str, float]] = {}
        for monitoring in ("off", "on"):
            process, _port = start_server(folder, work, monitoring, f"idle-{monitoring}-{models}")
            try:
                idle[monitoring] = idle_memory(process)
            finally:
                stop(process)
        line: dict[str, Any] = {"case": "idle", "models": models}
        for monitoring in ("on", "off"):
            for kind, value in idle[monitoring].items():
                line[f"{kind}_mb_monitoring_{monitoring}"] = round(value, 1)
        line["ratio_rss_on_vs_off"] = round(idle["on"]["rss"] / idle["off"]["rss"], 3)
        line["target_rss_mb"] = TARGET_IDLE_MB
        print(json.dumps(line | machine), flush=True)

    process, port = start_server(repo, work, args.monitoring, "long-run")
    samples: list[tuple[float, float, int]] = []  # (fraction done, rss, threads)
    try:
        per_process = [
            total // args.processes + (1 if i < total % args.processes else 0)
            for i in range(args.processes)
        ]
        started = time.monotonic()
        target, width, requests_arg = f"127.0.0.1:{port}", str(args.concurrency), str(request_file)
        clients = [
            subprocess.Popen(
                [sys.executable, str(HERE), "--client", target, requests_arg, str(count), width],
                stdout=subprocess.PIPE,
            )
            for count in per_process
        ]
        samples.append((0.0, rss_mb(process.pid), threads(process.pid)))
        while any(client.poll() is None for client in clients):
            time.sleep(0.5)
            elapsed = time.monotonic() - started
            samples.append((elapsed, rss_mb(process.pid), threads(process.pid)))
        seconds = time.monotonic() - started
        ok = errors = 0
        for client in clients:
            out, _ = client.communicate()
            result = json.loads(out)
            ok += result["ok"]
            errors += result["errors"]
        samples.append((seconds, rss_mb(process.pid), threads(process.pid)))
    finally:
        stop(process)

    # Requests are issued at a steady rate, so time stands for progress: the warm baseline is
    # the RSS once 10 % of the run's time has passed (the median of the samples around it).
    warm_at = 0.1 * seconds
    warm = _median_near(samples, warm_at, 0.02 * seconds)
    end = _median_near(samples, seconds, 0.05 * seconds)
    growth = end / warm - 1
    print(
        json.dumps(
            {
                "case": "long_run",
                "monitoring": args.monitoring,
                "requests": ok + errors,
                "ok": ok,
                "errors": errors,
                "seconds": round(seconds, 1),
                "req_per_s": round((ok + errors) / seconds, 1),
                "batch_rows_min": min(sizes),
                "batch_rows_median": statistics.median(sizes),
                "batch_rows_max": max(sizes),
                "rss_mb_start": round(samples[0][1], 1),
                "rss_mb_warm": round(warm, 1),
                "warm_at_s": round(warm_at, 1),
                "rss_mb_end": round(end, 1),
                "rss_mb_max": round(max(r for _, r, _ in samples), 1),
                "ratio_end_vs_warm": round(end / warm, 4),
                "threads_start": samples[0][2],
                "threads_end": samples[-1][2],
                "target_growth": TARGET_GROWTH,
                "met": abs(growth) <= TARGET_GROWTH,
                **machine,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
