"""A small HTTP reverse proxy that injects real network faults between a client and a real server.

Every fault happens on a real socket: the listening socket is closed ("down": connection refused),
a request is accepted and never answered ("hang": the client times out), answered only after a
delay ("slow"), answered 200 with a body that is not what was asked for ("garbage": see
``ProxyState.garbage``), or the connection is reset without an answer ("reset"), the response is
cut after N bytes and the connection closed ("drop": the client sees a short read), or stalls
after N bytes until released ("stall"), or the server answers 503 ("error"). Requests are logged
with their Range header and the number of body bytes sent, so tests can prove a download
resumed.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0
    fault: str = ""


@dataclass
class Cut:
    """Cut (``drop``) or stall (``stall``) the response of requests whose path contains
    ``match`` after ``after`` body bytes, ``times`` times."""

    match: str
    after: int
    kind: str = "drop"
    times: int = 1


@dataclass
class ProxyState:
    upstream: tuple[str, int]
    mode: str = "pass"  # pass | hang | error | slow | garbage | reset
    delay: float = 1.0  # seconds, in "slow" mode
    # Bodies answered in "garbage" mode, in turn: not JSON, JSON of the wrong shape, nothing.
    garbage: tuple[bytes, ...] = (
        b"\x89PNG\r\n\x1a\n\x00\x00garbage",
        b'{"model_version": [1, 2, 3]}',
        b'["not", "an", "object"]',
        b'{"model_version": {"name": 7, "version": "x", "tags": "nope"}}',
        b"",
    )
    served_garbage: int = 0
    cuts: list[Cut] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _forward(self) -> None:
        state = self.server.state
        entry = Logged(self.command, self.path, self.headers.get("Range"))
        with state.lock:
            state.log.append(entry)
            mode = state.mode
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if mode == "hang":
            entry.fault = "hang"
            state.release.wait(60)
            self.close_connection = True
            return
        if mode == "reset":
            entry.fault = "reset"
            # SO_LINGER 0: close() sends a RST, the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if mode == "garbage":
            entry.fault = "garbage"
            with state.lock:
                payload = state.garbage[state.served_garbage % len(state.garbage)]
                state.served_garbage += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True
            return
        if mode == "slow":
            entry.fault = "slow"
            time.sleep(state.delay)
        if mode == "error":
            entry.fault = "error"
            payload = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected 503"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True
            return
        connection = http.client.HTTPConnection(*state.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = f"{state.upstream[0]}:{state.upstream[1]}"
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        entry.status = response.status
        cut = None
        with state.lock:
            for candidate in state.cuts:
                if candidate.times > 0 and candidate.match in self.path and self.command == "GET":
                    candidate.times -= 1
                    cut = candidate
                    break
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if cut is None:
            self.wfile.write(payload)
            entry.body_bytes = len(payload)
            return
        part = payload[: cut.after]
        self.wfile.write(part)
        self.wfile.flush()
        entry.body_bytes = len(part)
        entry.fault = cut.kind
        if cut.kind == "stall":
            state.release.wait(120)
        # Close the connection early (a FIN after the partial body): the client reads what was
        # sent, then meets the end of the stream before Content-Length is reached.
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    do_GET = _forward
    do_POST = _forward
    do_PUT = _forward
    do_DELETE = _forward
    do_PATCH = _forward


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: ProxyState) -> None:
        self.state = state
        super().__init__(address, _Handler)


class FaultProxy:
    """``with FaultProxy(("127.0.0.1", upstream_port)) as proxy: proxy.url ...``"""

    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self.state = ProxyState(upstream)
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again, on the same port)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = _Server(("127.0.0.1", self.port), self.state)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_mode(self, mode: str) -> None:
        with self.state.lock:
            self.state.mode = mode
        if mode == "pass":
            self.release()

    def cut(self, match: str, after: int, kind: str = "drop", times: int = 1) -> None:
        with self.state.lock:
            self.state.cuts.append(Cut(match, after, kind, times))

    def release(self) -> None:
        """Let hanging and stalled responses end (and new ones through)."""
        self.state.release.set()
        self.state.release = threading.Event()

    def requests(self, match: str = "") -> list[Logged]:
        with self.state.lock:
            return [e for e in self.state.log if match in e.path]

    def close(self) -> None:
        self.release()
        self.down()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
