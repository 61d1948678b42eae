"""Request ids and trace ids on a real server (issue 28 item 5): echoed in answers on the grpcio
and the native gRPC front end and on HTTP (tritonclient, and plain clients for the metadata and
headers), and in the ``--log-format json`` lines logged while a call is served, never in another
call's. Each case runs on a server of each gRPC front end (tests/servers.py FRONT_ENDS)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
HEX = set("0123456789abcdef")

#: tritonclient.grpc in a process of its own: its generated code and edgewise's both register
#: the ``inference`` protobuf package (see tests/interop/triton_calls.py). Prints the ids of
#: three answers: with an id and a traceparent, and twice without either.
GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
target, width, traceparent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = triton.InferenceServerClient(target)
inputs = [triton.InferInput("features", [2, width], "FP32")]
inputs[0].set_data_from_numpy(np.zeros((2, width), np.float32))
ids = [client.infer("logreg", inputs, request_id="grpc-7",
                    headers={"traceparent": traceparent}).get_response().id]
ids += [client.infer("logreg", inputs).get_response().id for _ in range(2)]
print(json.dumps(ids))
"""


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp(f"request-ids-{request.param}")
    repo = workdir / "repo"  # logreg, and forest with dynamic batching
    for name in ("logreg", "forest"):
        shutil.copytree(model_repo / name, repo / name)
    (repo / "forest" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 4, "max_queue_delay_us": 1000}})
    )
    running = start_server(
        repo,
        workdir,
        [*front_end_args(request.param), "--http-port", "0"],
        global_args=["--log-format", "json", "--log-level", "DEBUG"],
    )
    assert running.http_port, running.log()
    yield running
    assert running.stop() == 0, running.log()


def width(repo: Path, model: str = "logreg") -> int:
    manifest = json.loads((repo / model / "1" / "manifest.json").read_text())
    return int(manifest["inputs"][0]["shape"][1])


