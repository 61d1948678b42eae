"""The capture's queue, shipper and writer process, behind the real serving core: a full queue
drops and counts without failing a request, a writer error is counted and logged once, a writer
process that dies is counted and replaced, a rate of 0 captures nothing, sampling by request id
is deterministic and near its rate."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from edgewise.runtime._process import pid_alive
from edgewise.runtime.app.server import InferenceServer
from edgewise.runtime.config.settings import ServerSettings
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.capture import Capture, CaptureSettings, sampled
from edgewise.runtime.serving.capture_files import captured_files
from edgewise.runtime.serving.capture_tables import CHUNK_RECORDS
from edgewise.runtime.serving.codecs import decode_outputs
from edgewise.runtime.serving.pipeline import InferenceCore

NEVER = 3600.0  # a flush interval no test waits for: the writer runs when flushed


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    repo = tmp_path_factory.mktemp("capture-queue") / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = InferenceServer(ServerSettings.from_sources({"repo": repo, "metrics_port": -1}))
    server.repository.load_all()
    server.dataplane.set_ready(True)
    yield server
    server.executor.shutdown()


def core_with(server: InferenceServer, capture: Capture) -> InferenceCore:
    return InferenceCore(server.dataplane, server.metrics, server.executor, capture=capture)


def request(index: int) -> pb.ModelInferRequest:
    rows = np.random.default_rng(index).normal(size=(2, 30)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="logreg", id=f"q{index}")
    message.inputs.add(name="features", datatype="FP32", shape=[2, 30])
    message.raw_input_contents.append(rows.tobytes())
    return message


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def answer(core: InferenceCore, index: int) -> pb.ModelInferResponse:
    response = core.infer_on_thread(
        request(index), None, time.perf_counter(), defer=lambda f, *args: f(*args)
    )
    assert isinstance(response, pb.ModelInferResponse)
    assert response.id == f"q{index}" and len(response.outputs) == 2
    return response


def test_a_full_queue_drops_and_counts_and_every_request_is_answered(
    server: InferenceServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    capture = Capture(
        CaptureSettings(tmp_path, queue_records=3, flush_seconds=NEVER, batch_records=1000),
        registry,
    )
    core = core_with(server, capture)
    for index in range(3):
        answer(core, index)
    os.kill(capture.writer_pid, signal.SIGSTOP)  # the writer process falls behind
    try:
        assert not capture.flush(1)  # the 3 are sent to it, not written
        for index in range(3, 10):  # 3 fit in the queue again, 4 are dropped
            answer(core, index)
        dropped = value(
            registry, "edgewise_capture_dropped_total", model="logreg", reason="queue_full"
        )
        assert dropped == 4
        assert value(registry, "edgewise_capture_records_total", model="logreg") == 6
        assert value(registry, "edgewise_capture_written_records_total", model="logreg") == 0
    finally:
        os.kill(capture.writer_pid, signal.SIGCONT)
    assert capture.flush(30)
    assert value(registry, "edgewise_capture_written_records_total", model="logreg") == 6
    ids = set()
    for path in captured_files(tmp_path):
        ids |= set(pq.read_table(path).column("request_id").to_pylist())
    assert ids == {f"q{i}" for i in (0, 1, 2, 3, 4, 5)}
    written_bytes = sum(p.stat().st_size for p in captured_files(tmp_path))
    assert value(registry, "edgewise_capture_written_bytes_total") == written_bytes
    assert value(registry, "edgewise_capture_folder_bytes") == written_bytes
    assert value(registry, "edgewise_capture_files") == 2
    # The writer process's CPU (start-up and two files), which the server's own does not hold.
    assert value(registry, "edgewise_capture_writer_cpu_seconds_total") > 0
    capture.close()


def test_a_writer_error_is_counted_and_logged_once(
    server: InferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "logreg").write_text("a file where the model's folder goes")  # writes fail
    registry = CollectorRegistry()
    capture = Capture(CaptureSettings(tmp_path, flush_seconds=NEVER), registry)
    core = core_with(server, capture)
    with caplog.at_level(logging.ERROR, logger="edgewise.runtime.serving.capture"):
        for round_ in range(3):
            for index in range(4):
                answer(core, 10 * round_ + index)
            assert capture.flush(30)
    dropped = value(
        registry, "edgewise_capture_dropped_total", model="logreg", reason="write_error"
    )
    assert dropped == 12
    errors = [r for r in caplog.records if "write_error" in r.getMessage()]
    assert len(errors) == 1 and "logreg" in errors[0].getMessage()
    assert not list(captured_files(tmp_path))
    capture.close()


def test_a_writer_process_that_dies_is_counted_and_replaced(
    server: InferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records sent to a writer that is killed before it writes them are counted lost
    (writer_exited); the next flush starts another writer, which writes what came after."""
    registry = CollectorRegistry()
    capture = Capture(CaptureSettings(tmp_path, flush_seconds=NEVER), registry)
    core = core_with(server, capture)
    first = capture.writer_pid
    os.kill(first, signal.SIGSTOP)  # it holds what it is sent, unwritten
    for index in range(5):
        answer(core, index)
    with caplog.at_level(logging.ERROR, logger="edgewise.runtime.serving.capture"):
        assert not capture.flush(1)  # sent, not written: the writer is stopped
        os.kill(first, signal.SIGKILL)
        assert capture.flush(30)  # the dead writer's frame: counted, not waited on
        lost = value(
            registry, "edgewise_capture_dropped_total", model="logreg", reason="writer_exited"
        )
        assert lost == 5
        for index in range(5, 8):
            answer(core, index)
        assert capture.flush(30)
    assert capture.writer_pid != first
    assert value(registry, "edgewise_capture_written_records_total", model="logreg") == 3
    ids = set()
    for path in captured_files(tmp_path):
        ids |= set(pq.read_table(path).column("request_id").to_pylist())
    assert ids == {"q5", "q6", "q7"}
    assert any("writer process exited" in r.getMessage() for r in caplog.records)
    second = capture.writer_pid
    capture.close()
    deadline = time.monotonic() + 10
    while pid_alive(second) and time.monotonic() < deadline:  # a zombie until reaped: waited
        time.sleep(0.01)
    assert not pid_alive(second)  # close() stops the writer process


