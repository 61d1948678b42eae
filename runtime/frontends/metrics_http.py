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
"""

from __future__ import annotations

import socket
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

__all__ = ["HEALTH_PATH", "METRICS_PATH", "exposed_registry", "routed_app", "start"]

METRICS_PATH: Final = "/metrics"
HEALTH_PATH: Final = "/healthz"

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


def routed_app(registry: Collector) -> _App:
    """The WSGI application of the metrics port (see the module's docstring)."""
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
    """A scrape per thread (a slow scraper does not hold up the next), threads not waited on."""

    daemon_threads = True


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
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        return


def start(port: int, host: str, served: Collector) -> WSGIServer:
    """Serve ``served`` (see :func:`exposed_registry`) on ``host:port`` from a daemon thread;
    the OSError of a failed bind propagates. Stop it with ``shutdown()`` and ``server_close()``."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    host = host.strip("[]")
    server_class = _Server6 if _family(host, port) == socket.AF_INET6 else _Server
    server = make_server(
        host,
        port,
        routed_app(exposed_registry(served)),
        server_class=server_class,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(
        target=server.serve_forever, name="edgewise-metrics", kwargs={"poll_interval": 0.5}
    )
    thread.daemon = True
    thread.start()
    return server
