"""How the conformance suite talks to a front end: one small caller per wire protocol.

Each caller sends the same logical call (a V2 ModelInfer with given tensors, a token, a
deadline; model metadata; readiness) and reports an :class:`Outcome` in one vocabulary: the gRPC
status name (an HTTP caller maps its status through the server's own table), the message, the
retry hint and the decoded outputs. The suite then asserts the same outcome on every front end.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
import numpy.typing as npt

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc

#: V2 datatype -> numpy dtype of the tensors the suite sends and reads.
DTYPES: Mapping[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    data: npt.NDArray[np.generic]
    shape: Sequence[int] | None = None  # as declared; None: the array's own


@dataclass
class Outcome:
    code: str  # gRPC status name: OK, INVALID_ARGUMENT, ...
    message: str = ""
    retry_after_ms: str | None = None
    outputs: dict[str, npt.NDArray[np.generic]] = field(default_factory=dict)


class Caller(Protocol):
    def infer(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        raw: bool = True,
        outputs: Sequence[str] = (),
        token: str | None = None,
        timeout: float | None = 30.0,
        version: str = "",
    ) -> Outcome: ...

    def infer_body(self, body: bytes, token: str | None = None) -> Outcome:
        """A request body as the wire carries it (possibly malformed)."""
        ...

    def model_metadata(self, model: str, token: str | None = None) -> Outcome: ...

    def server_ready(self, token: str | None = None) -> bool: ...

    def close(self) -> None: ...


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


def _outputs(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[np.generic]]:
    decoded: dict[str, npt.NDArray[np.generic]] = {}
    for index, output in enumerate(response.outputs):
        dtype = DTYPES[output.datatype]
        if response.raw_output_contents:
            array = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        else:
            contents = output.contents
            values = {
                "FP32": contents.fp32_contents,
                "FP64": contents.fp64_contents,
                "INT64": contents.int64_contents,
                "INT32": contents.int_contents,
                "BOOL": contents.bool_contents,
            }[output.datatype]
            array = np.asarray(list(values), dtype=dtype)
        decoded[output.name] = array.reshape(list(output.shape))
    return decoded


def infer_request(
    model: str, inputs: Sequence[Tensor], raw: bool, outputs: Sequence[str], version: str = ""
) -> pb.ModelInferRequest:
    """The V2 protobuf request for these tensors: raw bytes or typed contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for tensor in inputs:
        shape = list(tensor.shape if tensor.shape is not None else tensor.data.shape)
        message = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        flat = tensor.data.reshape(-1)
        if raw:
            request.raw_input_contents.append(flat.tobytes())
        else:
            target = {
                "FP32": message.contents.fp32_contents,
                "FP64": message.contents.fp64_contents,
                "INT64": message.contents.int64_contents,
                "INT32": message.contents.int_contents,
                "BOOL": message.contents.bool_contents,
            }[tensor.datatype]
            target.extend(flat.tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request


class GrpcCaller:
    """gRPC (either gRPC front end): the generated V2 stub over a real channel."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_send_message_length", 64 << 20)]
        self.channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._raw_infer = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda body: body,
            response_deserializer=pb.ModelInferResponse.FromString,
        )

    @staticmethod
    def _failure(exc: grpc.RpcError) -> Outcome:
        assert isinstance(exc, grpc.Call)
        trailers = dict(exc.trailing_metadata() or ())
        hint = trailers.get("retry-after-ms")
        return Outcome(exc.code().name, exc.details() or "", str(hint) if hint else None)

    def infer(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        raw: bool = True,
        outputs: Sequence[str] = (),
        token: str | None = None,
        timeout: float | None = 30.0,
        version: str = "",
    ) -> Outcome:
        request = infer_request(model, inputs, raw, outputs, version)
        try:
            response = self.stub.ModelInfer(request, timeout=timeout, metadata=_metadata(token))
        except grpc.RpcError as exc:
            return self._failure(exc)
        return Outcome("OK", outputs=_outputs(response))

    def infer_body(self, body: bytes, token: str | None = None) -> Outcome:
        try:
            response = self._raw_infer(body, timeout=30, metadata=_metadata(token))
        except grpc.RpcError as exc:
            return self._failure(exc)
        return Outcome("OK", outputs=_outputs(response))

    def model_metadata(self, model: str, token: str | None = None) -> Outcome:
        try:
            response = self.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=model), timeout=30, metadata=_metadata(token)
            )
        except grpc.RpcError as exc:
            return self._failure(exc)
        names = [tensor.name for tensor in response.inputs]
        return Outcome("OK", message=",".join(names))

    def server_ready(self, token: str | None = None) -> bool:
        response = self.stub.ServerReady(
            pb.ServerReadyRequest(), timeout=30, metadata=_metadata(token)
        )
        return bool(response.ready)

    def close(self) -> None:
        self.channel.close()


#: HTTP status -> the gRPC status name the suite speaks (a 503 with a retry hint is shedding).
_HTTP_CODES: Mapping[int, str] = {
    0: "UNAVAILABLE",  # no answer: the connection or the TLS handshake failed
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class HttpCaller:
    """HTTP/REST (the Open Inference Protocol's): JSON tensors for typed calls, the binary-data
    extension (``Inference-Header-Content-Length``) for raw ones; the deadline in the
    ``Request-Timeout-Ms`` header, as the front end documents it."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base.rstrip("/")
        self.context = context

    def _send(
        self,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        token: str | None,
        timeout: float | None = 30.0,
    ) -> tuple[int, dict[str, str], bytes]:
        if token is not None:
            headers = {**headers, "Authorization": f"Bearer {token}"}
        request = urllib.request.Request(
            self.base + path,
            data=body,
            headers=headers,
            method="POST" if body is not None else "GET",
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            # no HTTP exchange at all
            return 0, {}, str(exc).encode()

    @staticmethod
    def _failure(status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
        try:
            message = str(json.loads(body).get("error", ""))
        except ValueError:
            message = body.decode(errors="replace")
        hint = headers.get("retry-after-ms") or headers.get("Retry-After-Ms")
        code = _HTTP_CODES.get(status, f"HTTP {status}")
        if status == 503 and hint is not None:
            code = "RESOURCE_EXHAUSTED"
        return Outcome(code, message, hint)

    def infer(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        raw: bool = True,
        outputs: Sequence[str] = (),
        token: str | None = None,
        timeout: float | None = 30.0,
        version: str = "",
    ) -> Outcome:
        header: dict[str, object] = {"inputs": []}
        binary = b""
        for tensor in inputs:
            shape = list(tensor.shape if tensor.shape is not None else tensor.data.shape)
            entry: dict[str, object] = {
                "name": tensor.name,
                "shape": shape,
                "datatype": tensor.datatype,
            }
            flat = tensor.data.reshape(-1)
            if raw:
                data = flat.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                binary += data
            else:
                entry["data"] = flat.tolist()
            header["inputs"].append(entry)  # type: ignore[attr-defined]
        if outputs:
            header["outputs"] = [
                {"name": name, "parameters": {"binary_data": raw}} for name in outputs
            ]
        elif raw:
            header["parameters"] = {"binary_data_output": True}
        encoded = json.dumps(header).encode()
        headers = {"Content-Type": "application/json"}
        if raw:
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(encoded)),
            }
        if timeout is not None:
            headers["Request-Timeout-Ms"] = str(max(1, round(timeout * 1000)))
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, answer_headers, body = self._send(path, encoded + binary, headers, token)
        if status != 200:
            return self._failure(status, answer_headers, body)
        return Outcome("OK", outputs=_http_outputs(answer_headers, body))

    def infer_body(self, body: bytes, token: str | None = None) -> Outcome:
        headers = {"Content-Type": "application/json"}
        status, answer_headers, answer = self._send("/v2/models/logreg/infer", body, headers, token)
        if status != 200:
            return self._failure(status, answer_headers, answer)
        return Outcome("OK", outputs=_http_outputs(answer_headers, answer))

    def model_metadata(self, model: str, token: str | None = None) -> Outcome:
        status, headers, body = self._send(f"/v2/models/{model}", None, {}, token)
        if status != 200:
            return self._failure(status, headers, body)
        names = [tensor["name"] for tensor in json.loads(body)["inputs"]]
        return Outcome("OK", message=",".join(names))

    def server_ready(self, token: str | None = None) -> bool:
        status, _, _ = self._send("/v2/health/ready", None, {}, token)
        return status == 200

    def close(self) -> None:
        pass


def _http_outputs(headers: Mapping[str, str], body: bytes) -> dict[str, npt.NDArray[np.generic]]:
    length = headers.get("Inference-Header-Content-Length") or headers.get(
        "inference-header-content-length"
    )
    split = int(length) if length is not None else len(body)
    answer = json.loads(body[:split])
    binary = body[split:]
    decoded: dict[str, npt.NDArray[np.generic]] = {}
    offset = 0
    for output in answer["outputs"]:
        dtype = DTYPES[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(binary[offset : offset + size], dtype=dtype)
            offset += size
        else:
            array = np.asarray(output["data"], dtype=dtype)
        decoded[output["name"]] = array.reshape(output["shape"])
    return decoded