def test_rate_zero_captures_nothing(server: InferenceServer, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    capture = Capture(CaptureSettings(tmp_path, rate=0.0, flush_seconds=NEVER), registry)
    core = core_with(server, capture)
    for index in range(20):
        answer(core, index)
    assert capture.flush(30)
    assert value(registry, "edgewise_capture_records_total", model="logreg") == 0
    assert not list(captured_files(tmp_path))
    capture.close()


def test_sampling_by_request_id_is_deterministic_and_near_its_rate() -> None:
    ids = [f"id-{i}" for i in range(20_000)]
    for rate in (0.01, 0.25, 0.5):
        picked = [i for i in ids if sampled(i, rate)]
        assert picked == [i for i in ids if sampled(i, rate)]  # the same every time
        # binomial: within 5 standard deviations of rate * n
        spread = 5 * (len(ids) * rate * (1 - rate)) ** 0.5
        assert abs(len(picked) - rate * len(ids)) < spread
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0.0) for i in ids[:100])
    # a lower rate takes a subset of what a higher one takes (one hash, one threshold)
    assert {i for i in ids if sampled(i, 0.1)} <= {i for i in ids if sampled(i, 0.3)}


@pytest.mark.parametrize("raw", [True, False])
def test_close_writes_what_is_queued_as_answered(
    server: InferenceServer, tmp_path: Path, raw: bool
) -> None:
    """Raw answers (joined at once) and typed ones (decoded one by one) give the same columns:
    the answered outputs, row by row."""
    registry = CollectorRegistry()
    capture = Capture(CaptureSettings(tmp_path, flush_seconds=NEVER), registry)
    core = core_with(server, capture)
    answered = {}
    for index in range(5):
        message = request(index)
        if not raw:  # the same values as typed contents
            values = np.frombuffer(message.raw_input_contents[0], dtype=np.float32)
            del message.raw_input_contents[:]
            message.inputs[0].contents.fp32_contents.extend(values.tolist())
        response = core.infer_on_thread(
            message, None, time.perf_counter(), defer=lambda f, *args: f(*args)
        )
        assert isinstance(response, pb.ModelInferResponse)
        assert bool(response.raw_output_contents) == raw
        answered[message.id] = decode_outputs(response)
    capture.close()
    table = pa.concat_tables([pq.read_table(p) for p in captured_files(tmp_path)]).to_pydict()
    assert len(table["request_id"]) == 10  # 5 requests of 2 rows
    for place, (request_id, row) in enumerate(zip(table["request_id"], table["row"], strict=True)):
        for name, values in answered[request_id].items():
            np.testing.assert_array_equal(np.asarray(table[f"output.{name}"][place]), values[row])


