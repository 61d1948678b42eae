"""The edgewise.v1 RolloutService on grpc.aio: splits, shadows and labels (docs/rollout.md).

Translates calls to :class:`~edgewise.runtime.serving.rollout.Rollouts` and its errors to
statuses; decides nothing. Control runs on a worker thread (it writes ``rollout.json``). With
several server processes, GetRollout's shadow figures are merged over all of them
(:func:`~edgewise.runtime.frontends.peer_windows.merged_shadow_stats`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from edgewise.runtime.frontends.grpcio import fan_out, status_of
from edgewise.runtime.frontends.peer_windows import forwarded, merged_shadow_stats
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.serving.rollout import ModelRoutes, Rollouts
from edgewise.runtime.serving.shadow import ShadowStats

__all__ = ["RolloutServicer", "rollout_message"]

T = TypeVar("T")


def rollout_message(
    name: str, routes: ModelRoutes, rollouts: Rollouts, shadow: ShadowStats | None = None
) -> epb.Rollout:
    """The wire form of a model's routes, with its shadow's figures (``shadow``, else this
    process's)."""
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
        if shadow is None and rollouts.shadow is not None:
            shadow = rollouts.shadow.stats(name, routes.shadow.version)
        if shadow is not None:
            stats = shadow
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
    """``peers``: in multi-process mode, the sibling processes' private addresses: a change
    committed here is made there too (a client's call reaches one process of the port)."""

    def __init__(
        self,
        rollouts: Rollouts,
        executor: ThreadPoolExecutor,
        peers: Callable[[], list[str]] | None = None,
    ) -> None:
        self.rollouts = rollouts
        self.executor = executor
        self.peers = peers

    async def _answer(
        self,
        name: str,
        work: Callable[[], ModelRoutes],
        context: grpc.aio.ServicerContext[object, object],
        forward: tuple[str, Message] | None = None,
    ) -> epb.Rollout:
        try:
            routes = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        except Exception as exc:
            code, message, trailers = status_of(exc)
            await context.abort(code, message, trailing_metadata=trailers)
            raise
        if forward is not None:
            await self._fan_out(*forward, context)
        return rollout_message(
            name, routes, self.rollouts, await self._merged(name, routes, context)
        )

    async def _merged(
        self, name: str, routes: ModelRoutes, context: grpc.aio.ServicerContext[object, object]
    ) -> ShadowStats | None:
        """The shadow's figures over every process, when there are siblings (None: this
        process's alone are the whole)."""
        shadow, siblings = self.rollouts.shadow, self.peers() if self.peers else []
        if routes.shadow is None or shadow is None or not siblings or forwarded(context):
            return None
        own = shadow.stats(name, routes.shadow.version)
        try:
            return await merged_shadow_stats(own, name, routes.shadow.version, siblings, context)
        except Exception as exc:
            code, message, trailers = status_of(exc)
            await context.abort(code, message, trailing_metadata=trailers)
            raise

    async def _fan_out(
        self, method: str, request: Message, context: grpc.aio.ServicerContext[object, object]
    ) -> None:
        """The same change in every sibling process (a forwarded call is not forwarded again)."""
        await fan_out(self.peers, epb_grpc.RolloutServiceStub, method, request, context, timeout=30)

    async def GetRollout(
        self, request: epb.GetRolloutRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.Rollout:
        rollouts = self.rollouts
        return await self._answer(
            request.model, lambda: rollouts.served_routes(request.model), context
        )

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
            ("SetTrafficSplit", request),
        )

    async def SetShadow(
        self, request: epb.SetShadowRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> epb.Rollout:
        rate = request.rate  # refused outside (0, 1] (0, NaN) when a version is given
        return await self._answer(
            request.model,
            lambda: self.rollouts.set_shadow(request.model, request.version, rate),
            context,
            ("SetShadow", request),
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
            ("SetVersionLabel", request),
        )
