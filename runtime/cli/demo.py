"""``edgewise demo``: the whole path on the embedded default, in one command.

Trains a logistic regression on scikit-learn's bundled breast cancer data, converts it into a local
model repository, starts ``edgewise serve`` on it, answers a few requests with edgewise's client,
prints them beside scikit-learn's own answers, then keeps serving until interrupted.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np

from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.errors import EdgewiseError

__all__ = ["run_demo"]

MODEL_NAME = "breast_cancer"


def _train_and_convert(repo: Path) -> tuple[object, object, object]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgewise.runtime.convert.converter import convert

    data = load_breast_cancer(as_frame=True)
    x_train, x_test, _y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=0, stratify=data.target
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x_train, _y_train)
    print(
        f"trained {type(model[-1]).__name__} on breast cancer ({len(x_train)} rows, "
        f"{x_train.shape[1]} features); held-out accuracy {model.score(x_test, y_test):.3f}"
    )
    shutil.rmtree(repo / MODEL_NAME, ignore_errors=True)  # the demo owns this model folder
    result = convert(model, x_train, name=MODEL_NAME, repo=repo, held_out=x_test)
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.manifest.parity["max_abs_diff"].items())
    print(f"converted to {result.path} (parity max |diff|: {diffs})")
    return model, x_test, y_test


def _start_server(
    repo: Path, port: int, metrics_port: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], int, int]:
    port_file = workdir / "ports"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgewise.runtime.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--repo",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(metrics_port),
            "--port-file",
            str(port_file),
        ],
    )
    try:
        grpc_port, metrics = _wait_for_ports(process, port_file)
    except BaseException:  # an interrupt while it starts too
        _stop_server(process)
        raise
    return process, grpc_port, metrics


def _wait_for_ports(process: subprocess.Popen[bytes], port_file: Path) -> tuple[int, int]:
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if process.poll() is not None:
            raise EdgewiseError(f"the server exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise EdgewiseError("the server did not start within 60 s")
        time.sleep(0.05)
    grpc_port, metrics = (int(x) for x in port_file.read_text().split())
    return grpc_port, metrics


def _show_requests(
    client: EdgewiseClient, repo: Path, model: object, x_test: object, y_test: object
) -> None:
    import pandas as pd

    from edgewise.runtime.package.manifest import read_manifest
    from edgewise.runtime.package.schema import frame_to_inputs

    assert isinstance(x_test, pd.DataFrame) and isinstance(y_test, pd.Series)
    meta = client.model_metadata(MODEL_NAME)
    version = meta.versions[-1]
    manifest = read_manifest(repo / MODEL_NAME / version)
    print(
        f"\nmodel {meta.name!r} version {version}: inputs "
        + ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in meta.inputs)
        + "; outputs "
        + ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in meta.outputs)
    )
    rows = x_test.iloc[:5]
    expected = model.predict_proba(rows)  # type: ignore[attr-defined]
    print(f"\n{'request':<9} {'true':>5} {'label':>6} {'P(benign)':>10} {'sklearn':>9} {'ms':>6}")
    for index in range(len(rows)):
        inputs = frame_to_inputs(manifest, rows.iloc[index : index + 1])
        started = time.perf_counter()
        result = client.infer(MODEL_NAME, inputs, request_id=f"demo-{index}")
        elapsed = (time.perf_counter() - started) * 1000
        probability = float(result.outputs["probabilities"][0, 1])
        print(
            f"{result.id:<9} {int(y_test.iloc[index]):>5} {int(result.outputs['label'][0]):>6} "
            f"{probability:>10.4f} {expected[index, 1]:>9.4f} {elapsed:>6.2f}"
        )
    batch = frame_to_inputs(manifest, x_test)
    result = client.infer(MODEL_NAME, batch)
    agree = np.mean(result.outputs["label"] == model.predict(x_test))  # type: ignore[attr-defined]
    print(f"batch of {len(x_test)} rows: labels agree with scikit-learn on {agree:.1%}")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the demo's ``finally`` stops its
    server (by default SIGTERM ends the process at once and the server kept running)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(repo: Path, port: int, metrics_port: int, exit_after_requests: bool) -> int:
    """Train, convert, serve and show requests; keep serving until SIGINT or SIGTERM (or return
    after the requests), always stopping the server it started."""
    with _sigterm_interrupts():
        return _run_demo(repo, port, metrics_port, exit_after_requests)


def _run_demo(repo: Path, port: int, metrics_port: int, exit_after_requests: bool) -> int:
    from edgewise.runtime.convert.converter import require_converter

    require_converter("edgewise demo")  # it trains a scikit-learn model
    repo.mkdir(parents=True, exist_ok=True)
    model, x_test, y_test = _train_and_convert(repo)
    with tempfile.TemporaryDirectory(prefix="edgewise-demo-") as scratch:
        process, grpc_port, metrics = _start_server(repo, port, metrics_port, Path(scratch))
        try:
            target = f"127.0.0.1:{grpc_port}"
            with EdgewiseClient(target) as client:
                client.wait_until_serving()
                print(f"\nserving {repo} on {target} (metrics: http://127.0.0.1:{metrics}/metrics)")
                _show_requests(client, repo, model, x_test, y_test)
            if exit_after_requests:
                return 0
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM: a clean stop
                print(
                    f"\nStill serving. Try:\n"
                    f"  .venv/bin/edgewise repository --server {target} index\n"
                    f"  curl -s http://127.0.0.1:{metrics}/metrics | grep edgewise_requests\n"
                    f'  python -c "import tritonclient.grpc as t; '
                    f"print(t.InferenceServerClient('{target}').get_model_metadata('{MODEL_NAME}'))\"\n"
                    f"Press Ctrl-C to stop."
                )
                _wait_interruptibly(process)
            return 0
        finally:
            _stop_server(process)


def _wait_interruptibly(process: subprocess.Popen[bytes]) -> None:
    """Wait for the server to end, in short timed waits: the client's gRPC threads live on, and
    the kernel may hand Ctrl-C or SIGTERM to one of them, which would not interrupt a blocking
    waitpid in this thread; between two timed waits the handler's KeyboardInterrupt is raised."""
    while True:
        try:
            process.wait(timeout=0.5)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then SIGKILL after 30 s; a second Ctrl-C or SIGTERM while
    waiting kills it at once."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        process.wait()
