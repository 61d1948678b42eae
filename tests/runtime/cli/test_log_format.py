"""``--log-format json`` (runtime/cli/logformat.py): a real server's every stderr line is one JSON
object with the stable keys; the text format stays the default."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from edgewise.runtime.cli.logformat import JsonFormatter
from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.config.settings import ClientSecurity

KEYS = {"time", "level", "event", "logger"}


def serve(repo: Path, workdir: Path, *flags: str) -> tuple[str, str]:
    """Start ``edgewise [flags] serve`` on free ports, wait until it serves, make one inference
    call, stop it with SIGTERM; its stdout and stderr."""
    port_file = workdir / "ports"
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", *flags, "serve", "--repo", str(repo),
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
        "--metrics-port", "0", "--port-file", str(port_file), "--front-end", "grpcio",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        delay = 0.01
        while not port_file.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        port = int(port_file.read_text().split()[0])
        with EdgewiseClient(f"127.0.0.1:{port}", security=ClientSecurity()) as client:
            client.wait_until_serving(timeout=max(1.0, deadline - time.monotonic()))
            width = int(
                json.loads((repo / "logreg" / "1" / "manifest.json").read_text())["inputs"][0][
                    "shape"
                ][1]
            )
            client.infer("logreg", {"features": np.zeros((2, width), np.float32)})
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    return out, err


def test_json_logs_are_one_object_per_line(model_repo: Path, tmp_path: Path) -> None:
    _, err = serve(model_repo, tmp_path, "--log-format", "json")
    lines = err.splitlines()
    assert len(lines) >= 2, err  # at least the listening and the shutting-down lines
    events = []
    for line in lines:
        entry = json.loads(line)
        assert set(entry) >= KEYS, line
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        assert entry["time"].endswith("Z")
        events.append(entry["event"])
    assert any(event.startswith("shutting down") for event in events), events


def test_text_stays_the_default(model_repo: Path, tmp_path: Path) -> None:
    _, err = serve(model_repo, tmp_path)
    assert err.strip()
    for line in err.splitlines():
        assert not line.startswith("{"), line


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("edgewise.test", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_context_keys_come_from_the_record_and_the_current_span() -> None:
    entry = json.loads(
        JsonFormatter().format(record("late", model="m", version="2", request_id="r-9"))
    )
    assert entry["event"] == "late" and entry["logger"] == "edgewise.test"
    assert (entry["model"], entry["version"], entry["request_id"]) == ("m", "2", "r-9")
    assert "trace_id" not in entry  # no span: nothing made up
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        inside = json.loads(JsonFormatter().format(record("in a span")))
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}"


def test_an_unknown_log_format_in_the_environment_is_refused(model_repo: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "serve", "--repo", str(model_repo)],
        env={**__import__("os").environ, "EDGEWISE_LOG_FORMAT": "yaml"},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "edgewise: error: EDGEWISE_LOG_FORMAT='yaml': not one of text, json"
    ]


@pytest.mark.parametrize("flag", ["xml"])
def test_an_unknown_log_format_flag_is_refused(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "--log-format", flag, "serve"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "invalid choice: 'xml'" in done.stderr
