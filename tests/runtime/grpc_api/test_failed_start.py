"""A server start that is refused (a busy port, an address it cannot bind) exits 1 and leaves
nothing it made behind: no native front end's socket folder in the temporary folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import front_end_args, start_server


def _serve(model_repo: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING",
            "serve", "--repo", str(model_repo), *front_end_args("native"), *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip


def _made_by_edgewise(tmp: Path) -> list[str]:
    """What edgewise made in ``tmp`` (the gRPC C++ library may leave its own dot file)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("edgewise-"))


@pytest.mark.parametrize(
    "ports",
    [
        ["--host", "127.0.0.1", "--port", "{port}", "--metrics-port", "-1"],
        ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
         "--metrics-port", "{port}"],
        ["--host", "192.0.2.1", "--port", "0", "--metrics-port", "-1"],
    ],
    ids=["grpc-port", "metrics-port", "unbindable-address"],
)  # fmt: skip
def test_a_refused_start_leaves_no_temporary_folder(
    model_repo: Path, tmp_path: Path, ports: list[str]
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(model_repo, tmp, *(arg.format(port=port) for arg in ports))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert _made_by_edgewise(tmp) == []


def test_a_started_server_uses_the_temporary_folder(model_repo: Path, tmp_path: Path) -> None:
    """The check above can fail: a server that starts makes its folder there (and removes it
    when it stops)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = start_server(
        model_repo, tmp_path / "work", front_end_args("native"), env={"TMPDIR": str(tmp)}
    )
    try:
        assert len(_made_by_edgewise(tmp)) == 1
    finally:
        assert server.stop() == 0
    assert _made_by_edgewise(tmp) == []


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        (
            ["--port", "{port}", "--metrics-port", "-1"],
            "cannot bind 127.0.0.1:{port}: the address is ",
        ),
        (
            ["--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "{port}"],
            "cannot bind the metrics port 127.0.0.1:{port}: Address ",
        ),
    ],
    ids=["grpc-port", "metrics-port"],
)
def test_a_refused_multi_process_start_leaves_nothing(
    model_repo: Path, tmp_path: Path, ports: list[str], expected: str
) -> None:
    """``--processes 2`` on a busy port: the single server's one line naming the address,
    exit 1, and the supervisor's work folder (metrics, peers) is not left behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING",
                "serve", "--repo", str(model_repo), "--processes", "2", "--host", "127.0.0.1",
                *(arg.format(port=port) for arg in ports),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "TMPDIR": str(tmp)},
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgewise serve:")]
    message = f"edgewise serve: error: {expected.format(port=port)}already in use"
    assert errors == [message], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert _made_by_edgewise(tmp) == []
