"""Multi-process serving: N server processes share one port through SO_REUSEPORT.

Python serves one request at a time per process (the GIL), so past one core the way to use the
CPU budget is more processes. ``edgewise serve --processes N`` starts this supervisor, which:

- reserves the port, then starts N ordinary ``edgewise serve`` processes on it with SO_REUSEPORT
  (the kernel spreads new connections over them), each with the same settings (handed down as
  ``EDGEWISE_*`` variables), the same model repository, and a private control address (a Unix
  socket in the peers folder, which only this user can enter) published there;
- serves the aggregated Prometheus metrics of all of them on the metrics port (prometheus_client's
  multiprocess mode);
- writes the port file once every process is SERVING, restarts a process that dies, and on
  SIGTERM/SIGINT stops them all (each drains its in-flight requests) and exits 0.

A LoadModel or UnloadModel call reaches one process; that process makes the change, then
forwards the call to its siblings' private addresses, so every process serves the same model set
and a hot swap stays zero-failure. Worker threads and the memory budget are split evenly between
the processes; each admits up to the whole in-flight limit, within its share of the memory (a
client's calls stay on the process its connection reached, so the load need not be even; see
:func:`~edgewise.runtime.config.limits.process_inflight_limit`). A drift report merges every
process's window (frontends/peer_windows.py); the drift gauges are per process (the most recent
shows).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields, replace
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from edgewise.runtime._process import pid_alive
from edgewise.runtime.app.composition import start_metrics_port
from edgewise.runtime.config.limits import process_inflight_limit
from edgewise.runtime.config.settings import ENV_PREFIX, ServerSettings
from edgewise.runtime.errors import EdgewiseError, Unavailable
from edgewise.runtime.frontends.ports import (
    reserve_port,
    stop_http,
    write_port_file,
)

__all__ = ["peer_addresses", "run_supervisor"]

log = logging.getLogger(__name__)

PEER_SUFFIX = ".peer"


def published_peers(peers_dir: Path) -> dict[int, Path]:
    """The processes that have published their control address: pid -> its file. A file being
    written (the atomic write's temporary name, which also ends in the suffix) is not one yet."""
    found = {}
    for path in sorted(peers_dir.glob(f"*{PEER_SUFFIX}")):
        stem = path.name.removesuffix(PEER_SUFFIX)
        if stem.isdigit():
            found[int(stem)] = path
    return found


def peer_addresses(peers_dir: Path, exclude_pid: int) -> list[str]:
    """Private control addresses of the sibling processes (from their files in ``peers_dir``)."""
    addresses = []
    for pid, path in published_peers(peers_dir).items():
        if pid == exclude_pid or not pid_alive(pid):  # a dead sibling's file is stale
            continue
        addresses.append(path.read_text().strip())
    return addresses


def _child_environment(
    settings: ServerSettings, processes: int, base: dict[str, str]
) -> dict[str, str]:
    env = dict(base)
    per_process = replace(
        settings,
        # The budget is the whole CPU and memory: each process gets its share of the threads
        # and memory, and the whole in-flight limit within its memory (see limits.py).
        worker_threads=max(1, settings.worker_threads // processes),
        memory_budget_bytes=settings.memory_budget_bytes // processes,
        max_inflight=process_inflight_limit(
            settings.max_inflight,
            processes,
            settings.memory_budget_bytes,
            settings.max_message_bytes,
        ),
    )
    for item in fields(per_process):
        if not item.metadata.get("env", True):
            continue
        value = getattr(per_process, item.name)
        if value is None or item.name in ("port_file", "processes"):
            continue
        env[ENV_PREFIX + item.name.upper()] = str(value)
    return env


class _Child:
    def __init__(self, command: list[str], env: dict[str, str], index: int) -> None:
        self.command = command
        self.env = env
        self.metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
        self.index = index
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, env=self.env)

    def restart(self) -> None:
        mark_process_dead(self.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        self.process = self._spawn()


def run_supervisor(settings: ServerSettings) -> int:
    """Serve with ``settings.processes`` server processes; return the exit code. A start that
    fails leaves nothing behind (processes, the port, the work folder)."""
    reserved = reserve_port(settings.host, settings.port)  # before anything is made
    try:
        workdir = Path(tempfile.mkdtemp(prefix="edgewise-workers-"))
    except OSError:
        reserved.close()
        raise
    try:
        return _supervise(settings, reserved, workdir)
    finally:
        reserved.close()
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("stopped")


def _supervise(settings: ServerSettings, reserved: socket.socket, workdir: Path) -> int:
    """Start the server processes sharing ``reserved``'s port, restart those that exit, and
    stop them all at SIGTERM/SIGINT or when one cannot start; ``workdir`` holds their metrics
    and control addresses."""
    processes = settings.processes
    port = reserved.getsockname()[1]
    prom_dir = workdir / "metrics"
    peers_dir = workdir / "peers"
    prom_dir.mkdir()
    peers_dir.mkdir(mode=0o700)  # the siblings' control sockets: this user only
    base_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    env = _child_environment(settings, processes, base_env)
    env.update(
        {
            ENV_PREFIX + "PORT": str(port),
            ENV_PREFIX + "METRICS_PORT": "-1",
            ENV_PREFIX + "REUSE_PORT": "true",
            ENV_PREFIX + "PEERS_DIR": str(peers_dir),
            ENV_PREFIX + "PROCESSES": "1",
        }
    )
    env.pop(ENV_PREFIX + "PORT_FILE", None)
    # The children log as this process does (the format travels in EDGEWISE_LOG_FORMAT).
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    command = [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", level, "serve"]
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    children: list[_Child] = []
    metrics_server: WSGIServer | None = None
    try:
        metrics_server = _start_metrics(settings, prom_dir)  # a busy port: before any process
        metrics_port = -1 if metrics_server is None else int(metrics_server.server_port)
        children.extend(_Child(command, env, i) for i in range(processes))
        _wait_serving(children, peers_dir, stopping)
        reserved.close()
        log.info(
            "serving with %d processes on %s:%d (metrics on %s)",
            processes,
            settings.host,
            port,
            metrics_port if metrics_port >= 0 else "off",
        )
        if settings.port_file is not None:
            http_port = settings.http_port if settings.http_port >= 0 else None  # fixed: >0
            write_port_file(settings.port_file, port, metrics_port, http_port)
        while not stopping.wait(0.2):
            for child in children:
                code = child.process.poll()
                if code is not None and not stopping.is_set():
                    log.error("server process %d exited with %s: restarting it", child.index, code)
                    try:
                        child.restart()
                    except OSError as exc:
                        log.error("cannot restart server process %d: %s", child.index, exc)
        return 0
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.grace_seconds + 5
        for child in children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if metrics_server is not None:
            stop_http(metrics_server)


def _start_metrics(settings: ServerSettings, prom_dir: Path) -> WSGIServer | None:
    """The metrics endpoint over every process's metrics in ``prom_dir`` (None when off)."""
    if settings.metrics_port < 0:
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))  # type: ignore[no-untyped-call]
    return start_metrics_port(settings, registry, None)


def _wait_serving(children: list[_Child], peers_dir: Path, stopping: threading.Event) -> None:
    """Until every process has published its control address (it does so once SERVING)."""
    deadline = time.monotonic() + 300
    while True:
        published = published_peers(peers_dir)
        if all(child.process.pid in published for child in children):
            return
        for child in children:
            if child.process.poll() is not None:
                raise EdgewiseError(
                    f"server process {child.index} exited with code {child.process.returncode} "
                    "during start-up"
                )
        if stopping.is_set():
            raise Unavailable("stopped during start-up")
        if time.monotonic() > deadline:
            raise Unavailable("the server processes did not become ready within 300 s")
        time.sleep(0.05)
