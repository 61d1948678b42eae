"""Server lifecycle: bind, load, serve, drain.

Start-up binds the gRPC port first with health NOT_SERVING (so liveness probes answer while models
load), loads the repository, then turns health to SERVING. SIGTERM or SIGINT turns health to
NOT_SERVING, stops accepting new calls, lets in-flight calls finish within the grace period, and
returns exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from edgewise.runtime.dataplane import DataPlane
from edgewise.runtime.grpc_api.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.grpc_api.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.grpc_api.servicers import InferenceServicer, RepositoryServicer
from edgewise.runtime.metrics import ServerMetrics
from edgewise.runtime.repository import ModelRepository
from edgewise.runtime.settings import ServerSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

__all__ = ["InferenceServer", "run_server"]

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
REPOSITORY_SERVICE = epb.DESCRIPTOR.services_by_name["ModelRepositoryService"].full_name


class InferenceServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.repository = ModelRepository(
            settings.repo,
            settings.session_settings(),
            settings.policy(),
            on_event=self._on_model_event,
        )
        self.dataplane = DataPlane(self.repository)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="edgewise-worker"
        )
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None

    def _on_model_event(self, name: str, version: int, event: str) -> None:
        self.metrics.model_event(name, version, event)
        self.metrics.models_ready.set(len(self.repository.served_models()))

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
        settings = self.settings
        limit = settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(
                self.dataplane, self.metrics, self.executor, settings.inline_max_bytes
            ),
            server,
        )
        epb_grpc.add_ModelRepositoryServiceServicer_to_server(
            RepositoryServicer(self.repository, self.executor, self.update_health), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                INFERENCE_SERVICE,
                REPOSITORY_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {settings.host}:{settings.port}")
        await self.update_health()
        await server.start()
        self._grpc = server
        if settings.metrics_port >= 0:
            http_server, _thread = start_http_server(
                settings.metrics_port, settings.metrics_host, registry=self.metrics.registry
            )
            self._metrics_http = http_server
            self.metrics_port = int(http_server.server_port)
        log.info(
            "gRPC listening on %s:%d, loading models from %s",
            settings.host,
            self.port,
            settings.repo,
        )
        loop = asyncio.get_running_loop()
        statuses = await loop.run_in_executor(self.executor, self.repository.load_all)
        ready = [s for s in statuses if s.state.value == "READY"]
        self.dataplane.set_ready(True)
        await self.update_health()
        log.info(
            "serving %d model version(s) on %s:%d (metrics on %s)",
            len(ready),
            settings.host,
            self.port,
            self.metrics_port if self._metrics_http else "off",
        )
        if settings.port_file is not None:
            _write_port_file(settings.port_file, self.port, self.metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        self.dataplane.set_ready(False)
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(self.settings.grace_seconds if grace is None else grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


def _write_port_file(path: Path, port: int, metrics_port: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{port} {metrics_port}\n")
    os.replace(temporary, path)


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
    asyncio.run(_serve(settings))
    return 0
