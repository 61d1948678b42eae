"""The grpcio front end under overload: costly model runs stay off the event loop, so a call
that arrives while they run is shed at once (not after them). The soak at three times capacity
is tests/runtime/serving/test_overload.py's, on both front ends. Behaviour only: figures are
benchmarks/soak.py's."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import encode_inputs
from tests.servers import RunningServer, running_server

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def forest_request(rows: int) -> bytes:
    """A ModelInfer request for the test repository's forest (13 features); about half a second
    of onnxruntime for 200,000 rows."""
    request = pb.ModelInferRequest(model_name="forest")
    features = np.random.default_rng(0).normal(size=(rows, 13)).astype(np.float32)
    encode_inputs(request, {"features": features}, raw=True)
    return request.SerializeToString()


def gauge(server: RunningServer, name: str) -> float:
    """A gauge of the server's, scraped on the metrics port (served by a thread of its own,
    so it answers while the event loop is busy)."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.serial
def test_a_call_arriving_behind_a_costly_one_is_shed_before_it_ends(
    model_repo: Path, tmp_path: Path
) -> None:
    """One call admitted at a time; requests of any size are "small" (--inline-max-bytes), so
    only the cost of the model runs can keep them off the loop. Before, a costly request ran
    inline: the loop took no call in until its model had run, so the next call was refused only
    after that, however long it took."""
    costly = forest_request(400_000)
    args = ["--front-end", "grpcio", "--max-inflight", "1", "--worker-threads", "1",
            "--inline-max-bytes", str(64 << 20), "--monitoring", "off"]  # fmt: skip
    options = [("grpc.max_receive_message_length", -1)]
    with (
        running_server(model_repo, tmp_path, args) as server,
        grpc.insecure_channel(server.target, options) as channel,
    ):
        call = channel.unary_unary(MODEL_INFER)
        call(costly, timeout=120)  # the server learns what this model's runs cost
        first = threading.Thread(target=call, args=(costly,), kwargs={"timeout": 120})
        first.start()
        while gauge(server, "edgewise_inflight_requests") < 1:  # its model runs
            assert first.is_alive(), "the costly call ended before its model was seen running"
            first.join(0.01)
        with pytest.raises(grpc.RpcError) as refused:
            call(forest_request(1), timeout=120)
        running_after_refusal = gauge(server, "edgewise_inflight_requests")
        first.join()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert running_after_refusal == 1  # refused while the costly model ran, not after


@pytest.mark.serial
def test_every_call_of_a_burst_past_the_limit_is_refused_with_the_retry_hint(
    model_repo: Path, tmp_path: Path
) -> None:
    """A burst of calls on one connection while the one admitted call runs: each refused call
    is answered RESOURCE_EXHAUSTED with the retry hint (both keys) and the limit in its message,
    and the server counted exactly those; none is refused by gRPC's own machinery (CANCELLED, or
    grpc.aio's "Concurrent RPC limit exceeded" without a hint). The event loop takes calls in
    one at a time, so a burst waits in gRPC core's queue first; that queue holds it
    (shedding.pending_limits), and the shedder decides on every call. Before, the queue held 64
    calls here: of a burst of 200, 15 to 29 were cancelled by core."""
    costly = forest_request(400_000)
    burst = 200
    args = ["--front-end", "grpcio", "--max-inflight", "1", "--worker-threads", "1",
            "--retry-after-ms", "75", "--monitoring", "off"]  # fmt: skip
    options = [("grpc.max_receive_message_length", -1)]
    with (
        running_server(model_repo, tmp_path, args) as server,
        grpc.insecure_channel(server.target, options) as channel,
    ):
        call = channel.unary_unary(MODEL_INFER)
        shed_before = gauge(server, "edgewise_shed_requests_total")
        first = call.future(costly, timeout=300)
        while gauge(server, "edgewise_inflight_requests") < 1:  # its model runs
            assert not first.done(), "the costly call ended before its model was seen running"
        small = forest_request(1)
        answers = [call.future(small, timeout=300) for _ in range(burst)]
        errors = [answer.exception() for answer in answers]
        first.result()
        shed = gauge(server, "edgewise_shed_requests_total") - shed_before
    refused = [e for e in errors if e is not None]
    assert refused, "no call of the burst was refused while the costly one ran"
    for error in refused:
        assert isinstance(error, grpc.Call)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
        assert "1 inference calls in flight" in (error.details() or "")
        trailers = dict(error.trailing_metadata() or ())
        assert trailers.get("retry-after-ms") == "75", trailers
        assert trailers.get("grpc-retry-pushback-ms") == "75", trailers
    assert shed == len(refused)  # every refusal the clients saw is one the server counted