def test_a_large_flush_is_built_in_chunks_and_written_as_one_file(
    server: InferenceServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    capture = Capture(
        CaptureSettings(tmp_path, flush_seconds=NEVER, batch_records=10_000), registry
    )
    core = core_with(server, capture)
    count = 2 * CHUNK_RECORDS + 7
    for index in range(count):
        answer(core, index)
    assert capture.flush(60)
    files = list(captured_files(tmp_path))
    assert len(files) == 1
    table = pq.read_table(files[0])
    assert table.num_rows == 2 * count
    assert table.column("request_id").to_pylist()[::2] == [f"q{i}" for i in range(count)]
    assert value(registry, "edgewise_capture_written_records_total", model="logreg") == count
    capture.close()


def test_requests_of_other_outputs_and_batch_sizes_are_written_as_answered(
    server: InferenceServer, tmp_path: Path
) -> None:
    """Answers of every output and answers of one named output (two files: their columns
    differ), requests of 1 to 3 rows: each captured row holds its request's inputs and answer."""
    capture = Capture(CaptureSettings(tmp_path, flush_seconds=NEVER), CollectorRegistry())
    core = core_with(server, capture)
    sent, answered = {}, {}
    for index in range(9):
        rows = np.random.default_rng(index).normal(size=(1 + index % 3, 30)).astype(np.float32)
        message = pb.ModelInferRequest(model_name="logreg", id=f"m{index}")
        message.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
        message.raw_input_contents.append(rows.tobytes())
        if index % 2:
            message.outputs.add(name="label")
        response = core.infer_on_thread(
            message, None, time.perf_counter(), defer=lambda f, *args: f(*args)
        )
        assert isinstance(response, pb.ModelInferResponse)
        sent[message.id], answered[message.id] = rows, decode_outputs(response)
    capture.close()
    tables = [pq.read_table(p).to_pydict() for p in captured_files(tmp_path)]
    assert len(tables) == 2
    seen = set()
    for table in tables:
        for place, (request_id, row) in enumerate(
            zip(table["request_id"], table["row"], strict=True)
        ):
            seen.add((request_id, row))
            np.testing.assert_array_equal(table["input.features"][place], sent[request_id][row])
            assert {k for k in table if k.startswith("output.")} == {
                f"output.{name}" for name in answered[request_id]
            }
            for name, values in answered[request_id].items():
                np.testing.assert_array_equal(
                    np.asarray(table[f"output.{name}"][place]), values[row]
                )
    assert seen == {(i, r) for i, rows in sent.items() for r in range(len(rows))}


def test_the_serving_process_leaves_arrow_to_the_writer_process(tmp_path: Path) -> None:
    """A capture's serving process never loads pyarrow (its writer process does): checked in a
    fresh interpreter, where nothing else has loaded it."""
    script = (
        "import sys, pathlib\n"
        "from prometheus_client import CollectorRegistry\n"
        "from edgewise.runtime.serving.capture import Capture, CaptureSettings\n"
        f"settings = CaptureSettings(pathlib.Path({str(tmp_path)!r}))\n"
        "capture = Capture(settings, CollectorRegistry())\n"
        "assert capture.flush(60)\n"
        "capture.close()\n"
        "print('pyarrow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False"


def test_an_unloaded_version_is_freed_with_capture_on(model_repo: Path, tmp_path: Path) -> None:
    """The capture keeps a model version's name and version text, not the version: once it is
    unloaded (its records written), its LoadedModel and onnxruntime session are freed."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = InferenceServer(ServerSettings.from_sources({"repo": repo, "metrics_port": -1}))
    try:
        server.repository.load_all()
        server.dataplane.set_ready(True)
        registry = CollectorRegistry()
        capture = Capture(CaptureSettings(tmp_path / "capture", flush_seconds=NEVER), registry)
        core = core_with(server, capture)
        model = server.repository.get("logreg")
        freed = weakref.ref(model)
        del model
        answer(core, 0)
        message = request(1)
        message.outputs.add(name="label")  # a group of its own: one chosen output
        core.infer_on_thread(message, None, time.perf_counter(), defer=lambda f, *args: f(*args))
        assert capture.flush(30)
        assert value(registry, "edgewise_capture_written_records_total", model="logreg") == 2
        server.repository.unload("logreg")
        gc.collect()
        assert freed() is None
        capture.close()
    finally:
        server.executor.shutdown()


def test_a_stop_with_the_writer_stalled_kills_it_and_counts_what_was_never_written(
    server: InferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """close() with the writer stalled (its disk hangs: stopped here) and the shipper blocked on
    its pipe: the writer process is killed and every captured record is accounted for, written
    or counted lost as stopped (logged once with the total)."""
    registry = CollectorRegistry()
    capture = Capture(CaptureSettings(tmp_path, flush_seconds=NEVER), registry)
    core = core_with(server, capture)
    writer = capture.writer_pid
    os.kill(writer, signal.SIGSTOP)
    try:
        for index in range(3000):  # a frame larger than the pipe holds: the shipper blocks
            answer(core, index)
        with caplog.at_level(logging.ERROR, logger="edgewise.runtime.serving.capture"):
            capture.close(timeout=1)
        deadline = time.monotonic() + 10
        while pid_alive(writer) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(writer)  # killed, though it was stopped
        stopped = value(
            registry, "edgewise_capture_dropped_total", model="logreg", reason="stopped"
        )
        written = value(registry, "edgewise_capture_written_records_total", model="logreg")
        assert value(registry, "edgewise_capture_records_total", model="logreg") == 3000
        assert stopped == 3000 and written == 0
        said = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
        assert len(said) == 1 and "3000 captured record(s) never written" in said[0]
    finally:
        if pid_alive(writer):
            os.kill(writer, signal.SIGKILL)


def large_request(index: int, rows: int = 512) -> pb.ModelInferRequest:
    values = np.random.default_rng(index).normal(size=(rows, 30)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="logreg", id=f"big{index}")
    message.inputs.add(name="features", datatype="FP32", shape=[rows, 30])
    message.raw_input_contents.append(values.tobytes())
    return message


def test_the_queue_is_bounded_by_bytes_too(server: InferenceServer, tmp_path: Path) -> None:
    """Records of 60 KiB of inputs each: a queue of 1 MiB takes 17 of them (the budget's
    worth, inputs and answers counted), drops the rest (queue_full); once written, it takes
    more again."""
    registry = CollectorRegistry()
    budget = 1 << 20
    capture = Capture(CaptureSettings(tmp_path, flush_seconds=NEVER, queue_bytes=budget), registry)
    core = core_with(server, capture)
    sent = large_request(0).raw_input_contents[0]
    for index in range(50):
        response = core.infer_on_thread(
            large_request(index), None, time.perf_counter(), defer=lambda f, *args: f(*args)
        )
        assert isinstance(response, pb.ModelInferResponse)
    captured = value(registry, "edgewise_capture_records_total", model="logreg")
    per_record = len(sent) + sum(map(len, response.raw_output_contents))
    assert captured == -(-budget // per_record)  # up to the first record at or over the budget
    dropped = value(registry, "edgewise_capture_dropped_total", model="logreg", reason="queue_full")
    assert dropped == 50 - captured
    assert capture.flush(60)
    assert value(registry, "edgewise_capture_written_records_total", model="logreg") == captured
    for index in range(50, 55):
        core.infer_on_thread(
            large_request(index), None, time.perf_counter(), defer=lambda f, *args: f(*args)
        )
    assert value(registry, "edgewise_capture_records_total", model="logreg") == captured + 5
    capture.close()


def test_records_the_shipper_holds_count_against_the_queue(
    server: InferenceServer, tmp_path: Path
) -> None:
    """With the writer behind, the records the shipper took and cannot send yet still count
    against --capture-queue: what a stop or SIGKILL can lose is at most that many records."""
    registry = CollectorRegistry()
    capture = Capture(
        CaptureSettings(tmp_path, queue_records=100, flush_seconds=NEVER, batch_records=1000),
        registry,
    )
    core = core_with(server, capture)
    writer = capture.writer_pid
    os.kill(writer, signal.SIGSTOP)
    try:
        for index in range(100):
            core.infer_on_thread(
                large_request(index), None, time.perf_counter(), defer=lambda f, *args: f(*args)
            )
        assert not capture.flush(1)  # taken by the shipper: a frame larger than the pipe
        for index in range(100, 130):
            core.infer_on_thread(
                large_request(index), None, time.perf_counter(), defer=lambda f, *args: f(*args)
            )
        dropped = value(
            registry, "edgewise_capture_dropped_total", model="logreg", reason="queue_full"
        )
        assert dropped == 30
        capture.close(timeout=1)
        assert (
            value(registry, "edgewise_capture_dropped_total", model="logreg", reason="stopped")
            == 100
        )
    finally:
        if pid_alive(writer):
            os.kill(writer, signal.SIGKILL)


def test_writers_that_cannot_start_are_restarted_with_a_back_off(
    server: InferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture folder that became unusable (here a file in its place): each writer exits at
    start. Ten flushes in a row start a few writers, not ten (restarts back off), every record
    is counted lost, the writers' CPU (their imports) is published and the log gives the exit
    status."""
    folder = tmp_path / "gone"
    folder.write_text("a file where the capture folder was")
    registry = CollectorRegistry()
    with caplog.at_level(logging.ERROR, logger="edgewise.runtime.serving.capture"):
        capture = Capture(CaptureSettings(folder, flush_seconds=NEVER), registry)
        core = core_with(server, capture)
        writers = {capture.writer_pid}
        for index in range(10):
            answer(core, index)
            assert capture.flush(60)
            writers.add(capture.writer_pid)
        capture.close()
    assert 2 <= len(writers) <= 4
    lost = value(registry, "edgewise_capture_dropped_total", model="logreg", reason="writer_exited")
    assert lost == 10
    assert value(registry, "edgewise_capture_writer_cpu_seconds_total") > 0
    said = [r.getMessage() for r in caplog.records if "writer process exited" in r.getMessage()]
    assert len(said) == 1 and "exit status 1" in said[0]


def test_a_file_larger_than_the_cap_is_counted_removed_and_said_once(
    server: InferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    capture = Capture(CaptureSettings(tmp_path, max_bytes=100, flush_seconds=NEVER), registry)
    core = core_with(server, capture)
    with caplog.at_level(logging.WARNING, logger="edgewise.runtime.serving.capture"):
        for round_ in range(2):
            for index in range(3):
                answer(core, 10 * round_ + index)
            assert capture.flush(30)
        capture.close()
    assert value(registry, "edgewise_capture_written_records_total", model="logreg") == 6
    assert value(registry, "edgewise_capture_files_removed_total") == 2
    assert value(registry, "edgewise_capture_files") == 0
    assert not list(captured_files(tmp_path))
    said = [
        r.getMessage()
        for r in caplog.records
        if "larger than the folder's size cap" in r.getMessage()
    ]
    assert len(said) == 1 and "--capture-max-bytes 100" in said[0]
