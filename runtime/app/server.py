"""Server lifecycle: bind, load, serve, drain.

Start-up binds the gRPC port first with health NOT_SERVING (so liveness probes answer while models
load), loads the repository, then turns health to SERVING. SIGTERM or SIGINT turns health to
NOT_SERVING, stops accepting new calls, lets in-flight calls finish within the grace period, keeps
the connections open (within it, at most 5 s) until the clients have acknowledged the end of the
last responses (see drain.py), and returns exit code 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.app.composition import (
    INFERENCE_SERVICE,
    REPOSITORY_SERVICE,
    check_settings,
    data_capture,
    grpc_server,
    load_shedder,
    memory_admission,
    model_repository,
    publish_split,
    rollouts,
    security,
    start_metrics_port,
)
from edgewise.runtime.app.supervisor import PEER_SUFFIX, peer_addresses
from edgewise.runtime.config.settings import ServerSettings
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.drain import hold_connections
from edgewise.runtime.frontends.native.binding import NativeFront, load_front
from edgewise.runtime.frontends.ports import (
    check_port_free,
    stop_http,
    write_port_file,
)
from edgewise.runtime.frontends.tls_stage import TlsStage
from edgewise.runtime.serving.alerts import AlertHook
from edgewise.runtime.serving.dataplane import DataPlane
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.pipeline import InferenceCore
from edgewise.runtime.serving.shedding import LoopLoad

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgewise.runtime.frontends.http import HttpFront

__all__ = ["InferenceServer", "run_server"]

log = logging.getLogger(__name__)

# At most this long after the last call (and never past the grace period) the server waits for
# its clients to acknowledge the end of the last responses before closing their connections.
_CONNECTION_DRAIN_SECONDS = 5.0


class InferenceServer:
    """One server process: its parts made from ``settings`` in dependency order by the
    composition root (composition.py), then bound, started and drained here."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        publish_split(settings, self.metrics)
        self.security = security(settings, self.metrics)
        self.shedder = load_shedder(settings, self.metrics, elsewhere=self._native_in_flight)
        self.admission = memory_admission(settings, self.metrics)
        self.alerts = AlertHook(settings.alert_command, settings.alert_webhook)
        self.repository = model_repository(
            settings, self.metrics, self.security.trusted_keys, self.alerts
        )
        self.dataplane = DataPlane(self.repository)
        self.capture = data_capture(settings, self.metrics, self.repository)
        self.rollouts = rollouts(self.repository, self.dataplane, self.metrics)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="edgewise-worker"
        )
        self.health = HealthServicer()
        self.port = 0
        self.private_address = ""  # multi-process mode: where siblings forward control calls
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._created: grpc.aio.Server | None = None  # made by start(), started or not
        self._metrics_http: WSGIServer | None = None
        self._drift_task: asyncio.Task[None] | None = None
        self.loop_load: LoopLoad | None = None
        self.core: InferenceCore | None = None  # the request pipeline, made by start()
        self.front: NativeFront | None = None  # --front-end native
        self._front_dir: Path | None = None
        self.http: HttpFront | None = None  # --http-port
        self.http_port = -1

    def _native_in_flight(self) -> int:
        """The native front end's inference calls in flight (counted in C++; 0 without it)."""
        return 0 if self.front is None else self.front.in_flight()

    async def update_health(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.dataplane.ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE, REPOSITORY_SERVICE):
            await self.health.set(service, status)
        self.metrics.models_ready.set(len(self.repository.served_models()))

    async def start(self) -> None:
        """Bind, register and start serving; a start that fails (a busy port) closes what it
        opened, so the caller reports one error and nothing is left to clean up at exit."""
        try:
            await self._start()
        except BaseException:
            await self._close_failed_start()
            raise

    async def _close_failed_start(self) -> None:
        if self.http is not None:
            await self.http.stop(0.0)
        if self.front is not None:
            await asyncio.to_thread(self.front.shutdown, 0.0)
        if self._created is not None:
            await self._created.stop(None)  # else grpc's __del__ stops it on a closed loop
        self._release_resources()

    def _release_resources(self) -> None:
        """What outlives the gRPC server: the metrics endpoint, the worker threads and the
        native front end's folder (the last step of a stop, and of a start that failed)."""
        if self._metrics_http is not None:
            stop_http(self._metrics_http)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.capture is not None:  # after the last answer: what is queued is written
            self.capture.close()
        if self.core is not None and self.core.tracing is not None:  # queued spans go out
            self.core.tracing.shutdown()
        if self.rollouts.shadow is not None:
            self.rollouts.shadow.close()
        if self._front_dir is not None:
            shutil.rmtree(self._front_dir, ignore_errors=True)

    async def _start(self) -> None:
        settings = self.settings
        limit = settings.max_message_bytes
        front_module = self._front_module()
        shedder = self.shedder
        if shedder is not None:
            self.loop_load = LoopLoad(
                asyncio.get_running_loop(),
                last_shed=lambda: shedder.last_shed,
                in_flight=shedder.calls_in_flight,
                limit=shedder.limit,
            )
        # Every front end's inference calls, as a batch queue's idle test counts them.
        calls_in_flight: Callable[[], int] | None = None
        if shedder is not None:
            calls_in_flight = shedder.admitted_calls
        elif front_module is not None:
            calls_in_flight = self._native_in_flight
        core = self.core = InferenceCore(
            self.dataplane,
            self.metrics,
            self.executor,
            settings.inline_max_bytes,
            self.admission,
            retry_after_ms=settings.retry_after_ms,
            loop_load=self.loop_load,
            calls_in_flight=calls_in_flight,
            capture=self.capture,
            rollouts=self.rollouts,
        )
        if settings.otel_endpoint is not None:  # else opentelemetry is never imported
            from edgewise.runtime.serving.tracing import RequestTracing, otlp_provider

            provider = otlp_provider(settings.otel_endpoint)
            core.tracing = RequestTracing(provider, settings.otel_sample_ratio)
            log.info(
                "tracing to %s, sampling %g of new traces",
                settings.otel_endpoint,
                settings.otel_sample_ratio,
            )
        auth = self.security.auth
        server = self._created = grpc_server(
            settings,
            auth,
            shedder,
            core,
            self.repository,
            self.executor,
            self.health,
            self.update_health,
            self._peers if settings.peers_dir is not None else None,
            self.capture,
            self.rollouts,
        )
        address = f"{settings.host}:{settings.port}"
        check_port_free(settings.host, settings.port, settings.reuse_port)
        upstream = ""
        if front_module is not None:
            # The C++ front end takes the port; this server answers what it relays, on a
            # Unix socket in a folder only this user can enter.
            self._front_dir = Path(tempfile.mkdtemp(prefix="edgewise-front-"))
            upstream = f"unix:{self._front_dir / 'grpc.sock'}"
            _add_port(server, upstream)
        else:
            self.port = _add_port(server, address, self.security.credentials)
        if settings.peers_dir is not None:
            # Multi-process mode: a private address for control calls forwarded by siblings, a
            # Unix socket in the supervisor's private folder (only this user can reach it, so
            # grpcio believes the caller's certificate identities relayed there).
            self.private_address = f"unix:{settings.peers_dir / f'{os.getpid()}.sock'}"
            _add_port(server, self.private_address)
        await self.update_health()
        await server.start()
        self._grpc = server
        if front_module is not None:
            self.front = NativeFront(core, auth, shedder, settings.retry_after_ms)
            # As many threads compute at once as with grpcio: one for cheap calls (its event loop)
            # and its worker threads for those over inline_max_bytes or while calls are slow.
            self.port = self.front.start(
                front_module,
                address,
                upstream,
                limit,
                settings.reuse_port,
                handlers=settings.worker_threads + 1,
                small_max_bytes=settings.inline_max_bytes,
                tls=self._tls_stage(),
                fast_path=settings.native_fast_path,
            )
        if settings.http_port >= 0:
            await self._start_http(core)
        if settings.metrics_port >= 0:
            self._metrics_http = start_metrics_port(settings, self.metrics.registry, auth)
            self.metrics_port = int(self._metrics_http.server_port)
        log.info(
            "gRPC listening on %s:%d (front end: %s), loading models from %s",
            settings.host,
            self.port,
            "native" if self.front is not None else "grpcio",
            settings.repo,
        )
        loop = asyncio.get_running_loop()
        if settings.monitoring or settings.quality:
            # Load the request path's kernels now (compiled ahead of time, or numba's from its
            # cache or compiled): no request pays a JIT. Imported only here: with monitoring off
            # the server never loads them. Where neither can run, the repository serves every
            # model unmonitored and without online quality, each drift report giving the reason.
            from edgewise.kernels import native_status, unavailable

            missing = unavailable()
            if missing is not None:
                log.warning("monitoring and online quality are off: %s", missing)
            elif settings.monitoring:
                seconds = await loop.run_in_executor(self.executor, warm_request_kernels)
                log.info(
                    "monitoring kernels ready in %.2f s (ahead-of-time compiled kernels: %s)",
                    seconds,
                    native_status(),
                )
        statuses = await loop.run_in_executor(self.executor, self.repository.load_all)
        await loop.run_in_executor(self.executor, self.rollouts.restore)
        ready = [s for s in statuses if s.state.value == "READY"]
        if settings.gc_tuning:
            _tune_garbage_collector()
        self.dataplane.set_ready(True)
        await self.update_health()
        log.info(
            "serving %d model version(s) on %s:%d (metrics on %s)",
            len(ready),
            settings.host,
            self.port,
            self.metrics_port if self._metrics_http else "off",
        )
        if settings.monitoring and settings.drift_interval_seconds > 0:
            self._drift_task = asyncio.create_task(self._drift_timer())
        if settings.port_file is not None:
            http_port = self.http_port if self.http is not None else None
            write_port_file(settings.port_file, self.port, self.metrics_port, http_port)
        if settings.peers_dir is not None:
            peer_file = settings.peers_dir / f"{os.getpid()}{PEER_SUFFIX}"
            write_text_atomic(peer_file, f"{self.private_address}\n")

    async def _start_http(self, core: InferenceCore) -> None:
        """The HTTP/REST front end on ``host:http_port``, with the gRPC port's tokens, TLS files,
        in-flight limit (shared) and message size (see http_front.py). Imported only here: its
        HTTP stack is the ``http`` extra."""
        try:
            from edgewise.runtime.frontends.http import HttpFront
            from edgewise.runtime.frontends.http_tls import server_ssl_context
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("aiohttp"):
                raise
            raise InvalidInput(
                "--http-port needs the HTTP front end's aiohttp: pip install 'edgewise[http]'"
            ) from None
        settings = self.settings
        self.http = HttpFront(
            core,
            self.dataplane,
            auth=self.security.auth,
            health_open=settings.health_open,
            shedder=self.shedder,  # which counts the native front end's calls with HTTP's
            max_message_bytes=settings.max_message_bytes,
            retry_after_ms=settings.retry_after_ms,
        )
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = server_ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        host, port = settings.host, settings.http_port
        self.http_port = await self.http.start(host, port, tls, settings.reuse_port)
        log.info("HTTP/REST listening on %s:%d%s", host, self.http_port, " (TLS)" if tls else "")

    def _tls_stage(self) -> TlsStage | None:
        """The native front end's copies of the TLS files, in its private folder (or None)."""
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None or self._front_dir is None:
            return None
        return TlsStage(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca, self._front_dir / "tls"
        )

    def _front_module(self) -> ModuleType | None:
        """The native front end's module to serve with, or None for grpcio: ``auto`` is native
        wherever its module is built and fresh, TLS or not."""
        choice = self.settings.front_end
        if choice == "grpcio":
            return None
        module, status = load_front()
        if module is None:
            if choice == "native":
                raise InvalidInput(f"--front-end native: the native front end is {status}")
            # Built but stale (an upgrade without `make native`) is worth a warning: the
            # server is several times slower than it was.
            report = log.warning if status.startswith("stale") else log.info
            report("native front end %s: serving with grpcio", status)
        return module

    def _peers(self) -> list[str]:
        assert self.settings.peers_dir is not None
        return peer_addresses(self.settings.peers_dir, os.getpid())

    async def _drift_timer(self) -> None:
        """Every drift interval: tick each monitor, judge its window, publish, log transitions."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.drift_interval_seconds)
            try:
                await loop.run_in_executor(self.executor, self.judge_drift)
            except Exception:
                log.exception("drift evaluation failed")

    def judge_drift(self) -> None:
        """Each monitor judges, logs, publishes and alerts in one place; an unloaded version's
        series were dropped by the unload itself (its monitor's and its quality's close)."""
        for model in self.repository.served_models():
            if model.monitor is not None:
                model.monitor.evaluate()

    async def stop(self, grace: float | None = None) -> None:
        self.dataplane.set_ready(False)
        if self.loop_load is not None:
            self.loop_load.close()
        if self._drift_task is not None:
            self._drift_task.cancel()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_seconds if grace is None else grace
        # The HTTP front end drains beside the gRPC port, within the same grace period.
        http_stopped = asyncio.create_task(self.http.stop(grace)) if self.http else None
        if self._grpc is not None:
            started = time.monotonic()
            held = hold_connections(self.port)  # before gRPC can close any of them
            if self.front is not None:
                # The C++ server drains first, off the loop: the calls it relays still need
                # this server until they end.
                await asyncio.to_thread(self.front.shutdown, grace)
                await self._grpc.stop(max(0.0, grace - (time.monotonic() - started)))
            else:
                await self._grpc.stop(grace)
            # The last responses may still be on their way (see drain.py): keep the sockets
            # open until the clients have them, within what is left of the grace period.
            linger = min(_CONNECTION_DRAIN_SECONDS, grace - (time.monotonic() - started))
            undelivered = await held.release_when_delivered(linger)
            if undelivered:
                log.warning("%d bytes of responses were not delivered before closing", undelivered)
        if http_stopped is not None:
            await http_stopped
        self._release_resources()

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


def _add_port(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind ``address`` (TLS with ``credentials``); the port bound. gRPC says it cannot by
    returning 0 or raising RuntimeError (grpcio's aio server): :class:`OSError` naming the
    address either way (the command line's one error line)."""
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def warm_request_kernels() -> float:
    """Load the request path's kernels (the ahead-of-time compiled ones when built, otherwise
    numba's, from its cache or compiled); return the seconds.

    numba probes for SciPy's BLAS when its CPU target first initialises, which imports
    scipy.linalg: ~16 MB resident and ~70 ms here. edgewise's kernels never call BLAS (see
    kernels/_special.py), and this server process runs no other numba code, so the probe is
    made to find nothing; scipy.linalg stays importable for anything that asks for it later."""
    from edgewise import kernels

    probe = "scipy.linalg.cython_blas"
    hidden = probe not in sys.modules
    if hidden:
        sys.modules[probe] = None  # type: ignore[assignment]  # importing it raises ImportError
    try:
        return kernels.warmup_request_path()
    finally:
        if hidden and sys.modules.get(probe, object()) is None:
            del sys.modules[probe]


def _tune_garbage_collector() -> None:
    """After start-up: collect once, then move everything allocated so far (modules, models,
    sessions, monitors) out of the collector's reach, and run the youngest generation's
    collections less often, so that requests do not pay for rescanning start-up objects."""
    gc.collect()
    gc.freeze()
    threshold, *older = gc.get_threshold()
    gc.set_threshold(max(threshold, 50_000), *older)


async def _serve(settings: ServerSettings) -> None:
    server = InferenceServer(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    waiter = asyncio.create_task(server.wait())
    stopper = asyncio.create_task(stopping.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down: draining in-flight requests (grace %.1f s)", settings.grace_seconds)
    await server.stop()
    waiter.cancel()
    log.info("stopped")


def run_server(settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code."""
    check_settings(settings)  # once, before any process starts
    if settings.processes > 1:
        from edgewise.runtime.app.supervisor import run_supervisor

        return run_supervisor(settings)
    asyncio.run(_serve(settings))
    return 0
