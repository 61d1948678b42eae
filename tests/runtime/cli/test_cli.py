"""The ``edgewise`` command as a user runs it: a real process, its exit code and its output."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import joblib
import pytest

from edgewise.runtime.client.client import EdgewiseClient
from tests import models
from tests.servers import running_server


def edgewise(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_lists_every_command() -> None:
    done = edgewise("--help")
    assert done.returncode == 0
    for command in ("convert", "serve", "repository", "demo"):
        assert command in done.stdout


def test_demo_trains_converts_serves_and_answers(tmp_path: Path) -> None:
    done = edgewise(
        "demo", "--exit-after-requests", "--port", "0", "--metrics-port", "0",
        "--repo", str(tmp_path / "demo-repo"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "converted to" in out
    assert "model 'breast_cancer' version 1" in out
    assert out.count("demo-") >= 5
    assert "labels agree with scikit-learn on 100.0%" in out
    assert (tmp_path / "demo-repo" / "breast_cancer" / "1" / "model.onnx").is_file()


def _children(pid: int) -> set[int]:
    """The process ids of ``pid``'s children (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except FileNotFoundError:
        return []


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited, not reaped yet (its parent, the demo, is gone)


@pytest.mark.serial
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_demo_stopped_by_a_signal_stops_its_server(tmp_path: Path, stop: signal.Signals) -> None:
    errors = (tmp_path / "demo.err").open("w")  # with every thread's stack if it hangs
    # A process started with SIGINT ignored keeps ignoring it, as shells want for background
    # jobs (a test run under nohup or `&` has it so): the demo gets Ctrl-C as a terminal would
    # give it. A handled signal is reset to its default by exec.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "edgewise.runtime.cli", "demo", "--port", "0",
             "--metrics-port", "0", "--repo", str(tmp_path / "demo-repo")],
            stdout=subprocess.PIPE, stderr=errors, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert demo.stdout is not None
        target = ""
        for line in demo.stdout:
            if line.startswith("serving "):
                target = line.split(" on ")[1].split()[0]
            if line.startswith("Press Ctrl-C"):
                break
        assert target, "the demo never said where it serves"
        with EdgewiseClient(target) as client:
            client.wait_until_serving(timeout=30)
        (server,) = (c for c in _children(demo.pid) if "serve" in _command_line(c))
        demo.send_signal(stop)
        try:
            assert demo.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            demo.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack
            with contextlib.suppress(subprocess.TimeoutExpired):
                demo.wait(timeout=10)
            stacks = (tmp_path / "demo.err").read_text()[-6000:]
            raise AssertionError(f"the demo did not stop on {stop.name}:\n{stacks}") from None
    finally:
        errors.close()
        if demo.poll() is None:
            leftovers = _children(demo.pid)
            demo.kill()
            for child in leftovers:  # no leftover from a failing run
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
    if not _gone(server):
        os.kill(server, signal.SIGKILL)  # no leftover from a failing run
        raise AssertionError("the demo's server outlived it")
    with socket.socket() as probe:
        host, port = target.rsplit(":", 1)
        assert probe.connect_ex((host, int(port))) != 0, "something still listens on its port"


def test_convert_cli_writes_a_package_and_serves_it(tmp_path: Path) -> None:
    model, frame, _ = models.train_logreg()
    joblib.dump(model, tmp_path / "model.joblib")
    frame.to_csv(tmp_path / "sample.csv", index=False)
    repo = tmp_path / "repo"
    done = edgewise(
        "convert", str(tmp_path / "model.joblib"), "--sample", str(tmp_path / "sample.csv"),
        "--name", "cancer", "--out", str(repo),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "parity max |diff|" in done.stdout
    with running_server(repo, tmp_path) as server:
        index = edgewise("repository", "--server", server.target, "index")
        assert index.returncode == 0, index.stderr
        assert "cancer" in index.stdout
        assert "READY" in index.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["convert", "missing.joblib", "--sample", "x.csv", "--name", "m", "--out", "r"],
            "missing",
        ),
        (["serve", "--repo", "/nonexistent/repo"], "not a folder"),
        (["serve", "--repo", ".", "--version-policy", "newest"], "version policy"),
        (
            ["serve", "--repo", ".", "--front-end", "native", "--tls-cert", "c"],
            "give both or neither",
        ),
        (["repository", "--server", "127.0.0.1:1", "index"], "cannot reach the server"),
    ],
)
def test_errors_are_one_line_without_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert message in lines[0]


def test_corrupt_pickle_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04not a pickle")
    (tmp_path / "sample.csv").write_text("a,b\n1,2\n")
    done = edgewise(
        "convert", str(tmp_path / "model.pkl"), "--sample", str(tmp_path / "sample.csv"),
        "--name", "m", "--out", str(tmp_path / "repo"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "model.joblib", "--sample", "x.csv", "--name", "m", "--out", "repo"],
        ["demo", "--exit-after-requests", "--repo", "repo"],
    ],
)
def test_convert_and_demo_without_scikit_learn_name_the_extra(
    tmp_path: Path, args: list[str]
) -> None:
    """A node installed without the convert extra (as the image is) gets one line naming it."""
    script = (
        "import sys; sys.modules['sklearn'] = None\n"  # what a missing package looks like
        "from edgewise.runtime.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'sklearn'" in lines[0] and "pip install 'edgewise[convert]'" in lines[0]
    assert not (tmp_path / "repo").exists()
