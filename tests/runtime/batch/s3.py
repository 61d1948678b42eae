"""A real S3-compatible server for the batch tests: moto's server mode (``python -m
moto.server``) on 127.0.0.1 with a free port, waited on through its health endpoint, stopped
with SIGTERM; the test's environment points pyarrow's S3 filesystem at it (``AWS_ENDPOINT_URL``
and static credentials), as a user's nightly job would be configured."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]  # the variables a client needs

    def filesystem(self) -> object:
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint,
            region=self.env["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )


def moto_missing() -> str | None:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        return "moto[server] is not installed (pip install 'edgewise[test]')"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_s3(log: Path) -> Iterator[S3Server]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"moto server exited:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"moto server not healthy in {START_TIMEOUT} s")
            time.sleep(0.05)
        env = {
            "AWS_ACCESS_KEY_ID": "edgewise-test",
            "AWS_SECRET_ACCESS_KEY": "edgewise-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        yield S3Server(endpoint, env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
