"""Data capture's cost on the request path, and the capture's throughput, in one run.

    .venv/bin/python benchmarks/capture.py [--rounds R (default 5)] [--seconds S (default 3)]
                                           [--models logreg32,forest100] [--records N]
                                           [--core-requests N] [--skip-request-path]
                                           [--only-request-path]

The capture's CPU is the serving process's (the request thread's offer, the shipper thread that
turns the queue into columns) plus its writer process's (Arrow, Parquet): every measure below
counts both; the writer's own CPU comes from ``edgewise_capture_writer_cpu_seconds_total`` (its
process_time, reported after each file) in process, from the server's process tree (psutil,
children included) end to end.

Writer throughput (``capture_writer_throughput``): in this process, the real serving core
answers ``--records`` requests of one row (logreg32) and offers each to a Capture whose queue
holds them all and whose shipper waits; then it is woken and timed until every record is in
Parquet files: records/s written, and the CPU per record in this process and in the writer.

Saturation (``capture_saturation``): one answered request offered again and again (bursts of
500, then 1 ms) to a Capture with the server's defaults (queue 10,000, a file as soon as 5,000
wait) for ``--seconds``: the records written per second while the queue overflows, the most
the capture takes before it drops.

Core CPU (``capture_core_cpu``): the serving core alone in this process, no transport: CPU time
of the process (every thread) and of the capture's writer process per request of one row, capture
off, off again (the control: what a ratio of 1 looks like in this run), 1 % and 100 %, in
alternating rounds (2 x --rounds); medians and the medians of per-round ratios against off;
and where it went: the CPU time of the request thread (the core, the capture's offer), of the
other threads (the capture's shipper) and of the writer process per request.

Request path (``capture_request_path``): five edgewise servers serve the same models
(serving.py's build_models) with the native front end, on its fast path (docs/native.md): capture
off, off again (the control), ``--capture-rate 0.01`` and ``--capture-rate 1``, and
``--capture-rate 1`` with ``--native-fast-path off`` (the Python path: what capture cost before
the fast path captured), each capturing into its own folder and writing
every 0.5 s (``--capture-flush-seconds 0.5``: the writer's work falls inside the measurement
windows). tritonclient[grpc] (serving.py's client processes) drives each at concurrency 1 and 8;
rounds alternate between the servers and the order rotates each round, so drift on the shared
machine hits all of them. The server's CPU per request is the CPU time of the whole process
and its children (front end, core, the capture's shipper and its writer process) over the
window, divided by the requests answered. One JSON line per (model, concurrency, server):
medians over rounds of p50, server CPU per request and throughput, and the medians of the
per-round ratios against capture off (target at rate 1: server CPU ratio <= 1.05; the
control's ratio is the run's noise). The servers' metrics are read at the end: records
captured, written and dropped, and the calls answered on the fast path (``fast_calls``) of all
answered (``requests``). ``--only-request-path`` skips the in-process cases.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("serving", HERE / "serving.py")
assert _spec is not None and _spec.loader is not None
bench: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

#: The servers, all on the native fast path (docs/native.md): capture off twice (the second,
#: "off-control", measures the run's noise: its ratio against "off" is what a ratio of 1 looks
#: like on this machine now), 1 % and 100 %; and 100 % on the Python path
#: (``--native-fast-path off``: every call, captured or not, as before the fast path captured).
RATES: dict[str, tuple[str | None, bool]] = {
    "off": (None, True),
    "off-control": (None, True),
    "1%": ("0.01", True),
    "100%": ("1", True),
    "100%-python-path": ("1", False),
}


def metric_total(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start(work: Path, label: str, rate: str | None, fast: bool = True) -> tuple[Any, int]:
    slug = label.replace("%", "")
    port_file = work / f"{slug}.port"
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
        "--repo", str(work / "repo"), "--host", "127.0.0.1", "--port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--port-file", str(port_file),
        "--front-end", "native", "--native-fast-path", "on" if fast else "off",
    ]  # fmt: skip
    if rate is not None:
        command += [
            "--capture-dir", str(work / f"capture-{slug}"), "--capture-rate", rate,
            "--capture-flush-seconds", "0.5", "--capture-max-bytes", str(4 << 30),
        ]  # fmt: skip
    server = bench.Server(command, port_file)
    metrics_port = int(port_file.read_text().split()[1])
    return server, metrics_port


def request_path(models: list[str], rounds: int, seconds: float, work: Path) -> None:
    servers = {label: start(work, label, rate, fast) for label, (rate, fast) in RATES.items()}
    labels = list(RATES)
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    try:
        for concurrency in (1, 8):
            for index in range(rounds):
                order = labels[index % len(labels) :] + labels[: index % len(labels)]
                for model in models:
                    for label in order:
                        server, _ = servers[label]
                        results.setdefault((model, concurrency, label), []).append(
                            bench.drive(server.url, model, concurrency, seconds, server.process.pid)
                        )
        counts = {}
        for label, (_, metrics_port) in servers.items():
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            counts[label] = {
                "captured": metric_total(text, "edgewise_capture_records_total"),
                "written": metric_total(text, "edgewise_capture_written_records_total"),
                "dropped": metric_total(text, "edgewise_capture_dropped_total"),
                "fast_calls": metric_total(text, "edgewise_native_fast_calls_total"),
                "requests": metric_total(text, "edgewise_requests_total"),
            }
    finally:
        for server, _ in servers.values():
            server.stop()
    for model in models:
        for concurrency in (1, 8):
            off = results[(model, concurrency, "off")]
            for label in labels:
                rows = results[(model, concurrency, label)]
                line: dict[str, Any] = {
                    "case": "capture_request_path", "model": model, "concurrency": concurrency,
                    "capture": label, "rounds": rounds, "seconds": seconds,
                    "front_end": "native", "fast_path": RATES[label][1],
                }  # fmt: skip
                for key in ("p50_us", "server_cpu_us_per_req", "rps"):
                    line[key] = round(statistics.median(r[key] for r in rows), 2)
                    ratios = [r[key] / o[key] for r, o in zip(rows, off, strict=True)]
                    line[f"ratio_{key}_vs_off_paired"] = round(statistics.median(ratios), 3)
                line["errors"] = sum(r["errors"] for r in rows)
                print(json.dumps(line), flush=True)
    for label, figures in counts.items():
        print(json.dumps({"case": "capture_counts", "capture": label, **figures}), flush=True)


def writer_throughput(records: int, work: Path, seconds: float) -> None:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.capture import Capture, CaptureSettings
    from edgewise.runtime.serving.capture_files import captured_files
    from edgewise.runtime.serving.pipeline import InferenceCore

    server = InferenceServer(
        ServerSettings.from_sources({"repo": work / "repo", "metrics_port": -1})
    )
    server.repository.load_all()
    server.dataplane.set_ready(True)
    folder = work / "capture-throughput"
    registry = CollectorRegistry()
    capture = Capture(
        CaptureSettings(
            folder, queue_records=records, flush_seconds=3600.0, batch_records=records + 1,
            max_bytes=4 << 30,
        ),
        registry,
    )  # fmt: skip
    core = InferenceCore(server.dataplane, server.metrics, server.executor, capture=capture)
    data = np.random.default_rng(0).random((64, bench.N_FEATURES), dtype=np.float32) * 16
    for index in range(records):
        request = pb.ModelInferRequest(model_name="logreg32", id=f"r{index}")
        request.inputs.add(name="features", datatype="FP32", shape=[1, bench.N_FEATURES])
        request.raw_input_contents.append(data[index % 64 : index % 64 + 1].tobytes())
        core.infer_on_thread(request, None, time.perf_counter(), defer=lambda f, *a: f(*a))
    cpu_started = time.process_time()
    writer_started = writer_cpu_of(registry)
    started = time.perf_counter()
    assert capture.flush(600)
    elapsed = time.perf_counter() - started
    shipper = time.process_time() - cpu_started  # the shipper thread's (the main one waits)
    writer = writer_cpu_of(registry) - writer_started
    written = registry.get_sample_value(
        "edgewise_capture_written_records_total", {"model": "logreg32"}
    )
    files = list(captured_files(folder))
    size = sum(p.stat().st_size for p in files)
    capture.close()
    print(
        json.dumps(
            {
                "case": "capture_writer_throughput", "model": "logreg32", "records": records,
                "written": written, "files": len(files), "bytes": size,
                "seconds": round(elapsed, 3),
                "records_per_s": round(records / elapsed),
                "server_cpu_us_per_record": round(shipper / records * 1e6, 2),
                "writer_process_cpu_us_per_record": round(writer / records * 1e6, 2),
                "bytes_per_record": round(size / records, 1),
            }
        ),
        flush=True,
    )  # fmt: skip
    saturation(server, work, seconds)
    server.executor.shutdown()


def writer_cpu_of(registry: Any) -> float:
    """CPU seconds of a capture's writer process so far, as it reports them after each file
    (its process_time: finer than /proc's clock ticks)."""
    return float(registry.get_sample_value("edgewise_capture_writer_cpu_seconds_total") or 0.0)


def saturation(server: Any, work: Path, seconds: float) -> None:
    """Capture's throughput before the queue drops: one answered request offered to a Capture
    with the server's defaults (queue 10,000, a file as soon as 5,000 wait) at a paced rate
    (offers every millisecond, caught up to the rate), stepping up from 25,000 to 400,000 a
    second, ``seconds`` a step: per step, what was offered and written a second and what the
    full queue dropped. The highest rate without drops is the most the capture takes."""
    import numpy as np
    from prometheus_client import CollectorRegistry

    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.capture import Capture, CaptureSettings
    from edgewise.runtime.serving.pipeline import InferenceCore

    kept: list[Any] = []

    class Keeper:  # the core's capture for one request: what it offers, kept
        def offer(self, prepared: Any, response: Any) -> None:
            kept.append((prepared, response))

    keeper: Any = Keeper()
    core = InferenceCore(server.dataplane, server.metrics, server.executor, capture=keeper)
    request = pb.ModelInferRequest(model_name="logreg32", id="saturation")
    request.inputs.add(name="features", datatype="FP32", shape=[1, bench.N_FEATURES])
    request.raw_input_contents.append(np.ones((1, bench.N_FEATURES), np.float32).tobytes())
    core.infer_on_thread(request, None, time.perf_counter(), defer=lambda f, *a: f(*a))
    prepared, response = kept[0]
    for rate in (25_000, 50_000, 100_000, 200_000, 400_000):
        registry = CollectorRegistry()
        capture = Capture(
            CaptureSettings(work / f"capture-saturation-{rate}", max_bytes=4 << 30), registry
        )
        capture.offer(prepared, response)  # the writer process started and ready: not timed
        assert capture.flush(120)
        offered = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(int(elapsed * rate) - offered):
                capture.offer(prepared, response)
            offered = max(offered, int(elapsed * rate))
            time.sleep(0.001)
        assert capture.flush(120)
        elapsed = time.perf_counter() - started
        written = (
            registry.get_sample_value(
                "edgewise_capture_written_records_total", {"model": "logreg32"}
            )
            or 0.0
        ) - 1
        dropped = registry.get_sample_value(
            "edgewise_capture_dropped_total", {"model": "logreg32", "reason": "queue_full"}
        )
        capture.close()
        print(
            json.dumps(
                {
                    "case": "capture_saturation", "model": "logreg32", "rate": rate,
                    "offered": offered, "written": written, "dropped": dropped or 0.0,
                    "written_per_s_until_flushed": round(written / elapsed),
                }
            ),
            flush=True,
        )  # fmt: skip


def core_cpu(rounds: int, requests: int, work: Path) -> None:
    """The serving core alone, in this process (no transport, no client on the same CPUs'
    clock): CPU time (process_time: every thread, the capture writer's included) per request of
    one row with capture off, 1 % and 100 %, in alternating rounds; each capture round ends
    when its writer has written everything."""
    import gc

    import numpy as np
    from prometheus_client import CollectorRegistry

    from edgewise.runtime.app.server import InferenceServer, _tune_garbage_collector
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.capture import Capture, CaptureSettings
    from edgewise.runtime.serving.pipeline import InferenceCore

    server = InferenceServer(
        ServerSettings.from_sources({"repo": work / "repo", "metrics_port": -1})
    )
    server.repository.load_all()
    server.dataplane.set_ready(True)
    data = np.random.default_rng(0).random((64, bench.N_FEATURES), dtype=np.float32) * 16
    bodies = []
    for index in range(64):
        request = pb.ModelInferRequest(model_name="logreg32")
        request.inputs.add(name="features", datatype="FP32", shape=[1, bench.N_FEATURES])
        request.raw_input_contents.append(data[index : index + 1].tobytes())
        bodies.append(request.SerializeToString())
    cores: dict[str, InferenceCore] = {}
    registries = {label: CollectorRegistry() for label in RATES}
    for label, rate in RATES.items():
        capture = None
        if rate is not None:
            settings = CaptureSettings(
                work / f"core-{label.strip('%')}", rate=float(rate), flush_seconds=0.5
            )
            capture = Capture(settings, registries[label])
        cores[label] = InferenceCore(
            server.dataplane, server.metrics, server.executor, capture=capture
        )
    _tune_garbage_collector()  # as a server does after start-up

    def defer(function: Any, *args: Any) -> None:
        function(*args)

    def writer_cpu(label: str) -> float:
        """CPU seconds of the capture's writer process so far, as it reports them after each
        file (its process_time: finer than /proc's clock ticks; 0 without capture)."""
        name = "edgewise_capture_writer_cpu_seconds_total"
        return registries[label].get_sample_value(name) or 0.0

    results: dict[str, list[float]] = {label: [] for label in cores}
    on_thread: dict[str, list[float]] = {label: [] for label in cores}
    in_writer: dict[str, list[float]] = {label: [] for label in cores}
    labels = list(cores)
    for index in range(rounds + 1):  # the first round warms up and is not counted
        for label in labels[index % len(labels) :] + labels[: index % len(labels)]:
            core = cores[label]
            gc.collect()
            writer_started = writer_cpu(label)
            started = time.process_time()
            thread_started = time.thread_time()
            for number in range(requests):
                request = pb.ModelInferRequest.FromString(bodies[number % 64])
                request.id = f"r{index}-{number}"
                core.infer_on_thread(request, None, time.perf_counter(), defer=defer)
            thread_cpu = time.thread_time() - thread_started
            if core.capture is not None:
                assert core.capture.flush(120)
            process_cpu = time.process_time() - started
            writer = writer_cpu(label) - writer_started
            if index:
                results[label].append((process_cpu + writer) / requests * 1e6)
                on_thread[label].append(thread_cpu / requests * 1e6)
                in_writer[label].append(writer / requests * 1e6)
    for core in cores.values():
        if core.capture is not None:
            core.capture.close()
    server.executor.shutdown()
    off = results["off"]
    for label, values in results.items():
        ratios = [v / o for v, o in zip(values, off, strict=True)]
        others = [
            v - t - w for v, t, w in zip(values, on_thread[label], in_writer[label], strict=True)
        ]
        print(
            json.dumps(
                {
                    "case": "capture_core_cpu", "model": "logreg32", "capture": label,
                    "rounds": rounds, "requests": requests,
                    "cpu_us_per_req": round(statistics.median(values), 2),
                    "ratio_vs_off_paired": round(statistics.median(ratios), 3),
                    "request_thread_us_per_req": round(statistics.median(on_thread[label]), 2),
                    "other_threads_us_per_req": round(statistics.median(others), 2),
                    "writer_process_us_per_req": round(statistics.median(in_writer[label]), 2),
                }
            ),
            flush=True,
        )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--models", default="logreg32,forest100")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--core-requests", type=int, default=20_000)
    parser.add_argument("--skip-request-path", action="store_true")
    parser.add_argument(
        "--only-request-path",
        action="store_true",
        help="skip the in-process cases (writer throughput, saturation, core CPU)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgewise-capture-bench-"))
    try:
        bench.build_models(work / "repo")
        if not args.only_request_path:
            writer_throughput(args.records, work, args.seconds)
            core_cpu(args.rounds * 2, args.core_requests, work)
        if not args.skip_request_path:
            request_path(args.models.split(","), args.rounds, args.seconds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
