"""OpenTelemetry spans of the request path (runtime/serving/tracing.py), checked with the SDK's
in-memory exporter on a real in-process server: the grpcio, native C++ and HTTP front ends, the
caller's W3C traceparent kept, sampling, and no opentelemetry import with tracing off."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind

from edgewise.runtime.app.server import InferenceServer
from edgewise.runtime.cli.logformat import JsonFormatter
from edgewise.runtime.config.settings import ServerSettings
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.tracing import RequestTracing
from tests.servers import native_front_or_unmet

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
STEPS = {"admit", "decode", "run", "monitor"}
#: grpcio parses the request's bytes in the core (InferenceCore.infer_body).
GRPC_STEPS = {"parse", *STEPS}


class Traced:
    def __init__(self, server: InferenceServer, exporter: InMemorySpanExporter) -> None:
        self.server = server
        self.exporter = exporter
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def use(self, sample_ratio: float) -> None:
        provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))  # as otlp_provider
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        core = self.server.core
        assert core is not None
        core.tracing = RequestTracing(provider, sample_ratio)
        self.exporter.clear()

    def spans(self, names: set[str], timeout: float = 10.0) -> list[ReadableSpan]:
        """The finished spans, once those named ``names`` are all there (the monitor's span
        ends on the loop's turn after the answer)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = list(self.exporter.get_finished_spans())
            if names <= {span.name for span in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.01)


def serving(repo_from: Path, root: Path, front_end: str) -> Iterator[Traced]:
    """A server of logreg and forest (forest with dynamic batching) with ``front_end``."""
    repo = root / "repo"
    for name in ("logreg", "forest"):
        shutil.copytree(repo_from / name, repo / name)
    (repo / "forest" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 4, "max_queue_delay_us": 1000}})
    )
    settings = ServerSettings.from_sources(
        {
            "repo": repo,
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "front_end": front_end,
            "http_port": 0,
        }
    )
    server = InferenceServer(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    traced = Traced(server, InMemorySpanExporter())
    try:
        yield traced
    finally:
        traced.channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def traced(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    yield from serving(model_repo, tmp_path_factory.mktemp("traced"), "grpcio")


@pytest.fixture(scope="module")
def native(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """The same server with the native C++ front end (its gRPC calls: infer_on_thread)."""
    native_front_or_unmet()
    served = serving(model_repo, tmp_path_factory.mktemp("native"), "native")
    try:
        traced = next(served)
        assert traced.server.front is not None  # the native front end answers gRPC
        yield traced
    finally:
        served.close()  # the server stops


def features(repo: Path, model: str, n: int) -> np.ndarray:
    manifest = json.loads((repo / model / "1" / "manifest.json").read_text())
    width = int(manifest["inputs"][0]["shape"][1])
    return np.random.default_rng(0).normal(size=(n, width)).astype(np.float32)


def grpc_request(repo: Path, model: str, request_id: str, n: int = 3) -> pb.ModelInferRequest:
    rows = features(repo, model, n)
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]  # one of each
    return named


def check_tree(spans: list[ReadableSpan], steps: set[str], request_id: str, version: str) -> None:
    named = by_name(spans)
    assert set(named) == {"edgewise.infer", *steps}, sorted(named)
    root = named["edgewise.infer"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # the caller's trace
    assert f"{root.parent.span_id:016x}" == PARENT_ID  # a child of the caller's span
    assert root.attributes is not None
    assert root.attributes["edgewise.version"] == version
    assert root.attributes["edgewise.request_id"] == request_id
    for name in steps:
        span = named[name]
        assert span.parent is not None and span.context is not None
        assert span.parent.span_id == root.context.span_id, name
        assert span.context.trace_id == root.context.trace_id


def test_grpcio_spans_keep_the_callers_trace(traced: Traced) -> None:
    traced.use(1.0)
    repo = traced.server.settings.repo
    response = traced.stub.ModelInfer(
        grpc_request(repo, "logreg", "g-1"), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    assert response.id == "g-1"
    spans = traced.spans(GRPC_STEPS)
    check_tree(spans, GRPC_STEPS, "g-1", "1")
    root = by_name(spans)["edgewise.infer"]
    assert root.attributes is not None and root.attributes["edgewise.model"] == "logreg"


def test_a_large_request_runs_on_a_worker_in_the_same_trace(traced: Traced) -> None:
    traced.use(1.0)
    repo = traced.server.settings.repo
    request = grpc_request(repo, "logreg", "l-1", n=4000)
    core = traced.server.core
    assert core is not None and request.ByteSize() > core.inline_max_bytes
    response = traced.stub.ModelInfer(request, metadata=(("traceparent", SAMPLED),), timeout=30)
    assert response.id == "l-1"
    check_tree(traced.spans(GRPC_STEPS), GRPC_STEPS, "l-1", "1")


def test_a_batched_model_has_a_queue_span(traced: Traced) -> None:
    traced.use(1.0)
    repo = traced.server.settings.repo
    traced.stub.ModelInfer(
        grpc_request(repo, "forest", "b-1"), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    steps = {"parse", "admit", "decode", "queue"}
    spans = traced.spans(steps)
    check_tree(spans, steps, "b-1", "1")


def test_http_spans_keep_the_callers_trace(traced: Traced) -> None:
    traced.use(1.0)
    repo = traced.server.settings.repo
    rows = features(repo, "logreg", 2)
    body = json.dumps(
        {
            "id": "h-1",
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "data": rows.ravel().tolist(),
                }
            ],
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{traced.server.http_port}/v2/models/logreg/infer",
        data=body,
        headers={"Content-Type": "application/json", "traceparent": SAMPLED},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read())["id"] == "h-1"
    check_tree(traced.spans(STEPS), STEPS, "h-1", "1")


def test_sampling_ratio_zero_records_only_sampled_parents(traced: Traced) -> None:
    traced.use(0.0)
    repo = traced.server.settings.repo
    for index in range(5):  # no parent: the ratio decides, and it is 0
        traced.stub.ModelInfer(grpc_request(repo, "logreg", f"n-{index}"), timeout=10)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    traced.stub.ModelInfer(
        grpc_request(repo, "logreg", "u-1"), metadata=(("traceparent", unsampled),), timeout=10
    )
    traced.stub.ModelInfer(  # the caller sampled it: kept whatever the ratio
        grpc_request(repo, "logreg", "s-1"), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    spans = traced.spans(GRPC_STEPS)
    check_tree(spans, GRPC_STEPS, "s-1", "1")


def test_a_malformed_traceparent_starts_a_new_trace(traced: Traced) -> None:
    traced.use(1.0)
    repo = traced.server.settings.repo
    traced.stub.ModelInfer(
        grpc_request(repo, "logreg", "m-1"), metadata=(("traceparent", "garbage"),), timeout=10
    )
    named = by_name(traced.spans(GRPC_STEPS))
    root = named["edgewise.infer"]
    assert root.parent is None and root.context is not None
    assert f"{root.context.trace_id:032x}" != TRACE_ID


def test_a_refused_request_ends_its_span_with_an_error(traced: Traced) -> None:
    traced.use(1.0)
    request = pb.ModelInferRequest(model_name="no-such-model", id="e-1")
    with pytest.raises(grpc.RpcError) as failure:
        traced.stub.ModelInfer(request, metadata=(("traceparent", SAMPLED),), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    named = by_name(traced.spans({"edgewise.infer", "parse", "admit", "decode"}))
    assert set(named) == {"edgewise.infer", "parse", "admit", "decode"}
    assert not named["decode"].status.is_ok
    assert not named["edgewise.infer"].status.is_ok


def test_native_spans_keep_the_callers_trace(native: Traced) -> None:
    """The native front end's call (C++ parses it: no ``parse`` span) has grpcio's other
    spans, joined to the caller's trace, whose id its trailers echo."""
    native.use(1.0)
    repo = native.server.settings.repo
    response, call = native.stub.ModelInfer.with_call(
        grpc_request(repo, "logreg", "nt-1"), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    assert response.id == "nt-1"
    assert dict(call.trailing_metadata() or ())["x-trace-id"] == TRACE_ID
    spans = native.spans(STEPS)
    check_tree(spans, STEPS, "nt-1", "1")
    root = by_name(spans)["edgewise.infer"]
    assert root.kind is SpanKind.SERVER
    assert root.attributes is not None and root.attributes["edgewise.model"] == "logreg"
    run = by_name(spans)["run"]  # on the front end's thread, within the call's span
    assert root.start_time is not None and run.start_time is not None
    assert root.end_time is not None and run.end_time is not None
    assert root.start_time <= run.start_time <= run.end_time <= root.end_time


def test_native_batched_call_has_a_queue_span(native: Traced) -> None:
    """A call on a batch queue: its ``queue`` span and the call's end once the batch answered
    it (the future's done callback), in the caller's trace."""
    native.use(1.0)
    repo = native.server.settings.repo
    response, call = native.stub.ModelInfer.with_call(
        grpc_request(repo, "forest", "nb-1"), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    assert response.id == "nb-1"
    assert dict(call.trailing_metadata() or ())["x-trace-id"] == TRACE_ID
    steps = {"admit", "decode", "queue"}
    spans = native.spans({"edgewise.infer", *steps})
    check_tree(spans, steps, "nb-1", "1")
    named = by_name(spans)
    queue, root = named["queue"], named["edgewise.infer"]
    assert queue.status.is_ok and root.status.is_ok
    assert queue.end_time is not None and root.end_time is not None
    assert queue.end_time <= root.end_time


def test_native_new_trace_and_sampling(native: Traced) -> None:
    """No traceparent at ratio 1: a new trace, its id in the trailers; at ratio 0 only a
    caller's sampled call is traced (an unsampled parent and no parent make no span)."""
    native.use(1.0)
    repo = native.server.settings.repo
    _, call = native.stub.ModelInfer.with_call(grpc_request(repo, "logreg", "nn-1"), timeout=10)
    root = by_name(native.spans(STEPS))["edgewise.infer"]
    assert root.context is not None and root.parent is None
    trailers = dict(call.trailing_metadata() or ())
    assert trailers["x-trace-id"] == f"{root.context.trace_id:032x}" != TRACE_ID
    native.use(0.0)
    for index, model in enumerate(("logreg", "forest", "logreg")):
        native.stub.ModelInfer(grpc_request(repo, model, f"nz-{index}"), timeout=10)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    for model in ("logreg", "forest"):
        _, call = native.stub.ModelInfer.with_call(
            grpc_request(repo, model, f"nu-{model}"),
            metadata=(("traceparent", unsampled),),
            timeout=10,
        )
        assert dict(call.trailing_metadata() or ())["x-trace-id"] == TRACE_ID  # echoed still
    native.stub.ModelInfer(
        grpc_request(repo, "logreg", "ns-1"), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    check_tree(native.spans(STEPS), STEPS, "ns-1", "1")  # only the sampled call's spans


def test_native_refused_call_ends_its_span_with_an_error(native: Traced) -> None:
    native.use(1.0)
    request = pb.ModelInferRequest(model_name="no-such-model", id="ne-1")
    with pytest.raises(grpc.RpcError) as failure:
        native.stub.ModelInfer(request, metadata=(("traceparent", SAMPLED),), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    named = by_name(native.spans({"edgewise.infer", "admit", "decode"}))
    assert set(named) == {"edgewise.infer", "admit", "decode"}
    assert not named["decode"].status.is_ok
    assert not named["edgewise.infer"].status.is_ok


class Lines(logging.Handler):
    """The JSON lines (runtime/cli/logformat.py) of the records it handles."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_a_new_trace_comes_back_and_labels_the_calls_log_lines(traced: Traced) -> None:
    """A call without a traceparent that tracing samples: its answer carries the new trace's
    id (gRPC trailers, HTTP header), and so does a line logged while it was served."""
    traced.use(1.0)
    repo = traced.server.settings.repo
    response, call = traced.stub.ModelInfer.with_call(grpc_request(repo, "logreg", "t-1"))
    trailers = dict(call.trailing_metadata() or ())
    root = by_name(traced.spans(GRPC_STEPS))["edgewise.infer"]
    assert root.context is not None and root.parent is None
    assert trailers["x-trace-id"] == f"{root.context.trace_id:032x}" != TRACE_ID
    assert response.id == "t-1" and "x-request-id" not in trailers  # in the response already
    traced.exporter.clear()
    request = urllib.request.Request(
        f"http://127.0.0.1:{traced.server.http_port}/v2/models/logreg/infer",
        data=json.dumps({"id": "t-2", "inputs": []}).encode(),  # refused: no inputs
        headers={"Content-Type": "application/json"},
    )
    handler = Lines()
    logger = logging.getLogger("edgewise.runtime.serving.pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert refused.value.code == 400
    root = by_name(traced.spans({"edgewise.infer"}))["edgewise.infer"]
    assert root.context is not None
    trace_id = f"{root.context.trace_id:032x}"
    assert refused.value.headers["x-trace-id"] == trace_id
    assert refused.value.headers["x-request-id"] == "t-2"
    (line,) = [entry for entry in handler.lines if entry.get("request_id") == "t-2"]
    assert line["trace_id"] == trace_id and line["model"] == "logreg"


OFF = """
import asyncio, sys
from pathlib import Path
from edgewise.runtime.app.server import InferenceServer
from edgewise.runtime.cli.logformat import JsonFormatter
from edgewise.runtime.config.settings import ServerSettings
from edgewise.runtime.frontends import grpcio, http
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.pipeline import InferenceCore
import numpy as np
settings = ServerSettings.from_sources({"repo": Path(sys.argv[1]), "metrics_port": -1})
server = InferenceServer(settings)
server.repository.load_all()
core = InferenceCore(server.dataplane, server.metrics, server.executor)
rows = np.zeros((2, int(sys.argv[2])), np.float32)
request = pb.ModelInferRequest(model_name="logreg")
request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
request.raw_input_contents.append(rows.tobytes())
answer = asyncio.run(core.infer(request, None))
server.executor.shutdown()
assert answer.model_name == "logreg"
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_tracing_off_never_imports_opentelemetry(model_repo: Path) -> None:
    width = features(model_repo, "logreg", 1).shape[1]
    done = subprocess.run(
        [sys.executable, "-c", OFF, str(model_repo), str(width)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_serve_refuses_otel_without_the_extra(model_repo: Path) -> None:
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from edgewise.runtime.cli.main import main\n"
        "sys.exit(main(['serve', '--repo', sys.argv[1], '--otel-endpoint', 'http://x:4317']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_repo)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "otel extra" in lines[0] and "Traceback" not in done.stderr


def test_serve_refuses_a_sample_ratio_out_of_range(model_repo: Path) -> None:
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "serve", "--repo", str(model_repo),
        "--otel-endpoint", "http://127.0.0.1:4317", "--otel-sample-ratio", "1.5",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "edgewise serve: error: otel-sample-ratio must be a fraction from 0 to 1, not 1.5"
    ]
