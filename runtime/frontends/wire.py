"""Request bodies are parsed by edgewise, not by gRPC.

Every method of the server takes its request as bytes and parses it itself (the serving core's
:func:`~edgewise.runtime.serving.codecs.decode`, or here with its message), so a body that
is not the method's request message is answered INVALID_ARGUMENT from the one error table
(status.py), on every front end and every service, with a message that says what was wrong.
Left to grpcio, a parse failure is UNKNOWN with the parser's exception class in the message
(and the native front end, which parses ModelInfer itself, answered differently).
ModelInfer parses in its own handler (see InferenceServicer.infer_bytes: a large body is parsed
on a worker thread, off the event loop); every other method through :func:`parsing_inside`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from edgewise.runtime.errors import ErrorCode
from edgewise.runtime.frontends.status import grpc_status
from edgewise.runtime.serving.codecs import not_valid

__all__ = ["parsing_inside"]


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # subscriptable in the stubs only


def parsing_inside(handlers: Mapping[str, Handler]) -> dict[str, Handler]:
    """``handlers`` (method name -> handler), each taking its request as bytes and parsing it
    itself: an undecodable body is INVALID_ARGUMENT (see the module docstring). Handlers that
    stream requests, or take bytes already, are kept as they are."""
    return {method: _parsing(handler) for method, handler in handlers.items()}


def _parsing(handler: Handler) -> Handler:
    parse: Callable[[bytes], Any] | None = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler
    message = not_valid(getattr(parse, "__self__", None))
    status = grpc_status(ErrorCode.INVALID_ARGUMENT)

    async def parsed(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = parse(body)
        except DecodeError:
            await context.abort(status, message)
        return request

    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary  # a coroutine function on the aio server

        async def unary_unary(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            response = unary(await parsed(body, context), context)
            return await response if inspect.isawaitable(response) else response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, response_serializer=handler.response_serializer
        )
    streaming: Any = handler.unary_stream
    if streaming is None:
        return handler
    if inspect.isasyncgenfunction(streaming):

        async def unary_stream(
            body: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for response in streaming(await parsed(body, context), context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, response_serializer=handler.response_serializer
        )

    async def writing(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await streaming(await parsed(body, context), context)  # writes with context.write

    return grpc.unary_stream_rpc_method_handler(
        writing, response_serializer=handler.response_serializer
    )
