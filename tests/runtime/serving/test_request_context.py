"""The labels of an inference call (runtime/serving/request_context.py): what a traceparent and
an x-request-id give, what an answer echoes, what the log formats show, and that a call's labels
never outlive it on the event loop, on a worker thread or in a batch."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.cli.logformat import JsonFormatter, TextFormatter
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.request_context import (
    CURRENT,
    RequestLabels,
    current,
    model_context,
    trace_id_of,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (TRACEPARENT, TRACE_ID),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-00", TRACE_ID),  # not sampled: still its trace
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01-more", TRACE_ID),  # a later version may add fields
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01-more", ""),  # version 00 may not
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", ""),  # version ff is invalid
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", ""),  # lowercase hex only
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", ""),  # all-zero trace id
        (f"00-{TRACE_ID}-{'0' * 16}-01", ""),  # all-zero parent id
        (f"00-{TRACE_ID[:-1]}g-00f067aa0ba902b7-01", ""),
        ("x" * 55, ""),
        ("garbage", ""),
        ("", ""),
    ],
)
def test_trace_id_of_a_traceparent(traceparent: str, expected: str) -> None:
    assert trace_id_of(traceparent) == expected


def test_an_id_is_the_requests_else_the_headers_else_made() -> None:
    sent = RequestLabels("hdr-1", TRACEPARENT)
    request = pb.ModelInferRequest(model_name="m", model_version="2")
    sent.take(request)
    assert request.id == "hdr-1" and sent.request_id == "hdr-1"  # taken as the request's own
    assert (sent.model, sent.version, sent.trace_id) == ("m", "2", TRACE_ID)
    assert sent.echo() == (("x-request-id", "hdr-1"), ("x-trace-id", TRACE_ID))

    own = RequestLabels("hdr-2")
    own.take(pb.ModelInferRequest(model_name="m", id="body-2"))
    assert own.request_id == "body-2"  # the body wins

    made = RequestLabels()
    request = pb.ModelInferRequest(model_name="m")
    made.take(request)
    assert request.id == "" and len(made.request_id) == 16  # not the request's key
    assert made.answered(pb.ModelInferResponse()).id == made.request_id
    assert made.echo() == () and made.echo(failed=True) == (("x-request-id", made.request_id),)
    assert made.headers() == {"x-request-id": made.request_id}
    assert RequestLabels().request_id != made.request_id


def test_an_id_a_header_cannot_carry_is_answered_in_the_body_only() -> None:
    labels = RequestLabels()
    labels.take(pb.ModelInferRequest(model_name="m", id="line\nbreak"))
    assert labels.headers() == {} and labels.echo(failed=True) == ()
    labels.take(pb.ModelInferRequest(model_name="m", id="x" * 257))
    assert labels.headers() == {}


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("edgewise.test", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_log_lines_take_the_current_labels() -> None:
    labels = RequestLabels("r-1", TRACEPARENT)
    labels.model, labels.version = "churn", "3"
    token = CURRENT.set(labels)
    try:
        entry = json.loads(JsonFormatter().format(record("inside")))
        text = TextFormatter().format(record("inside"))
        over = json.loads(JsonFormatter().format(record("named", request_id="other")))
    finally:
        CURRENT.reset(token)
    assert (entry["model"], entry["version"], entry["request_id"], entry["trace_id"]) == (
        "churn",
        "3",
        "r-1",
        TRACE_ID,
    )
    assert text.endswith(f" [model=churn version=3 request_id=r-1 trace_id={TRACE_ID}]")
    assert over["request_id"] == "other" and over["model"] == "churn"  # the record's extra wins
    outside = json.loads(JsonFormatter().format(record("outside")))
    assert not {"model", "version", "request_id", "trace_id"} & set(outside)
    assert TextFormatter().format(record("outside")).endswith("edgewise.test: outside")


def test_a_text_line_stays_one_line() -> None:
    labels = RequestLabels("a b\nc")
    token = CURRENT.set(labels)
    try:
        text = TextFormatter().format(record("inside"))
    finally:
        CURRENT.reset(token)
    assert "\n" not in text and "request_id='a b\\nc'" in text


def test_a_batch_runs_with_the_models_labels_only() -> None:
    labels = model_context("forest", "1").run(current)
    assert labels is not None
    assert (labels.model, labels.version, labels.request_id, labels.trace_id) == (
        "forest",
        "1",
        "",
        "",
    )


def test_labels_never_outlive_their_call(model_repo: Path, tmp_path: Path) -> None:
    """Calls inline, on worker threads, and batched together: each answer has its own id, and
    afterwards neither the loop's task nor any worker thread has labels."""
    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.serving.pipeline import InferenceCore

    repo = tmp_path / "repo"
    for name in ("logreg", "forest"):
        shutil.copytree(model_repo / name, repo / name)
    (repo / "forest" / "config.json").write_text(
        json.dumps(
            {"batching": {"max_batch_size": 8, "max_queue_delay_us": 20000, "idle_dispatch": False}}
        )
    )
    server = InferenceServer(ServerSettings.from_sources({"repo": repo, "metrics_port": -1}))
    server.repository.load_all()
    core = InferenceCore(server.dataplane, server.metrics, server.executor, inline_max_bytes=256)

    def request(model: str, rows: int, request_id: str = "") -> pb.ModelInferRequest:
        manifest = json.loads((repo / model / "1" / "manifest.json").read_text())
        x = np.ones((rows, int(manifest["inputs"][0]["shape"][1])), np.float32)
        message = pb.ModelInferRequest(model_name=model, id=request_id)
        message.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
        message.raw_input_contents.append(x.tobytes())
        return message

    seen: list[RequestLabels | None] = []

    def on_worker() -> None:
        seen.append(current())
        threading.Event().wait(0.001)  # hold the thread so that others run the next ones

    async def scenario() -> list[pb.ModelInferResponse]:
        answers = [
            await core.infer(request("logreg", 1), None, labels=RequestLabels()),
            # Over inline_max_bytes: parsed and run on a worker thread.
            await core.infer_body(
                request("logreg", 64).SerializeToString(), None, labels=RequestLabels("big-1")
            ),
            *await asyncio.gather(
                *(
                    core.infer(request("forest", 1), None, labels=RequestLabels(f"b-{index}"))
                    for index in range(4)
                ),
                core.infer(request("forest", 1), None, labels=RequestLabels()),
            ),
        ]
        assert current() is None
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(server.executor, on_worker) for _ in range(32)))
        return answers

    try:
        answers = asyncio.run(scenario())
    finally:
        server.executor.shutdown()
    ids = [answer.id for answer in answers]
    assert ids[1:6] == ["big-1", "b-0", "b-1", "b-2", "b-3"]
    assert len(ids[0]) == 16 and len(ids[6]) == 16 and ids[0] != ids[6]  # made, one each
    assert core.batch_queues()[("forest", "1")].batches_run >= 1
    assert seen and all(labels is None for labels in seen)
