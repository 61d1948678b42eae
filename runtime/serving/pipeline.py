"""The serving core: the one request pipeline every front end calls.

admit (memory) -> decode and check -> deadline -> batch queue or run -> monitor -> encode, with
the in-flight gauge, the outcome and latency of every call, and the batch queues, all here and
only here. A front end (grpcio, the native C++ front end, HTTP/REST) translates its wire format
to a :class:`~pb.ModelInferRequest`, calls one entry point and maps the
:class:`~edgewise.runtime.errors.EdgewiseError` it raises to its own status through the one
table in :mod:`edgewise.runtime.frontends.status`; nothing else.

Two call styles, one pipeline:

* :meth:`InferenceCore.infer` (and :meth:`InferenceCore.infer_body` on the request's bytes), for
  front ends that run on the server's event loop (grpcio, HTTP). Small requests run inline on the
  loop (onnxruntime at batch 1 costs tens of microseconds, less than a thread hand-off); large
  ones, and every request while recent model runs took longer than :data:`SIDE_BY_SIDE_SECONDS`
  or the loop is saturated (see LoopLoad), run on a worker thread, so the loop stays free to
  take calls in and shed them.
* :meth:`InferenceCore.infer_on_thread`, for a front end with threads of its own (the native
  front end): the request runs on the calling thread; a request for a model with dynamic
  batching joins its queue on the event loop, and the caller gets a future to wait on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from edgewise.runtime.errors import EdgewiseError, ResourceExhausted
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.batching import DynamicBatcher
from edgewise.runtime.serving.codecs import decode
from edgewise.runtime.serving.dataplane import DataPlane, PreparedRequest
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.model import LoadedModel
from edgewise.runtime.serving.request_context import CURRENT, RequestLabels

if TYPE_CHECKING:
    from edgewise.runtime.serving.admission import MemoryAdmission
    from edgewise.runtime.serving.capture import Capture
    from edgewise.runtime.serving.rollout import Rollouts
    from edgewise.runtime.serving.shedding import LoopLoad
    from edgewise.runtime.serving.tracing import RequestTracing

__all__ = ["SIDE_BY_SIDE_SECONDS", "Deferrer", "InferenceCore", "outcome_code"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where work taken off the response's path goes (the monitor's statistics): ``defer(f, *args)``.
Deferrer = Callable[..., object]

#: While model runs have recently taken longer than this a call (a moving average; a call's
#: decoding, checks and feature lookup included, refused calls too: a feature store that does not
#: answer holds the thread for its budget), every request runs on a worker thread: onnxruntime
#: releases the GIL, so such runs overlap and the event loop stays free to take calls in (and
#: shed them). The native front end uses the same figure.
SIDE_BY_SIDE_SECONDS = 0.0005


def outcome_code(exc: BaseException) -> str:
    """The outcome label of a call that failed with ``exc``."""
    return exc.code.name if isinstance(exc, EdgewiseError) else "INTERNAL"


def payload_bytes(request: pb.ModelInferRequest) -> int:
    """The size of a request's tensor payload (8 bytes per typed element: an upper bound)."""
    if request.raw_input_contents:
        return sum(len(raw) for raw in request.raw_input_contents)
    total = 0
    for tensor in request.inputs:
        contents = tensor.contents
        total += 8 * (
            len(contents.fp32_contents)
            + len(contents.fp64_contents)
            + len(contents.int_contents)
            + len(contents.int64_contents)
            + len(contents.uint_contents)
            + len(contents.uint64_contents)
            + len(contents.bool_contents)
            + len(contents.bytes_contents)
        )
    return total


