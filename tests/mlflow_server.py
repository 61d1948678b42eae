"""A real ``mlflow server`` for tests, in a virtual environment of its own.

mlflow (with its auth app) is ~0.8 GB and pins its own dependency set, so it never goes into the
project's environment: it lives in ``.venv-mlflow`` (or ``$EDGEWISE_MLFLOW_VENV``), installed from
the ``mlflow-server`` extra of ``pyproject.toml`` by ``make mlflow-venv`` (which ``make test``
depends on) or, when missing, by :func:`ensure_mlflow` under a file lock (so parallel test
processes install it once). ``python -m tests.mlflow_server install`` does the same by hand.

The server runs as the measured recipe says: sqlite backend, artifact proxying
(``--serve-artifacts``), job execution off, one worker, the basic-auth app with a generated admin
password; it is waited on through ``GET /health`` and stopped with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTRA = "mlflow-server"
START_TIMEOUT = 120.0


def requirements() -> list[str]:
    """The ``mlflow-server`` extra of pyproject.toml (the single place its version is pinned)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["project"]["optional-dependencies"][EXTRA])


def venv_path() -> Path:
    return Path(os.environ.get("EDGEWISE_MLFLOW_VENV", ROOT / ".venv-mlflow"))


def ensure_mlflow(quiet: bool = True) -> Path:
    """The ``mlflow`` executable, installing the environment first if it is missing or stale."""
    venv = venv_path()
    executable = venv / "bin" / "mlflow"
    stamp = venv / ".installed"
    wanted = "\n".join(requirements())
    if executable.exists() and stamp.exists() and stamp.read_text() == wanted:
        return executable
    lock_path = ROOT / ".build" / "mlflow-venv.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing it right now
        if executable.exists() and stamp.exists() and stamp.read_text() == wanted:
            return executable
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        if quiet:
            pip.append("--quiet")
        subprocess.run([*pip, *requirements()], check=True)
        stamp.write_text(wanted)
    return executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    username: str
    password: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.workdir / "artifacts"

    def env(self) -> dict[str, str]:
        """Environment for a client process (credentials the way mlflow's client reads them)."""
        return {
            **os.environ,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200 and response.read().strip() == b"OK")
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow(workdir: Path, timeout: float = START_TIMEOUT) -> MlflowServer:
    executable = ensure_mlflow()
    workdir.mkdir(parents=True, exist_ok=True)
    username, password = "admin", "pw-" + secrets.token_hex(12)
    # auth_cache_ttl_seconds: without it every request re-derives the PBKDF2 password hash,
    # measured here at ~260 ms per REST call on 2 cores (21 ms with the cache).
    auth_config = workdir / "basic_auth.ini"
    auth_config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{workdir / 'auth.db'}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config),
        MLFLOW_AUTH_ADMIN_PASSWORD=password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    port = free_port()
    log_path = workdir / "mlflow.log"
    command = [
        str(executable), "server", "--app-name", "basic-auth",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts"),
    ]  # fmt: skip
    with log_path.open("wb") as log_handle:
        process = subprocess.Popen(
            command,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,  # its own process group: stop() ends its workers too
        )
    server = MlflowServer(process, port, workdir, username, password, log_path)
    deadline = time.monotonic() + timeout
    delay = 0.1
    while not _healthy(server.url):
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{server.log()}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    return server


@contextlib.contextmanager
def running_mlflow(workdir: Path) -> Iterator[MlflowServer]:
    server = start_mlflow(workdir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow server (basic auth on) per test module."""
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m tests.mlflow_server install")
    print(ensure_mlflow(quiet=False))
