"""Memory admission: the estimate, the admit/refuse rule, and a real server refusing a request its
budget cannot hold (the cgroup-enforced version is in test_cgroup_run.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from prometheus_client import CollectorRegistry

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.errors import ResourceExhausted
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.admission import (
    OBJECT_ELEMENT_BYTES,
    REQUEST_MEMORY_FACTOR,
    SMALL_REQUEST_BYTES,
    TYPED_ELEMENT_BYTES,
    MemoryAdmission,
    anonymous_bytes,
    estimate_request_bytes,
)
from edgewise.runtime.serving.codecs import MAX_RANK, encode_inputs
from tests.servers import RunningServer, running_server

MiB = 1 << 20


def request_of(inputs: dict[str, np.ndarray], raw: bool = True) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    encode_inputs(request, inputs, raw=raw)
    return request


def mixed_inputs(rows: int) -> dict[str, np.ndarray]:
    return {
        "features": np.zeros((rows, 13), np.float32),
        "alcohol_level": np.array([[b"low"]] * rows, dtype=object),
        "color_band": np.array([[b"mid"]] * rows, dtype=object),
    }


# ---- the estimate -------------------------------------------------------------------------------


def test_estimate_raw_fixed_size() -> None:
    request = request_of({"x": np.zeros((1000, 30), np.float32)})
    assert estimate_request_bytes(request) == REQUEST_MEMORY_FACTOR * 120_000


def test_estimate_typed_counts_python_numbers() -> None:
    request = request_of({"x": np.zeros((1000, 2), np.float64)}, raw=False)
    assert estimate_request_bytes(request) == (
        REQUEST_MEMORY_FACTOR * 16_000 + TYPED_ELEMENT_BYTES * 2000
    )


def test_estimate_bytes_counts_objects() -> None:
    raw = request_of({"s": np.array([[b"low"]] * 100, dtype=object)})
    assert estimate_request_bytes(raw) == REQUEST_MEMORY_FACTOR * 700 + OBJECT_ELEMENT_BYTES * 100
    typed = request_of({"s": np.array([b"ab", b"cde", b""], dtype=object)}, raw=False)
    assert estimate_request_bytes(typed) == REQUEST_MEMORY_FACTOR * 5 + OBJECT_ELEMENT_BYTES * 3


def test_estimate_follows_the_payload_not_a_claimed_shape() -> None:
    """A huge declared shape with a tiny payload is a malformed request (INVALID_ARGUMENT from
    the decoder), not one to refuse for memory."""
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1_000_000_000, 30])
    request.raw_input_contents.append(b"\0" * 120)
    assert estimate_request_bytes(request) == REQUEST_MEMORY_FACTOR * 120
    request.inputs.add(name="y", datatype="NOPE", shape=[1])
    assert estimate_request_bytes(request) == REQUEST_MEMORY_FACTOR * 120


def test_the_estimate_reads_no_more_dimensions_than_the_decoder_accepts() -> None:
    """A BYTES tensor declaring 300,000 dimensions of 3: the estimate multiplied them all (big
    integers of up to 475,000 bits: seconds of CPU on the event loop for one 300 kB request)
    and priced one object; the decoder refuses the rank, so there is nothing to price."""
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="s", datatype="BYTES", shape=[3] * 300_000)
    request.raw_input_contents.append(b"\0" * 4)
    assert estimate_request_bytes(request) == REQUEST_MEMORY_FACTOR * 4
    request.inputs[0].ClearField("shape")
    request.inputs[0].shape.extend([1] * MAX_RANK)
    assert estimate_request_bytes(request) == REQUEST_MEMORY_FACTOR * 4 + OBJECT_ELEMENT_BYTES


def test_the_estimate_covers_what_decoding_really_allocates() -> None:
    """Decode a BYTES-heavy request the way the server does and check the estimate is not below
    the memory the decoded arrays and their objects really take."""
    from edgewise.runtime.serving.codecs import decode_inputs
    from edgewise.runtime.serving.model import _as_strings

    request = request_of(mixed_inputs(20_000))
    # tracemalloc counts every allocation (numpy's included) whatever the allocator reuses, so
    # the figure does not depend on what earlier tests left free in the process.
    tracemalloc.start()
    try:
        decoded = decode_inputs(request)
        strings = [_as_strings(t.name, t.array) for t in decoded if t.datatype == "BYTES"]
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown > 0 and len(strings) == 2
    assert estimate_request_bytes(request) >= grown


# ---- admit and refuse ---------------------------------------------------------------------------


class FakeHeld:
    def __init__(self, value: int) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.value


def big_request(estimate_mib: int) -> pb.ModelInferRequest:
    size = estimate_mib * MiB // REQUEST_MEMORY_FACTOR
    return request_of({"x": np.zeros(size, np.uint8)})


def test_admit_reserve_refuse_release() -> None:
    held = FakeHeld(50 * MiB)
    registry = CollectorRegistry()
    admission = MemoryAdmission(100 * MiB, registry=registry, held=held)
    first = admission.admit(big_request(30))
    assert first == 30 * MiB and admission.reserved_bytes == 30 * MiB
    with pytest.raises(ResourceExhausted) as info:
        admission.admit(big_request(30))  # 50 + 30 reserved + 30 > 100
    message = info.value.message
    assert "30.0 MiB" in message and "50.0 MiB" in message and "100.0 MiB" in message
    assert admission.refusals == 1 and admission.last_refusal_held == 50 * MiB
    assert registry.get_sample_value("edgewise_admission_refused_total") == 1
    assert registry.get_sample_value("edgewise_admission_reserved_bytes") == 30 * MiB
    admission.release(first)
    assert admission.reserved_bytes == 0
    assert admission.admit(big_request(30)) == 30 * MiB  # fits again
    assert registry.get_sample_value("edgewise_memory_budget_bytes") == 100 * MiB


def test_small_requests_never_read_the_process_memory() -> None:
    held = FakeHeld(10**12)  # "over budget", but never consulted
    admission = MemoryAdmission(100 * MiB, held=held)
    small = request_of({"x": np.zeros((10, 30), np.float32)})
    assert estimate_request_bytes(small) < SMALL_REQUEST_BYTES
    assert admission.admit(small) == 0
    assert held.calls == 0


def test_disabled_admission_admits_everything() -> None:
    registry = CollectorRegistry()
    admission = MemoryAdmission(1 * MiB, enabled=False, registry=registry, held=FakeHeld(10**12))
    assert admission.admit(big_request(500)) == 0
    assert registry.get_sample_value("edgewise_memory_budget_bytes") == 0
    assert MemoryAdmission(0).enabled is False


def test_concurrent_admissions_never_overcommit() -> None:
    admission = MemoryAdmission(100 * MiB, held=FakeHeld(40 * MiB))
    request = big_request(7)
    peak = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal peak
        for _ in range(300):
            try:
                reservation = admission.admit(request)
            except ResourceExhausted:
                continue
            with lock:
                peak = max(peak, admission.reserved_bytes)
            admission.release(reservation)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admission.reserved_bytes == 0
    assert 7 * MiB <= peak <= 60 * MiB


def rss_anon() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if "RssAnon" in x)
    return int(line.split()[1]) * 1024


def test_anonymous_bytes_is_this_process_anonymous_memory() -> None:
    before = anonymous_bytes()
    assert abs(before - rss_anon()) < 4 * MiB
    assert before < psutil.Process().memory_info().rss  # library pages are not counted
    # The growth in a fresh interpreter: a long test process may have the block's pages mapped
    # already from earlier tests (freed to the allocator, not to the kernel).
    code = (
        "import numpy as np\n"
        "from edgewise.runtime.serving.admission import anonymous_bytes\n"
        "before = anonymous_bytes()\n"
        "block = np.ones(64 << 20, np.uint8)  # touched, so resident\n"
        "print(anonymous_bytes() - before)\n"
    )
    grown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert int(grown.stdout) >= 60 * MiB


# ---- a real server ------------------------------------------------------------------------------


def metrics_text(server: RunningServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, name: str) -> float:
    """The value of the sample written exactly ``name`` (with its labels) in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in the metrics")