def raw_request(
    repo: Path, request_id: str = "", columns: int | None = None, model: str = "logreg"
) -> pb.ModelInferRequest:
    x = np.ones((1, columns or width(repo, model)), np.float32)
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def grpc_call(
    server: RunningServer, request: pb.ModelInferRequest, metadata: tuple[tuple[str, str], ...]
) -> tuple[pb.ModelInferResponse | None, grpc.StatusCode, dict[str, str]]:
    """One ModelInfer call: the response (None when refused), its status and its trailers."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return None, error.code(), dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return response, grpc.StatusCode.OK, dict(call.trailing_metadata() or ())


def http_call(
    connection: http.client.HTTPConnection, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, Any], http.client.HTTPMessage]:
    connection.request(
        "POST",
        "/v2/models/logreg/infer",
        json.dumps(body),
        {"Content-Type": "application/json", **headers},
    )
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read()), answer.headers


def http_body(repo: Path, request_id: str = "", columns: int | None = None) -> dict[str, Any]:
    n = columns or width(repo)
    body: dict[str, Any] = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, n], "data": [1.0] * n}]
    }
    if request_id:
        body["id"] = request_id
    return body


def logged(server: RunningServer, request_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The JSON log lines that carry ``request_id``, once there is at least one."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        found = [entry for entry in entries if entry.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_tritonclient_grpc_gets_its_id_back(server: RunningServer, model_repo: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, server.target, str(width(model_repo)), TRACEPARENT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    sent, unnamed, again = json.loads(done.stdout)
    assert sent == "grpc-7"
    assert len(unnamed) == 16 and set(unnamed) <= HEX and unnamed != again  # made by the server


def test_grpc_trailers_carry_the_trace_id_and_the_sent_request_id(
    server: RunningServer, model_repo: Path
) -> None:
    response, code, trailers = grpc_call(
        server, raw_request(model_repo), (("x-request-id", "meta-1"), ("traceparent", TRACEPARENT))
    )
    assert code is grpc.StatusCode.OK and response is not None
    assert response.id == "meta-1"  # the metadata's id, taken as the request's own
    assert trailers["x-request-id"] == "meta-1" and trailers["x-trace-id"] == TRACE_ID
    response, code, trailers = grpc_call(server, raw_request(model_repo, "body-1"), ())
    assert response is not None and response.id == "body-1"
    assert "x-trace-id" not in trailers and "x-request-id" not in trailers  # nothing to echo
    # A malformed traceparent is no trace: nothing made up.
    response, _, trailers = grpc_call(server, raw_request(model_repo), (("traceparent", "00-xyz"),))
    assert response is not None and "x-trace-id" not in trailers


def test_a_batched_call_gets_its_ids_back(server: RunningServer, model_repo: Path) -> None:
    """A call that waits on a batch queue (the native front end answers it later, from the
    loop) carries its ids as one answered at once."""
    metadata = (("x-request-id", "batch-1"), ("traceparent", TRACEPARENT))
    response, code, trailers = grpc_call(server, raw_request(model_repo, model="forest"), metadata)
    assert code is grpc.StatusCode.OK and response is not None and response.id == "batch-1"
    assert trailers["x-request-id"] == "batch-1" and trailers["x-trace-id"] == TRACE_ID
    response, code, trailers = grpc_call(server, raw_request(model_repo, model="forest"), ())
    assert response is not None and len(response.id) == 16 and set(response.id) <= HEX
    assert "x-request-id" not in trailers and "x-trace-id" not in trailers


def test_tritonclient_http_gets_its_id_back(server: RunningServer, model_repo: Path) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inputs = [httpclient.InferInput("features", [1, width(model_repo)], "FP32")]
    inputs[0].set_data_from_numpy(np.zeros((1, width(model_repo)), np.float32), binary_data=True)
    result = client.infer(
        "logreg", inputs, request_id="http-7", headers={"traceparent": TRACEPARENT}
    )
    assert result.get_response()["id"] == "http-7"
    made = client.infer("logreg", inputs).get_response()["id"]
    assert len(made) == 16 and set(made) <= HEX
    client.close()


def test_http_headers_carry_the_request_id_and_the_trace_id(
    server: RunningServer, model_repo: Path
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    status, body, headers = http_call(
        connection, http_body(model_repo), {"x-request-id": "hdr-1", "traceparent": TRACEPARENT}
    )
    assert status == 200 and body["id"] == "hdr-1"
    assert headers["x-request-id"] == "hdr-1" and headers["x-trace-id"] == TRACE_ID
    # The next call on the same connection: its own made id, no trace.
    status, body, headers = http_call(connection, http_body(model_repo), {})
    assert status == 200 and len(body["id"]) == 16 and body["id"] != "hdr-1"
    assert headers["x-request-id"] == body["id"] and "x-trace-id" not in headers
    # A refused call carries its ids too (its body has none).
    status, body, headers = http_call(
        connection, http_body(model_repo, "bad-1", columns=1), {"traceparent": TRACEPARENT}
    )
    assert status == 400 and "error" in body
    assert headers["x-request-id"] == "bad-1" and headers["x-trace-id"] == TRACE_ID
    connection.close()


def test_a_refused_grpc_call_is_logged_with_its_ids_and_no_other(
    server: RunningServer, model_repo: Path
) -> None:
    refused = raw_request(model_repo, "refused-g1", columns=1)
    refused.model_version = "1"  # the version asked for (none answered)
    _, code, trailers = grpc_call(server, refused, (("traceparent", TRACEPARENT),))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert trailers["x-request-id"] == "refused-g1" and trailers["x-trace-id"] == TRACE_ID
    (line,) = logged(server, "refused-g1")
    assert line["level"] == "DEBUG" and line["event"].startswith("call refused: INVALID_ARGUMENT")
    assert (line["model"], line["version"], line["trace_id"]) == ("logreg", "1", TRACE_ID)
    # The next call, without ids: its own made id (echoed, as it failed), no trace id.
    _, code, trailers = grpc_call(server, raw_request(model_repo, columns=1), ())
    made = trailers["x-request-id"]
    assert code is grpc.StatusCode.INVALID_ARGUMENT and made != "refused-g1"
    (line,) = logged(server, made)
    assert "trace_id" not in line and line["model"] == "logreg"
    # A call with another trace: that one.
    other = f"00-{OTHER_TRACE}-00f067aa0ba902b7-00"
    grpc_call(server, raw_request(model_repo, "refused-g3", columns=1), (("traceparent", other),))
    (line,) = logged(server, "refused-g3")
    assert line["trace_id"] == OTHER_TRACE


def test_a_refused_http_call_is_logged_with_its_ids_and_no_other(
    server: RunningServer, model_repo: Path
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    status, _, _ = http_call(
        connection,
        http_body(model_repo, columns=1),
        {"x-request-id": "refused-h1", "traceparent": TRACEPARENT},
    )
    assert status == 400
    (line,) = logged(server, "refused-h1")
    assert line["trace_id"] == TRACE_ID and line["model"] == "logreg"
    status, _, headers = http_call(connection, http_body(model_repo, columns=1), {})
    assert status == 400
    (line,) = logged(server, headers["x-request-id"])
    assert "trace_id" not in line
    connection.close()
    # No line of the server names a request id in a line about no call.
    for entry in (json.loads(x) for x in server.log().splitlines() if x.startswith("{")):
        if entry["event"].startswith(("listening", "shutting")):
            assert "request_id" not in entry, entry
