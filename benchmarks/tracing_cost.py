"""What tracing costs the serving core per request: off, and on at sample ratios 0, 0.01 and 1.

    .venv/bin/python benchmarks/tracing_cost.py [--calls 5000] [--rounds 5]

In one process (no network): ``InferenceCore.infer`` on a parsed V2 request (the logistic
regression and the 100-tree forest of benchmarks/serving.py, batch 1, raw FP32, monitoring on),
awaited ``--calls`` times per round, the modes alternating round by round:

- ``off``: ``core.tracing`` is None, the baseline (the core has not imported opentelemetry);
- ``ratio_0``, ``ratio_0.01``, ``ratio_1``: :class:`RequestTracing` as
  ``serve --otel-sample-ratio R`` makes it, calls without a caller's traceparent; the spans go
  through the BatchSpanProcessor ``serve`` uses to an exporter that drops them (what a
  collector does with them is not the server's cost; the processor's thread is counted).

Per mode: CPU seconds of the whole process per request (``time.process_time``, so the batch
processor's thread counts) and the median wall time of one call, medians over the rounds, with
``cpu_ratio_to_off`` and ``p50_ratio_to_off``. A line ``off_check`` times the one thing
tracing-off adds to a request: the ``core.tracing is None`` check, next to an empty call. Two
lines ``labels`` time what a call's labels (runtime/serving/request_context.py) add to every
request whatever tracing: made from no metadata (an id made here) and from a ``traceparent``
(its trace id read), taken from the request, set as the current labels and back, the answer's id;
with ``ratio_to_off_call``, beside the ``off`` call of the logistic regression (the labels are
part of that call too: the ratio is (call) / (call without them)). Prints JSON lines.
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
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serving  # noqa: E402  (benchmarks/serving.py: build_models)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np

    from edgewise import kernels
    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.pipeline import InferenceCore

    repo = Path(tempfile.mkdtemp(prefix="edgewise-tracing-")) / "repo"
    serving.build_models(repo)
    settings = ServerSettings.from_sources({"repo": repo, "metrics_port": -1})
    server = InferenceServer(settings)
    kernels.warmup_request_path()
    server.repository.load_all()
    server.dataplane.set_ready(True)
    core = InferenceCore(
        server.dataplane, server.metrics, server.executor, settings.inline_max_bytes
    )
    assert "opentelemetry" not in sys.modules, "tracing off must not import opentelemetry"

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    from edgewise.runtime.serving.tracing import RequestTracing

    class Dropping(SpanExporter):
        def __init__(self) -> None:
            self.spans = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.spans += len(spans)
            return SpanExportResult.SUCCESS

    exporters: dict[str, Dropping] = {}
    tracings: dict[str, RequestTracing | None] = {"off": None}
    for ratio in (0.0, 0.01, 1.0):
        provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))  # as serve's
        exporter = exporters[f"ratio_{ratio:g}"] = Dropping()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracings[f"ratio_{ratio:g}"] = RequestTracing(provider, ratio)

    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    loop = asyncio.new_event_loop()

    async def calls(request: pb.ModelInferRequest, n: int) -> list[float]:
        walls = []
        for _ in range(n):
            began = time.perf_counter()
            await core.infer(request, None)
            walls.append(time.perf_counter() - began)
        await asyncio.sleep(0)  # the monitor's deferred statistics of the last call
        return walls

    cpu_off_by_model: dict[str, list[float]] = {}
    for name in ("logreg32", "forest100"):
        x = (np.random.default_rng(0).random((1, serving.N_FEATURES)) * 16).astype(np.float32)
        request = pb.ModelInferRequest(model_name=name, id="bench")
        request.inputs.add(name="features", datatype="FP32", shape=[1, serving.N_FEATURES])
        request.raw_input_contents.append(x.tobytes())
        cpu: dict[str, list[float]] = {mode: [] for mode in tracings}
        p50: dict[str, list[float]] = {mode: [] for mode in tracings}
        for tracing in tracings.values():  # warm-up
            core.tracing = tracing
            loop.run_until_complete(calls(request, min(1000, args.calls)))
        for _ in range(args.rounds):
            for mode, tracing in tracings.items():
                core.tracing = tracing
                began = time.process_time()
                walls = loop.run_until_complete(calls(request, args.calls))
                cpu[mode].append((time.process_time() - began) / args.calls)
                p50[mode].append(statistics.median(walls))
        core.tracing = None
        cpu_off_by_model[name] = cpu["off"]
        cpu_off = statistics.median(cpu["off"])
        p50_off = statistics.median(p50["off"])
        for mode in tracings:
            exporter = exporters.get(mode)
            print(
                json.dumps(
                    {
                        "case": "tracing_cost",
                        "model": name,
                        "mode": mode,
                        "cpu_us_per_request": round(statistics.median(cpu[mode]) * 1e6, 2),
                        "p50_us": round(statistics.median(p50[mode]) * 1e6, 2),
                        "cpu_ratio_to_off": round(statistics.median(cpu[mode]) / cpu_off, 3),
                        "p50_ratio_to_off": round(statistics.median(p50[mode]) / p50_off, 3),
                        "spans_exported": None if exporter is None else exporter.spans,
                        "calls": args.calls,
                        "rounds": args.rounds,
                        **machine,
                    }
                ),
                flush=True,
            )

    n = 1_000_000
    checks, empties = [], []
    for _ in range(args.rounds):
        began = time.perf_counter()
        for _ in range(n):
            core.tracing is None  # noqa: B015  (the check an untraced request makes)
        checks.append((time.perf_counter() - began) / n)
        began = time.perf_counter()
        for _ in range(n):
            pass
        empties.append((time.perf_counter() - began) / n)
    check, empty = statistics.median(checks), statistics.median(empties)
    off_call = statistics.median(cpu_off_by_model["logreg32"])
    labels_check(args.rounds, empty, off_call, machine)
    print(
        json.dumps(
            {
                "case": "tracing_cost",
                "mode": "off_check",
                "check_ns": round((check - empty) * 1e9, 1),
                "loop_ns": round(empty * 1e9, 1),
                **machine,
            }
        ),
        flush=True,
    )
    for tracing in tracings.values():
        if tracing is not None:
            tracing.shutdown()
    loop.close()
    server.executor.shutdown()
    return 0


def labels_check(rounds: int, empty: float, off_call: float, machine: dict[str, object]) -> None:
    """The labels' work on every request (see the module's docstring), per request."""
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.request_context import CURRENT, RequestLabels

    request = pb.ModelInferRequest(model_name="logreg32", id="bench")
    response = pb.ModelInferResponse()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    n = 200_000
    for case, metadata in (("no_metadata", ("", None)), ("traceparent", ("", traceparent))):
        times = []
        for _ in range(rounds):
            began = time.perf_counter()
            for _ in range(n):
                labels = RequestLabels(*metadata)
                labels.take(request)
                token = CURRENT.set(labels)
                CURRENT.get()  # the core's one read (the version that answers)
                CURRENT.reset(token)
                labels.answered(response)
            times.append((time.perf_counter() - began) / n)
        cost = statistics.median(times) - empty
        print(
            json.dumps(
                {
                    "case": "tracing_cost",
                    "mode": "labels",
                    "metadata": case,
                    "labels_ns": round(cost * 1e9, 1),
                    "off_call_us": round(off_call * 1e6, 2),
                    "ratio_to_off_call": round(off_call / (off_call - cost), 4),
                    **machine,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
