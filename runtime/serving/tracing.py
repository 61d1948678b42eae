"""OpenTelemetry spans of the request path (``serve --otel-endpoint``; the ``otel`` extra).

Imported only when tracing is on: with it off the serving core never imports opentelemetry, and
a request costs one attribute check (``InferenceCore.tracing is None``; measured by
benchmarks/tracing_cost.py). With it on, :meth:`RequestTracing.infer` runs the core's steps, one
span each, under one SERVER span per call:

``edgewise.infer`` (attributes ``edgewise.model``, ``edgewise.version``, ``edgewise.request_id``)
  ``parse`` (the request's bytes, grpcio's bytes path only), ``admit`` (memory admission),
  ``decode`` (find the model, check and decode the inputs), then ``run`` (the model run and the
  response's encoding) or, for a model with dynamic batching, ``queue`` (the wait for a batch and
  its run), and ``monitor`` (the drift statistics, taken off the response's path: it may end
  after its parent).

The parent is the W3C ``traceparent`` a front end read from the call's metadata or headers
(absent or malformed: a new trace); sampling follows the parent's sampled flag, else the ratio.
Spans go to an OTLP/gRPC collector in batches, off the request path.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode
from edgewise.runtime.serving.pipeline import payload_bytes

if TYPE_CHECKING:
    from edgewise.runtime.serving.pipeline import InferenceCore

__all__ = ["TRACEPARENT", "RequestTracing", "otlp_provider"]

#: The W3C trace context header / gRPC metadata key a front end reads.
TRACEPARENT = "traceparent"

_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_provider(endpoint: str, sample_ratio: float) -> TracerProvider:
    """A tracer provider that samples ``sample_ratio`` of new traces (a parent's decision
    otherwise) and exports over OTLP/gRPC to ``endpoint`` (e.g. ``http://collector:4317``)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        resource=Resource.create({"service.name": "edgewise"}),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class RequestTracing:
    """The traced request path of an :class:`InferenceCore` (see the module's docstring)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("edgewise.serving")

    def shutdown(self) -> None:
        """Export what is pending and stop."""
        self.provider.shutdown()

    async def infer_body(
        self,
        core: InferenceCore,
        body: bytes,
        deadline: float | None,
        started: float,
        traceparent: str | None,
    ) -> pb.ModelInferResponse:
        with self._root(traceparent) as root:
            with self.tracer.start_as_current_span("parse"):
                request = decode(pb.ModelInferRequest, body)
            return await self._steps(core, root, request, deadline, started)

    async def infer(
        self,
        core: InferenceCore,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        traceparent: str | None,
    ) -> pb.ModelInferResponse:
        with self._root(traceparent) as root:
            return await self._steps(core, root, request, deadline, started)

    def _root(self, traceparent: str | None) -> AbstractContextManager[trace.Span]:
        parent: Context | None = None
        if traceparent:
            parent = _PROPAGATOR.extract({TRACEPARENT: traceparent})
        return self.tracer.start_as_current_span(
            "edgewise.infer", context=parent, kind=trace.SpanKind.SERVER
        )

    async def _steps(
        self,
        core: InferenceCore,
        root: trace.Span,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
    ) -> pb.ModelInferResponse:
        tracer = self.tracer
        recording = root.is_recording()
        if recording:
            root.set_attribute("edgewise.model", request.model_name)
            root.set_attribute("edgewise.version", request.model_version)
            root.set_attribute("edgewise.request_id", request.id)
        with tracer.start_as_current_span("admit"):
            reservation = core.admit(request)
        with tracer.start_as_current_span("decode"):
            prepared = core.prepare(request, reservation)
        model = prepared.model
        if recording:
            root.set_attribute("edgewise.model", model.name)
            root.set_attribute("edgewise.version", model.version_str)
        if model.batching is not None:
            with tracer.start_as_current_span("queue"):
                return await core.batched(prepared, deadline, started, reservation)
        loop = asyncio.get_running_loop()
        defer = self._deferrer(loop, contextvars.copy_context())
        with tracer.start_as_current_span("run"):
            if payload_bytes(request) <= core.inline_max_bytes:
                return core.execute(prepared, deadline, started, reservation, defer=defer)
            context = contextvars.copy_context()  # this span, as the worker's parent
            return await loop.run_in_executor(
                core.executor,
                context.run,
                core.execute,
                prepared,
                deadline,
                started,
                reservation,
                defer,
            )

    def _deferrer(
        self, loop: asyncio.AbstractEventLoop, context: contextvars.Context
    ) -> Callable[..., object]:
        """A Deferrer that runs the monitor's work on the loop's next turn in a ``monitor``
        span, a child of the call's span (``context``)."""

        def monitor(function: Callable[..., object], *args: object) -> None:
            with self.tracer.start_as_current_span("monitor"):
                function(*args)

        def defer(function: Callable[..., object], *args: object) -> object:
            return loop.call_soon_threadsafe(context.run, monitor, function, *args)

        return defer
