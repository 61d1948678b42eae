"""Binding the server's ports, and the one line a refused bind says.

A single server and the multi-process supervisor refuse a busy or unbindable address the same
way: an :class:`OSError` whose message is ``cannot bind [the metrics port ]HOST:PORT: REASON``,
which the command line prints as its one error line.
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client.registry import Collector

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.frontends import metrics_http
from edgewise.runtime.frontends.security import AuthInterceptor

__all__ = [
    "bind_error",
    "check_port_free",
    "reserve_port",
    "start_metrics_http",
    "stop_http",
    "write_port_file",
]


def bind_error(host: str, port: int, exc: OSError, what: str = "") -> OSError:
    """The error to raise when ``host:port`` cannot be bound (``what``: e.g. "the metrics port")."""
    busy = exc.errno == errno.EADDRINUSE
    reason = "the address is already in use" if busy else exc.strerror or str(exc)
    where = f"{what} {host}:{port}" if what else f"{host}:{port}"
    return OSError(f"cannot bind {where}: {reason}")


def check_port_free(host: str, port: int, reuse_port: bool) -> None:
    """:func:`bind_error` when another process listens on ``host:port``, checked with the socket
    options gRPC binds with (so the answer is gRPC's), before gRPC tries and logs a screenful
    about it. Port 0 and names that do not resolve are left to gRPC."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return
    for family, kind, proto, _name, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise bind_error(host, port, exc) from None
                return  # anything else (no such interface, no rights): gRPC says


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: fixes the port number, takes no connections;
    :func:`bind_error` when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise bind_error(host, port, exc) from None
    return sock


def start_metrics_http(
    port: int,
    host: str,
    registry: Collector,
    *,
    auth: AuthInterceptor | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WSGIServer:
    """Serve ``registry`` for Prometheus at ``http://host:port/metrics`` (a thread of its own;
    404 off /metrics and /healthz, process metrics added, no ``_created`` series; behind
    ``auth``'s token check and over ``ssl_context``'s TLS when given: see
    :mod:`~edgewise.runtime.frontends.metrics_http`); stop it with :func:`stop_http`.
    :func:`bind_error` ("the metrics port") when it cannot bind."""
    try:
        server = metrics_http.start(port, host, registry, auth=auth, ssl_context=ssl_context)
    except OSError as exc:
        raise bind_error(host, port, exc, "the metrics port") from None
    return server


def stop_http(server: WSGIServer) -> None:
    """Stop a server :func:`start_metrics_http` started and close its socket."""
    server.shutdown()
    server.server_close()


def write_port_file(path: Path, port: int, metrics_port: int, http_port: int | None = None) -> None:
    """``PORT METRICS_PORT`` (-1: no metrics endpoint), then ``HTTP_PORT`` when the HTTP front
    end is on, for whoever started the server with port 0, written atomically: a reader sees
    the whole line or no file."""
    http = "" if http_port is None else f" {http_port}"
    write_text_atomic(path, f"{port} {metrics_port}{http}\n")
