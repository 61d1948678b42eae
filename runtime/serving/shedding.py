"""Load shedding: past its in-flight limit the server refuses inference calls at once, with
RESOURCE_EXHAUSTED and a retry hint, instead of queueing them without bound.

A call counts as in flight from the moment the server's event loop dispatches it (before its
request message is read) until its task ends, whatever way it ends: answered, refused, cancelled
by the client or killed by a deadline. That is counted on the call's own asyncio task (a done
callback), so a call that never reaches its handler cannot leak a slot. Calls that wait for the
event loop or for a worker thread count, so the limit bounds the queue as well as the work.

Only ``ModelInfer`` is shed: health checks, metadata and control calls always get through, so a
saturated server still answers its liveness probe. A refused call never reads its request (no
protobuf parsing, not even a wait for the message), which keeps shedding cheap next to serving.

Calls the event loop has not taken in yet wait in gRPC's core, where no Python can count them:
the grpcio server keeps that queue short (:func:`pending_limits`; the core refuses past it, at
once, with CANCELLED) and keeps model runs off the loop while they are costly (see servicers.py),
so that the loop takes calls in as they come and the shedder decides on them there.

Every RESOURCE_EXHAUSTED a client can usefully retry (shedding, memory admission, a full batch
queue) carries the same hint in its trailing metadata (:func:`retry_trailers`):
``retry-after-ms`` for any client and ``grpc-retry-pushback-ms``, which gRPC's own retry policy
honours (a client with a ``retryPolicy`` for RESOURCE_EXHAUSTED waits that long). A message over
the size cap gets no hint: retrying it cannot help.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from edgewise.runtime.config.channels import PUSHBACK_KEY, RETRY_AFTER_KEY

__all__ = [
    "LoadShedder",
    "LoopLoad",
    "backstop_limit",
    "pending_limits",
    "retry_trailers",
    "service_handlers",
    "shed_later",
]

log = logging.getLogger(__name__)


def retry_trailers(milliseconds: int) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a retryable RESOURCE_EXHAUSTED: come back in ``milliseconds``."""
    value = str(max(0, int(milliseconds)))
    return ((RETRY_AFTER_KEY, value), (PUSHBACK_KEY, value))


def backstop_limit(max_inflight: int) -> int | None:
    """gRPC's own cap on concurrent calls of every kind, far behind our shedding: calls being
    refused count there too, and on a machine short of CPU they can be hundreds at once, so it
    sits high enough that health checks still get through while inference is shed (a lower
    cap refused them in a 10-minute soak), and only bounds memory if shedding cannot keep up."""
    return max(1024, 32 * max_inflight) if max_inflight > 0 else None


def pending_limits(max_inflight: int) -> list[tuple[str, int]]:
    """gRPC core options that bound its own queue: the calls that arrived but that the event
    loop has not taken in yet. Past the soft limit core refuses a growing share of new calls at
    once (CANCELLED, before any Python runs), past the hard limit all of them, and a call that
    waited there a second is refused too; without these bounds (1000 and 3000 calls, 30 s by
    default) a loop that falls behind on a machine short of CPU lets calls wait there until
    their deadline, each holding its request's memory. The soft limit (16 x max_inflight, at
    least 256) holds a burst of a few hundred calls arriving at once, which the loop takes in
    one at a time within milliseconds and sheds with the hint (at 64, a burst of 200 calls on
    one connection had 15 to 29 of them cancelled by core)."""
    if max_inflight <= 0:
        return []
    soft = max(256, 16 * max_inflight)
    return [
        ("grpc.server.max_pending_requests", soft),
        ("grpc.server.max_pending_requests_hard_limit", 2 * soft),
        ("grpc.server_max_unrequested_time_in_server", 1),  # seconds
    ]


