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


def _made_by_edgewise(tmp: Path) -> list[str]:
    """What edgewise made in ``tmp`` (the gRPC C++ library may leave its own dot file)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("edgewise-"))


FRONT_ENDS = {
    "grpcio": ["--front-end", "grpcio"],
    "native": ["--front-end", "native"],
    "two-processes": ["--front-end", "grpcio", "--processes", "2"],
}

REFUSALS = {
    "grpc-port": (
        ["--host", "127.0.0.1", "--port", "{port}", "--metrics-port", "0"],
        "cannot bind 127.0.0.1:{port}: the address is already in use",
    ),
    "metrics-port": (
        ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
         "--metrics-port", "{port}"],
        "cannot bind the metrics port 127.0.0.1:{port}: the address is already in use",
    ),
    # 192.0.2.1 (TEST-NET-1) is on no interface: a single server's gRPC bind fails after the
    # server object exists (it used to end in a traceback from grpc's Server.__del__ on a closed
    # loop); the supervisor's reservation says why.
    "unbindable-address": (
        ["--host", "192.0.2.1", "--port", "0", "--metrics-port", "-1"],
        "cannot bind 192.0.2.1:0",
    ),
}  # fmt: skip


@pytest.mark.parametrize("refusal", REFUSALS)
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_refused_start_is_one_line_and_leaves_nothing(
    model_repo: Path, tmp_path: Path, front_end: str, refusal: str
) -> None:
    """A busy gRPC or metrics port, or an address nothing can bind: exit 1, the one error line
    naming the address (a busy port: nothing else on stderr; never a traceback or 'Exception
    ignored'), and nothing
    edgewise made left in TMPDIR (the native front end's socket folder, the supervisor's work
    folder)."""
    if front_end == "native":
        front_end_args("native")  # skipped (or failed under CI) where it is not built
    ports, expected = REFUSALS[refusal]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING",
                "serve", "--repo", str(model_repo), *FRONT_ENDS[front_end],
                *(arg.format(port=port) for arg in ports),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "TMPDIR": str(tmp)},
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if refusal == "unbindable-address":  # gRPC core logs its own bind failure first
        lines = [line for line in lines if line.startswith("edgewise serve:")]
    assert len(lines) == 1, done.stderr  # a busy port is found before gRPC tries it
    assert lines[0].startswith(f"edgewise serve: error: {expected.format(port=port)}"), lines
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
