"""A body that is not the method's request message gets the same answer on every front end:
INVALID_ARGUMENT from the one error table, with a message that names no Python class."""

from __future__ import annotations

import grpc
import pytest

from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from tests.servers import RunningServer

#: A field 1 of the length-delimited kind, with no length: truncated for every message type.
UNDECODABLE = b"\x0a"

INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
METHODS = [
    f"/{service.full_name}/{method.name}"
    for service in (
        INFERENCE,
        *(epb.DESCRIPTOR.services_by_name[name] for name in epb.DESCRIPTOR.services_by_name),
    )
    for method in service.methods
] + ["/grpc.health.v1.Health/Check"]


def answer_to(server: RunningServer, method: str, body: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(server.target) as channel:
        # No serializers: the bytes go out as they are.
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(body, timeout=30)
    return info.value


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[1])
def test_an_undecodable_body_is_invalid_argument(server: RunningServer, method: str) -> None:
    error = answer_to(server, method, UNDECODABLE)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error.details() or ""
    assert "Error" not in details and "<class" not in details, details
    assert "not a valid" in details, details


def test_the_server_serves_on_after_undecodable_bodies(server: RunningServer) -> None:
    for _ in range(3):
        answer_to(server, "/inference.GRPCInferenceService/ModelInfer", UNDECODABLE)
    with server.client() as client:
        assert client.server_live() and client.model_ready("logreg")


def test_an_undecodable_health_watch_is_invalid_argument(server: RunningServer) -> None:
    """A server-streaming method parses its request the same way."""
    with grpc.insecure_channel(server.target) as channel:
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            list(watch(UNDECODABLE, timeout=30))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
