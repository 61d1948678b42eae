"""The per-request path, step by step, in one process (no network): what each step of a V2
ModelInfer costs next to the onnxruntime call it wraps.

    .venv/bin/python benchmarks/request_path.py [--calls 20000] [--rounds 5]

Models: the logistic regression and the 100-tree random forest of benchmarks/serving.py (32
features of scikit-learn's digits data), batch 1, raw FP32 contents, monitoring on. Each step runs
the server's own code on a parsed request, ``--calls`` times per round; medians over the rounds
of the mean time per call:

- ``parse``: protobuf parsing of the request bytes (gRPC does this before our handler);
- ``decode``: find the model, decode and check the inputs (zero-copy view of the raw bytes);
- ``onnxruntime``: ``InferenceSession.run`` on the decoded input, the baseline;
- ``model_run``: our wrapper around it (output selection, error translation);
- ``monitor``: the per-request statistics update as the server runs it (fused Numba kernel +
  reservoir, the PCA reconstruction error of the row, and the model's outputs for prediction
  drift);
- ``monitor_inputs_only``: the same on a monitor whose profile has neither the model's outputs
  nor the PCA (what ``monitor`` was before prediction and multivariate drift), its baseline;
- ``encode``: building the response message (raw contents);
- ``metrics``: request counter, latency histogram, in-flight gauge;
- ``serialize``: protobuf serialisation of the response (gRPC does this after our handler);
- ``handler``: the whole servicer ``ModelInfer`` on a parsed request, as the server runs it inline.

Prints one JSON line per model and step, with ``ratio_to_onnxruntime``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serving  # noqa: E402  (benchmarks/serving.py: build_models)


class _Context:
    """The little of grpc.aio.ServicerContext the inline path uses."""

    def time_remaining(self) -> float | None:
        return None


def per_call(step: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from dataclasses import replace

    import numpy as np

    from edgewise import kernels
    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.frontends.grpcio import InferenceServicer
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.dataplane import DataPlane
    from edgewise.runtime.serving.monitor import ModelMonitor
    from edgewise.runtime.serving.pipeline import InferenceCore

    repo = Path(tempfile.mkdtemp(prefix="edgewise-path-")) / "repo"
    serving.build_models(repo)
    settings = ServerSettings.from_sources({"repo": repo})
    server = InferenceServer(settings)
    kernels.warmup_request_path()
    server.repository.load_all()
    server.dataplane.set_ready(True)
    servicer = InferenceServicer(
        InferenceCore(
            server.dataplane,
            server.metrics,
            server.executor,
            settings.inline_max_bytes,
            server.admission,
        )
    )
    dataplane: DataPlane = server.dataplane
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    context = _Context()
    loop = asyncio.new_event_loop()

    for name in ("logreg32", "forest100"):
        x = (np.random.default_rng(0).random((1, serving.N_FEATURES)) * 16).astype(np.float32)
        request = pb.ModelInferRequest(model_name=name, id="bench")
        request.inputs.add(name="features", datatype="FP32", shape=[1, serving.N_FEATURES])
        request.raw_input_contents.append(x.tobytes())
        wire = request.SerializeToString()
        prepared = dataplane.prepare(request)
        model = prepared.model
        session = model.session
        feeds = prepared.feeds
        results = model.run(feeds)
        response = prepared.respond(results)
        monitor = model.monitor
        assert monitor is not None, "the benchmark models carry a reference profile"
        assert monitor.reference.outputs is not None and monitor.reference.multivariate is not None
        inputs_only = ModelMonitor(
            name,
            "1",
            replace(monitor.reference, outputs=None, multivariate=None),
            monitor.config,
        )
        metrics = server.metrics

        def metrics_step() -> None:
            metrics.inflight.inc()  # noqa: B023
            metrics.inflight.dec()  # noqa: B023
            metrics.observe_request(name, "1", "OK", 0.0005)  # noqa: B023

        async def handler_calls(calls: int) -> None:
            for _ in range(calls):
                await servicer.ModelInfer(request, context)  # type: ignore[arg-type]  # noqa: B023

        steps: dict[str, Callable[[], object]] = {
            "parse": lambda: pb.ModelInferRequest.FromString(wire),  # noqa: B023
            "decode": lambda: dataplane.prepare(request),  # noqa: B023
            "onnxruntime": lambda: session.run(None, feeds),  # noqa: B023
            "model_run": lambda: model.run(feeds),  # noqa: B023
            "monitor": lambda: monitor.observe(feeds, results),  # noqa: B023
            "monitor_inputs_only": lambda: inputs_only.observe(feeds),  # noqa: B023
            "encode": lambda: prepared.respond(results),  # noqa: B023
            "metrics": metrics_step,
            "serialize": response.SerializeToString,
        }
        timings: dict[str, list[float]] = {step: [] for step in [*steps, "handler"]}
        for step in steps.values():
            per_call(step, min(2000, args.calls))  # warm-up
        loop.run_until_complete(handler_calls(min(2000, args.calls)))
        for _ in range(args.rounds):  # steps interleaved round by round
            for step_name, step in steps.items():
                timings[step_name].append(per_call(step, args.calls))
            started = time.perf_counter()  # the handler: awaited in a loop, as a task would
            loop.run_until_complete(handler_calls(args.calls))
            timings["handler"].append((time.perf_counter() - started) / args.calls)
        floor = statistics.median(timings["onnxruntime"])
        for step_name, values in timings.items():
            median = statistics.median(values)
            print(
                json.dumps(
                    {
                        "case": "request_path_step",
                        "model": name,
                        "step": step_name,
                        "median_us": round(median * 1e6, 2),
                        "ratio_to_onnxruntime": round(median / floor, 2),
                        **machine,
                    }
                ),
                flush=True,
            )
    loop.close()
    server.executor.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
