"""HTTP/REST against gRPC on one edgewise server, in one run.

    .venv/bin/python benchmarks/http_serving.py [--quick] [--seconds S] [--rounds R (default 3)]
                                                [--front-end auto|native|grpcio] [--mlserver]

One server (``serve --http-port 0``) serves benchmarks/serving.py's two models (a logistic
regression and a 100-tree forest on 32 digit pixels). Three clients drive it, each the real
third-party client in separate processes, one row per request: ``grpc`` (tritonclient.grpc.aio,
on the gRPC front end chosen), ``http_json`` (tritonclient.http.aio, JSON tensors both ways) and
``http_binary`` (the binary tensor data extension both ways). For each model, concurrency 1 and
8: p50/p99 latency, throughput and the server's CPU time per request over the window. Rounds
alternate the clients, so drift on a shared machine hits all three; medians over rounds are
reported, and each HTTP line carries the median of its per-round ratios to gRPC (the baseline,
measured in the same rounds against the same server process).

With ``--mlserver`` the same rounds also drive MLServer 1.7.1 (mlserver-sklearn serving the
same scikit-learn models, installed once into .build/mlserver-venv by benchmarks/suite.py) with the
same two clients: ``mlserver_grpc`` and ``mlserver_http_json`` (MLServer's default outputs; it has
no binary tensor extension). Their lines carry the median of the per-round ratios of edgewise's
figure to MLServer's (``ratio_..._edgewise_vs_mlserver``: below 1, edgewise spends less), each
edgewise protocol against MLServer's same protocol, measured in the same rounds.

A separate script rather than a case of serving.py: it compares protocols on one server, where
serving.py compares one protocol against floors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from serving import N_FEATURES, build_models, cpu_seconds  # noqa: E402

CLIENTS = ("grpc", "http_json", "http_binary")
BASELINE = "grpc"
# MLServer's cases: each against edgewise's case of the same protocol.
MLSERVER_CLIENTS = {"mlserver_grpc": "grpc", "mlserver_http_json": "http_json"}


def client_main(kind: str, url: str, model: str, concurrency: int, seconds: float) -> None:
    """Warm up, print ``ready``, wait for ``go`` on stdin, then measure ``seconds``: the driver
    reads the server's CPU over the same window, however long imports and connecting took."""
    import numpy as np

    rng = np.random.default_rng(os.getpid())
    data = rng.random((64, N_FEATURES), dtype=np.float32) * 16
    protocol = MLSERVER_CLIENTS.get(kind, kind)
    binary = protocol == "http_binary"
    if protocol == "grpc":
        import tritonclient.grpc.aio as triton

        outputs = None
    else:
        import tritonclient.http.aio as triton  # type: ignore[no-redef]

        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")
        ]
    headers = None
    if kind in MLSERVER_CLIENTS and protocol != "grpc":
        # MLServer's sklearn runtime answers its own output, "predict"; its FastAPI app refuses a
        # body without the JSON content type, which tritonclient.http.aio does not send.
        outputs = [triton.InferRequestedOutput("predict", binary_data=False)]
        headers = {"Content-Type": "application/json"}
    elif kind in MLSERVER_CLIENTS:
        outputs = None

    async def run() -> dict[str, Any]:
        client = triton.InferenceServerClient(url=url)

        def make_inputs(i: int) -> list[Any]:
            tensor = triton.InferInput("features", [1, N_FEATURES], "FP32")
            if protocol == "grpc":
                tensor.set_data_from_numpy(data[i % 64 : i % 64 + 1])
            else:
                tensor.set_data_from_numpy(data[i % 64 : i % 64 + 1], binary_data=binary)
            return [tensor]

        latencies: list[float] = []
        errors = 0
        first_error: list[str] = []

        async def worker(k: int, until: float, measure: bool) -> None:
            nonlocal errors
            i = k
            while True:
                now = time.perf_counter()
                if now >= until:
                    return
                try:
                    if headers is None:
                        await client.infer(model, make_inputs(i), outputs=outputs)
                    else:
                        await client.infer(model, make_inputs(i), outputs=outputs, headers=headers)
                except Exception as exc:
                    errors += 1
                    first_error[:] = first_error or [str(exc)[:300]]
                    continue
                if measure:
                    latencies.append(time.perf_counter() - now)
                i += 1

        warm_until = time.perf_counter() + 0.5
        await asyncio.gather(*(worker(k, warm_until, False) for k in range(concurrency)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(worker(k, stop_at, True) for k in range(concurrency)))
        await client.close()
        return {"latencies": latencies, "errors": errors, "first_error": first_error}

    print(json.dumps(asyncio.run(run())))


def drive(
    kind: str, url: str, model: str, concurrency: int, seconds: float, pid: int
) -> dict[str, Any]:
    """Clients in 1 or 2 processes (as benchmarks/serving.py), all started together once each
    is warm; the server's CPU read over their measurement window."""
    processes = 1 if concurrency == 1 else 2
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    clients = [
        subprocess.Popen(
            [sys.executable, str(HERE), "--client", kind, url, model, str(c), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for c in shares
    ]
    for client in clients:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
    for client in clients:
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
    before = cpu_seconds(pid)
    time.sleep(seconds)
    after = cpu_seconds(pid)
    latencies: list[float] = []
    errors = 0
    for client in clients:
        out, _ = client.communicate(timeout=seconds + 60)
        result = json.loads(out)
        latencies.extend(result["latencies"])
        errors += result["errors"]
        if result["errors"] and not result["latencies"]:
            raise RuntimeError(f"{kind} on {model}: every request failed: {result['first_error']}")
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "errors": errors,
        "p50_us": latencies[count // 2] * 1e6 if count else None,
        "p99_us": latencies[min(count - 1, int(count * 0.99))] * 1e6 if count else None,
        "rps": count / seconds,
        "server_cpu_us_per_req": (after - before) / count * 1e6 if count else None,
    }


def start_server(
    repo: Path, work: Path, front_end: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    port_file = work / "ports"
    command = [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "ERROR", "serve",
               "--repo", str(repo), "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
               "--metrics-port", "-1", "--front-end", front_end,
               "--port-file", str(port_file)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start ({process.poll()})")
        time.sleep(0.05)
    grpc_port, _metrics, http_port = (int(x) for x in port_file.read_text().split())
    return process, grpc_port, http_port


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def round_ratio(
    runs: list[dict[str, Any]], baselines: list[dict[str, Any]], key: str
) -> float | None:
    """The median over rounds of ``runs``' figure over the baseline's in the same round."""
    ratios = [r[key] / b[key] for r, b in zip(runs, baselines, strict=True) if r[key] and b[key]]
    value = median(list(ratios))
    return round(value, 2) if value else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, one round")
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians taken)")
    parser.add_argument("--front-end", choices=["auto", "native", "grpcio"], default="auto")
    parser.add_argument(
        "--mlserver", action="store_true", help="also drive MLServer (gRPC and REST) in each round"
    )
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        kind, url, model, concurrency, seconds = args.client
        client_main(kind, url, model, int(concurrency), float(seconds))
        return 0
    seconds = 1.5 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="edgewise-http-bench-"))
    repo = work / "repo"
    if args.mlserver:
        import suite

        joblib_dir = work / "mlserver-models"
        models = [m for m in suite.build_models(repo, joblib_dir) if m in ("logreg32", "forest100")]
        for extra in set((joblib_dir).iterdir()) - {joblib_dir / m for m in models}:
            shutil.rmtree(extra)  # MLServer serves only the models measured
            shutil.rmtree(repo / extra.name)
    else:
        models = list(build_models(repo))
    from edgewise.runtime.frontends.native.binding import front_status

    front_end = args.front_end
    if front_end == "auto":
        front_end = "native" if front_status() == "loaded" else "grpcio"
    process, grpc_port, http_port = start_server(repo, work, front_end)
    urls = {"grpc": f"127.0.0.1:{grpc_port}", "http_json": f"127.0.0.1:{http_port}"}
    urls["http_binary"] = urls["http_json"]
    pids = dict.fromkeys(CLIENTS, process.pid)
    kinds: tuple[str, ...] = CLIENTS
    mlserver = None
    if args.mlserver:
        mlserver = suite.MLServer(joblib_dir)
        urls["mlserver_grpc"] = mlserver.url
        urls["mlserver_http_json"] = f"127.0.0.1:{mlserver.http_port}"
        pids.update(dict.fromkeys(MLSERVER_CLIENTS, mlserver.process.pid))
        kinds = (*CLIENTS, *MLSERVER_CLIENTS)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "front_end": front_end}
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    try:
        for _ in range(rounds):
            for model in models:
                for concurrency in (1, 8):
                    for kind in kinds:
                        measured = drive(kind, urls[kind], model, concurrency, seconds, pids[kind])
                        results.setdefault((kind, model, concurrency), []).append(measured)
    finally:
        process.terminate()
        process.wait(timeout=60)
        if mlserver is not None:
            mlserver.stop()
    for model in models:
        for concurrency in (1, 8):
            base = results[(BASELINE, model, concurrency)]
            for kind in kinds:
                runs = results[(kind, model, concurrency)]
                line: dict[str, Any] = {"case": kind, "model": model, "concurrency": concurrency}
                for key in ("p50_us", "p99_us", "rps", "server_cpu_us_per_req"):
                    value = median([r[key] for r in runs])
                    line[key] = round(value, 1) if value is not None else None
                line["errors"] = sum(r["errors"] for r in runs)
                if kind in MLSERVER_CLIENTS:
                    ours = results[(MLSERVER_CLIENTS[kind], model, concurrency)]
                    line["baseline"] = "this MLServer case; ratios are edgewise's same protocol"
                    for key in ("p50_us", "server_cpu_us_per_req"):
                        line[f"ratio_{key}_edgewise_vs_mlserver"] = round_ratio(ours, runs, key)
                elif kind != BASELINE:
                    line["baseline"] = f"{BASELINE} ({front_end} front end), same rounds"
                    for key in ("p50_us", "server_cpu_us_per_req"):
                        line[f"ratio_{key}_vs_grpc"] = round_ratio(runs, base, key)
                print(
                    json.dumps({**line, "rounds": rounds, "seconds": seconds, **machine}),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
