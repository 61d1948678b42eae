"""The HTTP/REST front end of a real server, through tritonclient.http (the third-party client)
and curl: the same answers as the gRPC front end and as onnxruntime on the model itself, the
same statuses (one table), deadlines and request metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.frontends.http import TIMEOUT_HEADER
from edgewise.runtime.frontends.rest_codec import HEADER_LENGTH
from edgewise.runtime.frontends.status import error_code_for, http_status
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models
from tests.prerequisites import unmet
from tests.runtime.frontends.http.conftest import call, metric
from tests.servers import FRONT_ENDS, RunningServer, front_end_args

MODELS = ("logreg", "forest", "mixed")


def rest(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")


def url(server: RunningServer, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def model_inputs(repo: Path, name: str, rows: int = 16) -> dict[str, np.ndarray]:
    _, frame, _ = models.TRAINERS[name]()
    return frame_to_inputs(read_manifest(repo / name / "1"), frame.iloc[:rows])


def triton_inputs(arrays: dict[str, np.ndarray], binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_health_and_metadata_are_the_grpc_front_ends(server: RunningServer) -> None:
    client = rest(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("logreg") and client.is_model_ready("logreg", "1")
    assert not client.is_model_ready("logreg", "7")
    with server.client() as grpc_client:
        metadata = grpc_client.server_metadata()
        assert client.get_server_metadata() == {
            "name": metadata.name,
            "version": metadata.version,
            "extensions": [*metadata.extensions, "binary_tensor_data"],
        }
        for name in MODELS:
            expected = grpc_client.model_metadata(name)
            for version in ("", "1"):
                got = client.get_model_metadata(name, version)
                assert got["name"] == expected.name and got["platform"] == expected.platform
                assert got["versions"] == list(expected.versions)
                for kind in ("inputs", "outputs"):
                    assert got[kind] == [
                        {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in getattr(expected, kind)
                    ]


def onnxruntime_outputs(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model run by onnxruntime itself (its string inputs as text: onnxruntime does not
    take ``bytes`` elements)."""
    feeds = {
        name: np.vectorize(bytes.decode, otypes=[object])(array) if array.dtype == object else array
        for name, array in arrays.items()
    }
    session = ort.InferenceSession(str(path))
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", MODELS)
def test_infer_answers_as_grpc_and_onnxruntime_do(
    server: RunningServer, model_repo: Path, name: str, binary: bool
) -> None:
    arrays = model_inputs(model_repo, name)
    outputs = [
        triton.InferRequestedOutput(o, binary_data=binary) for o in ("label", "probabilities")
    ]
    result = rest(server).infer(
        name, triton_inputs(arrays, binary), outputs=outputs, request_id=f"h-{name}"
    )
    document = result.get_response()
    assert (document["model_name"], document["model_version"], document["id"]) == (
        name, "1", f"h-{name}"
    )  # fmt: skip
    with server.client() as grpc_client:
        expected = grpc_client.infer(name, arrays).outputs
    direct = onnxruntime_outputs(model_repo / name / "1" / "model.onnx", arrays)
    for output in ("label", "probabilities"):
        got = result.as_numpy(output)
        np.testing.assert_array_equal(got, expected[output])  # the same core, the same bits
        np.testing.assert_allclose(got, direct[output], rtol=1e-6, atol=1e-7)
        assert got.dtype == direct[output].dtype


def test_all_outputs_binary_when_none_are_named(server: RunningServer, model_repo: Path) -> None:
    arrays = model_inputs(model_repo, "logreg", rows=3)
    result = rest(server).infer("logreg", triton_inputs(arrays, binary=True))
    document = result.get_response()
    assert [o["name"] for o in document["outputs"]] == ["label", "probabilities"]
    assert all("binary_data_size" in o["parameters"] for o in document["outputs"])
    with server.client() as grpc_client:
        expected = grpc_client.infer("logreg", arrays).outputs
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected["probabilities"])


def test_binary_response_headers(server: RunningServer, model_repo: Path) -> None:
    arrays = model_inputs(model_repo, "logreg", rows=2)
    inputs = triton_inputs(arrays, binary=True)
    body, length = triton.InferenceServerClient.generate_request_body(inputs)
    answer = call(url(server, "/v2/models/logreg/infer"), body, {HEADER_LENGTH: str(length)})
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"] == "application/octet-stream"
    head = int(answer.headers[HEADER_LENGTH])
    sizes = [o["parameters"]["binary_data_size"] for o in json.loads(answer.body[:head])["outputs"]]
    assert head + sum(sizes) == len(answer.body)


