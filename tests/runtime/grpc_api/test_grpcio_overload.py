"""The grpcio front end under overload: costly model runs stay off the event loop, so a call
that arrives while they run is shed at once (not after them), and an overloaded server sheds with
a retry hint rather than letting calls meet their deadline in gRPC's own queue, answers its
health checks, and keeps its memory bounded. Behaviour only: figures are benchmarks/soak.py's."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgewise.runtime.codecs import encode_inputs
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2 as pb
from tests.runtime.test_overload import soak
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


def test_grpcio_sheds_under_three_times_its_capacity(tmp_path: Path) -> None:
    """benchmarks/soak.py on the grpcio front end (3 x 400 requests/s of a forest's 512-row
    requests, several times what 2 cores serve). Before, a large share of the calls met their
    deadline in gRPC's own queue (up to 3000 calls deep), and memory grew with that queue."""
    result = soak(tmp_path, seconds=20, rate=400, front_end="grpcio")
    codes, sent = result["codes"], result["sent"]
    # Answered, not left to time out: served, shed with the retry hint by the server, or refused
    # at once by gRPC's core when the event loop falls behind (its queue is bounded).
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"}, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) <= 0.05 * sent, codes
    assert result["server_shed_total"] >= 0.2 * sent, result
    assert result["shed_with_retry_hint"] == result["server_shed_total"], result
    assert all(third["ok"] > 0 for third in result["thirds"]), result["thirds"]
    assert result["health_check_failures"] == 0 and result["samples"] > 0, result
    # Memory stays bounded: no queue grows with the overload (before: +70 to +176 MiB).
    assert result["rss_mib_max"] - result["rss_mib_first_third"] < 60, result  # MiB
