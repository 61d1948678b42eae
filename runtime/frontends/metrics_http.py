"""The metrics port: ``/metrics`` for Prometheus, ``/healthz`` for a probe, 404 for the rest.

prometheus_client's own ``start_http_server`` answers 200 with the metrics on every path; an
operator's scanner or a mistyped probe then reads a healthy page where none exists. This server
routes: ``GET``/``HEAD /metrics`` is prometheus_client's exposition (``make_wsgi_app``: content
negotiation between the text format and OpenMetrics, gzip, ``name[]`` filters), ``/healthz``
answers ``ok``, any other path 404 and any other method 405.

What it serves is the given registry plus the process's own metrics (prometheus_client's
``ProcessCollector``, ``PlatformCollector`` and ``GCCollector``: ``process_*``, ``python_info``,
``python_gc_*``), and no ``_created`` series: :func:`start` switches prometheus_client's
process-wide ``disable_created_metrics`` off before it serves (a counter's creation time is a
series per counter that no dashboard reads).

The port binds 127.0.0.1 unless ``--metrics-host`` widens it. Two switches close it further:

* ``--metrics-auth on``: ``/metrics`` needs ``Authorization: Bearer <token>`` with the ``read``
  scope (:data:`~edgewise.runtime.frontends.scopes.METRICS_SCRAPE` in the scopes table), checked
  by the gRPC port's :class:`~edgewise.runtime.frontends.security.AuthInterceptor`: the same
  tokens file (re-read when it changes), the same refusals (401 with ``WWW-Authenticate``; 403
  for a token without ``read``) counted in ``edgewise_auth_refusals_total``. ``/healthz`` stays
  open (probes send no token).
* ``--metrics-tls on``: TLS with the gRPC port's certificate and key (and client CA: mutual TLS),
  read and re-read on change by the one reader, tls_files.py (through http_tls.py). The
  handshake runs on the connection's own thread, never on the accepting one, and a connection
  gets :data:`_TIMEOUT_SECONDS` to send its request.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.registry import Collector, CollectorRegistry

from edgewise.runtime.frontends.scopes import METRICS_SCRAPE
from edgewise.runtime.frontends.security import AuthInterceptor

log = logging.getLogger(__name__)

__all__ = ["HEALTH_PATH", "METRICS_PATH", "exposed_registry", "routed_app", "start"]

METRICS_PATH: Final = "/metrics"
HEALTH_PATH: Final = "/healthz"
#: Seconds a connection has for its handshake and request (a silent one does not hold a thread).
_TIMEOUT_SECONDS: Final = 10
_UNAUTHENTICATED: Final = ("WWW-Authenticate", 'Bearer realm="edgewise-metrics"')

_StartResponse = Callable[..., Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


def exposed_registry(served: Collector) -> CollectorRegistry:
    """A registry showing ``served`` and this process's process, platform and GC metrics
    (``served`` itself is left as it is: several servers in one process each get their own)."""
    registry = CollectorRegistry()
    registry.register(served)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def routed_app(registry: Collector, auth: AuthInterceptor | None = None) -> _App:
    """The WSGI application of the metrics port (see the module's docstring); with ``auth``,
    ``/metrics`` needs a token with the scope of :data:`METRICS_SCRAPE`."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in (METRICS_PATH, HEALTH_PATH):
            return _plain(start_response, "404 Not Found", f"not found: {path}\n")
        if method not in ("GET", "HEAD"):
            headers = [("Allow", "GET, HEAD")]
            return _plain(start_response, "405 Method Not Allowed", f"{method}\n", headers)
        if path == HEALTH_PATH:
            return _plain(start_response, "200 OK", "ok\n")
        if auth is not None:
            value = environ.get("HTTP_AUTHORIZATION")
            refusal = auth.authorize(
                (("authorization", value),) if value is not None else (), METRICS_SCRAPE
            )
            if refusal is not None:
                if refusal.code.name == "PERMISSION_DENIED":
                    return _plain(start_response, "403 Forbidden", refusal.message + "\n")
                headers = [_UNAUTHENTICATED]
                return _plain(start_response, "401 Unauthorized", refusal.message + "\n", headers)
        if method == "HEAD":  # prometheus_client's app answers GET only; HEAD: the same headers
            environ = {**environ, "REQUEST_METHOD": "GET"}
            b"".join(metrics(environ, start_response))
            return [b""]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


def _plain(
    start_response: _StartResponse,
    status: str,
    text: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = text.encode()
    base = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, base + (headers or []))
    return [body]


class _Server(ThreadingMixIn, WSGIServer):
    """A scrape per thread (a slow scraper does not hold up the next), threads not waited on;
    with :attr:`ssl_context`, each connection is TLS, its handshake done on its own thread."""

    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails the TLS handshake (plain HTTP, no certificate under mutual TLS)
        or goes away: closed without a traceback on stderr; anything else is logged once."""
        if isinstance(sys.exc_info()[1], OSError):  # ssl.SSLError is an OSError
            return
        log.exception("metrics port: a scrape from %s failed", client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        if self.ssl_context is not None:
            connection = self.ssl_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address


class _Server6(_Server):
    address_family = socket.AF_INET6


def _family(host: str, port: int) -> int:
    """The address family ``host`` resolves to first (as prometheus_client picks it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return socket.AF_INET  # the bind says what is wrong with it
    return int(infos[0][0]) if infos else socket.AF_INET


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape; a TLS connection's handshake first, on this thread (a
    client that fails it is closed without an answer)."""

    timeout = _TIMEOUT_SECONDS

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            return  # the client went away, or sent nothing in time

    def log_message(self, format: str, *args: Any) -> None:
        return


def start(
    port: int,
    host: str,
    served: Collector,
    *,
    auth: AuthInterceptor | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WSGIServer:
    """Serve ``served`` (see :func:`exposed_registry`) on ``host:port`` from a daemon thread,
    behind ``auth``'s token check and over ``ssl_context``'s TLS when given (see the module's
    docstring); the OSError of a failed bind propagates. Stop it with ``shutdown()`` and
    ``server_close()``."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    host = host.strip("[]")
    server_class = _Server6 if _family(host, port) == socket.AF_INET6 else _Server
    server = make_server(
        host,
        port,
        routed_app(exposed_registry(served), auth),
        server_class=server_class,
        handler_class=_QuietHandler,
    )
    if isinstance(server, _Server):
        server.ssl_context = ssl_context
    thread = threading.Thread(
        target=server.serve_forever, name="edgewise-metrics", kwargs={"poll_interval": 0.5}
    )
    thread.daemon = True
    thread.start()
    return server