def test_bad_input_is_400_naming_the_field_as_grpc_refuses_it(
    server: RunningServer, model_repo: Path
) -> None:
    arrays = model_inputs(model_repo, "logreg", rows=2)
    wrong = {"features": arrays["features"].astype(np.float64)}
    with pytest.raises(InferenceServerException) as http_error:
        rest(server).infer("logreg", triton_inputs(wrong, binary=False))
    with server.client() as grpc_client, pytest.raises(ServerError) as grpc_error:
        grpc_client.infer("logreg", wrong)
    assert grpc_error.value.status is grpc.StatusCode.INVALID_ARGUMENT
    code = error_code_for(grpc_error.value.status)
    assert http_error.value.status() == str(http_status(code)) == "400"
    assert "'features'" in http_error.value.message()
    assert http_error.value.message() == grpc_error.value.details
    # a mistake only the REST form can make, named by its JSON path
    body = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1]}]}
    answer = call(url(server, "/v2/models/logreg/infer"), body)
    assert answer.status == 400
    assert answer.json()["error"].startswith("inputs[0] ('features').data: has 1 values")


def test_unknown_model_is_404(server: RunningServer, model_repo: Path) -> None:
    client = rest(server)
    assert not client.is_model_ready("no-such-model")
    for action in (
        lambda: client.get_model_metadata("no-such-model"),
        lambda: client.infer(
            "no-such-model", triton_inputs(model_inputs(model_repo, "logreg", 1), True)
        ),
    ):
        with pytest.raises(InferenceServerException) as error:
            action()
        assert error.value.status() == "404"
        assert "no-such-model" in error.value.message()


def test_deadlines_from_the_header_and_the_timeout_parameter(
    server: RunningServer, model_repo: Path
) -> None:
    arrays = model_inputs(model_repo, "logreg", rows=2)
    with pytest.raises(InferenceServerException) as error:
        rest(server).infer("logreg", triton_inputs(arrays, True), timeout=0)
    assert error.value.status() == "504"
    assert "deadline" in error.value.message()
    infer = url(server, "/v2/models/logreg/infer")
    body, length = triton.InferenceServerClient.generate_request_body(triton_inputs(arrays, False))
    assert length is None
    assert call(infer, body, {TIMEOUT_HEADER: "0"}).status == 504
    assert call(infer, body, {TIMEOUT_HEADER: "60000"}).status == 200
    bad = call(infer, body, {TIMEOUT_HEADER: "soon"})
    assert bad.status == 400 and TIMEOUT_HEADER in bad.json()["error"]


def test_requests_are_counted_with_the_grpc_labels(server: RunningServer, model_repo: Path) -> None:
    labels = {"model": "logreg", "version": "1"}
    ok = metric(server, "edgewise_requests_total", code="OK", **labels)
    rest(server).infer("logreg", triton_inputs(model_inputs(model_repo, "logreg", 2), True))
    assert metric(server, "edgewise_requests_total", code="OK", **labels) == ok + 1
    refused = metric(server, "edgewise_requests_total", code="INVALID_ARGUMENT", **labels)
    answer = call(url(server, "/v2/models/logreg/versions/1/infer"), b"{not json")
    assert answer.status == 400 and "not valid JSON" in answer.json()["error"]
    assert (
        metric(server, "edgewise_requests_total", code="INVALID_ARGUMENT", **labels) == refused + 1
    )


def curl(*args: str) -> tuple[str, Any]:
    """Run curl; its status code line and the JSON body it printed."""
    if shutil.which("curl") is None:
        unmet("curl is not installed")
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    body, _, status = done.stdout.rpartition("\n")
    return status, json.loads(body)


def test_curl_health_and_json_infer(server: RunningServer, model_repo: Path) -> None:
    assert curl(url(server, "/v2/health/live")) == ("200", {"live": True})
    assert curl(url(server, "/v2/health/ready")) == ("200", {"ready": True})
    features = model_inputs(model_repo, "logreg", rows=2)["features"]
    request = {
        "id": "curl-1",
        "inputs": [
            {"name": "features", "shape": list(features.shape), "datatype": "FP32",
             "data": features.tolist()}  # nested rows, as a person writes them
        ],
        "outputs": [{"name": "label"}],
    }  # fmt: skip
    status, answer = curl(
        "-H", "Content-Type: application/json", "-d", json.dumps(request),
        url(server, "/v2/models/logreg/infer"),
    )  # fmt: skip
    assert status == "200", answer
    with server.client() as grpc_client:
        expected = grpc_client.infer("logreg", {"features": features}).outputs["label"]
    assert answer["id"] == "curl-1"
    assert answer["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": expected.tolist()}
    ]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_busy_http_port_is_one_line_and_leaves_nothing(
    model_repo: Path, tmp_path: Path, front_end: str
) -> None:
    """As a busy gRPC or metrics port (tests/runtime/frontends/test_failed_start.py): exit 1,
    one line naming the address, nothing edgewise made left in TMPDIR."""
    args = front_end_args(front_end)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
             "--repo", str(model_repo), "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--http-port", str(port), *args],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "TMPDIR": str(tmp)},
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    expected = f"cannot bind the HTTP port 127.0.0.1:{port}: the address is already in use"
    assert lines == [f"edgewise serve: error: {expected}"], done.stderr
    assert [p.name for p in tmp.iterdir() if p.name.startswith("edgewise-")] == []