@pytest.fixture
def admission_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    # An idle server holds about 92 MiB: 170 MiB leaves room for ordinary requests, not for a
    # 150 000-row request with two string columns (an estimated 117 MiB).
    monkeypatch.setenv("EDGEWISE_MEMORY_BUDGET_BYTES", str(170 * MiB))
    monkeypatch.setenv("EDGEWISE_MAX_MESSAGE_BYTES", str(32 * MiB))
    yield monkeypatch


def test_server_refuses_what_its_budget_cannot_hold(
    model_repo: Path, tmp_path: Path, admission_env: pytest.MonkeyPatch
) -> None:
    big = mixed_inputs(150_000)
    assert estimate_request_bytes(request_of(big)) > 100 * MiB
    with running_server(model_repo, tmp_path) as server, server.client() as client:
        ok = client.infer("mixed", mixed_inputs(50))
        assert ok.outputs["label"].shape == (50,)
        medium = client.infer("logreg", {"features": np.zeros((20_000, 30), np.float32)})
        assert medium.outputs["label"].shape == (20_000,)
        with pytest.raises(ServerError) as info:
            client.infer("mixed", big)
        assert info.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory admission" in info.value.details
        # Still alive and serving.
        assert client.infer("mixed", mixed_inputs(5)).outputs["label"].shape == (5,)
        text = metrics_text(server)
        assert metric(text, "edgewise_admission_refused_total") == 1
        assert 'code="RESOURCE_EXHAUSTED"' in text
        assert metric(text, "edgewise_memory_budget_bytes") == 170 * MiB
    # The same request with admission off runs (no cgroup here to kill the server for it).
    admission_env.setenv("EDGEWISE_ADMISSION", "off")
    with running_server(model_repo, tmp_path) as server, server.client() as client:
        assert client.infer("mixed", big).outputs["label"].shape == (150_000,)


def test_in_flight_limit_refuses_calls_beyond_it(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWISE_MAX_INFLIGHT", "2")
    monkeypatch.setenv("EDGEWISE_WORKER_THREADS", "1")
    payload = {"features": np.zeros((100_000, 30), np.float32)}
    codes: list[str] = []
    lock = threading.Lock()
    with running_server(model_repo, tmp_path) as server:

        def call() -> None:
            with server.client() as client:
                try:
                    client.infer("logreg", payload)
                    code = "OK"
                except ServerError as exc:
                    code = exc.status.name
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        text = metrics_text(server)
    assert metric(text, 'edgewise_runtime_split{setting="max_inflight"}') == 2
    assert codes.count("OK") >= 1
    assert codes.count("RESOURCE_EXHAUSTED") >= 1
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
