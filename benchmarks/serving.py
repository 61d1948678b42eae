"""Serving benchmark: edgewise against the compute floor and the transport floor, in one run.

    .venv/bin/python benchmarks/serving.py [--quick] [--seconds S] [--rounds R (default 5)]
                                           [--front-end auto|native|grpcio]
                                           [--monitoring-cost] [--tls-cost]
                                           [--concurrency 1,8,32]

For each model (a logistic regression and a 100-tree random forest on 32 features of
scikit-learn's bundled digits data, converted with edgewise convert):
- the compute floor: onnxruntime called in-process at batch 1 (median per call);
- the transport floor: a bare grpcio server (grpc.aio and sync thread-pool variants) whose
  ModelInfer does no work, driven by the same client; the faster variant is the floor;
- edgewise serve, driven by tritonclient[grpc] (the real third-party client, in separate client
  processes): p50/p99 latency at concurrency 1, throughput at concurrency 8 and 32, and the
  server's CPU time per request read from /proc over the measurement window.

Prints one JSON line per case; the ratio fields compare with the floors measured in the same run.
Rounds alternate between servers so drift on a shared machine hits both; medians are reported.
``ratio_p50_vs_transport_floor`` divides the medians; ``..._paired`` is the median of the
per-round ratios (each against the faster bare server of that round), the steadier of the two.

``--monitoring-cost`` also serves the same models from a second edgewise server with
``--monitoring off``, driven in the same alternating rounds, and prints one
``monitoring_cost`` line per model and concurrency: the medians over rounds of the per-round
differences (monitoring on minus off) of p50 and of server CPU per request.

``--tls-cost`` also serves the same models from a second edgewise server (same front end) with
TLS on its port (a certificate made for the run), driven over TLS by the same client in the same
alternating rounds, and prints one ``tls_cost`` line per model and concurrency: p50 and server
CPU per request with and without TLS, and the medians over rounds of the per-round ratios (TLS
over plaintext). The clients keep their connections, so this is the cost of TLS per request
(record encryption), not of handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
N_FEATURES = 32


# ---- client side (separate processes; imports tritonclient, never edgewise) ---------------------


def client_main(
    url: str, model: str, concurrency: int, seconds: float, warmup: float, tls_ca: str = ""
) -> None:
    import numpy as np
    import tritonclient.grpc.aio as triton_aio

    async def run() -> dict[str, Any]:
        if tls_ca:
            client = triton_aio.InferenceServerClient(url=url, ssl=True, root_certificates=tls_ca)
        else:
            client = triton_aio.InferenceServerClient(url=url)
        rng = np.random.default_rng(os.getpid())
        data = rng.random((64, N_FEATURES), dtype=np.float32) * 16

        def make_inputs(i: int) -> list[Any]:
            tensor = triton_aio.InferInput("features", [1, N_FEATURES], "FP32")
            tensor.set_data_from_numpy(data[i % 64 : i % 64 + 1])
            return [tensor]

        latencies: list[float] = []
        errors = 0
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds

        async def worker(index: int) -> None:
            nonlocal errors
            i = index
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                try:
                    await client.infer(model, make_inputs(i))
                except Exception:
                    errors += 1
                done = time.perf_counter()
                if now >= measure_from:
                    latencies.append(done - now)
                i += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        await client.close()
        return {"latencies": latencies, "errors": errors}

    print(json.dumps(asyncio.run(run())))


# ---- bare server (does no work) -----------------------------------------------------------------


def bare_server_main(kind: str, port_file: Path) -> None:
    import grpc

    sys.path.insert(0, str(HERE.parent.parent))
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    response = pb.ModelInferResponse(model_name="bare", model_version="1")

    if kind == "aio":

        class AioServicer(pb_grpc.GRPCInferenceServiceServicer):
            async def ModelInfer(self, request: Any, context: Any) -> Any:
                return response

        async def serve() -> None:
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(AioServicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            port_file.write_text(str(port))
            await server.wait_for_termination()

        asyncio.run(serve())
    else:
        from concurrent.futures import ThreadPoolExecutor

        class SyncServicer(pb_grpc.GRPCInferenceServiceServicer):
            def ModelInfer(self, request: Any, context: Any) -> Any:
                return response

        server = grpc.server(ThreadPoolExecutor(8), options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        port_file.write_text(str(port))
        server.wait_for_termination()


# ---- orchestration ------------------------------------------------------------------------


def build_models(repo: Path) -> dict[str, Path]:
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgewise.runtime.convert.converter import convert

    digits = load_digits()
    # The top half of each 8x8 digit: 32 real pixel features.
    frame = pd.DataFrame(
        digits.data[:, :N_FEATURES].astype(np.float64),
        columns=[f"px{i}" for i in range(N_FEATURES)],
    )
    target = digits.target
    estimators = {
        "logreg32": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        "forest100": RandomForestClassifier(n_estimators=100, random_state=0),
    }
    paths = {}
    for name, estimator in estimators.items():
        estimator.fit(frame, target)
        paths[name] = convert(estimator, frame, name=name, repo=repo).path
    return paths


def onnxruntime_floor(model_path: Path, calls: int) -> float:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path / "model.onnx"), options)
    data = np.random.default_rng(0).random((64, N_FEATURES), dtype=np.float32) * 16
    feeds = [{"features": data[i : i + 1]} for i in range(64)]
    for i in range(200):
        session.run(None, feeds[i % 64])
    timings = []
    for i in range(calls):
        started = time.perf_counter()
        session.run(None, feeds[i % 64])
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no port file {path}")
        time.sleep(0.02)
    return path.read_text().split()[0]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants (multi-process servers)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def drive(
    url: str, model: str, concurrency: int, seconds: float, server_pid: int, tls_ca: str = ""
) -> dict[str, Any]:
    processes = 1 if concurrency == 1 else 2
    per_process = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    warmup = 1.0
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE),
                "--client",
                url,
                model,
                str(c),
                str(seconds),
                str(warmup),
                tls_ca,
            ],
            stdout=subprocess.PIPE,
        )
        for c in per_process
    ]
    time.sleep(warmup)  # the clients' own warm-up window: measure the server over the same window
    cpu_before = cpu_seconds(server_pid)
    time.sleep(seconds)
    cpu_after = cpu_seconds(server_pid)
    latencies: list[float] = []
    errors = 0
    for client in clients:
        out, _ = client.communicate(timeout=seconds + 60)
        result = json.loads(out)
        latencies.extend(result["latencies"])
        errors += result["errors"]
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "errors": errors,
        "p50_us": latencies[count // 2] * 1e6 if count else None,
        "p99_us": latencies[min(count - 1, int(count * 0.99))] * 1e6 if count else None,
        "rps": count / seconds,
        "server_cpu_us_per_req": (cpu_after - cpu_before) / count * 1e6 if count else None,
    }


class Server:
    def __init__(self, command: list[str], port_file: Path) -> None:
        self.port_file = port_file
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = wait_for_file(port_file, self.process)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, one round")
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per case")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (median taken)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[1, 8, 32],
        help="the concurrencies measured, comma-separated (default 1,8,32)",
    )
    parser.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--front-end", choices=["auto", "native", "grpcio"], default="auto", help="edgewise's"
    )
    parser.add_argument(
        "--monitoring-cost",
        action="store_true",
        help="also measure a second server with --monitoring off (same rounds) and print the cost",
    )
    parser.add_argument(
        "--tls-cost",
        action="store_true",
        help="also measure a second server with TLS on its port (same rounds) and print the cost",
    )
    args = parser.parse_args()
    if args.client:
        url, model, concurrency, seconds, warmup, tls_ca = args.client
        client_main(url, model, int(concurrency), float(seconds), float(warmup), tls_ca)
        return 0
    if args.bare:
        bare_server_main(args.bare[0], Path(args.bare[1]))
        return 0
    seconds = 1.5 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds

    work = Path(tempfile.mkdtemp(prefix="edgewise-bench-"))
    repo = work / "repo"
    paths = build_models(repo)
    from edgewise.runtime.frontends.native.binding import front_status

    native = front_status() == "loaded"
    front_end = args.front_end if args.front_end != "auto" else "native" if native else "grpcio"
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "front_end": front_end}

    floors = {
        name: onnxruntime_floor(path, 3000 if args.quick else 20000) for name, path in paths.items()
    }
    for name, floor in floors.items():
        print(
            json.dumps(
                {
                    "case": "onnxruntime_in_process",
                    "model": name,
                    "batch": 1,
                    "median_us": round(floor * 1e6, 2),
                    **machine,
                }
            ),
            flush=True,
        )

    def edgewise_server(label: str, monitoring: str, extra: tuple[str, ...] = ()) -> Server:
        port_file = work / f"{label}.port"
        command = [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING",
                   "serve", "--repo", str(repo), "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "-1", "--port-file", str(port_file),
                   "--front-end", front_end, "--monitoring", monitoring, *extra]  # fmt: skip
        return Server(command, port_file)

    edgewise_kinds = ["edgewise"]
    if args.monitoring_cost:
        edgewise_kinds.append("edgewise_monitoring_off")
    if args.tls_cost:
        edgewise_kinds.append("edgewise_tls")
    tls_ca = {kind: "" for kind in edgewise_kinds}
    servers = {
        "edgewise": edgewise_server("edgewise", "on"),
        "bare_aio": Server(
            [sys.executable, str(HERE), "--bare", "aio", str(work / "aio.port")], work / "aio.port"
        ),
        "bare_sync": Server(
            [sys.executable, str(HERE), "--bare", "sync", str(work / "sync.port")],
            work / "sync.port",
        ),
    }
    if args.monitoring_cost:
        servers["edgewise_monitoring_off"] = edgewise_server("edgewise_monitoring_off", "off")
    if args.tls_cost:
        certificates = test_certificates(work / "certs")
        tls_ca["edgewise_tls"] = str(certificates.ca)
        cert, key = str(certificates.server_cert), str(certificates.server_key)
        tls = ("--tls-cert", cert, "--tls-key", key)
        servers["edgewise_tls"] = edgewise_server("edgewise_tls", "on", tls)
    try:
        results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for concurrency in args.concurrency:
            for _ in range(rounds):
                for kind in ("bare_aio", "bare_sync"):
                    key = (kind, "bare", concurrency)
                    results.setdefault(key, []).append(
                        drive(
                            servers[kind].url,
                            "bare",
                            concurrency,
                            seconds,
                            servers[kind].process.pid,
                        )
                    )
                for name in paths:
                    for kind in edgewise_kinds:
                        results.setdefault((kind, name, concurrency), []).append(
                            drive(
                                servers[kind].url,
                                name,
                                concurrency,
                                seconds,
                                servers[kind].process.pid,
                                tls_ca[kind],
                            )
                        )
        summary: dict[tuple[str, str, int], dict[str, Any]] = {}
        for (kind, name, concurrency), rows in results.items():
            summary[(kind, name, concurrency)] = {
                key: median_of(rows, key)
                for key in ("p50_us", "p99_us", "rps", "server_cpu_us_per_req")
            } | {"errors": sum(r["errors"] for r in rows), "rounds": len(rows)}
        for concurrency in args.concurrency:
            bare = {k: summary[(k, "bare", concurrency)] for k in ("bare_aio", "bare_sync")}
            floor_kind = min(bare, key=lambda k: bare[k]["p50_us"] or float("inf"))
            for kind, stats in bare.items():
                print(
                    json.dumps(
                        {
                            "case": f"{kind}_round_trip",
                            "concurrency": concurrency,
                            **_rounded(stats),
                            **machine,
                        }
                    ),
                    flush=True,
                )
            for name in paths:
                stats = summary[("edgewise", name, concurrency)]
                floor = bare[floor_kind]
                line = {
                    "case": "edgewise_serve",
                    "model": name,
                    "concurrency": concurrency,
                    **_rounded(stats),
                    "transport_floor": floor_kind,
                    "ratio_p50_vs_transport_floor": _ratio(stats["p50_us"], floor["p50_us"]),
                    "ratio_p50_vs_transport_floor_paired": _paired_ratio(
                        results[("edgewise", name, concurrency)],
                        [results[(k, "bare", concurrency)] for k in bare],
                    ),
                    "ratio_rps_vs_transport_floor": _ratio(stats["rps"], floor["rps"]),
                    "compute_floor_us": round(floors[name] * 1e6, 2),
                    "ratio_p50_vs_compute_floor": _ratio(stats["p50_us"], floors[name] * 1e6),
                    **machine,
                }
                print(json.dumps(line), flush=True)
                if args.monitoring_cost:
                    on = results[("edgewise", name, concurrency)]
                    off = results[("edgewise_monitoring_off", name, concurrency)]
                    cost = {
                        "case": "monitoring_cost",
                        "model": name,
                        "concurrency": concurrency,
                        "rounds": len(on),
                        "p50_us_on": summary[("edgewise", name, concurrency)]["p50_us"],
                        "p50_us_off": summary[("edgewise_monitoring_off", name, concurrency)][
                            "p50_us"
                        ],
                        "p50_us_added": _paired_difference(on, off, "p50_us"),
                        "server_cpu_us_added": _paired_difference(on, off, "server_cpu_us_per_req"),
                        **machine,
                    }
                    print(json.dumps(_rounded(cost)), flush=True)
                if args.tls_cost:
                    plain = results[("edgewise", name, concurrency)]
                    secure = results[("edgewise_tls", name, concurrency)]
                    plain_stats = summary[("edgewise", name, concurrency)]
                    secure_stats = summary[("edgewise_tls", name, concurrency)]
                    cost = {
                        "case": "tls_cost",
                        "model": name,
                        "concurrency": concurrency,
                        "rounds": len(plain),
                        "p50_us_plain": plain_stats["p50_us"],
                        "p50_us_tls": secure_stats["p50_us"],
                        "ratio_p50_tls_vs_plain": _paired_ratio_between(secure, plain, "p50_us"),
                        "server_cpu_us_plain": plain_stats["server_cpu_us_per_req"],
                        "server_cpu_us_tls": secure_stats["server_cpu_us_per_req"],
                        "ratio_server_cpu_tls_vs_plain": _paired_ratio_between(
                            secure, plain, "server_cpu_us_per_req"
                        ),
                        "rps_plain": plain_stats["rps"],
                        "rps_tls": secure_stats["rps"],
                        "errors_tls": secure_stats["errors"],
                        **machine,
                    }
                    ratios = {k: v for k, v in cost.items() if k.startswith("ratio_")}
                    print(json.dumps(_rounded(cost) | ratios), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return 0


def _rounded(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()}


def _paired_ratio(rows: list[dict[str, Any]], floors: list[list[dict[str, Any]]]) -> float | None:
    """The median over rounds of p50 / the faster bare server's p50 in the same round: each
    ratio compares runs a few seconds apart, so drift on a shared machine cancels out."""
    ratios = []
    for index, row in enumerate(rows):
        floor = min((f[index]["p50_us"] or float("inf")) for f in floors)
        if row["p50_us"] and floor != float("inf"):
            ratios.append(row["p50_us"] / floor)
    return round(statistics.median(ratios), 3) if ratios else None


def _paired_difference(
    rows: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str
) -> float | None:
    """The median over rounds of ``rows[i][key] - baseline[i][key]``: runs of the same round,
    seconds apart, so drift on a shared machine cancels out."""
    differences = [
        row[key] - base[key]
        for row, base in zip(rows, baseline, strict=True)
        if row.get(key) is not None and base.get(key) is not None
    ]
    return round(statistics.median(differences), 1) if differences else None


def _paired_ratio_between(
    rows: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str
) -> float | None:
    """The median over rounds of ``rows[i][key] / baseline[i][key]`` (see _paired_difference)."""
    ratios = [
        row[key] / base[key]
        for row, base in zip(rows, baseline, strict=True)
        if row.get(key) and base.get(key)
    ]
    return round(statistics.median(ratios), 3) if ratios else None


def test_certificates(folder: Path) -> Any:
    """A CA and a server certificate for 127.0.0.1, made for this run (tests/certs.py)."""
    sys.path.insert(0, str(HERE.parent.parent))
    from tests.certs import make_certificates

    return make_certificates(folder)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


if __name__ == "__main__":
    sys.exit(main())