class _CallAccounting:
    """Counts one inference call while its model runs (or it waits for a batch): the in-flight
    gauge, the memory reservation given back at the end, and the outcome with its latency. Used
    as ``with`` on whichever thread or task runs the call, so a call whose caller has gone away
    is still counted with the outcome it really had: a task cancelled under it (grpc.aio cancels
    a call whose deadline passed, or whose client went away) is DEADLINE_EXCEEDED once
    ``deadline`` has passed, else CANCELLED. ``name`` and ``version`` may be set to the model
    version that answered."""

    __slots__ = ("core", "deadline", "name", "reservation", "started", "version")

    def __init__(
        self,
        core: InferenceCore,
        name: str,
        version: str,
        started: float,
        reservation: int,
        deadline: float | None = None,
    ) -> None:
        self.core = core
        self.name = name
        self.version = version
        self.started = started
        self.reservation = reservation
        self.deadline = deadline

    def __enter__(self) -> _CallAccounting:
        self.core.metrics.inflight.inc()
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        core = self.core
        metrics = core.metrics
        metrics.inflight.dec()
        core.release(self.reservation)
        if exc is None:
            seconds = time.perf_counter() - self.started
            metrics.observe_request(self.name, self.version, "OK", seconds)
        elif isinstance(exc, Exception):  # not a cancellation: the call had an outcome
            metrics.observe_request(self.name, self.version, outcome_code(exc), 0.0)
        elif isinstance(exc, asyncio.CancelledError):
            late = self.deadline is not None and time.monotonic() >= self.deadline
            code = "DEADLINE_EXCEEDED" if late else "CANCELLED"
            metrics.observe_request(self.name, self.version, code, 0.0)


