"""Load shedding: past its in-flight limit the server refuses inference calls at once, with
RESOURCE_EXHAUSTED and a retry hint, instead of queueing them without bound.

A call counts as in flight from the moment the server's event loop dispatches it (before its
request message is read) until its task ends, whatever way it ends: answered, refused, cancelled
by the client or killed by a deadline. That is counted on the call's own asyncio task (a done
callback), so a call that never reaches its handler cannot leak a slot. Calls that wait for the
event loop or for a worker thread count, so the limit bounds the queue as well as the work.

Only ``ModelInfer`` is shed: health checks, metadata and control calls always get through, so a
saturated server still answers its liveness probe. A refused call never reads its request (no
protobuf parsing), which keeps shedding cheap next to serving.

Every RESOURCE_EXHAUSTED a client can usefully retry (shedding, memory admission, a full batch
queue) carries the same hint in its trailing metadata (:func:`retry_trailers`):
``retry-after-ms`` for any client and ``grpc-retry-pushback-ms``, which gRPC's own retry policy
honours (a client with a ``retryPolicy`` for RESOURCE_EXHAUSTED waits that long). A message over
the size cap gets no hint: retrying it cannot help.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = [
    "PUSHBACK_KEY",
    "RETRY_AFTER_KEY",
    "LoadShedder",
    "backstop_limit",
    "retry_after_ms",
    "retry_trailers",
]

log = logging.getLogger(__name__)

RETRY_AFTER_KEY: Final = "retry-after-ms"
PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"


def retry_trailers(milliseconds: int) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a retryable RESOURCE_EXHAUSTED: come back in ``milliseconds``."""
    value = str(max(0, int(milliseconds)))
    return ((RETRY_AFTER_KEY, value), (PUSHBACK_KEY, value))


def retry_after_ms(trailing_metadata: Any) -> int | None:
    """The retry hint of a call's trailing metadata (client side), or None."""
    for key, value in trailing_metadata or ():
        if key in (RETRY_AFTER_KEY, PUSHBACK_KEY):
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def backstop_limit(max_inflight: int) -> int | None:
    """gRPC's own cap on concurrent calls of every kind, behind our shedding: high enough that
    health and control calls get through while inference is shed, low enough to bound memory
    if even shedding cannot keep up."""
    return 4 * max_inflight + 64 if max_inflight > 0 else None


class LoadShedder(grpc.aio.ServerInterceptor):
    """Refuses calls of ``methods`` beyond ``limit`` in flight (see the module docstring)."""

    def __init__(
        self,
        limit: int,
        retry_ms: int,
        methods: frozenset[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.methods = methods
        self.inflight = 0
        self.shed = 0
        registry = registry if registry is not None else CollectorRegistry()
        self._shed_counter = Counter(
            "edgewise_shed_requests",
            "Inference calls refused RESOURCE_EXHAUSTED because the in-flight limit was reached.",
            registry=registry,
        )
        Gauge(
            "edgewise_inflight_limit",
            "Inference calls admitted at once before shedding starts.",
            registry=registry,
        ).set(limit)
        admitted = Gauge(
            "edgewise_admitted_calls",
            "Inference calls in flight as the shedder counts them (dispatched, not yet ended).",
            registry=registry,
        )
        admitted.set_function(lambda: self.inflight)
        trailers = retry_trailers(retry_ms)
        message = (
            f"server overloaded: {limit} inference calls in flight; retry after {retry_ms} ms"
        )

        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailers
            )

        # No deserializer: a refused request is never parsed.
        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def _done(self, _task: object) -> None:
        self.inflight -= 1

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler_call_details.method not in self.methods:
            return await continuation(handler_call_details)
        if self.inflight >= self.limit:
            self.shed += 1
            self._shed_counter.inc()
            return self._refuse
        task = asyncio.current_task()
        if task is not None:
            # Runs on the event loop thread, like this method: no lock needed.
            self.inflight += 1
            task.add_done_callback(self._done)
        return await continuation(handler_call_details)