class LoadShedder(grpc.GenericRpcHandler):
    """Serves the method handlers of the services given to :meth:`add_service` and refuses
    calls of ``methods`` beyond ``limit`` in flight (see the module docstring).

    A generic handler rather than an interceptor: gRPC asks it for a call's handler
    synchronously, on the call's own task, after any interceptor (token checks come first; see
    :func:`shed_later` for a caller known by its certificate); an aio interceptor would cost
    every call a coroutine and an await (about 12 us a call here)."""

    def __init__(
        self,
        limit: int,
        retry_ms: int,
        methods: frozenset[str],
        registry: CollectorRegistry | None = None,
        elsewhere: Callable[[], int] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.methods = methods
        self.inflight = 0
        # Inference calls counted outside this shedder that share its limit (the native front
        # end's, counted in C++; it checks the limit itself with them and :attr:`inflight`).
        self._elsewhere = elsewhere
        # Told the new count at each enter and leave (the HTTP front end's calls): the native
        # front end's fast path keeps a copy in native memory to check the limit without the GIL.
        self.on_change: Callable[[int], None] | None = None
        self.shed = 0
        self.last_shed = -1e9  # time.monotonic() of the last refusal
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
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
        self.admitted = Gauge(
            "edgewise_admitted_calls",
            "Inference calls in flight on every front end as the limit counts them (dispatched, "
            "not yet ended).",
            registry=registry,
        )
        self.admitted.set_function(self.admitted_calls)
        trailers = retry_trailers(retry_ms)
        message = f"server overloaded: {limit} inference calls in flight; retry after {retry_ms} ms"
        self.refusal: tuple[str, tuple[tuple[str, str], ...]] = (message, trailers)

        async def refuse(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailers
            )

        # A streaming handler, so that gRPC does not even wait for the request message: a
        # refused request is never received into Python, let alone parsed.
        self._refuse: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(
            refuse
        )

    def add_service(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Serve ``handlers`` (method name -> handler) of ``service`` (``package.Service``)."""
        for method, handler in handlers.items():
            self._handlers[f"/{service}/{method}"] = handler

    def record_shed(self) -> None:
        """Count one call refused for the limit (the refusal is :attr:`refusal`)."""
        self.shed += 1
        self.last_shed = time.monotonic()
        self._shed_counter.inc()

    def _done(self, _task: object) -> None:
        self.inflight -= 1

    def enter(self, elsewhere: Callable[[], int] | None = None) -> bool:
        """For a front end that counts its own inference calls (HTTP), on the event loop: take
        one more call unless the limit is reached, counting it with the gRPC ones (so both
        share the limit); False when it is (the call is counted as shed; answer it with
        :attr:`refusal`'s message and hint). ``elsewhere``: calls counted outside this shedder
        that share the limit too (default: the ones it was made with, the native front end's).
        Every True is paired with :meth:`leave`."""
        outside = elsewhere if elsewhere is not None else self._elsewhere
        if self.inflight + (outside() if outside is not None else 0) >= self.limit:
            self.record_shed()
            return False
        self.inflight += 1
        if self.on_change is not None:
            self.on_change(self.inflight)
        return True

    def leave(self) -> None:
        """The end of a call :meth:`enter` took."""
        self.inflight -= 1
        if self.on_change is not None:
            self.on_change(self.inflight)

    def calls_in_flight(self) -> int:
        """Inference calls dispatched and not yet ended (refused ones excluded)."""
        return self.inflight

    def admitted_calls(self) -> int:
        """Inference calls in flight on every front end: this shedder's (grpcio's and HTTP's)
        and those counted elsewhere (the native front end's)."""
        return self.inflight + (self._elsewhere() if self._elsewhere is not None else 0)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None or method not in self.methods:
            return handler
        if _SHED_LATER.get():  # decided in the handler, by enter_task (see shed_later)
            return handler
        if self.inflight >= self.limit:
            self.record_shed()
            return self._refuse
        task = asyncio.current_task()
        if task is not None:
            # Runs on the event loop thread, in the call's task: no lock needed.
            self.inflight += 1
            task.add_done_callback(self._done)
        return handler

    def refuses(self, handler: grpc.RpcMethodHandler[Any, Any] | None) -> bool:
        """Whether ``handler`` (what :meth:`service` answered) is the refusal of a shed call."""
        return handler is self._refuse

    def enter_task(self) -> bool:
        """:meth:`service`'s decision, for a call whose handler :meth:`service` returned for a
        :func:`shed_later`: in the call's task, take a slot until the task ends; False (counted
        as shed; answer with :attr:`refusal`) at the limit."""
        if self.inflight >= self.limit:
            self.record_shed()
            return False
        task = asyncio.current_task()
        if task is not None:
            self.inflight += 1
            task.add_done_callback(self._done)
        return True

    def leave_task(self) -> None:
        """Give back now the slot the call on the current task holds, if it holds one: for a
        call refused after the shedder let it in (a credential's quota), so that its refusal
        takes no slot while it is answered."""
        task = asyncio.current_task()
        if task is not None and task.remove_done_callback(self._done):
            self.inflight -= 1


#: Set while a check before the shedder asks for a handler it will decide on later (shed_later).
_SHED_LATER: ContextVar[bool] = ContextVar("edgewise_shed_later", default=False)


@contextmanager
def shed_later() -> Iterator[None]:
    """Within it, in the call's task, :meth:`LoadShedder.service` returns the method's handler
    without deciding: for a check before the shedder that can only know the caller in the
    call's handler (a client certificate, which only the handler's context shows); it calls
    :meth:`LoadShedder.enter_task` there once the caller is known, so that an unauthenticated
    call takes no slot and is never counted as shed."""
    token = _SHED_LATER.set(True)
    try:
        yield
    finally:
        _SHED_LATER.reset(token)


def service_handlers(
    add_to_server: Callable[[Any, Any], None], servicer: object
) -> tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
    """The service name and method handlers that a generated ``add_..._to_server`` function
    registers for ``servicer``, without a server: what :meth:`LoadShedder.add_service` takes."""

    class _Collector:
        found: tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] | None = None

        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass  # the same handlers again, as a generic handler

        def add_registered_method_handlers(
            self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
        ) -> None:
            self.found = (service, dict(handlers))

    collector = _Collector()
    add_to_server(servicer, collector)
    if collector.found is None:
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers")
    return collector.found


class LoopLoad:
    """How busy the event loop is: the share of wall time it spent waiting in ``select`` over
    the last ``window`` seconds, measured by wrapping the loop's selector.

    Why it matters: gRPC hands the server one new call per turn of the loop or so, and calls
    not yet handed over wait inside gRPC's core, where no Python code can see, count or shed
    them. While requests run inline on the loop, a saturated loop therefore queues new calls
    out of sight. When the loop stops idling while most of its time goes to running models
    inline (:attr:`inline_seconds`, added up by the servicer), :attr:`busy` turns on and the
    servicer runs requests on worker threads instead: the loop is free again to take calls in,
    the queue moves where :class:`LoadShedder` counts it, and excess calls get
    RESOURCE_EXHAUSTED with a retry hint. Below saturation requests stay inline (no thread
    hand-off), and so do requests so cheap that gRPC's own machinery, not the model, fills the
    loop (moving them would cost a hand-off and free nothing). Once busy, it stays
    busy until the loop idles again *and* nothing was shed for ``hold`` seconds, so that it does
    not flap back to inline work while the overload lasts.

    A saturated loop is not always an overloaded server: a few clients that send their next call
    as soon as the last is answered keep it saturated with no backlog at all, and there the
    hand-off to threads only costs (13 % fewer calls per second and 13 % more CPU per call for
    the forest at concurrency 8 on two cores). So, given the shedder's count (``in_flight``)
    and ``limit``, the first ``probe`` seconds of busy work are a test: with the loop free,
    every waiting call becomes visible within milliseconds. If none was shed and the count
    never reached the limit, nothing needed shedding: :attr:`busy` turns off and stays off for
    ``quiet`` seconds even if the loop saturates again (then the next probe). An overload that
    starts in a quiet period is therefore seen within ``quiet`` seconds, not ``window``. While
    busy, a new probe starts whenever nothing was shed for ``hold`` seconds, so a server does not
    stay on threads after an overload ends while its loop stays saturated.

    With an event loop that has no selector to wrap (uvloop), :attr:`busy` stays False.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        window: float = 0.1,
        busy_below: float = 0.05,
        idle_above: float = 0.15,
        hold: float = 2.0,
        last_shed: Callable[[], float] = lambda: -1e9,
        inline_share: float = 0.25,
        in_flight: Callable[[], int] | None = None,
        limit: int = 0,
        probe: float = 0.25,
        quiet: float = 2.0,
    ) -> None:
        self.window = window
        self._in_flight = in_flight
        self.limit = limit
        self.probe = probe
        self.quiet = quiet
        self._probe_started: float | None = None  # time.monotonic() of the probe under way
        self._probe_peak = 0  # the most calls in flight seen during it
        self._probe_ended = -1e9
        self._quiet_until = -1e9
        self.probes_cleared = 0  # probes that found nothing to shed (busy turned off early)
        self.busy_below = busy_below
        self.idle_above = idle_above
        self.hold = hold
        self.inline_share = inline_share
        self.inline_seconds = 0.0  # added to by the servicer: time spent running requests inline
        self._inline_mark = 0.0
        self._last_shed = last_shed
        self._busy_since_seen = -1e9
        self.busy = False
        self.idle_fraction = 1.0
        self._idle = 0.0
        self._mark = (time.perf_counter(), 0.0)
        self._task: asyncio.Task[None] | None = None
        selector = getattr(loop, "_selector", None)
        original = getattr(selector, "select", None)
        self.enabled = original is not None
        if original is None:
            log.info("event loop without a selector: inline requests are not moved off it")
            return

        def select(timeout: float | None = None) -> Any:
            if timeout is not None and timeout <= 0:
                return original(timeout)
            started = time.perf_counter()
            try:
                return original(timeout)
            finally:
                self._idle += time.perf_counter() - started

        selector.select = select  # type: ignore[union-attr]
        self._task = loop.create_task(self._watch())

    def sample(self) -> float:
        """Close a window: the idle share since the previous one; updates :attr:`busy`."""
        now = time.perf_counter()
        then, idle_then = self._mark
        elapsed = now - then
        if elapsed <= 0:
            return self.idle_fraction
        self.idle_fraction = min(1.0, (self._idle - idle_then) / elapsed)
        inline = (self.inline_seconds - self._inline_mark) / elapsed
        self._mark = (now, self._idle)
        self._inline_mark = self.inline_seconds
        moment = time.monotonic()
        saturated = self.idle_fraction < self.busy_below
        if self.busy and self._probe_started is not None and self._probe_cleared(moment):
            self.busy = False
            self._quiet_until = moment + self.quiet
            self.probes_cleared += 1
        elif saturated and (self.busy or inline >= self.inline_share):
            if not self.busy and moment < self._quiet_until:
                return self.idle_fraction
            # A probe as busy work starts, and again once nothing was shed for ``hold`` seconds
            # (an overload that ended while the loop stayed saturated).
            quiet_since = moment - max(self._probe_ended, self._last_shed())
            if (
                self._in_flight is not None
                and self.limit > 0
                and self._probe_started is None
                and (not self.busy or quiet_since > self.hold)
            ):
                self._probe_started, self._probe_peak = moment, 0
            self.busy = True
            self._busy_since_seen = moment
        elif (
            self.busy
            and self.idle_fraction > self.idle_above
            and moment - max(self._busy_since_seen, self._last_shed()) > self.hold
        ):
            self.busy = False
            self._probe_started = None
        return self.idle_fraction

    def _probe_cleared(self, moment: float) -> bool:
        """Whether the probe under way is over and found nothing to shed (it ends, shedding
        or not, after ``probe`` seconds: then the ``hold`` rule applies)."""
        assert self._probe_started is not None and self._in_flight is not None
        self._probe_peak = max(self._probe_peak, self._in_flight())
        if moment - self._probe_started < self.probe:
            return False
        started, self._probe_started = self._probe_started, None
        self._probe_ended = moment
        return self._last_shed() < started and self._probe_peak < self.limit

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.window)
            self.sample()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
