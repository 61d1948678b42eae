"""How the client names a failed call: the server unreachable vs an UNAVAILABLE it answered."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.errors import Unavailable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Unavailable(grpc.GenericRpcHandler):
    """Answers every call UNAVAILABLE with a message about a connection of its own."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNAVAILABLE, "feature store: cannot connect to redis")

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture
def answering_unavailable() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_Unavailable(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_a_server_that_answers_unavailable_is_not_called_unreachable(
    answering_unavailable: str,
) -> None:
    client = EdgewiseClient(answering_unavailable, timeout=10)
    with client, pytest.raises(ServerError) as raised:
        client.server_live()
    assert raised.value.status == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details == "feature store: cannot connect to redis"


def test_no_server_on_the_port_is_unreachable() -> None:
    target = f"127.0.0.1:{_free_port()}"
    client = EdgewiseClient(target, timeout=10)
    with client, pytest.raises(Unavailable, match=f"cannot reach the server at {target}"):
        client.server_live()
