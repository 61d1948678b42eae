"""Holding a server's connections until the clients have the last bytes (see drain.py).

The scene gRPC's stop can set: the server writes a response larger than the client's receive
buffer, then closes its descriptor while the client has not read yet; the client then sends a
frame (a flow-control update) and reads. Without a held descriptor the kernel resets the
connection and the unsent tail is lost; with one, every byte arrives."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from edgewise.runtime.frontends.drain import hold_connections

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="connections are found under /proc/self/fd"
)

RESPONSE = bytes(range(256)) * 4096  # 1 MiB


@contextmanager
def connected_pair() -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """(server side, client side, server port); the client's receive buffer is small, so most
    of a large response waits in the server's send queue."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        client.connect(("127.0.0.1", port))
        server, _ = listener.accept()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        try:
            yield server, client, port
        finally:
            server.close()
            client.close()


def send_then_close(server: socket.socket) -> None:
    server.setblocking(False)
    sent = server.send(RESPONSE)
    assert sent == len(RESPONSE), "the whole response must fit in the send queue"
    server.close()


def read_all(client: socket.socket) -> tuple[bytes, OSError | None]:
    client.sendall(b"window update")  # what an HTTP/2 client sends as it reads
    client.settimeout(10)
    chunks: list[bytes] = []
    try:
        while chunk := client.recv(65536):
            chunks.append(chunk)
    except OSError as exc:
        return b"".join(chunks), exc
    return b"".join(chunks), None


def test_without_a_held_descriptor_the_tail_of_the_response_is_lost() -> None:
    """The failure the held descriptors prevent, shown on the same scene."""
    with connected_pair() as (server, client, _port):
        send_then_close(server)
        received, error = read_all(client)
    assert isinstance(error, ConnectionResetError)
    assert len(received) < len(RESPONSE)


def test_a_held_connection_delivers_every_byte_then_closes() -> None:
    with connected_pair() as (server, client, port):
        held = hold_connections(port)
        assert len(held) == 1
        send_then_close(server)
        assert held.unsent_bytes() > 0

        async def deliver() -> tuple[int, tuple[bytes, OSError | None]]:
            reading = asyncio.get_running_loop().run_in_executor(None, read_all, client)
            unsent = await held.release_when_delivered(timeout=10)
            return unsent, await reading

        unsent, (received, error) = asyncio.run(deliver())
    assert unsent == 0
    assert received == RESPONSE
    # Closed after delivery: the client's read ends (EOF, or a reset for its unread frame).
    assert error is None or isinstance(error, ConnectionResetError)


def test_only_connections_on_the_port_are_held() -> None:
    with connected_pair() as (_server, _client, port), connected_pair() as (_s, _c, other):
        held = hold_connections(port)
        try:
            assert len(held) == 1
            assert held.sockets[0].getsockname()[1] == port
            assert len(hold_connections(other + 1 if other + 1 != port else other + 2)) == 0
        finally:
            held.release()


def test_a_timeout_releases_what_the_client_never_reads() -> None:
    with connected_pair() as (server, _client, port):
        held = hold_connections(port)
        send_then_close(server)
        unsent = asyncio.run(held.release_when_delivered(timeout=0.05))
    assert unsent > 0
    assert len(held) == 0
