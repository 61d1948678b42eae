"""The native front end's fast path (fast_path.py, _front.cc TryFast): calls answered in C++
without the GIL give what onnxruntime itself gives, are counted where a user scrapes them, feed
the monitor, fall back to the Python path (counted) for what they do not handle, and a version
swapped under load loses no call."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.frontends.native.fast_path import ENVIRONMENT
from edgewise.runtime.package.manifest import MODEL_FILE
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import RunningServer, start_server

pytestmark = pytest.mark.timeout(300)


def _serve(repo: Path, workdir: Path, on: bool = True) -> RunningServer:
    return start_server(
        repo, workdir, ["--front-end", "native"], env={ENVIRONMENT: "on" if on else "off"}
    )


def _direct(repo: Path, name: str, rows: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    session = ort.InferenceSession(
        (repo / name / "1" / MODEL_FILE).read_bytes(), providers=["CPUExecutionProvider"]
    )
    return list(session.run(None, {"features": rows}))


def _rows(n: int, width: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32) * 3


def test_fast_calls_equal_onnxruntime_and_are_counted(
    fast_module: Any, model_repo: Path, tmp_path: Path
) -> None:
    server = _serve(model_repo, tmp_path)
    try:
        with server.client() as client:
            for name in ("logreg", "forest"):
                width = 30 if name == "logreg" else 13
                rows = _rows(5, width)
                want = _direct(model_repo, name, rows)
                for raw in (True, False):
                    got = client.infer(name, {"features": rows}, raw=raw)
                    assert got.model_version == "1"
                    assert len(got.id) == 16  # one made for a call without an id
                    np.testing.assert_array_equal(got.outputs["label"], want[0])
                    np.testing.assert_array_equal(got.outputs["probabilities"], want[1])
                asked = client.infer(name, {"features": rows}, outputs=["probabilities"])
                assert list(asked.outputs) == ["probabilities"]
        text = metrics_text(server)
        for name in ("logreg", "forest"):
            fast = metric_value(text, "edgewise_native_fast_calls_total", model=name)
            assert fast == 3, name
            ok = metric_value(text, "edgewise_requests_total", model=name, code="OK")
            assert ok == 3, name  # the native counts reach the metric a user scrapes
            count = metric_value(text, "edgewise_request_duration_seconds_count", model=name)
            assert count == 3, name
    finally:
        server.stop()


def test_what_the_fast_path_does_not_handle_falls_back_counted(
    fast_module: Any, model_repo: Path, tmp_path: Path
) -> None:
    server = _serve(model_repo, tmp_path)
    try:
        with server.client() as client:
            rows = _rows(2, 30)
            keyed = client.infer("logreg", {"features": rows}, request_id="req-1")
            assert keyed.id == "req-1"  # online quality keeps it: the Python path's
            with pytest.raises(ServerError) as refused:
                client.infer("logreg", {"features": _rows(2, 7)})
            assert "does not match" in str(refused.value)  # Python's own error
            with pytest.raises(ServerError):
                client.infer("nosuch", {"features": rows})
        text = metrics_text(server)
        fallback = "edgewise_native_fallback_total"
        assert metric_value(text, fallback, model="logreg", reason="keyed") == 1
        assert metric_value(text, fallback, model="logreg", reason="inputs") == 1
        assert metric_value(text, fallback, model="_other", reason="not_in_table") == 1
        assert metric_value(text, "edgewise_native_fast_calls_total", model="logreg") == 0
        assert metric_value(text, "edgewise_requests_total", model="logreg", code="OK") == 1
    finally:
        server.stop()


def test_switched_off_nothing_is_fast(fast_module: Any, model_repo: Path, tmp_path: Path) -> None:
    server = _serve(model_repo, tmp_path, on=False)
    try:
        with server.client() as client:
            client.infer("logreg", {"features": _rows(2, 30)})
        text = metrics_text(server)
        assert metric_value(text, "edgewise_native_fast_calls_total") == 0
        assert metric_value(text, "edgewise_requests_total", model="logreg", code="OK") == 1
    finally:
        server.stop()


def test_monitor_sees_fast_rows(fast_module: Any, model_repo: Path, tmp_path: Path) -> None:
    server = _serve(model_repo, tmp_path)
    try:
        with server.client() as client:
            before = client.drift_report("logreg").rows
            for seed in range(20):
                client.infer("logreg", {"features": _rows(10, 30, seed)})
            deadline = time.monotonic() + 10
            rows = before
            while rows < before + 200 and time.monotonic() < deadline:  # drained each tick
                time.sleep(0.02)
                rows = client.drift_report("logreg").rows
            assert rows == before + 200
        text = metrics_text(server)
        assert metric_value(text, "edgewise_native_fast_calls_total", model="logreg") == 20
    finally:
        server.stop()


def test_swap_under_load_loses_no_call(fast_module: Any, model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = _serve(repo, tmp_path / "work")
    failures: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        with server.client() as client:
            rows = _rows(1, 30)
            while not stop.is_set():
                try:
                    client.infer("logreg", {"features": rows})
                    answered[0] += 1
                except BaseException as exc:
                    failures.append(exc)

    try:
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        with server.client() as admin:
            for version in (2, 3, 4):
                shutil.copytree(repo / "logreg" / "1", repo / "logreg" / str(version))
                admin.load_model("logreg", str(version), make_default=True, transient_default=True)
                time.sleep(0.3)
                admin.unload_model("logreg", str(version - 1))
                time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join()
        assert failures == []
        assert answered[0] > 0
        text = metrics_text(server)
        fast = metric_value(text, "edgewise_native_fast_calls_total", model="logreg")
        assert fast > 0
    finally:
        stop.set()
        server.stop()


def test_with_tokens_every_call_is_checked_in_python(
    fast_module: Any, model_repo: Path, tmp_path: Path
) -> None:
    """The fast path checks no credentials: with a tokens file, no call is answered there, and
    a call without a token is refused as before."""
    token = "fast-path-token-0123456789abcdef"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{token}\n")
    server = start_server(
        model_repo,
        tmp_path / "server",
        ["--front-end", "native", "--tokens-file", str(tokens)],
        env={ENVIRONMENT: "on"},
        security=ClientSecurity(token=token),
    )
    try:
        with server.client() as client:
            client.infer("logreg", {"features": _rows(2, 30)})
        with EdgewiseClient(server.target, security=ClientSecurity()) as anonymous:
            with pytest.raises(ServerError) as refused:
                anonymous.infer("logreg", {"features": _rows(2, 30)})
            assert "UNAUTHENTICATED" in str(refused.value)
        text = metrics_text(server)
        assert metric_value(text, "edgewise_native_fast_calls_total") == 0
        # shown all the same (a counter family is never empty on the page)
        assert 'edgewise_native_fast_calls_total{model="logreg",version="1"} 0.0' in text
        assert metric_value(text, "edgewise_requests_total", model="logreg", code="OK") == 1
    finally:
        server.stop()
