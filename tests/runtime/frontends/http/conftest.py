"""A real server with the HTTP/REST front end on (``--http-port 0``), on each gRPC front end, and
the small HTTP helpers the tests share."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RunningServer]:
    running = start_server(
        model_repo,
        tmp_path_factory.mktemp("http"),
        ["--http-port", "0", *front_end_args(request.param)],
    )
    assert running.http_port, running.log()
    yield running
    assert running.stop() == 0, running.log()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    """One HTTP request (POST when there is a body); any status is an answer, not an error."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """A sample of the server's metrics (0 when the series does not exist yet)."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        if series.partition("{")[0] != name:
            continue
        present = series.partition("{")[2].rstrip("}")
        if sorted(present.split(",")) == sorted(wanted.split(",")) or (not labels and not present):
            return float(value)
    return 0.0
