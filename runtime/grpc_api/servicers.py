"""gRPC servicers (grpc.aio): the V2 inference service and edgewise's repository service.

Every handler calls the data plane (or the repository) and maps an
:class:`~edgewise.runtime.errors.EdgewiseError` to a gRPC status through the one table in
:mod:`edgewise.runtime.grpc_api.status`. An unexpected exception becomes INTERNAL with its type
name; the server itself never goes down because of a request.

Small requests run inline on the event loop (onnxruntime at batch 1 costs tens of microseconds, less
than a thread hand-off); requests with a large payload, and every request while recent model runs
took longer than :data:`SIDE_BY_SIDE_SECONDS` (the native front end's rule), run on a worker thread
so they do not hold up the loop: a loop busy running models takes no new calls in, and calls it
has not taken in wait inside gRPC where nothing can shed them. The grpcio server hands ModelInfer
its request as bytes (:meth:`InferenceServicer.infer_bytes`): a large body is parsed on the worker
thread too, and an undecodable one is INVALID_ARGUMENT (see wire.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import grpc

from edgewise.runtime.admission import MemoryAdmission
from edgewise.runtime.batching import BatchingConfig, DynamicBatcher
from edgewise.runtime.dataplane import DataPlane, PreparedRequest
from edgewise.runtime.errors import (
    EdgewiseError,
    ErrorCode,
    InvalidInput,
    ModelNotReady,
    ResourceExhausted,
)
from edgewise.runtime.grpc_api.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.grpc_api.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.grpc_api.overload import LoopLoad, retry_trailers
from edgewise.runtime.grpc_api.status import grpc_status
from edgewise.runtime.grpc_api.wire import decode
from edgewise.runtime.metrics import ServerMetrics
from edgewise.runtime.model import LoadedModel
from edgewise.runtime.paths import parse_version
from edgewise.runtime.quality import submit_feedback
from edgewise.runtime.repository import ModelRepository, VersionStatus

if TYPE_CHECKING:
    from edgewise.runtime.monitor import DriftReport
    from edgewise.runtime.quality import OnlineQuality

__all__ = ["InferenceServicer", "MonitoringServicer", "QualityServicer", "RepositoryServicer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Marks a control call one process forwards to its siblings in multi-process mode.
FORWARDED_HEADER = "edgewise-forwarded"

#: While model runs have recently taken longer than this a call (a moving average), every request
#: runs on a worker thread: onnxruntime releases the GIL, so such runs overlap and the event loop
#: stays free to take calls in (and shed them). The native front end uses the same figure.
SIDE_BY_SIDE_SECONDS = 0.0005


def _payload_bytes(request: pb.ModelInferRequest) -> int:
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


def status_of(
    exc: Exception, retry_after_ms: int | None = None
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, message and trailing metadata that answer ``exc``: a RESOURCE_EXHAUSTED
    carries the retry hint; an unexpected error is logged and answered INTERNAL."""
    if isinstance(exc, EdgewiseError):
        trailers: tuple[tuple[str, str], ...] = ()
        if retry_after_ms is not None and exc.code is ErrorCode.RESOURCE_EXHAUSTED:
            trailers = retry_trailers(retry_after_ms)
        return grpc_status(exc.code), exc.message, trailers
    log.exception("unexpected error in a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", ()


async def _abort(
    context: grpc.aio.ServicerContext[object, object],
    exc: Exception,
    retry_after_ms: int | None = None,
) -> None:
    """Answer ``exc`` with its status (see :func:`status_of`)."""
    code, message, trailers = status_of(exc, retry_after_ms)
    await context.abort(code, message, trailing_metadata=trailers)


def _code_of(exc: Exception) -> str:
    return exc.code.name if isinstance(exc, EdgewiseError) else "INTERNAL"


class _CallAccounting:
    """Counts one inference call while its model runs (or it waits for a batch): the in-flight
    gauge, the memory reservation given back at the end, and the outcome with its latency. Used
    as ``with`` on whichever thread or task runs the call, so a call whose caller has gone away
    is still counted with the outcome it really had. ``name`` and ``version`` may be set to the
    model version that answered."""

    __slots__ = ("name", "reservation", "servicer", "started", "version")

    def __init__(
        self, servicer: InferenceServicer, name: str, version: str, started: float, reservation: int
    ) -> None:
        self.servicer = servicer
        self.name = name
        self.version = version
        self.started = started
        self.reservation = reservation

    def __enter__(self) -> _CallAccounting:
        self.servicer.metrics.inflight.inc()
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        servicer = self.servicer
        metrics = servicer.metrics
        metrics.inflight.dec()
        servicer._release(self.reservation)
        if exc is None:
            seconds = time.perf_counter() - self.started
            metrics.observe_request(self.name, self.version, "OK", seconds)
        elif isinstance(exc, Exception):  # not a cancellation: the call had an outcome
            metrics.observe_request(self.name, self.version, _code_of(exc), 0.0)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
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
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.executor = executor
        self.inline_max_bytes = inline_max_bytes
        self.admission = admission
        self.retry_after_ms = retry_after_ms  # the hint of memory admission and full batch queues
        # A saturated event loop runs nothing inline (see LoopLoad): calls stay visible to shedding.
        self.loop_load = loop_load
        self.calls_in_flight = calls_in_flight  # the shedder's count: a batcher's idle test
        # Moving average of a model run's seconds (see SIDE_BY_SIDE_SECONDS); written by whichever
        # thread ran the model: a race only blurs it.
        self.run_seconds = 0.0
        # One batch queue per served model version that has batching configured; a version
        # that is unloaded drops out with its last reference.
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, DynamicBatcher] = (
            weakref.WeakKeyDictionary()
        )

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self.dataplane.model_ready(request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerMetadataResponse:
        return self.dataplane.server_metadata()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelMetadataResponse:
        try:
            return self.dataplane.model_metadata(request.name, request.version)
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    def _admit(self, request: pb.ModelInferRequest) -> int:
        """Memory admission, before anything is decoded: the reservation to release, or
        ResourceExhausted (counted here, as no thread will run the request)."""
        if self.admission is None:
            return 0
        try:
            return self.admission.admit(request)
        except ResourceExhausted as exc:
            code = exc.code.name
            self.metrics.observe_request(request.model_name, request.model_version, code, 0.0)
            raise

    def _batches(self, request: pb.ModelInferRequest) -> bool:
        """Whether the model version ``request`` asks for has dynamic batching configured."""
        try:
            model = self.dataplane.repository.get(request.model_name, request.model_version)
        except EdgewiseError:
            return False  # the request fails the same way wherever it is decoded
        return model.batching is not None

    def _release(self, reservation: int) -> None:
        if reservation and self.admission is not None:
            self.admission.release(reservation)

    def _timed(self, began: float) -> None:
        """One more model run, begun at ``began`` (perf_counter), in the moving average. Taken
        on the grpcio path only, the one that reads it (:meth:`_runs_inline`): the native front
        end keeps its own average in C++."""
        self.run_seconds += (time.perf_counter() - began - self.run_seconds) / 16

    def _infer_counted(
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
        with _CallAccounting(self, name, version, started, reservation) as call:
            response, model = self.dataplane.infer(request, deadline)
            call.name, call.version = model.name, model.version_str
        self._timed(began)
        return response

    def _decode_and_infer(
        self, body: bytes, deadline: float | None, started: float
    ) -> pb.ModelInferResponse:
        """On a worker thread: parse a large request, admit it, run it and count it."""
        request = decode(pb.ModelInferRequest, body)
        return self._infer_counted(request, deadline, started, self._admit(request))

    def _prepare_counted(self, request: pb.ModelInferRequest, reservation: int) -> PreparedRequest:
        try:
            return self.dataplane.prepare(request)
        except Exception as exc:
            code = _code_of(exc)
            self.metrics.observe_request(request.model_name, request.model_version, code, 0.0)
            self._release(reservation)
            raise

    def _execute_counted(
        self,
        prepared: PreparedRequest,
        deadline: float | None,
        started: float,
        reservation: int,
        defer: Callable[..., object] | None = None,
    ) -> pb.ModelInferResponse:
        """Run and count a prepared request; the monitor's statistics are taken after the
        response: on the loop's next turn, or through ``defer`` (see DataPlane.execute)."""
        model = prepared.model
        with _CallAccounting(self, model.name, model.version_str, started, reservation):
            return self.dataplane.execute(prepared, deadline, on_loop=defer is None, defer=defer)

    async def _batched(
        self,
        prepared: PreparedRequest,
        config: BatchingConfig,
        deadline: float | None,
        started: float,
        reservation: int,
    ) -> pb.ModelInferResponse:
        model = prepared.model
        batcher = self._batchers.get(model)
        if batcher is None:
            histogram = self.metrics.batch_rows.labels(model.name, model.version_str)
            batcher = DynamicBatcher(
                model, config, self.executor, histogram.observe, self.calls_in_flight
            )
            self._batchers[model] = batcher
        with _CallAccounting(self, model.name, model.version_str, started, reservation):
            return await batcher.submit(prepared, deadline)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        """ModelInfer on a request parsed already (the grpcio server calls :meth:`infer_bytes`)."""
        started = time.perf_counter()
        deadline = _deadline(context)
        try:
            return await self._infer(request, deadline, started)
        except Exception as exc:
            await _abort(context, exc, self.retry_after_ms)
            raise

    async def infer_bytes(
        self, body: bytes, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        """ModelInfer on the request's bytes: a body over ``inline_max_bytes`` is parsed, admitted
        and run on a worker thread (the event loop never spends long on one call); a smaller one
        is parsed here. An undecodable body is INVALID_ARGUMENT."""
        started = time.perf_counter()
        deadline = _deadline(context)
        try:
            if len(body) > self.inline_max_bytes:
                return await self._on_worker(self._decode_and_infer, body, deadline, started)
            request = decode(pb.ModelInferRequest, body)
            return await self._infer(request, deadline, started, small=True)
        except Exception as exc:
            await _abort(context, exc, self.retry_after_ms)
            raise

    def _runs_inline(self, request: pb.ModelInferRequest, small: bool) -> bool:
        """Whether ``request`` runs on the event loop: a small one while model runs are cheap
        and the loop is not saturated by them (see LoopLoad); a request for a model with
        batching joins its batch queue from the loop whatever (its batch runs on a worker
        thread anyway). ``small``: its body is known to be at most ``inline_max_bytes`` (which
        bounds its parsing and decoding), else its payload is measured."""
        if not small and _payload_bytes(request) > self.inline_max_bytes:
            return False
        busy = self.loop_load is not None and self.loop_load.busy
        costly = self.run_seconds > SIDE_BY_SIDE_SECONDS
        return not (busy or costly) or self._batches(request)

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        started: float,
        small: bool = False,
    ) -> pb.ModelInferResponse:
        reservation = self._admit(request)
        if not self._runs_inline(request, small):
            run = self._infer_counted
            return await self._on_worker(
                run, request, deadline, started, reservation, reservation=reservation
            )
        prepared = self._prepare_counted(request, reservation)
        batching = prepared.model.batching
        if batching is not None:
            return await self._batched(prepared, batching, deadline, started, reservation)
        try:
            began = time.perf_counter()
            response = self._execute_counted(prepared, deadline, started, reservation)
            self._timed(began)
            return response
        finally:
            if self.loop_load is not None:  # the loop's time spent on models
                self.loop_load.inline_seconds += time.perf_counter() - started

    async def _on_worker(
        self, function: Callable[..., T], *args: object, reservation: int = 0
    ) -> T:
        """``function(*args)`` on a worker thread; a call cancelled before it ran gives back
        ``reservation``."""
        future = self.executor.submit(function, *args)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if future.cancelled():  # never ran: its reservation is still held
                self._release(reservation)


def _deadline(context: grpc.aio.ServicerContext[object, object]) -> float | None:
    """The call's deadline on time.monotonic()'s clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _to_proto(status: VersionStatus) -> epb.ModelVersionState:
    return epb.ModelVersionState(
        name=status.name,
        version=str(status.version),
        state=status.state.value,
        reason=status.reason,
        is_default=status.is_default,
        sha256=status.sha256,
    )


def _parse_version(text: str) -> int | None:
    return parse_version(text) if text else None


class RepositoryServicer(epb_grpc.ModelRepositoryServiceServicer):
    """Index, load and unload; control work runs on a worker thread."""

    def __init__(
        self,
        repository: ModelRepository,
        executor: ThreadPoolExecutor,
        on_change: Callable[[], Awaitable[None]],
        peers: Callable[[], list[str]] | None = None,
    ) -> None:
        self.repository = repository
        self.executor = executor
        self.on_change = on_change
        # Multi-process mode: the private addresses of the sibling processes, which must make
        # the same load or unload (a client's call reaches only one process of the shared port).
        self.peers = peers

    async def _fan_out(
        self,
        method: str,
        request: epb.LoadModelRequest | epb.UnloadModelRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> None:
        if self.peers is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(FORWARDED_HEADER):
            return  # already a forwarded call: do not forward again

        # The siblings' private addresses are plaintext on 127.0.0.1; with authentication on,
        # the caller's token goes along (the same interceptor checks it there).
        forwarded: tuple[tuple[str, str], ...] = ((FORWARDED_HEADER, "1"),)
        if metadata.get("authorization"):
            forwarded += (("authorization", str(metadata["authorization"])),)

        async def call(address: str) -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = epb_grpc.ModelRepositoryServiceStub(channel)
                await getattr(stub, method)(request, timeout=120, metadata=forwarded)

        results = await asyncio.gather(
            *(call(address) for address in self.peers()), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            details = failed[0].details() if isinstance(failed[0], grpc.aio.AioRpcError) else ""
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"{method} succeeded here but failed in {len(failed)} of {len(results)} sibling "
                f"process(es): {details or type(failed[0]).__name__}",
            )

    async def _control(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, work)
        finally:
            await self.on_change()

    async def RepositoryIndex(
        self,
        request: epb.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> epb.RepositoryIndexResponse:
        try:
            statuses = self.repository.index(ready_only=request.ready_only)
        except Exception as exc:
            await _abort(context, exc)
            raise
        return epb.RepositoryIndexResponse(models=[_to_proto(s) for s in statuses])

    async def LoadModel(
        self, request: epb.LoadModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.LoadModelResponse:
        try:
            version = _parse_version(request.version)
            statuses = await self._control(
                lambda: self.repository.load(
                    request.name,
                    version,
                    request.make_default,
                    persist=not request.transient_default,
                )
            )
        except Exception as exc:
            await _abort(context, exc)
            raise
        failed = [s for s in statuses if s.state.value == "FAILED" and s.version == version]
        if not failed:
            await self._fan_out("LoadModel", request, context)
        if version is not None and failed:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {request.name!r} version {version} failed to load: {failed[0].reason}",
            )
        return epb.LoadModelResponse(models=[_to_proto(s) for s in statuses])

    async def UnloadModel(
        self, request: epb.UnloadModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.UnloadModelResponse:
        try:
            version = _parse_version(request.version)
            statuses = await self._control(lambda: self.repository.unload(request.name, version))
        except Exception as exc:
            await _abort(context, exc)
            raise
        await self._fan_out("UnloadModel", request, context)
        return epb.UnloadModelResponse(models=[_to_proto(s) for s in statuses])


def _report_to_proto(report: DriftReport) -> epb.DriftReport:
    message = epb.DriftReport(
        model=report.model,
        version=report.version,
        window=report.window,
        available=report.available,
        reason=report.reason,
        rows=report.rows,
        reference_rows=report.reference_rows,
        insufficient_data=report.insufficient_data,
        drifting=report.drifting,
        wrong_type=report.wrong_type,
        computed_at_unix=report.computed_at,
        thresholds=report.thresholds,
    )
    for feature in report.features:
        stats = feature.statistics
        message.features.add(
            name=feature.name,
            kind=feature.kind,
            scores=feature.scores,
            drifting=feature.drifting,
            warning=feature.warning,
            reasons=feature.reasons,
            statistics=epb.FeatureStatistics(
                count=int(stats.get("count", 0)),
                mean=stats.get("mean", math.nan),
                std=stats.get("std", math.nan),
                min=stats.get("min", math.nan),
                max=stats.get("max", math.nan),
                missing=int(stats.get("missing", 0)),
                infinite=int(stats.get("infinite", 0)),
                out_of_range=int(stats.get("out_of_range", 0)),
                unseen=int(stats.get("unseen", 0)),
            ),
        )
    return message


class MonitoringServicer(epb_grpc.MonitoringServiceServicer):
    """Drift reports, feature statistics and window resets of served model versions."""

    def __init__(self, repository: ModelRepository, executor: ThreadPoolExecutor) -> None:
        self.repository = repository
        self.executor = executor

    async def _report(
        self,
        request: epb.DriftReportRequest,
        context: grpc.aio.ServicerContext[object, object],
        scores: bool,
    ) -> epb.DriftReport:
        try:
            model = self.repository.get(request.model, request.version)
            monitor = model.monitor
            if monitor is None:
                return epb.DriftReport(
                    model=model.name,
                    version=model.version_str,
                    window=request.window or "current",
                    available=False,
                    reason=model.monitor_reason,
                )
            loop = asyncio.get_running_loop()
            report = await loop.run_in_executor(
                self.executor, monitor.report, request.window or "current", request.exact, scores
            )
            return _report_to_proto(report)
        except Exception as exc:
            await _abort(context, exc)
            raise

    async def GetDriftReport(
        self, request: epb.DriftReportRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.DriftReport:
        return await self._report(request, context, scores=True)

    async def GetFeatureStatistics(
        self, request: epb.DriftReportRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.DriftReport:
        return await self._report(request, context, scores=False)

    async def ResetWindow(
        self, request: epb.ResetWindowRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.ResetWindowResponse:
        try:
            model = self.repository.get(request.model, request.version)
            if model.monitor is None:
                raise ModelNotReady(
                    f"model {model.name!r} version {model.version} is not monitored: "
                    f"{model.monitor_reason}"
                )
            # The reset judges the fresh window and publishes it before answering.
            await asyncio.get_running_loop().run_in_executor(self.executor, model.monitor.reset)
            if model.performance is not None:
                model.performance.reset()  # the CBPE window starts over with the drift window
            return epb.ResetWindowResponse()
        except Exception as exc:
            await _abort(context, exc)
            raise


def _truth(label: epb.Label) -> int | float | str:
    kind = label.WhichOneof("truth")
    if kind is None:
        raise InvalidInput(f"label for request {label.request_id!r} row {label.row} has no value")
    value: int | float | str = getattr(label, kind)
    return value


class QualityServicer(epb_grpc.QualityServiceServicer):
    """Ground-truth feedback joined with kept predictions, the online quality report (a pure
    read) and its explicit reset."""

    def __init__(self, repository: ModelRepository, executor: ThreadPoolExecutor) -> None:
        self.repository = repository
        self.executor = executor

    def _quality(self, model_name: str, version: str) -> OnlineQuality:
        model = self.repository.get(model_name, version)
        if model.quality is None:
            raise ModelNotReady(
                f"model {model.name!r} version {model.version} keeps no predictions for "
                "feedback (quality tracking is off, or the model is not a classifier or regressor)"
            )
        return model.quality

    def _qualities(self, model_name: str, version: str) -> list[OnlineQuality]:
        """Where labels may go: the version named, else every served version that keeps
        predictions, the default one first."""
        if version:
            return [self._quality(model_name, version)]
        default = self.repository.get(model_name)
        others = [
            self.repository.get(model_name, str(number))
            for number in self.repository.served_versions(model_name)
            if number != default.version
        ]
        qualities = [m.quality for m in (default, *others) if m.quality is not None]
        return qualities or [self._quality(model_name, "")]

    async def SubmitFeedback(
        self, request: epb.FeedbackRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.FeedbackResponse:
        try:
            qualities = self._qualities(request.model, request.version)
            labels = [(label.request_id, label.row, _truth(label)) for label in request.labels]
            loop = asyncio.get_running_loop()
            joined, unknown, duplicate = await loop.run_in_executor(
                self.executor, submit_feedback, qualities, labels
            )
            return epb.FeedbackResponse(joined=joined, unknown=unknown, duplicate=duplicate)
        except Exception as exc:
            await _abort(context, exc)
            raise

    async def ResetQuality(
        self, request: epb.ResetQualityRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.ResetQualityResponse:
        try:
            self._quality(request.model, request.version).reset()
            return epb.ResetQualityResponse()
        except Exception as exc:
            await _abort(context, exc)
            raise

    async def GetQuality(
        self, request: epb.QualityRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.QualityReport:
        try:
            model = self.repository.get(request.model, request.version)
            if model.quality is None:
                return epb.QualityReport(
                    model=model.name,
                    version=model.version_str,
                    available=False,
                    reason="quality tracking is off for this model version",
                )
            report = model.quality.report()
            return epb.QualityReport(
                model=model.name,
                version=model.version_str,
                available=True,
                metric=report["metric"],
                labelled=report["labelled"],
                error=report["error"],
                recent_error=report["recent_error"],
                window=report["window"],
                warning=report["warning"],
                drifting=report["drifting"],
                drifts=report["drifts"],
                kept_predictions=report["kept_predictions"],
                slices=[
                    epb.SliceQuality(slice=key, count=value["count"], error=value["error"])
                    for key, value in report["slices"].items()
                ],
            )
        except Exception as exc:
            await _abort(context, exc)
            raise
