"""Drift reports over every server process (``serve --processes N``): siblings hand over their
windows on their private addresses, and a reset reaches them all.

A client's GetDriftReport reaches one process of the shared port. That process asks each sibling
for its share of the window (its :class:`~edgewise.runtime.serving.monitor.WindowStats`, on the
private control address the supervisor's peers folder lists, as LoadModel's fan-out does), adds its
own, and answers the merged report (:func:`~edgewise.runtime.serving.drift_merge.merged_report`):
the report describes all the processes' traffic. A ResetWindow is forwarded the same way, so the
next merged report starts over everywhere. A sibling that does not serve the version (it is
restarting) has no traffic of it and adds nothing; a sibling that fails otherwise fails the report
(UNAVAILABLE, naming how many did not answer): a report silently missing a share would understate
the traffic.

The sibling call is ``/edgewise.internal.PeerMonitoring/WindowShare``: a JSON request
(``{"model", "version", "window"}``), answered with the share in
:func:`~edgewise.runtime.serving.drift_merge.encode_window`'s form. A shadow's figures (GetRollout)
are merged the same way: ``/edgewise.internal.PeerMonitoring/ShadowShare`` (``{"model",
"version"}``) answers a sibling's figures of that candidate in
:func:`~edgewise.runtime.serving.shadow.encode_stats`'s form, and a sibling that fails fails the
answer. Both are served only to calls marked as forwarded by a sibling (and, with authentication
on, carrying the caller's token or client certificate's identities, as every call).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import grpc

from edgewise.runtime.errors import InvalidInput, Unavailable
from edgewise.runtime.frontends.security import forwarded_identity
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.serving.drift_merge import (
    MERGED_WINDOWS,
    WorkerWindow,
    decode_window,
    encode_window,
    local_window,
    merged_report,
)
from edgewise.runtime.serving.monitor import DriftReport, ModelMonitor
from edgewise.runtime.serving.repository import ModelRepository
from edgewise.runtime.serving.rollout import Rollouts
from edgewise.runtime.serving.shadow import ShadowStats, decode_stats, encode_stats, merged_stats

__all__ = [
    "SERVICE",
    "forwarded",
    "merged_drift_report",
    "merged_shadow_stats",
    "reset_siblings",
    "window_share_handler",
]

SERVICE: Final = "edgewise.internal.PeerMonitoring"
_METHOD: Final = f"/{SERVICE}/WindowShare"
_SHADOW_METHOD: Final = f"/{SERVICE}/ShadowShare"
_TIMEOUT_SECONDS: Final = 30.0
_MAX_MESSAGE: Final = 256 << 20


def forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether this call was forwarded by a sibling (and must not be forwarded again)."""
    from edgewise.runtime.frontends.grpcio import forwarded_by_sibling

    return forwarded_by_sibling(context)


