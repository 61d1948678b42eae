"""HTTP inference calls share the gRPC port's in-flight limit, both ways and on both gRPC front
ends: with a costly call running on one front end, a call on the other is shed at once, 503 with
``Retry-After`` on HTTP (see frontends/status.py for why not 429), RESOURCE_EXHAUSTED on gRPC,
each counted as shed, and ``edgewise_admitted_calls`` counts the running call whichever front end
holds it. And its drain: SIGTERM lets an HTTP call under way finish."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.http as triton

from edgewise.runtime.frontends.rest_codec import HEADER_LENGTH
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import encode_inputs
from tests.runtime.frontends.http.conftest import call, metric
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, running_server, start_server

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
ROWS = 400_000  # about a second of onnxruntime for the forest here
ARGS = ["--max-inflight", "1", "--worker-threads", "1", "--inline-max-bytes", str(64 << 20),
        "--monitoring", "off", "--http-port", "0"]  # fmt: skip


def features(rows: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, 13)).astype(np.float32)


def grpc_body(rows: int) -> bytes:
    request = pb.ModelInferRequest(model_name="forest")
    encode_inputs(request, {"features": features(rows)}, raw=True)
    return request.SerializeToString()


def http_body(rows: int) -> tuple[bytes, int]:
    tensor = triton.InferInput("features", [rows, 13], "FP32")
    tensor.set_data_from_numpy(features(rows), binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([tensor])
    assert length is not None
    return body, length


def while_running(
    server: RunningServer, costly: Callable[[], object], other: Callable[[], None]
) -> None:
    """Run ``costly`` once to teach the server its cost, then again in a thread and, once its
    model is seen running, ``other``; then wait for the costly one."""
    costly()
    first = threading.Thread(target=costly)
    first.start()
    try:
        while metric(server, "edgewise_inflight_requests") < 1:
            assert first.is_alive(), "the costly call ended before its model was seen running"
            first.join(0.01)
        # The limit's count holds the running call, whichever front end took it.
        assert metric(server, "edgewise_admitted_calls") == 1
        other()
        assert metric(server, "edgewise_inflight_requests") == 1  # refused while it ran
    finally:
        first.join()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_http_is_shed_while_a_grpc_call_holds_the_limit(
    model_repo: Path, tmp_path: Path, front_end: str
) -> None:
    with (
        running_server(model_repo, tmp_path, [*ARGS, *front_end_args(front_end)]) as server,
        grpc.insecure_channel(server.target, [("grpc.max_receive_message_length", -1)]) as channel,
    ):
        costly = grpc_body(ROWS)
        infer = channel.unary_unary(MODEL_INFER)
        body, length = http_body(1)
        answers = []

        def http_call() -> None:
            url = f"http://127.0.0.1:{server.http_port}/v2/models/forest/infer"
            answers.append(call(url, body, {HEADER_LENGTH: str(length)}))

        shed = metric(server, "edgewise_shed_requests_total")
        while_running(server, lambda: infer(costly, timeout=120), http_call)
        assert metric(server, "edgewise_shed_requests_total") == shed + 1
    (answer,) = answers
    assert answer.status == 503, answer.body
    assert answer.headers["Retry-After"] == "1" and answer.headers["retry-after-ms"] == "50"
    assert "overloaded" in answer.json()["error"]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_grpc_is_shed_while_an_http_call_holds_the_limit(
    model_repo: Path, tmp_path: Path, front_end: str
) -> None:
    """The native front end counts its calls in C++ and adds the HTTP calls the shedder
    counts before it admits one."""
    with (
        running_server(model_repo, tmp_path, [*ARGS, *front_end_args(front_end)]) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        body, length = http_body(ROWS)
        url = f"http://127.0.0.1:{server.http_port}/v2/models/forest/infer"

        def costly() -> None:
            assert call(url, body, {HEADER_LENGTH: str(length)}).status == 200

        refused: list[grpc.RpcError] = []

        def grpc_call() -> None:
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary(MODEL_INFER)(grpc_body(1), timeout=60)
            refused.append(error.value)

        shed = metric(server, "edgewise_shed_requests_total")
        while_running(server, costly, grpc_call)
        assert metric(server, "edgewise_shed_requests_total") == shed + 1
    assert refused[0].code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_sigterm_lets_an_http_call_under_way_finish(
    model_repo: Path, tmp_path: Path, front_end: str
) -> None:
    args = ["--monitoring", "off", "--http-port", "0", "--grace-seconds", "60",
            *front_end_args(front_end)]  # fmt: skip
    server = start_server(model_repo, tmp_path, args)
    try:
        body, length = http_body(ROWS)
        url = f"http://127.0.0.1:{server.http_port}/v2/models/forest/infer"
        answers = []
        running = threading.Thread(
            target=lambda: answers.append(call(url, body, {HEADER_LENGTH: str(length)}))
        )
        running.start()
        while metric(server, "edgewise_inflight_requests") < 1:
            assert running.is_alive(), "the call ended before its model was seen running"
            running.join(0.01)
        server.process.send_signal(signal.SIGTERM)
        running.join(120)
        assert server.process.wait(timeout=60) == 0, server.log()
    finally:
        server.stop()
    (answer,) = answers
    assert answer.status == 200, answer.body
    assert len(triton.InferResult.from_response_body(
        answer.body, header_length=int(answer.headers[HEADER_LENGTH])
    ).as_numpy("label")) == ROWS  # fmt: skip
