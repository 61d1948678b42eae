"""Data capture on the native fast path: calls answered in C++ are sampled by the Python
capture's rule and written by its writer process, row for row what the Python path writes for
the same calls (the same requests sent with --native-fast-path on and off)."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.frontends.native.fast_path import ENVIRONMENT
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.capture import sampled
from edgewise.runtime.serving.capture_files import captured_files
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import RunningServer, start_server

pytestmark = pytest.mark.timeout(300)

FLUSH = ["--capture-flush-seconds", "0.05"]
MODELS = ("logreg", "forest")


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logreg and forest with online quality off: a call with a request id stays on the fast
    path (with quality on it is Python's, to keep its prediction for a label)."""
    target = tmp_path_factory.mktemp("fast-capture") / "repo"
    for name in MODELS:
        shutil.copytree(model_repo / name, target / name)
        (target / name / "config.json").write_text(json.dumps({"quality": {"enabled": False}}))
    return target


def _width(repo: Path, name: str) -> int:
    manifest = json.loads((repo / name / "1" / "manifest.json").read_text())
    return int(manifest["inputs"][0]["shape"][1])


def _serve(repo: Path, workdir: Path, folder: Path, fast: bool, *args: str) -> RunningServer:
    return start_server(
        repo,
        workdir,
        ["--front-end", "native", "--capture-dir", str(folder), *FLUSH, *args],
        env={ENVIRONMENT: "on" if fast else "off"},
    )


def _read(folder: Path) -> pa.Table:
    tables = [pq.read_table(path) for path in captured_files(folder)]
    assert tables, f"no capture file in {folder}"
    return pa.concat_tables(tables, promote_options="default")


def _send(server: RunningServer, repo: Path) -> int:
    """The same calls every time: ids in the body, in x-request-id, none; raw and typed; every
    output and one named; 1 to 4 rows. Returns how many."""
    sent = 0
    with server.client() as client:
        for index in range(24):
            name = MODELS[index % 2]
            rows = np.random.default_rng(index).normal(size=(1 + index % 4, _width(repo, name)))
            rows = rows.astype(np.float32)
            outputs = ["probabilities"] if index % 3 == 0 else []
            request_id = f"body-{index}" if index % 4 != 3 else ""
            client.infer(
                name, {"features": rows}, request_id=request_id, raw=index % 5 != 0, outputs=outputs
            )
            sent += 1
    with grpc.insecure_channel(server.target) as channel:  # the id in x-request-id
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for index in range(6):
            rows = np.random.default_rng(100 + index).normal(size=(2, _width(repo, "logreg")))
            request = pb.ModelInferRequest(model_name="logreg")
            request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
            request.raw_input_contents.append(rows.astype(np.float32).tobytes())
            answer = stub.ModelInfer(
                request, timeout=30, metadata=(("x-request-id", f"header-{index}"),)
            )
            assert answer.id == f"header-{index}"
            sent += 1
    return sent


def _rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """The rows, without their times (when each server answered), in a fixed order."""
    columns = sorted(c for c in table.column_names if c != "timestamp")  # files' order aside
    listed = table.select(columns).to_pylist()
    keyed = [tuple((c, json.dumps(row[c], sort_keys=True)) for c in columns) for row in listed]
    return sorted(keyed)


@pytest.mark.parametrize("rate", ["1.0", "0.5"])
def test_fast_path_writes_what_the_python_path_writes(
    fast_module: Any, repo: Path, tmp_path: Path, rate: str
) -> None:
    tables: dict[bool, dict[str, pa.Table]] = {}
    fast_calls: dict[bool, float] = {}
    for fast in (True, False):
        folder = tmp_path / f"captured-{fast}"
        server = _serve(repo, tmp_path / f"work-{fast}", folder, fast, "--capture-rate", rate)
        try:
            sent = _send(server, repo)
            text = metrics_text(server)
            fast_calls[fast] = metric_value(text, "edgewise_native_fast_calls_total")
        finally:
            assert server.stop() == 0
        tables[fast] = {name: _read(folder / name) for name in MODELS}
    assert fast_calls[True] == sent  # every call answered in C++, capture on
    assert fast_calls[False] == 0
    for name in MODELS:
        on, off = tables[True][name], tables[False][name]
        assert set(on.column_names) == set(off.column_names), name
        assert {"request_id", "model", "version", "input.features"} <= set(on.column_names)
        with_id_on = _rows(on.filter(pa.compute.not_equal(on["request_id"], "")))
        with_id_off = _rows(off.filter(pa.compute.not_equal(off["request_id"], "")))
        assert with_id_on == with_id_off, name  # inputs, outputs, ids, model, version alike
        ids = set(on["request_id"].to_pylist()) - {""}
        expected = {f"body-{i}" for i in range(24) if MODELS[i % 2] == name and i % 4 != 3} | (
            {f"header-{i}" for i in range(6)} if name == "logreg" else set()
        )
        assert ids == {i for i in expected if sampled(i, float(rate))}, name
        if rate == "1.0":  # the calls without an id too: every one, as on the Python path
            assert _rows(on) == _rows(off), name


def test_a_full_buffer_drops_counted_never_fails_a_call(
    fast_module: Any, repo: Path, tmp_path: Path
) -> None:
    """A queue of 2 records: calls from 8 threads are all answered; every captured call is
    written or counted as dropped (queue_full), none is lost uncounted."""
    folder = tmp_path / "captured"
    server = _serve(repo, tmp_path, folder, True, "--capture-queue", "2")
    width = _width(repo, "logreg")
    try:

        def calls(seed: int) -> int:
            rows = np.random.default_rng(seed).normal(size=(1, width)).astype(np.float32)
            with server.client() as client:
                for k in range(60):
                    client.infer("logreg", {"features": rows}, request_id=f"{seed}-{k}")
            return 60

        with ThreadPoolExecutor(8) as pool:
            sent = sum(pool.map(calls, range(8)))
        # Every sampled call reaches the capture (queued) or its drop counter, within the
        # drain's period: polled, never a fixed sleep.
        deadline = time.monotonic() + 30
        while True:
            text = metrics_text(server)
            captured = metric_value(text, "edgewise_capture_records_total", model="logreg")
            dropped = metric_value(
                text, "edgewise_capture_dropped_total", model="logreg", reason="queue_full"
            )
            if captured + dropped >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert captured + dropped == sent
        assert metric_value(text, "edgewise_native_fast_calls_total", model="logreg") == sent
    finally:
        assert server.stop() == 0
    written = _read(folder / "logreg").num_rows if captured else 0
    assert written == captured  # what was queued is written (the stop writes it all)
