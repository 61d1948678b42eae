"""What tracing costs a real server: CPU per request and client p50 with tracing off, on at 1 %
and at 100 % sampling, in one run.

    .venv/bin/python benchmarks/tracing_server.py [--seconds 5] [--rounds 3] [--concurrency 1]

Three ``edgewise serve --front-end grpcio`` processes on the logistic regression of
benchmarks/serving.py (32 features, batch 1, monitoring on): one without ``--otel-endpoint``
(the baseline), two with ``--otel-endpoint`` to an OTLP/gRPC collector in this process (the
OTLP trace service of opentelemetry-proto, counting the spans it receives) and
``--otel-sample-ratio`` 0.01 and 1. Load: benchmarks/serving.py's client processes (ModelInfer
without a traceparent, so the ratio decides), ``--seconds`` per window, the servers taking turns
round by round. Per mode: the medians over rounds of the server's CPU per request (user + system,
psutil) and of the client's p50, with ratios to off, and the spans the collector received.
Prints JSON lines.

``--baseline-tree DIR`` adds a mode ``baseline``: an off server run from another copy of the
package source (``DIR/runtime``; the kernels stay this checkout's), to measure what a change
costs the untraced path in the same run, e.g. the request and trace ids of commit C::

    mkdir /tmp/base && cp -r runtime /tmp/base/
    git diff C^ C -- runtime | patch -R -p1 -d /tmp/base
    .venv/bin/python benchmarks/tracing_server.py --modes baseline,off --baseline-tree /tmp/base

``--modes`` picks the modes run (default: off, ratio_0.01, ratio_1, and baseline when given).
``--front-end native`` serves gRPC with the native front end instead (its calls traced on the
core's thread path, InferenceCore.infer_on_thread); with ``--modes baseline,...`` the baseline
tree needs its own build of ``_front.cc``, e.g. ``PYTHONPATH=<a folder with edgewise/runtime
linked to DIR/runtime> python -m edgewise.runtime.frontends.native.build``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serving  # noqa: E402  (build_models, Server, drive)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--baseline-tree", type=Path, default=None)
    parser.add_argument("--modes", default="")
    parser.add_argument("--front-end", choices=("grpcio", "native"), default="grpcio")
    args = parser.parse_args()

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

    received = {"spans": 0}
    lock = threading.Lock()

    class Collector(otlp_grpc.TraceServiceServicer):
        def Export(
            self, request: otlp.ExportTraceServiceRequest, context: object
        ) -> otlp.ExportTraceServiceResponse:
            count = sum(
                len(scope.spans)
                for resource in request.resource_spans
                for scope in resource.scope_spans
            )
            with lock:
                received["spans"] += count
            return otlp.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()

    work = Path(tempfile.mkdtemp(prefix="edgewise-tracing-server-"))
    repo = work / "repo"
    serving.build_models(repo)
    endpoint = f"http://127.0.0.1:{collector_port}"
    modes: dict[str, tuple[str, ...]] = {
        "off": (),
        "ratio_0.01": ("--otel-endpoint", endpoint, "--otel-sample-ratio", "0.01"),
        "ratio_1": ("--otel-endpoint", endpoint, "--otel-sample-ratio", "1"),
    }
    prefix: dict[str, list[str]] = {}
    if args.baseline_tree is not None:
        modes["baseline"] = ()
        shim = work / "baseline" / "edgewise"  # edgewise.runtime from the tree, found first
        shim.mkdir(parents=True)
        (shim / "runtime").symlink_to((args.baseline_tree / "runtime").resolve())
        (shim / "kernels").symlink_to((HERE.parent / "kernels").resolve())
        prefix["baseline"] = ["env", f"PYTHONPATH={shim.parent}"]
    if args.modes:
        chosen = args.modes.split(",")
        unknown = sorted(set(chosen) - set(modes))
        if unknown:
            parser.error(f"--modes: unknown {unknown} (known: {', '.join(modes)})")
        modes = {mode: modes[mode] for mode in chosen}
    servers: dict[str, serving.Server] = {}
    try:
        for mode, extra in modes.items():
            port_file = work / f"{mode}.port"
            command = [
                *prefix.get(mode, []), sys.executable, "-m", "edgewise.runtime.cli",
                "--log-level", "WARNING", "serve",
                "--repo", str(repo), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--port-file", str(port_file),
                "--front-end", args.front_end,
                *extra,
            ]  # fmt: skip
            servers[mode] = serving.Server(command, port_file)
        rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        order = list(modes)
        for index in range(args.rounds):
            turn = order[index % len(order) :] + order[: index % len(order)]
            for mode in turn:
                server = servers[mode]
                rounds[mode].append(
                    serving.drive(
                        server.url, "logreg32", args.concurrency, args.seconds, server.process.pid
                    )
                )
    finally:
        for server in servers.values():
            server.stop()  # a stop flushes the spans still queued
        collector.stop(None)

    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}

    def ratio(value: float | None, to: str, key: str) -> float | None:
        base = serving.median_of(rounds[to], key) if to in rounds else None
        return None if not (value and base) else round(value / base, 3)

    for mode in modes:
        cpu = serving.median_of(rounds[mode], "server_cpu_us_per_req")
        p50 = serving.median_of(rounds[mode], "p50_us")
        to_baseline = {}
        if "baseline" in modes:
            to_baseline = {
                "cpu_ratio_to_baseline": ratio(cpu, "baseline", "server_cpu_us_per_req"),
                "p50_ratio_to_baseline": ratio(p50, "baseline", "p50_us"),
            }
        print(
            json.dumps(
                {
                    "case": "tracing_server",
                    "mode": mode,
                    "front_end": args.front_end,
                    "server_cpu_us_per_req": None if cpu is None else round(cpu, 1),
                    "p50_us": None if p50 is None else round(p50, 1),
                    "cpu_ratio_to_off": ratio(cpu, "off", "server_cpu_us_per_req"),
                    "p50_ratio_to_off": ratio(p50, "off", "p50_us"),
                    **to_baseline,
                    "requests": sum(r["requests"] for r in rounds[mode]),
                    "errors": sum(r["errors"] for r in rounds[mode]),
                    "rps_median": round(statistics.median(r["rps"] for r in rounds[mode]), 1),
                    "concurrency": args.concurrency,
                    "seconds": args.seconds,
                    "rounds": args.rounds,
                    **machine,
                }
            ),
            flush=True,
        )
    print(
        json.dumps({"case": "tracing_server", "mode": "collector", "spans": received["spans"]}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
