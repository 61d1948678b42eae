"""The edgewise.v1 RolloutService on grpc.aio: splits, shadows and labels (docs/rollout.md).

Translates calls to :class:`~edgewise.runtime.serving.rollout.Rollouts` and its errors to
statuses; decides nothing. Control runs on a worker thread (it writes ``rollout.json``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from edgewise.runtime.frontends.grpcio import status_of
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.serving.rollout import ModelRoutes, Rollouts

__all__ = ["RolloutServicer", "rollout_message"]

T = TypeVar("T")


def rollout_message(name: str, routes: ModelRoutes, rollouts: Rollouts) -> epb.Rollout:
    """The wire form of a model's routes, with its shadow's figures."""
    message = epb.Rollout(model=name)
    if routes.split is not None:
        message.sticky_key = routes.split.sticky_key
        for version, weight in routes.split.weights:
            message.weights.add(version=str(version), weight=weight)
    for label, version in sorted(routes.labels.items()):
        message.labels[label] = str(version)
    if routes.shadow is not None:
        message.shadow_version = str(routes.shadow.version)
        message.shadow_rate = routes.shadow.rate
        if rollouts.shadow is not None:
            stats = rollouts.shadow.stats(name, routes.shadow.version)
            message.shadow.CopyFrom(
                epb.ShadowFigures(
                    requests=stats.requests,
                    errors=stats.errors,
                    dropped=stats.dropped,
                    labelled_rows=stats.labelled_rows,
                    agreement=stats.agreement,
                    mean_abs_difference=stats.mean_abs_difference,
                    mean_latency_seconds=stats.mean_latency,
                    p99_latency_seconds=stats.p99_latency,
                )
            )
    return message


class RolloutServicer(epb_grpc.RolloutServiceServicer):
    def __init__(self, rollouts: Rollouts, executor: ThreadPoolExecutor) -> None:
        self.rollouts = rollouts
        self.executor = executor

    async def _answer(
        self,
        name: str,
        work: Callable[[], ModelRoutes],
        context: grpc.aio.ServicerContext[object, object],
    ) -> epb.Rollout:
        try:
            routes = await asyncio.get_running_loop().run_in_executor(self.executor, work)
            return rollout_message(name, routes, self.rollouts)
        except Exception as exc:
            code, message, trailers = status_of(exc)
            await context.abort(code, message, trailing_metadata=trailers)
            raise

    async def GetRollout(
        self, request: epb.GetRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.Rollout:
        rollouts = self.rollouts
        return await self._answer(request.model, lambda: rollouts.routes(request.model), context)

    async def SetTrafficSplit(
        self,
        request: epb.SetTrafficSplitRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> epb.Rollout:
        weights = [(entry.version, entry.weight) for entry in request.weights]
        return await self._answer(
            request.model,
            lambda: self.rollouts.set_split(request.model, weights, request.sticky_key),
            context,
        )

    async def SetShadow(
        self, request: epb.SetShadowRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.Rollout:
        rate = request.rate if request.rate != 0 else 1.0  # NaN is refused by the rollout
        return await self._answer(
            request.model,
            lambda: self.rollouts.set_shadow(request.model, request.version, rate),
            context,
        )

    async def SetVersionLabel(
        self,
        request: epb.SetVersionLabelRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> epb.Rollout:
        return await self._answer(
            request.model,
            lambda: self.rollouts.set_label(request.model, request.label, request.version),
            context,
        )
