"""gRPC servicers (grpc.aio): the V2 inference service and edgewise's repository service.

Every handler calls the data plane (or the repository) and maps an
:class:`~edgewise.runtime.errors.EdgewiseError` to a gRPC status through the one table in
:mod:`edgewise.runtime.grpc_api.status`. An unexpected exception becomes INTERNAL with its type
name; the server itself never goes down because of a request.

Small requests run inline on the event loop (onnxruntime at batch 1 costs tens of microseconds, less
than a thread hand-off); requests with a large payload run on a worker thread so they do not hold
up the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from edgewise.runtime.dataplane import DataPlane
from edgewise.runtime.errors import EdgewiseError, InvalidInput
from edgewise.runtime.grpc_api.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.grpc_api.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.grpc_api.status import grpc_status
from edgewise.runtime.metrics import ServerMetrics
from edgewise.runtime.repository import ModelRepository, VersionStatus

__all__ = ["InferenceServicer", "RepositoryServicer"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: Exception) -> None:
    if isinstance(exc, EdgewiseError):
        await context.abort(grpc_status(exc.code), exc.message)
    log.exception("unexpected error in a request")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        metrics: ServerMetrics,
        executor: ThreadPoolExecutor,
        inline_max_bytes: int = 64 * 1024,
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.executor = executor
        self.inline_max_bytes = inline_max_bytes

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

    def _infer_counted(
        self, request: pb.ModelInferRequest, deadline: float | None, started: float
    ) -> pb.ModelInferResponse:
        """Run one request and count it, on whichever thread runs it: a request whose caller has
        gone away is still counted with the outcome it really had."""
        metrics = self.metrics
        metrics.inflight.inc()
        try:
            response, model = self.dataplane.infer(request, deadline)
        except Exception as exc:
            code = exc.code.name if isinstance(exc, EdgewiseError) else "INTERNAL"
            metrics.observe_request(request.model_name, request.model_version, code, 0.0)
            raise
        finally:
            metrics.inflight.dec()
        metrics.observe_request(model.name, model.version_str, "OK", time.perf_counter() - started)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            if _payload_bytes(request) <= self.inline_max_bytes:
                return self._infer_counted(request, deadline, started)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.executor, self._infer_counted, request, deadline, started
            )
        except Exception as exc:
            await _abort(context, exc)
            raise


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
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"version {text!r} is not a positive integer")
    return int(text)


class RepositoryServicer(epb_grpc.ModelRepositoryServiceServicer):
    """Index, load and unload; control work runs on a worker thread."""

    def __init__(
        self,
        repository: ModelRepository,
        executor: ThreadPoolExecutor,
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self.repository = repository
        self.executor = executor
        self.on_change = on_change

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
                lambda: self.repository.load(request.name, version, request.make_default)
            )
        except Exception as exc:
            await _abort(context, exc)
            raise
        failed = [s for s in statuses if s.state.value == "FAILED" and s.version == version]
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
        return epb.UnloadModelResponse(models=[_to_proto(s) for s in statuses])
