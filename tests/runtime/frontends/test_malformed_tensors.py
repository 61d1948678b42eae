"""Tensor declarations no payload can back get the same answer on every front end: INVALID_ARGUMENT
with the decoder's message naming the input, and no memory allocated for what was declared
(issue 18: rank 65 and ``[0, 2**62, 4]`` were INTERNAL "ValueError"; a 28-byte BYTES request
declaring ``[2**26, 1]`` made the server allocate 512 MiB before noticing)."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import pytest

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode_inputs
from tests.servers import RunningServer

MiB = 1 << 20


def logreg_request(datatype: str, shape: list[int], raw: bytes | None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="logreg")
    request.inputs.add(name="features", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


CASES = {
    "rank-65-raw": logreg_request("FP32", [1] * 65, b"\0" * 4),
    "rank-65-typed": logreg_request("FP32", [1] * 65, None),
    "zero-spanning-raw": logreg_request("FP32", [0, 1 << 62, 4], b""),
    "zero-spanning-typed": logreg_request("FP32", [0, 1 << 62, 4], None),
    "bytes-2-26": logreg_request("BYTES", [1 << 26, 1], struct.pack("<I", 0)),
    "bytes-2-31": logreg_request("BYTES", [1 << 31], struct.pack("<I", 0)),
}


def decoder_message(request: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_inputs(request)
    return info.value.message


def peak_rss(server: RunningServer) -> int:
    """The server process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.parametrize("case", CASES)
def test_a_declaration_no_payload_backs_is_invalid_argument(
    server: RunningServer, case: str
) -> None:
    request = CASES[case]
    before = peak_rss(server)
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
    error = info.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details() == decoder_message(request)
    assert "'features'" in (error.details() or "")
    assert peak_rss(server) - before < 64 * MiB
    with server.client() as client:
        assert client.server_live()
