"""gRPC servicers (grpc.aio): the V2 inference service and edgewise's repository, monitoring and
quality services.

A servicer translates: each handler calls the serving core (ModelInfer, see
:mod:`edgewise.runtime.serving.pipeline`), the data plane (health, metadata), or the repository,
monitor or online quality, and maps an :class:`~edgewise.runtime.errors.EdgewiseError` to a gRPC
status through the one table in :mod:`edgewise.runtime.frontends.status`. An unexpected exception
becomes INTERNAL with its type name; the server itself never goes down because of a request. The
grpcio server hands ModelInfer its request as bytes (:meth:`InferenceServicer.infer_bytes`), so
the core decides where a large body is parsed, and an undecodable one is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import grpc

from edgewise.runtime.errors import EdgewiseError, ErrorCode, InvalidInput, ModelNotReady
from edgewise.runtime.frontends.peer_windows import forwarded, merged_drift_report, reset_siblings
from edgewise.runtime.frontends.security import forwarded_identity
from edgewise.runtime.frontends.status import grpc_status
from edgewise.runtime.package.paths import parse_version
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.drift_merge import MERGED_WINDOWS
from edgewise.runtime.serving.feedback import Feedback
from edgewise.runtime.serving.pipeline import InferenceCore
from edgewise.runtime.serving.repository import ModelRepository, VersionStatus
from edgewise.runtime.serving.request_context import REQUEST_ID_KEY, TRACEPARENT, RequestLabels
from edgewise.runtime.serving.shedding import retry_trailers

if TYPE_CHECKING:
    from edgewise.runtime.serving.capture import Capture
    from edgewise.runtime.serving.monitor import DriftReport

__all__ = ["InferenceServicer", "MonitoringServicer", "QualityServicer", "RepositoryServicer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Marks a control call one process forwards to its siblings in multi-process mode.
FORWARDED_HEADER = "edgewise-forwarded"


def forwarded_by_sibling(context: grpc.aio.ServicerContext[object, object]) -> bool:
    """Whether a sibling process forwarded this call: the mark, believed only on the private
    Unix socket (a client on the public port cannot set it there: the native front end drops it
    from what it relays), so a client cannot keep its call from reaching every process."""
    if not str(context.peer() or "").startswith("unix:"):
        return False
    return any(
        key == FORWARDED_HEADER and value for key, value in context.invocation_metadata() or ()
    )


async def fan_out(
    peers: Callable[[], list[str]] | None,
    stub: Callable[[grpc.aio.Channel], object],
    method: str,
    request: object,
    context: grpc.aio.ServicerContext[object, object],
    *,
    timeout: float,
) -> None:
    """Make the same control call in every sibling process of ``serve --processes N`` (a client's
    call reaches only one process of the shared port); a forwarded call is not forwarded again.
    The siblings' private addresses are Unix sockets in the supervisor's private folder; with
    authentication on, the caller goes along (its token, or its client certificate's
    identities: :func:`~edgewise.runtime.frontends.security.forwarded_identity`) and the same
    interceptor checks it there. A sibling that fails aborts the call with INTERNAL, naming how
    many failed."""
    if peers is None or forwarded_by_sibling(context):
        return
    forwarded = ((FORWARDED_HEADER, "1"), *forwarded_identity(context))

    async def call(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            await getattr(stub(channel), method)(request, timeout=timeout, metadata=forwarded)

    results = await asyncio.gather(*(call(address) for address in peers()), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        details = failed[0].details() if isinstance(failed[0], grpc.aio.AioRpcError) else ""
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"{method} succeeded here but failed in {len(failed)} of {len(results)} sibling "
            f"process(es): {details or type(failed[0]).__name__}",
        )


def status_of(
    exc: Exception, retry_after_ms: int | None = None, labels: RequestLabels | None = None
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, message and trailing metadata that answer ``exc``: a RESOURCE_EXHAUSTED
    carries the retry hint; an unexpected error is logged and answered INTERNAL. The
    ``labels`` of an inference call: its request id and trace id go in the trailers, and in
    the log line."""
    trailers: tuple[tuple[str, str], ...] = () if labels is None else labels.echo(failed=True)
    if isinstance(exc, EdgewiseError):
        if retry_after_ms is not None and exc.code is ErrorCode.RESOURCE_EXHAUSTED:
            trailers += retry_trailers(retry_after_ms)
        return grpc_status(exc.code), exc.message, trailers
    extra = None if labels is None else labels.extra()
    log.exception("unexpected error in a request", exc_info=exc, extra=extra)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", trailers


