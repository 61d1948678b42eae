"""The HTTP/REST front end of the Open Inference Protocol (V2), off by default (``--http-port``).

A third thin adapter over the serving core, beside grpcio and the native gRPC front end: it runs
on the server's event loop (aiohttp), translates each body with
:mod:`~edgewise.runtime.frontends.rest_codec` and calls :meth:`InferenceCore.infer`, the entry point
the grpcio servicer calls; admission, batching, the deadline check, monitoring and the
``edgewise_requests_total`` / ``edgewise_request_duration_seconds`` accounting all happen there.
Errors answer with the HTTP status beside the gRPC one in :mod:`~edgewise.runtime.frontends.status`
and the protocol's error object ``{"error": message}``.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata, with
the ``binary_tensor_data`` extension), ``GET /v2/models/{name}[/versions/{version}]`` (model
metadata), ``GET .../ready`` and ``POST .../infer``. A negative readiness is 503 with
``{"ready": false}`` (probes and tritonclient read the status).

The same rules as the gRPC port:

* **Tokens**: ``Authorization: Bearer <token>`` checked by the same
  :class:`~edgewise.runtime.frontends.security.AuthInterceptor` (``refusal``: the same token set,
  messages and ``edgewise_auth_failures_total{reason}``); 401 with ``WWW-Authenticate: Bearer``.
  Under mutual TLS a request without a token is identified by its client certificate (the
  TLS transport's peer certificate), mapped by the tokens file's ``cert:`` lines.
  The two health endpoints are open while the gRPC health service is (``health_open``): they
  are what HTTP probes call.
* **TLS**: the same certificate, key and client CA (mutual TLS: a client without a certificate
  the CA signed fails the handshake), re-read when they change (see http_tls.py).
* **Deadlines**: the ``Request-Timeout-Ms`` header (milliseconds, as gRPC's deadline is a
  duration from the call's start), and Triton's ``timeout`` request parameter (microseconds;
  what ``tritonclient.http``'s ``infer(timeout=...)`` sends); the earlier one wins. Past it the
  request is not run: 504.
* **Per-credential limits**: past its own rate or in-flight share (serving.admission.CallQuotas,
  checked through ``AuthInterceptor.take_quota`` as on every front end) a credential's
  inference call is refused 429 with the same retry headers as shedding's.
* **Shedding**: inference calls count against the same in-flight limit as the gRPC ones
  (:meth:`LoadShedder.enter`); past it a call is refused before its body is read, 503 with
  ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``, and counted in
  ``edgewise_shed_requests_total``. Health and metadata are never shed.
* **Message size**: a body over ``max_message_bytes`` is refused (413) as it arrives.
* **Request and trace ids**: an inference answer (an error too) carries ``x-request-id`` (the
  request's ``id``, else the ``x-request-id`` header sent, else one made by the server) and,
  where the call has a trace (a ``traceparent`` header, or tracing sampled it), ``x-trace-id``
  (see request_context.py).

A body over ``inline_max_bytes`` is parsed on a worker thread (the loop never parses a large
JSON document); the core decides where the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from edgewise.runtime.errors import EdgewiseError, ErrorCode, InvalidInput
from edgewise.runtime.frontends.ports import bind_error
from edgewise.runtime.frontends.rest_codec import (
    BINARY_EXTENSION,
    HEADER_LENGTH,
    InferCall,
    error_body,
    header_length,
    model_metadata_body,
    model_ready_body,
    parse_infer,
    render_infer,
    server_metadata_body,
)
from edgewise.runtime.frontends.scopes import HTTP_ROUTES
from edgewise.runtime.frontends.security import AuthInterceptor, certificate_identities
from edgewise.runtime.frontends.status import http_status
from edgewise.runtime.serving.dataplane import DataPlane
from edgewise.runtime.serving.pipeline import InferenceCore
from edgewise.runtime.serving.request_context import REQUEST_ID_KEY, TRACEPARENT, RequestLabels
from edgewise.runtime.serving.shedding import LoadShedder

__all__ = ["TIMEOUT_HEADER", "HttpFront"]

log = logging.getLogger(__name__)

#: The request header that carries a deadline, in milliseconds from the request's arrival.
TIMEOUT_HEADER: Final = "Request-Timeout-Ms"

_JSON: Final = "application/json"
_BINARY: Final = "application/octet-stream"
_UNAUTHENTICATED: Final = {"WWW-Authenticate": 'Bearer realm="edgewise"'}
#: Where the token check leaves a request's credential (security.Credential; None: no tokens).
CREDENTIAL_KEY: Final = "edgewise.credential"
_MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"


def _retry_headers(retry_ms: int) -> dict[str, str]:
    """The retry hint of a 503 or 429: ``Retry-After`` (whole seconds, rounded up) and
    ``retry-after-ms``."""
    return {"Retry-After": str(max(1, math.ceil(retry_ms / 1000))), "retry-after-ms": str(retry_ms)}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(error_body(message), status, headers)


class HttpFront:
    """The REST endpoints over ``core`` (see the module's docstring); :meth:`start` binds,
    :meth:`stop` drains."""

    def __init__(
        self,
        core: InferenceCore,
        dataplane: DataPlane,
        *,
        auth: AuthInterceptor | None = None,
        health_open: bool = True,
        shedder: LoadShedder | None = None,
        max_message_bytes: int = 64 << 20,
        retry_after_ms: int = 50,
    ) -> None:
        self.core = core
        self.dataplane = dataplane
        self.auth = auth
        self.health_open = health_open
        self.shedder = shedder
        self.max_message_bytes = max_message_bytes
        self.in_flight = 0  # inference calls being answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._retry_headers = _retry_headers(retry_after_ms)

    # ---- lifecycle -----------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_message_bytes)
        routes = app.router

        def add(verb: str, path: str, handler: Handler, open_: bool = False) -> None:
            # Every route is in the scopes table (the RPC it answers says its scope).
            method = HTTP_ROUTES[(verb, path)]
            routes.add_route(verb, path, handler if open_ else self._guarded(handler, method))

        add("GET", "/v2/health/live", self._live, self.health_open)
        add("GET", "/v2/health/ready", self._ready, self.health_open)
        add("GET", "/v2", self._server_metadata)
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            add("GET", model, self._model_metadata)
            add("GET", f"{model}/ready", self._model_ready)
            add("POST", f"{model}/infer", self._infer)
        return app

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> int:
        """Listen on ``host:port`` (TLS with ``ssl_context``); the port bound. OSError naming the
        address when it cannot bind."""
        runner = web.AppRunner(
            self.application(), handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            raise bind_error(host, port, exc, "the HTTP port") from None
        self._site = site
        return int(runner.addresses[0][1])

    async def stop(self, grace: float) -> None:
        """Stop taking connections, let the inference calls under way finish within ``grace``
        seconds, then close every connection."""
        if self._runner is None:
            return
        if self._site is not None:
            await self._site.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, grace))
        except TimeoutError:
            log.warning(
                "%d HTTP inference call(s) still running after the grace period", self.in_flight
            )
        await self._runner.cleanup()
        self._runner = None

    # ---- tokens --------------------------------------------------------------------------------

    def _guarded(self, handler: Handler, method: str) -> Handler:
        """``handler`` behind the token check (when tokens are on): the credential must hold
        the scope of ``method`` (the RPC the route answers)."""
        auth = self.auth
        if auth is None:
            return handler

        async def checked(request: web.Request) -> web.StreamResponse:
            value = request.headers.get("Authorization")
            peer: tuple[str, ...] = ()
            if value is None and auth.tokens.maps_certificates and request.transport is not None:
                peer = certificate_identities(request.transport.get_extra_info("peercert"))
            credential, refusal = auth.admit(
                (("authorization", value),) if value is not None else (), method, peer
            )
            request[CREDENTIAL_KEY] = credential
            if refusal is not None:
                if refusal.code.name == "PERMISSION_DENIED":
                    return _error(403, refusal.message)
                return _error(401, refusal.message, _UNAUTHENTICATED)
            return await handler(request)

        return checked

    # ---- health and metadata -------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        live = self.dataplane.live()
        return _json(b'{"live":true}' if live else b'{"live":false}', 200 if live else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.dataplane.ready()
        return _json(b'{"ready":true}' if ready else b'{"ready":false}', 200 if ready else 503)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        metadata = self.dataplane.server_metadata()
        return _json(server_metadata_body(metadata, (BINARY_EXTENSION,)))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            return _json(model_metadata_body(self.dataplane.model_metadata(name, version)))
        except Exception as exc:
            return self._failure(exc)

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = self.dataplane.model_ready(name, version)
        return _json(model_ready_body(name, ready), 200 if ready else 503)

    # ---- inference -----------------------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        arrived = time.monotonic()
        shedder = self.shedder
        if shedder is not None and not shedder.enter():
            return _error(503, shedder.refusal[0], self._retry_headers)
        auth = self.auth
        credential = request.get(CREDENTIAL_KEY)
        if auth is not None and auth.quotas is not None:  # the credential's own limits: 429
            over = auth.take_quota(credential, _MODEL_INFER)
            if over is not None:
                if shedder is not None:
                    shedder.leave()
                return _error(429, over.message, _retry_headers(over.retry_ms))
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._answer(request, started, arrived)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            if shedder is not None:
                shedder.leave()
            if auth is not None:
                auth.give_back_quota(credential, _MODEL_INFER)

    async def _answer(self, request: web.Request, started: float, arrived: float) -> web.Response:
        name, version = _model(request)
        headers = request.headers
        labels = RequestLabels(headers.get(REQUEST_ID_KEY, ""), headers.get(TRACEPARENT))
        labels.model, labels.version = name, version
        try:
            call, large = await self._translate(request, name, version, arrived)
        except web.HTTPRequestEntityTooLarge:
            message = f"request body: larger than the {self.max_message_bytes}-byte limit"
            return _error(413, message, labels.headers())
        except EdgewiseError as exc:  # the request never reached the core: counted here
            self.core.metrics.observe_request(name, version, exc.code.name, 0.0)
            return self._failure(exc, labels)
        except ConnectionError:
            raise  # the client went away while sending: nobody to answer
        except Exception as exc:
            return self._failure(exc, labels)
        try:
            deadline = _deadline(request, arrived, call.timeout_us)
            response = await self.core.infer(call.request, deadline, started, labels=labels)
            if large:
                loop = asyncio.get_running_loop()
                body, json_length = await loop.run_in_executor(
                    self.core.executor, render_infer, response, call.outputs
                )
            else:
                body, json_length = render_infer(response, call.outputs)
        except Exception as exc:
            return self._failure(exc, labels)
        if json_length is None:
            return _json(body, headers=labels.headers())
        answer = labels.headers()
        answer[HEADER_LENGTH] = str(json_length)
        return web.Response(body=body, content_type=_BINARY, headers=answer)

    async def _translate(
        self, request: web.Request, name: str, version: str, arrived: float
    ) -> tuple[InferCall, bool]:
        """The request's body as the core's request; and whether it was large (parsed on a
        worker thread)."""
        _deadline(request, arrived, None)  # a malformed header is refused before the body is read
        body = await request.read()
        json_length = header_length(request.headers.get(HEADER_LENGTH), len(body))
        if len(body) <= self.core.inline_max_bytes:
            return parse_infer(body, json_length, name, version), False
        loop = asyncio.get_running_loop()
        call = await loop.run_in_executor(
            self.core.executor, parse_infer, body, json_length, name, version
        )
        return call, True

    def _failure(self, exc: Exception, labels: RequestLabels | None = None) -> web.Response:
        """The answer to ``exc``; an inference call's (``labels``) carries its ids."""
        headers = None if labels is None else labels.headers()
        if isinstance(exc, EdgewiseError):
            if exc.code is ErrorCode.RESOURCE_EXHAUSTED:
                headers = {**(headers or {}), **self._retry_headers}
            return _error(http_status(exc.code), exc.message, headers)
        extra = None if labels is None else labels.extra()
        log.exception("unexpected error in an HTTP request", exc_info=exc, extra=extra)
        return _error(500, f"internal error: {type(exc).__name__}", headers)


def _model(request: web.Request) -> tuple[str, str]:
    info = request.match_info
    return info["name"], info.get("version", "")


def _deadline(request: web.Request, arrived: float, timeout_us: int | None) -> float | None:
    """The request's deadline on time.monotonic()'s clock, or None: the earlier of the timeout
    header's and the ``timeout`` parameter's."""
    deadline = None if timeout_us is None else arrived + timeout_us / 1e6
    value = request.headers.get(TIMEOUT_HEADER)
    if value is not None:
        try:
            milliseconds = float(value)
        except ValueError:
            milliseconds = math.nan
        if not (milliseconds >= 0 and math.isfinite(milliseconds)):
            raise InvalidInput(
                f"header {TIMEOUT_HEADER}: {value!r} is not a number of milliseconds >= 0"
            )
        from_header = arrived + milliseconds / 1000
        deadline = from_header if deadline is None else min(deadline, from_header)
    return deadline
