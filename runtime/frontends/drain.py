"""Keep the end of the last responses from being reset away when the server stops.

gRPC's graceful stop closes each connection as soon as its last call has sent its status. The
end of a large response may then still sit in the kernel's send queue, waiting for the client to
read. When the client's next frame (a flow-control update, sent as it reads) reaches a socket
that has been closed, the kernel answers with a reset and throws away what it had not yet
delivered: the client loses the tail of a response the server had finished, and sees
UNAVAILABLE ("Connection reset by peer") for a call that succeeded.

So before gRPC stops, the server takes a second descriptor of each of its established
connections on the serving port (:func:`hold_connections`). gRPC's close then only drops its
own descriptor; the socket stays open and the kernel goes on delivering. Once the clients have
acknowledged every byte (the socket's send queue is empty), or a time limit passes, the server
closes its descriptors too (:meth:`HeldConnections.release_when_delivered`).

Linux only (the descriptors are found under ``/proc/self/fd``); elsewhere nothing is held and
the stop is gRPC's own.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
import time
from pathlib import Path

_POLL_SECONDS = 0.01
_FD_DIR = Path("/proc/self/fd")


def _connected_socket_on_port(fd: int, port: int) -> socket.socket | None:
    """A socket object owning a duplicate of ``fd`` if ``fd`` is a connected TCP socket whose
    local port is ``port``; else None (the duplicate closed again)."""
    try:
        duplicate = os.dup(fd)
    except OSError:  # closed since it was listed
        return None
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return None
    try:
        if sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == port:
            sock.getpeername()  # raises for a listening socket
            return sock
    except (OSError, IndexError, TypeError):
        pass
    sock.close()
    return None


def _unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged yet."""
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except OSError:  # the connection is gone: nothing left to deliver
        return 0
    return int(struct.unpack("i", answer)[0])


class HeldConnections:
    """Second descriptors of a set of established connections, closed once delivered."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets

    def __len__(self) -> int:
        return len(self.sockets)

    def unsent_bytes(self) -> int:
        return sum(_unsent_bytes(sock) for sock in self.sockets)

    def release(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    async def release_when_delivered(self, timeout: float) -> int:
        """Wait until the peers have acknowledged everything sent on the held connections (or
        ``timeout`` seconds pass), then close them; return the bytes still unacknowledged."""
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while True:
                unsent = self.unsent_bytes()
                if unsent == 0 or time.monotonic() >= deadline:
                    return unsent
                await asyncio.sleep(_POLL_SECONDS)
        finally:
            self.release()


def hold_connections(port: int) -> HeldConnections:
    """Take a second descriptor of every connected TCP socket of this process on local port
    ``port``; none where the process's descriptors cannot be listed."""
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return HeldConnections([])
    held: list[socket.socket] = []
    seen: set[str] = set()  # a socket once, though it may have several descriptors
    for name in names:
        try:
            fd = int(name)
            target = os.readlink(_FD_DIR / name)
        except (OSError, ValueError):
            continue
        if not target.startswith("socket:") or target in seen:
            continue
        sock = _connected_socket_on_port(fd, port)
        if sock is not None:
            held.append(sock)
            seen.add(target)
    return HeldConnections(held)