async def _abort(
    context: grpc.aio.ServicerContext[object, object],
    exc: Exception,
    retry_after_ms: int | None = None,
    labels: RequestLabels | None = None,
) -> None:
    """Answer ``exc`` with its status (see :func:`status_of`)."""
    code, message, trailers = status_of(exc, retry_after_ms, labels)
    await context.abort(code, message, trailing_metadata=trailers)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 inference service on grpc.aio: translates calls to the serving core's (and the data
    plane's) and their errors to statuses; decides nothing."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self.dataplane = core.dataplane

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

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        """ModelInfer on a request parsed already (the grpcio server calls :meth:`infer_bytes`)."""
        started = time.perf_counter()
        labels = _labels(context)
        try:
            response = await self.core.infer(request, _deadline(context), started, labels=labels)
        except Exception as exc:
            await _abort(context, exc, self.core.retry_after_ms, labels)
            raise
        _echo(context, labels)
        return response

    async def infer_bytes(
        self, body: bytes, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        """ModelInfer on the request's bytes (see InferenceCore.infer_body)."""
        started = time.perf_counter()
        labels = _labels(context)
        try:
            response = await self.core.infer_body(body, _deadline(context), started, labels)
        except Exception as exc:
            await _abort(context, exc, self.core.retry_after_ms, labels)
            raise
        _echo(context, labels)
        return response


def _labels(context: grpc.aio.ServicerContext[object, object]) -> RequestLabels:
    """The call's labels from its metadata: ``x-request-id`` and the W3C ``traceparent``."""
    request_id = ""
    traceparent = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value
        elif key == TRACEPARENT and isinstance(value, str):
            traceparent = value
    return RequestLabels(request_id, traceparent)


def _echo(context: grpc.aio.ServicerContext[object, object], labels: RequestLabels) -> None:
    """The trailing metadata of an answer: the caller's ``x-request-id`` and the trace id,
    where there are (none on a plain call: nothing to send)."""
    if labels.sent_id or labels.trace_id:
        context.set_trailing_metadata(labels.echo())


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
        await fan_out(
            self.peers, epb_grpc.ModelRepositoryServiceStub, method, request, context, timeout=120
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
        unavailable=report.unavailable,
        windows_dropped=report.windows_dropped,
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

    def __init__(
        self,
        repository: ModelRepository,
        executor: ThreadPoolExecutor,
        peers: Callable[[], list[str]] | None = None,
    ) -> None:
        self.repository = repository
        self.executor = executor
        # Multi-process mode: the siblings' private addresses; a report then merges their
        # windows with this process's, and a reset reaches them all (frontends/peer_windows.py).
        self.peers = peers

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
            window = request.window or "current"
            if (
                self.peers is not None
                and window in MERGED_WINDOWS
                and not request.exact
                and not forwarded(context)
            ):
                report = await merged_drift_report(
                    monitor, window, scores, self.peers(), context, self.executor
                )
                return _report_to_proto(report)
            loop = asyncio.get_running_loop()
            # The monitor decides what a report of the growing window shows (served_report).
            report = await loop.run_in_executor(
                self.executor, monitor.served_report, window, request.exact, scores
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
            if self.peers is not None:
                await reset_siblings(self.peers, request, context)
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

    def __init__(
        self,
        repository: ModelRepository,
        executor: ThreadPoolExecutor,
        capture: Capture | None = None,
    ) -> None:
        self.repository = repository
        self.executor = executor
        self.feedback = Feedback(repository, capture)  # the core's: joins, checks, captures

    async def SubmitFeedback(
        self, request: epb.FeedbackRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.FeedbackResponse:
        try:
            labels = [(label.request_id, label.row, _truth(label)) for label in request.labels]
            loop = asyncio.get_running_loop()
            joined, unknown, duplicate = await loop.run_in_executor(
                self.executor, self.feedback.submit, request.model, request.version, labels
            )
            return epb.FeedbackResponse(joined=joined, unknown=unknown, duplicate=duplicate)
        except Exception as exc:
            await _abort(context, exc)
            raise

    async def ResetQuality(
        self, request: epb.ResetQualityRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.ResetQualityResponse:
        try:
            self.feedback.quality(request.model, request.version).reset()
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
            check = report["label_check"]
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
                checked=check is not None,
                check_reason=report["check_reason"],
                checked_rows=check["labelled"] if check is not None else 0,
                estimated_accuracy=check["estimated_accuracy"] if check is not None else math.nan,
                realized_accuracy=check["realized_accuracy"] if check is not None else math.nan,
                accuracy_chance=check["chance"] if check is not None else math.nan,
            )
        except Exception as exc:
            await _abort(context, exc)
            raise