class InferenceCore:
    """The request pipeline (see the module's docstring). One per server process."""

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: ServerMetrics,
        executor: ThreadPoolExecutor,
        inline_max_bytes: int = 64 * 1024,
        admission: MemoryAdmission | None = None,
        retry_after_ms: int = 50,
        loop_load: LoopLoad | None = None,
        calls_in_flight: Callable[[], int] | None = None,
        capture: Capture | None = None,
        rollouts: Rollouts | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.executor = executor
        self.inline_max_bytes = inline_max_bytes
        self.admission = admission
        self.retry_after_ms = retry_after_ms  # the hint of memory admission and full batch queues
        # A saturated event loop runs nothing inline (see LoopLoad): calls stay visible to shedding.
        self.loop_load = loop_load
        self.calls_in_flight = (
            calls_in_flight  # every front end's calls in flight: a batcher's idle test
        )
        # Data capture (serve --capture-dir): offered every answered request; None: off.
        self.capture = capture
        # Splits, shadows and labels (rollout.py): offered every answered request; None: off.
        self.rollouts = rollouts
        # OpenTelemetry spans (serve --otel-endpoint; tracing.py, imported only then); None: off,
        # and a request costs this one check.
        self.tracing: RequestTracing | None = None
        # Moving average of a model run's seconds (see SIDE_BY_SIDE_SECONDS); written by whichever
        # thread ran the model: a race only blurs it.
        self.run_seconds = 0.0
        # The loop batch queues run on (taken by the first call made on it, or :meth:`attach`).
        self.loop: asyncio.AbstractEventLoop | None = None
        # One batch queue per served model version that has batching configured; a version
        # that is unloaded drops out with its last reference.
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, DynamicBatcher] = (
            weakref.WeakKeyDictionary()
        )

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that runs batch queues for :meth:`infer_on_thread`."""
        self.loop = loop

    def _after_answer(self, prepared: PreparedRequest, response: pb.ModelInferResponse) -> None:
        """After an answer: its copies for the capture and the rollout's shadow (where any)."""
        if self.capture is not None:
            self.capture.offer(prepared, response)
        rollouts = self.rollouts
        if rollouts is not None and rollouts.active:
            rollouts.offer(prepared, response)

    def batch_queues(self) -> dict[tuple[str, str], DynamicBatcher]:
        """The batch queues by (model, version): one per served version with batching that has
        been called (a version that is unloaded drops out)."""
        return {(model.name, model.version_str): queue for model, queue in self._batchers.items()}

    # ---- the entry points ----------------------------------------------------------------------

    async def infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float | None = None,
        *,
        small: bool = False,
        labels: RequestLabels | None = None,
    ) -> pb.ModelInferResponse:
        """Answer ``request`` (on the event loop). ``deadline``: a ``time.monotonic()`` instant
        or None; ``started``: when the call arrived (``time.perf_counter()``), for its latency;
        ``small``: its encoded size is known to be at most ``inline_max_bytes``; ``labels``:
        the call's (request_context.py: what its metadata carried; None: none), the current
        labels while the call is served, filled in here."""
        if started is None:
            started = time.perf_counter()
        if labels is None:
            labels = RequestLabels()
        labels.take(request)
        with _serving(labels):
            response = await self._infer(request, deadline, started, small, labels)
        return labels.answered(response)

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        small: bool,
        labels: RequestLabels,
    ) -> pb.ModelInferResponse:
        if self.tracing is not None:
            return await self.tracing.infer(self, request, deadline, started, labels, small)
        reservation = self.admit(request)
        if not self._runs_inline(request, small):
            return await self._on_worker(
                self._run_counted, request, deadline, started, reservation, reservation=reservation
            )
        began = time.perf_counter()
        try:
            prepared = self._prepare_counted(request, reservation)
        except Exception:
            # A refusal counts in the moving average too: one that took long (a feature store
            # that did not answer within its budget) sends the next calls to the workers.
            self._timed(began)
            raise
        if prepared.model.batching is not None:
            return await self._batched(prepared, deadline, started, reservation)
        try:
            response = self._execute_counted(prepared, deadline, started, reservation)
            self._timed(began)  # decoding, checks and feature lookup included
            return response
        finally:
            if self.loop_load is not None:  # the loop's time spent on models
                self.loop_load.inline_seconds += time.perf_counter() - started

    async def infer_body(
        self,
        body: bytes,
        deadline: float | None,
        started: float | None = None,
        labels: RequestLabels | None = None,
    ) -> pb.ModelInferResponse:
        """:meth:`infer` on the request's protobuf bytes: a body over ``inline_max_bytes`` is
        parsed, admitted and run on a worker thread (the event loop never spends long on one
        call); a smaller one is parsed here. An undecodable body is INVALID_ARGUMENT."""
        if started is None:
            started = time.perf_counter()
        if labels is None:
            labels = RequestLabels()
        with _serving(labels):
            if self.tracing is not None:
                response = await self.tracing.infer_body(self, body, deadline, started, labels)
            elif len(body) > self.inline_max_bytes:
                response = await self._on_worker(
                    self._decode_and_run, body, deadline, started, labels
                )
            else:
                request = decode(pb.ModelInferRequest, body)
                labels.take(request)
                response = await self._infer(request, deadline, started, True, labels)
        return labels.answered(response)

    def infer_on_thread(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        defer: Deferrer | None = None,
        labels: RequestLabels | None = None,
    ) -> pb.ModelInferResponse | concurrent.futures.Future[pb.ModelInferResponse]:
        """Answer ``request`` on the calling thread (a front end's own thread, not the loop's):
        the response, or for a model with dynamic batching a future that the batch queue (on
        the loop given to :meth:`attach`) completes. ``defer(function, *args)`` takes the
        monitor's statistics off the response's path (the caller runs them once it has sent
        the answer). ``labels``: as for :meth:`infer`, current on this thread until this
        returns (and on the batch queue's task)."""
        if labels is None:
            labels = RequestLabels()
        labels.take(request)
        with _serving(labels):
            if self.tracing is not None:  # the same steps, one span each (tracing.py)
                return self.tracing.infer_on_thread(self, request, deadline, started, labels, defer)
            reservation = self.admit(request)
            prepared = self._prepare_counted(request, reservation)
            loop = self.loop
            if prepared.model.batching is not None and loop is not None:
                return asyncio.run_coroutine_threadsafe(  # the task copies this context
                    self.batched_labelled(prepared, deadline, started, reservation, labels), loop
                )
            response = self._execute_counted(prepared, deadline, started, reservation, defer=defer)
        return labels.answered(response)

    async def batched_labelled(
        self,
        prepared: PreparedRequest,
        deadline: float | None,
        started: float,
        reservation: int,
        labels: RequestLabels,
    ) -> pb.ModelInferResponse:
        """:meth:`_batched` for :meth:`infer_on_thread` (run on the loop), the response with the
        id made for a request without one."""
        try:
            response = await self._batched(prepared, deadline, started, reservation)
        except Exception as exc:
            _refused(exc)
            raise
        return labels.answered(response)

    # ---- the steps -----------------------------------------------------------------------------

    # The steps as the traced path (tracing.py) calls them, one span each.

    def prepare(self, request: pb.ModelInferRequest, reservation: int) -> PreparedRequest:
        """Decode and check an admitted request (counted and released if refused)."""
        return self._prepare_counted(request, reservation)

    def execute(
        self,
        prepared: PreparedRequest,
        deadline: float | None,
        started: float,
        reservation: int,
        defer: Deferrer | None = None,
    ) -> pb.ModelInferResponse:
        """Run, encode and count a prepared request (see :meth:`_execute_counted`), in the
        moving average of a model run."""
        began = time.perf_counter()
        response = self._execute_counted(prepared, deadline, started, reservation, defer=defer)
        self._timed(began)
        return response

    def execute_on_thread(
        self,
        prepared: PreparedRequest,
        deadline: float | None,
        started: float,
        reservation: int,
        defer: Deferrer | None = None,
    ) -> pb.ModelInferResponse:
        """Run, encode and count a prepared request on a front end's own thread (see
        :meth:`_execute_counted`), outside the moving average of :meth:`execute` (the native
        front end keeps its own)."""
        return self._execute_counted(prepared, deadline, started, reservation, defer=defer)

    def runs_inline(self, request: pb.ModelInferRequest, small: bool) -> bool:
        """Whether ``request`` runs on the event loop (see :meth:`_runs_inline`)."""
        return self._runs_inline(request, small)

    async def batched(
        self, prepared: PreparedRequest, deadline: float | None, started: float, reservation: int
    ) -> pb.ModelInferResponse:
        """Join the model's batch queue and count the call."""
        return await self._batched(prepared, deadline, started, reservation)

    def admit(self, request: pb.ModelInferRequest) -> int:
        """Memory admission, before anything is decoded: the reservation to :meth:`release`, or
        ResourceExhausted (counted here, as no thread will run the request)."""
        if self.admission is None:
            return 0
        try:
            return self.admission.admit(request)
        except ResourceExhausted as exc:
            self.metrics.observe_request(
                request.model_name, request.model_version, exc.code.name, 0.0
            )
            raise

    def release(self, reservation: int) -> None:
        if reservation and self.admission is not None:
            self.admission.release(reservation)

    def _batches(self, request: pb.ModelInferRequest) -> bool:
        """Whether the model version ``request`` asks for has dynamic batching configured."""
        try:
            model = self.dataplane.repository.get(request.model_name, request.model_version)
        except EdgewiseError:
            return False  # the request fails the same way wherever it is decoded
        return model.batching is not None

    def _timed(self, began: float) -> None:
        """One more model run, begun at ``began`` (perf_counter), in the moving average read by
        :meth:`_runs_inline` (the native front end keeps its own average in C++)."""
        self.run_seconds += (time.perf_counter() - began - self.run_seconds) / 16

    def _runs_inline(self, request: pb.ModelInferRequest, small: bool) -> bool:
        """Whether ``request`` runs on the event loop: a small one while model runs are cheap
        and the loop is not saturated by them (see LoopLoad); a request for a model with
        batching joins its batch queue from the loop whatever (its batch runs on a worker
        thread anyway). ``small``: its body is known to be at most ``inline_max_bytes`` (which
        bounds its parsing and decoding), else its payload is measured."""
        if not small and payload_bytes(request) > self.inline_max_bytes:
            return False
        busy = self.loop_load is not None and self.loop_load.busy
        costly = self.run_seconds > SIDE_BY_SIDE_SECONDS
        return not (busy or costly) or self._batches(request)

    def _run_counted(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        reservation: int = 0,
    ) -> pb.ModelInferResponse:
        """Run one request and count it, on whichever thread runs it: a request whose caller has
        gone away is still counted with the outcome it really had."""
        name, version = request.model_name, request.model_version
        began = time.perf_counter()
        try:
            with _CallAccounting(self, name, version, started, reservation) as call:
                prepared = self.dataplane.prepare(request)
                call.name, call.version = prepared.model.name, prepared.model.version_str
                _label(prepared)
                response = self.dataplane.execute(prepared, deadline)
        finally:
            self._timed(began)  # a refusal too (see _infer)
        self._after_answer(prepared, response)
        return response

    def _decode_and_run(
        self, body: bytes, deadline: float | None, started: float, labels: RequestLabels
    ) -> pb.ModelInferResponse:
        """On a worker thread: parse a large request, admit it, run it and count it."""
        request = decode(pb.ModelInferRequest, body)
        labels.take(request)
        return self._run_counted(request, deadline, started, self.admit(request))

    def _prepare_counted(self, request: pb.ModelInferRequest, reservation: int) -> PreparedRequest:
        try:
            prepared = self.dataplane.prepare(request)
            _label(prepared)
            return prepared
        except Exception as exc:
            code = outcome_code(exc)
            self.metrics.observe_request(request.model_name, request.model_version, code, 0.0)
            self.release(reservation)
            raise

    def _execute_counted(
        self,
        prepared: PreparedRequest,
        deadline: float | None,
        started: float,
        reservation: int,
        defer: Deferrer | None = None,
    ) -> pb.ModelInferResponse:
        """Run and count a prepared request; the monitor's statistics are taken after the
        response: on the loop's next turn, or through ``defer`` (see DataPlane.execute)."""
        model = prepared.model
        with _CallAccounting(self, model.name, model.version_str, started, reservation):
            response = self.dataplane.execute(
                prepared, deadline, on_loop=defer is None, defer=defer
            )
        self._after_answer(prepared, response)
        return response

    async def _batched(
        self,
        prepared: PreparedRequest,
        deadline: float | None,
        started: float,
        reservation: int,
    ) -> pb.ModelInferResponse:
        model = prepared.model
        config = model.batching
        assert config is not None  # the caller checked
        batcher = self._batchers.get(model)
        if batcher is None:
            histogram = self.metrics.batch_rows.labels(model.name, model.version_str)
            batcher = DynamicBatcher(
                model, config, self.executor, histogram.observe, self.calls_in_flight
            )
            self._batchers[model] = batcher
        with _CallAccounting(self, model.name, model.version_str, started, reservation, deadline):
            response = await batcher.submit(prepared, deadline)
        self._after_answer(prepared, response)
        return response

    async def _on_worker(
        self, function: Callable[..., T], *args: object, reservation: int = 0
    ) -> T:
        """``function(*args)`` on a worker thread, in this call's context (its labels); a call
        cancelled before it ran gives back ``reservation``."""
        future = self.executor.submit(contextvars.copy_context().run, function, *args)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if future.cancelled():  # never ran: its reservation is still held
                self.release(reservation)


def _label(prepared: PreparedRequest) -> None:
    """The current call's labels name the model version that answers."""
    labels = CURRENT.get()
    if labels is not None:
        labels.model, labels.version = prepared.model.name, prepared.model.version_str


@contextmanager
def _serving(labels: RequestLabels) -> Iterator[None]:
    """``labels`` current while a call is served (reset after, whatever happens); a refusal
    logged on its way out (:func:`_refused`)."""
    token = CURRENT.set(labels)
    try:
        yield
    except Exception as exc:
        _refused(exc)
        raise
    finally:
        CURRENT.reset(token)


def _refused(exc: Exception) -> None:
    """A refused call, in a DEBUG line (``--log-level DEBUG``) with the call's labels; an
    unexpected error is the front end's to log (at ERROR)."""
    if isinstance(exc, EdgewiseError) and log.isEnabledFor(logging.DEBUG):
        log.debug("call refused: %s: %s", exc.code.name, exc.message)
