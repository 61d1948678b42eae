"""Real edgewise servers for tests: started as subprocesses on 127.0.0.1 with free ports, waited on
through their port file and the gRPC health service (never a fixed sleep), stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.config.settings import ClientSecurity


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    security: ClientSecurity | None = None  # how to connect (TLS, token); None: plaintext
    http_port: int | None = None  # the HTTP/REST port (serve --http-port), None: off

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def client(self) -> EdgewiseClient:
        return EdgewiseClient(self.target, security=self.security or ClientSecurity())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(
    repo: Path,
    workdir: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
    wait_serving: bool = True,
    env: dict[str, str] | None = None,
    security: ClientSecurity | None = None,
    prefix: Sequence[str] = (),
    global_args: Sequence[str] = (),
) -> RunningServer:
    """``env`` adds environment variables to the server's; ``security`` is how the tests (and
    the wait for SERVING) connect to it; ``prefix`` goes before the command (e.g. nsenter);
    ``global_args`` go before ``serve`` (e.g. ``--log-level``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"ports-{time.monotonic_ns()}"
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    command = [
        *prefix, sys.executable, "-m", "edgewise.runtime.cli", *global_args, "serve",
        "--repo", str(repo), "--host", "127.0.0.1", "--port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--port-file", str(port_file), *extra_args,
    ]  # fmt: skip
    log_handle = log_path.open("wb")
    process = subprocess.Popen(
        command, stdout=log_handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not write its port file:\n{log_path.read_text()}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)
    port, metrics_port, *http = (int(x) for x in port_file.read_text().split())
    server = RunningServer(process, port, metrics_port, log_path, security, *http)
    if not wait_serving:
        return server
    with server.client() as client:
        client.wait_until_serving(timeout=max(1.0, deadline - time.monotonic()))
    return server


@contextmanager
def running_server(
    repo: Path, workdir: Path, extra_args: Sequence[str] = ()
) -> Iterator[RunningServer]:
    server = start_server(repo, workdir, extra_args)
    try:
        yield server
    finally:
        server.stop()


#: The front ends a server can have (``serve --front-end``); tests of the gRPC surface run on each.
FRONT_ENDS = ("grpcio", "native")


def front_end_args(front_end: str) -> list[str]:
    """The ``serve`` arguments for ``front_end``. Where the native front end is not built (it
    needs the gRPC C++ library: ``make native``) the test is skipped, or failed under CI."""
    if front_end == "native":
        native_front_or_unmet()
    return ["--front-end", front_end]


def native_front_or_unmet() -> ModuleType:
    """The built native front-end module; without it the test is skipped with the reason, or
    failed under CI (:func:`tests.prerequisites.unmet`)."""
    from edgewise.runtime.frontends.native.binding import load_front
    from tests.prerequisites import unmet

    module, status = load_front()
    if module is None:
        unmet(f"the native front end is {status}")
    return module
