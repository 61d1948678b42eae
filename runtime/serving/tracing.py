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
(absent or malformed: a new trace); sampling follows the parent's sampled flag; a call with no
parent is sampled at the ratio by a random draw before any span is made (an unsampled call then
costs the draw, not the SDK's non-recording spans).
The native front end's calls (:meth:`RequestTracing.infer_on_thread`, on the front end's own
threads) have the same spans but ``parse`` (C++ and the binding parse them, untraced): ``run``
on the calling thread, or ``queue`` until the batch queue's future is done, and ``monitor``
where the front end runs the deferred work once the answer is sent.

Spans go to an OTLP/gRPC collector in batches, off the request path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode

if TYPE_CHECKING:
    from edgewise.runtime.serving.dataplane import PreparedRequest
    from edgewise.runtime.serving.pipeline import Deferrer, InferenceCore
    from edgewise.runtime.serving.request_context import RequestLabels

__all__ = ["TRACEPARENT", "RequestTracing", "otlp_provider"]

#: The W3C trace context header / gRPC metadata key a front end reads (request_context's).
TRACEPARENT = "traceparent"

_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_provider(endpoint: str) -> TracerProvider:
    """A tracer provider that exports over OTLP/gRPC to ``endpoint`` (e.g.
    ``http://collector:4317``) and follows a caller's sampled flag; a call without one is
    sampled already (RequestTracing draws its ratio before any span is made)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        sampler=ParentBased(ALWAYS_ON),
        resource=Resource.create({"service.name": "edgewise"}),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class RequestTracing:
    """The traced request path of an :class:`InferenceCore` (see the module's docstring)."""

    def __init__(self, provider: TracerProvider, sample_ratio: float = 1.0) -> None:
        """``sample_ratio``: the fraction of calls without a caller's traceparent that are
        traced; the others skip the SDK (its unsampled span costs ~20 us a call; this, a random
        draw). The provider's sampler decides for calls with a traceparent."""
        self.provider = provider
        self.tracer = provider.get_tracer("edgewise.serving")
        self.sample_ratio = sample_ratio

    def shutdown(self) -> None:
        """Export what is pending and stop."""
        self.provider.shutdown()

    async def infer_body(
        self,
        core: InferenceCore,
        body: bytes,
        deadline: float | None,
        started: float,
        labels: RequestLabels,
    ) -> pb.ModelInferResponse:
        """A body over ``inline_max_bytes`` is parsed on a worker thread, as untraced."""
        small = len(body) <= core.inline_max_bytes
        traceparent = labels.traceparent
        if not traceparent and random.random() >= self.sample_ratio:
            request = await _parsed(core, body, small)
            labels.take(request)
            return await self._unrecorded(
                core, request, deadline, started, core.runs_inline(request, small)
            )
        with self._root(traceparent) as root:
            with self.tracer.start_as_current_span("parse"):
                request = await _parsed(core, body, small)
            labels.take(request)
            return await self._steps(core, root, request, deadline, started, labels, small)

    async def infer(
        self,
        core: InferenceCore,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        labels: RequestLabels,
        small: bool = False,
    ) -> pb.ModelInferResponse:
        """``request`` (its ``labels`` taken already)."""
        traceparent = labels.traceparent
        if not traceparent and random.random() >= self.sample_ratio:  # not sampled: no span
            return await self._unrecorded(
                core, request, deadline, started, core.runs_inline(request, small)
            )
        with self._root(traceparent) as root:
            return await self._steps(core, root, request, deadline, started, labels, small)

    def infer_on_thread(
        self,
        core: InferenceCore,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        labels: RequestLabels,
        defer: Deferrer | None,
    ) -> pb.ModelInferResponse | concurrent.futures.Future[pb.ModelInferResponse]:
        """:meth:`InferenceCore.infer_on_thread`'s steps (``request``'s labels taken, current
        here), with the spans of :meth:`infer`: ``run`` on this thread, or for a model with
        batching ``queue`` until the batch queue's future is done (``queue`` and the call's
        span end in its done callback). The monitor's span, a child of the call's, is made
        where ``defer`` runs the monitor's work."""
        traceparent = labels.traceparent
        if not traceparent and random.random() >= self.sample_ratio:  # not sampled: no span
            return _unrecorded_on_thread(core, request, deadline, started, labels, defer)
        root = self._start_root(traceparent)
        pending: concurrent.futures.Future[pb.ModelInferResponse] | None = None
        try:
            with trace.use_span(root):  # an exception: recorded, an error status
                if not root.is_recording():  # the caller's flag: not sampled
                    return _unrecorded_on_thread(core, request, deadline, started, labels, defer)
                labels.trace_id = f"{root.get_span_context().trace_id:032x}"
                tracer = self.tracer
                root.set_attribute("edgewise.model", request.model_name)
                root.set_attribute("edgewise.version", request.model_version)
                root.set_attribute("edgewise.request_id", labels.request_id)
                with tracer.start_as_current_span("admit"):
                    reservation = core.admit(request)
                with tracer.start_as_current_span("decode"):
                    prepared = core.prepare(request, reservation)
                model = prepared.model
                root.set_attribute("edgewise.model", model.name)
                root.set_attribute("edgewise.version", model.version_str)
                loop = core.loop
                if model.batching is not None and loop is not None:
                    queue = tracer.start_span("queue")
                    try:
                        with trace.use_span(queue):  # the batch queue's task copies it
                            pending = asyncio.run_coroutine_threadsafe(
                                core.batched_labelled(
                                    prepared, deadline, started, reservation, labels
                                ),
                                loop,
                            )
                    except BaseException:
                        queue.end()
                        raise
                    pending.add_done_callback(functools.partial(_ended, (queue, root)))
                    return pending
                parent = trace.set_span_in_context(root)  # the monitor's parent

                def traced(function: Callable[..., object], *args: object) -> object:
                    """The monitor's work, where ``defer`` runs it, in a span of its own."""
                    schedule = defer or asyncio.get_running_loop().call_soon  # as DataPlane's
                    return schedule(self._monitor_under, parent, function, *args)

                with tracer.start_as_current_span("run"):
                    response = core.execute_on_thread(
                        prepared, deadline, started, reservation, traced
                    )
                return labels.answered(response)
        finally:
            if pending is None:  # else: its done callback ends it
                root.end()

    def _start_root(self, traceparent: str | None) -> trace.Span:
        """The call's span, not current yet (see :meth:`_root`)."""
        parent: Context | None = None
        if traceparent:
            parent = _PROPAGATOR.extract({TRACEPARENT: traceparent})
        return self.tracer.start_span("edgewise.infer", context=parent, kind=trace.SpanKind.SERVER)

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
        labels: RequestLabels,
        small: bool = False,
    ) -> pb.ModelInferResponse:
        inline = core.runs_inline(request, small)  # as the untraced path chooses
        if not root.is_recording():  # not sampled: the steps without spans
            return await self._unrecorded(core, request, deadline, started, inline)
        labels.trace_id = f"{root.get_span_context().trace_id:032x}"  # a new trace's, too
        tracer = self.tracer
        root.set_attribute("edgewise.model", request.model_name)
        root.set_attribute("edgewise.version", request.model_version)
        root.set_attribute("edgewise.request_id", labels.request_id)
        with tracer.start_as_current_span("admit"):
            reservation = core.admit(request)
        with tracer.start_as_current_span("decode"):
            prepared = core.prepare(request, reservation)
        model = prepared.model
        root.set_attribute("edgewise.model", model.name)
        root.set_attribute("edgewise.version", model.version_str)
        if model.batching is not None:
            with tracer.start_as_current_span("queue"):
                return await core.batched(prepared, deadline, started, reservation)
        loop = asyncio.get_running_loop()
        parent = contextvars.copy_context()  # the call's span: the monitor's parent
        schedule = loop.call_soon if inline else loop.call_soon_threadsafe

        def defer(function: Callable[..., object], *args: object) -> object:
            """The monitor's work, on the loop's next turn, in a span of its own."""
            return schedule(parent.run, self._monitor, function, *args)

        with tracer.start_as_current_span("run"):
            if inline:
                return _on_loop(core, prepared, deadline, started, reservation, defer)
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

    def _monitor(self, function: Callable[..., object], *args: object) -> None:
        with self.tracer.start_as_current_span("monitor"):
            function(*args)

    def _monitor_under(
        self, parent: Context, function: Callable[..., object], *args: object
    ) -> None:
        """``function(*args)`` in a ``monitor`` span, a child of ``parent``'s span (whatever
        context the deferred work runs in: the native front end runs it in a copy of the
        one it was deferred from, the ``run`` span's)."""
        with self.tracer.start_as_current_span("monitor", context=parent):
            function(*args)

    @staticmethod
    async def _unrecorded(
        core: InferenceCore,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        inline: bool,
    ) -> pb.ModelInferResponse:
        """The steps of a call that is not sampled, as the untraced path runs them."""
        reservation = core.admit(request)
        prepared = core.prepare(request, reservation)
        if prepared.model.batching is not None:
            return await core.batched(prepared, deadline, started, reservation)
        if inline:  # the monitor: on the loop's next turn
            return _on_loop(core, prepared, deadline, started, reservation, None)
        context = contextvars.copy_context()  # the call's labels, on the worker
        return await asyncio.get_running_loop().run_in_executor(
            core.executor, context.run, core.execute, prepared, deadline, started, reservation, _now
        )