def _forwarding(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    """The metadata of a call forwarded to a sibling: the mark, and the caller (its token, or
    its client certificate's identities; see security.forwarded_identity), which the sibling
    checks on its private Unix socket as every port does."""
    from edgewise.runtime.frontends.grpcio import FORWARDED_HEADER

    return ((FORWARDED_HEADER, "1"), *forwarded_identity(context))


def _query(data: bytes) -> tuple[str, str, str]:
    try:
        query = json.loads(data)
    except ValueError:
        raise InvalidInput("a window share request must be JSON") from None
    if not isinstance(query, dict):
        raise InvalidInput("a window share request must be a JSON object")
    values = []
    for key in ("model", "version", "window"):
        value = query.get(key)
        if not isinstance(value, str):
            raise InvalidInput(f"a window share request needs {key!r} as a string")
        values.append(value)
    model, version, window = values
    if window not in MERGED_WINDOWS:
        raise InvalidInput(f"window {window!r} is not one of {', '.join(MERGED_WINDOWS)}")
    return model, version, window


def _shadow_query(data: bytes) -> tuple[str, int]:
    try:
        query = json.loads(data)
    except ValueError:
        raise InvalidInput("a shadow share request must be JSON") from None
    if not isinstance(query, dict):
        raise InvalidInput("a shadow share request must be a JSON object")
    model, version = query.get("model"), query.get("version")
    if not isinstance(model, str) or type(version) is not int:
        raise InvalidInput("a shadow share request needs 'model' (a string), 'version' (a number)")
    return model, version


def window_share_handler(
    repository: ModelRepository, executor: ThreadPoolExecutor, rollouts: Rollouts | None = None
) -> grpc.GenericRpcHandler:
    """The handler siblings call for this process's share of a window, and of a shadow's
    figures (pure: copies)."""
    from edgewise.runtime.frontends.grpcio import status_of

    async def shadow_share(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            if not forwarded(context):
                raise InvalidInput("ShadowShare answers sibling server processes only")
            name, version = _shadow_query(request)
            shadow = None if rollouts is None else rollouts.shadow
            return encode_stats(ShadowStats() if shadow is None else shadow.stats(name, version))
        except Exception as exc:
            code, message, _ = status_of(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    async def window_share(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            if not forwarded(context):
                raise InvalidInput("WindowShare answers sibling server processes only")
            name, version, window = _query(request)
            model = repository.get(name, version)
            if model.monitor is None:
                return encode_window(WorkerWindow(None))
            loop = asyncio.get_running_loop()
            share = await loop.run_in_executor(executor, local_window, model.monitor, window)
            return encode_window(share)
        except Exception as exc:
            code, message, _ = status_of(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WindowShare": grpc.unary_unary_rpc_method_handler(window_share),
            "ShadowShare": grpc.unary_unary_rpc_method_handler(shadow_share),
        },
    )


async def _share_of(
    address: str, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> WorkerWindow:
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(_METHOD)
        try:
            data = await call(payload, timeout=_TIMEOUT_SECONDS, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return WorkerWindow(None)  # not served there (restarting): no traffic of it
            raise
    if not isinstance(data, bytes):
        raise InvalidInput("a sibling answered something other than bytes")
    return decode_window(data)


async def merged_drift_report(
    monitor: ModelMonitor,
    window: str,
    scores: bool,
    siblings: Sequence[str],
    context: grpc.aio.ServicerContext[Any, Any],
    executor: ThreadPoolExecutor,
) -> DriftReport:
    """The report of ``window`` over this process's share and every sibling's (pure)."""
    loop = asyncio.get_running_loop()
    own = await loop.run_in_executor(executor, local_window, monitor, window)
    payload = json.dumps(
        {"model": monitor.model, "version": monitor.version, "window": window}
    ).encode()
    metadata = _forwarding(context)
    answers = await asyncio.gather(
        *(_share_of(address, payload, metadata) for address in siblings), return_exceptions=True
    )
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        first = failed[0]
        detail = first.details() if isinstance(first, grpc.aio.AioRpcError) else str(first)
        raise Unavailable(
            f"the drift report covers every server process, and {len(failed)} of "
            f"{len(answers)} sibling process(es) did not hand over their window: "
            f"{detail or type(first).__name__}"
        )
    shares = [own, *(a for a in answers if isinstance(a, WorkerWindow))]
    return await loop.run_in_executor(executor, merged_report, monitor, window, shares, scores)


async def _shadow_share_of(
    address: str, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> ShadowStats:
    async with grpc.aio.insecure_channel(address) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(_SHADOW_METHOD)
        data = await call(payload, timeout=_TIMEOUT_SECONDS, metadata=metadata)
    if not isinstance(data, bytes):
        raise InvalidInput("a sibling answered something other than bytes")
    return decode_stats(data)


async def merged_shadow_stats(
    own: ShadowStats,
    name: str,
    version: int,
    siblings: Sequence[str],
    context: grpc.aio.ServicerContext[Any, Any],
) -> ShadowStats:
    """A shadow's figures over this process's (``own``) and every sibling's (pure)."""
    payload = json.dumps({"model": name, "version": version}).encode()
    metadata = _forwarding(context)
    answers = await asyncio.gather(
        *(_shadow_share_of(address, payload, metadata) for address in siblings),
        return_exceptions=True,
    )
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        first = failed[0]
        detail = first.details() if isinstance(first, grpc.aio.AioRpcError) else str(first)
        raise Unavailable(
            f"the shadow's figures cover every server process, and {len(failed)} of "
            f"{len(answers)} sibling process(es) did not hand over theirs: "
            f"{detail or type(first).__name__}"
        )
    return merged_stats([own, *(a for a in answers if isinstance(a, ShadowStats))])


async def reset_siblings(
    siblings: Callable[[], list[str]],
    request: epb.ResetWindowRequest,
    context: grpc.aio.ServicerContext[Any, Any],
) -> None:
    """Forward a ResetWindow that this process made to its siblings (not a forwarded one)."""
    if forwarded(context):
        return
    metadata = _forwarding(context)

    async def reset(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = epb_grpc.MonitoringServiceStub(channel)
            await stub.ResetWindow(request, timeout=_TIMEOUT_SECONDS, metadata=metadata)

    addresses = siblings()
    answers = await asyncio.gather(*(reset(a) for a in addresses), return_exceptions=True)
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        first = failed[0]
        detail = first.details() if isinstance(first, grpc.aio.AioRpcError) else str(first)
        raise Unavailable(
            f"ResetWindow reset this process but failed in {len(failed)} of {len(addresses)} "
            f"sibling process(es): {detail or type(first).__name__}"
        )