async def _parsed(core: InferenceCore, body: bytes, small: bool) -> pb.ModelInferRequest:
    """The request in ``body``: parsed here when ``small``, else on a worker thread."""
    if small:
        return decode(pb.ModelInferRequest, body)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(core.executor, decode, pb.ModelInferRequest, body)


def _on_loop(
    core: InferenceCore,
    prepared: PreparedRequest,
    deadline: float | None,
    started: float,
    reservation: int,
    defer: Callable[..., object] | None,
) -> pb.ModelInferResponse:
    """Run a call on the event loop, its time counted as the loop's time on models (LoopLoad)."""
    try:
        return core.execute(prepared, deadline, started, reservation, defer=defer)
    finally:
        if core.loop_load is not None:
            core.loop_load.inline_seconds += time.perf_counter() - started


def _unrecorded_on_thread(
    core: InferenceCore,
    request: pb.ModelInferRequest,
    deadline: float | None,
    started: float,
    labels: RequestLabels,
    defer: Deferrer | None,
) -> pb.ModelInferResponse | concurrent.futures.Future[pb.ModelInferResponse]:
    """The steps of a thread's call that is not sampled, as InferenceCore.infer_on_thread runs
    them untraced."""
    reservation = core.admit(request)
    prepared = core.prepare(request, reservation)
    loop = core.loop
    if prepared.model.batching is not None and loop is not None:
        return asyncio.run_coroutine_threadsafe(
            core.batched_labelled(prepared, deadline, started, reservation, labels), loop
        )
    return labels.answered(core.execute_on_thread(prepared, deadline, started, reservation, defer))


def _ended(
    spans: tuple[trace.Span, ...], done: concurrent.futures.Future[pb.ModelInferResponse]
) -> None:
    """End ``spans`` (innermost first) once a batched call's future is ``done``: with an
    error status where it failed or was cancelled, as a span ended by its exception."""
    cancelled = done.cancelled()
    failure = concurrent.futures.CancelledError() if cancelled else done.exception()
    for span in spans:
        if failure is not None:
            span.record_exception(failure)
            span.set_status(Status(StatusCode.ERROR, f"{type(failure).__name__}: {failure}"))
        span.end()


def _now(function: Callable[..., object], *args: object) -> object:
    """A Deferrer for a worker thread: the monitor's work right there, as the untraced path."""
    return function(*args)
