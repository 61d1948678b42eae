"""The Open Inference Protocol's HTTP/REST bodies <-> the V2 protobuf messages the core serves.

The HTTP front end (``http_front``) is a translator: an inference request's JSON body, with or
without the binary tensor data extension, becomes the same :class:`pb.ModelInferRequest` a gRPC
client would have sent, and the core's :class:`pb.ModelInferResponse` becomes JSON (and binary
data where the client asked for it). Everything a request can get wrong that only exists in the
REST form (the JSON itself, a field of the wrong JSON type, ``data`` that does not fill its
``shape``, a ``binary_data_size`` past the body's end) is an
:class:`~edgewise.runtime.errors.InvalidInput` naming the field, raised here; everything else
(unknown datatypes, shapes against the model, value ranges) is left to the core's checks, so
both front ends refuse the same request with the same message.

The binary extension (``Inference-Header-Content-Length``): the body is the JSON object's
``header_length`` bytes, then each binary input's bytes in input order, each input saying its
size in ``parameters.binary_data_size``. An output is answered as binary data when its
``parameters.binary_data`` is true, or by default when the request's ``binary_data_output``
parameter is. Sizes are checked before anything is allocated: a shape's element count is
checked against :data:`~edgewise.runtime.serving.codecs.MAX_ELEMENTS` before JSON ``data`` is
flattened (flattening stops one value past it), and the binary sizes must add up to the bytes
received.

JSON data and binary data go to the core in the protobuf's two forms: typed contents when every
input is JSON (the lists go in as they are), ``raw_input_contents`` when any input is binary (a
protobuf request cannot mix them, so JSON inputs are packed too) or FP16 (typed contents have no
FP16 field).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Final, NoReturn

import numpy as np

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import TYPED_FIELD, decode_bytes_raw, element_count

__all__ = [
    "BINARY_EXTENSION",
    "HEADER_LENGTH",
    "InferCall",
    "OutputForms",
    "error_body",
    "header_length",
    "model_metadata_body",
    "model_ready_body",
    "parse_infer",
    "render_infer",
    "server_metadata_body",
]

#: The header that says how many bytes of the body are the JSON object (the binary extension).
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
#: The name of the binary tensor data extension in the server metadata.
BINARY_EXTENSION: Final = "binary_tensor_data"

_BINARY_SIZE: Final = "binary_data_size"
_BINARY_DATA: Final = "binary_data"
_BINARY_OUTPUT: Final = "binary_data_output"
_TIMEOUT: Final = "timeout"  # Triton's per-request timeout, microseconds (tritonclient's timeout=)

_INT_RANGE: Final[dict[str, tuple[int, int]]] = {
    **{f"INT{bits}": (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": (0, (1 << bits) - 1) for bits in (8, 16, 32, 64)},
}
_FLOATS: Final = frozenset({"FP16", "FP32", "FP64"})
_LENGTH: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class OutputForms:
    """How the client wants each output back: binary data or JSON ``data``."""

    binary_by_default: bool
    binary: Mapping[str, bool]  # the outputs the request names, with their own choice

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_by_default)


@dataclass(frozen=True, slots=True)
class InferCall:
    """A translated inference request: the protobuf for the core, and what the answer needs."""

    request: pb.ModelInferRequest
    outputs: OutputForms
    timeout_us: int | None  # the request's ``timeout`` parameter, if it has one


# ---- requests ------------------------------------------------------------------------------------


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON part's size from the ``Inference-Header-Content-Length`` header's ``value``
    (None: the whole body is JSON)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 19:  # isdigit: no sign, no spaces, no underscores
        raise InvalidInput(f"header {HEADER_LENGTH}: {value!r} is not a byte count")
    length = int(text)
    if length == 0 or length > body_size:
        raise InvalidInput(
            f"header {HEADER_LENGTH}: {length} bytes of JSON, but the body has {body_size} bytes"
        )
    return length


def parse_infer(
    body: bytes, json_length: int | None, model_name: str, model_version: str = ""
) -> InferCall:
    """Translate an inference request's body (``json_length``: from :func:`header_length`)."""
    view = memoryview(body)
    document = _load_json(body if json_length is None else body[:json_length])
    if not isinstance(document, dict):
        raise InvalidInput(f"request body: expected a JSON object, got {_kind(document)}")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = document.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidInput(f"id: expected a string, got {_kind(request_id)}")
        request.id = request_id
    parameters = _parameters(document.get("parameters"), "parameters")
    binary_default = _flag(parameters, _BINARY_OUTPUT, "parameters")
    timeout_us = _timeout(parameters)
    passed = {key: value for key, value in parameters.items() if key != _BINARY_OUTPUT}
    _put_parameters(request.parameters, passed, "parameters")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        what = "missing" if inputs is None else f"expected an array, got {_kind(inputs)}"
        raise InvalidInput(f"inputs: {what}")
    binary = view[json_length:] if json_length is not None else view[:0]
    tensors = [_input(index, item) for index, item in enumerate(inputs)]
    _attach_binary(tensors, binary)
    if any(t.raw is not None or t.datatype == "FP16" for t in tensors):
        for tensor in tensors:
            request.raw_input_contents.append(tensor.packed())
            tensor.declare(request.inputs.add())
    else:
        for tensor in tensors:
            tensor.fill_typed(request.inputs.add())
    forms = _requested_outputs(document.get("outputs"), request)
    return InferCall(request, OutputForms(binary_default, forms), timeout_us)


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"request body: the JSON is not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"request body: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise InvalidInput("request body: the JSON nests too deeply") from None


def _kind(value: object) -> str:
    """The JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parameters(value: object, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: expected an object, got {_kind(value)}")
    return value


def _flag(parameters: Mapping[str, object], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}.{key}: expected true or false, got {_kind(value)}")
    return value


def _timeout(parameters: Mapping[str, object]) -> int | None:
    value = parameters.get(_TIMEOUT)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"parameters.{_TIMEOUT}: expected a number of microseconds (an integer >= 0), "
            f"got {value!r}"
        )
    return value


def _put_parameters(target: Any, parameters: Mapping[str, object], where: str) -> None:
    """Copy JSON parameters into a protobuf ``map<string, InferParameter>``."""
    for key, value in parameters.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if -(1 << 63) <= value < (1 << 63):
                slot.int64_param = value
            elif 0 <= value < (1 << 64):
                slot.uint64_param = value
            else:
                raise InvalidInput(f"{where}.{key}: {value} does not fit 64 bits")
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise InvalidInput(
                f"{where}.{key}: expected a boolean, number or string, got {_kind(value)}"
            )


@dataclass(slots=True)
class _Input:
    """One input as the JSON declares it, its payload not yet in protobuf form."""

    index: int
    name: str
    datatype: str
    shape: list[int]
    count: int
    parameters: dict[str, object]
    values: list[Any] | None  # JSON data, flattened and type-checked
    binary_size: int | None
    raw: bytes | None = None  # its binary data, once attached

    @property
    def where(self) -> str:
        return f"inputs[{self.index}] ({self.name!r})"

    def declare(self, tensor: pb.ModelInferRequest.InferInputTensor) -> None:
        tensor.name = self.name
        tensor.datatype = self.datatype
        tensor.shape.extend(self.shape)
        _put_parameters(tensor.parameters, self.parameters, f"{self.where}.parameters")

    def fill_typed(self, tensor: pb.ModelInferRequest.InferInputTensor) -> None:
        self.declare(tensor)
        assert self.values is not None
        values: Sequence[Any] = self.values
        if self.datatype == BYTES:
            values = [item.encode("utf-8", "surrogatepass") for item in values]
        try:
            getattr(tensor.contents, TYPED_FIELD[self.datatype]).extend(values)
        except OverflowError:  # an integer no double holds, given for a float datatype
            raise InvalidInput(
                f"{self.where}.data: a value is outside the {self.datatype} range"
            ) from None

    def packed(self) -> bytes:
        """The input's bytes in the binary extension's (and raw_input_contents') layout."""
        if self.raw is not None:
            return self.raw
        assert self.values is not None
        if self.datatype == BYTES:
            return _pack_bytes(item.encode("utf-8", "surrogatepass") for item in self.values)
        try:
            return np.asarray(self.values, dtype=DATATYPE_TO_NUMPY[self.datatype]).tobytes()
        except OverflowError:
            raise InvalidInput(
                f"{self.where}.data: a value is outside the {self.datatype} range"
            ) from None


def _input(index: int, item: object) -> _Input:
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise InvalidInput(f"{where}: expected an object, got {_kind(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}.name: expected a non-empty string, got {_kind(name)}")
    where = f"{where} ({name!r})"
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"{where}.datatype: expected a string, got {_kind(datatype)}")
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidInput(f"{where}.datatype: unknown datatype {datatype!r}")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape[:64]):
        raise InvalidInput(f"{where}.shape: expected an array of integers >= 0")
    count = element_count(name, shape, "input")  # rank and size, before any data is looked at
    parameters = _parameters(item.get("parameters"), f"{where}.parameters")
    binary_size = parameters.pop(_BINARY_SIZE, None)
    data = item.get("data")
    if binary_size is not None:
        if type(binary_size) is not int or binary_size < 0:
            raise InvalidInput(f"{where}.parameters.{_BINARY_SIZE}: expected an integer >= 0")
        if data is not None:
            raise InvalidInput(f"{where}: has both data and parameters.{_BINARY_SIZE}")
        return _Input(index, name, datatype, shape, count, parameters, None, binary_size)
    if data is None:
        raise InvalidInput(f"{where}.data: missing (or send it as binary data)")
    values = _flatten(data, count, shape, f"{where}.data")
    _check_values(values, datatype, f"{where}.data")
    return _Input(index, name, datatype, shape, count, parameters, values, None)


def _flatten(data: object, count: int, shape: list[int], where: str) -> list[Any]:
    """The ``count`` scalars of ``data`` (an array, nested or flat), in row-major order. A
    nested array is counted level by level before the next level is built: one with more
    values than its shape is refused without a copy of them."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: expected an array, got {_kind(data)}")
    level: list[Any] = data
    while level and type(level[0]) is list:
        if not all(type(item) is list for item in level):
            raise InvalidInput(f"{where}: mixes arrays and values at one level")
        total = 0
        for item in level:
            total += len(item)
            if total > count:
                break
        if total > count:
            level = level[:0]
            _wrong_count(where, f"more than {count}", count, shape)
        level = list(chain.from_iterable(level))
    if len(level) != count:
        _wrong_count(where, str(len(level)), count, shape)
    return level


def _wrong_count(where: str, given: str, count: int, shape: list[int]) -> NoReturn:
    raise InvalidInput(f"{where}: has {given} values, expected {count} for shape {shape}")


def _check_values(values: list[Any], datatype: str, where: str) -> None:
    """Every value is of the JSON type ``datatype`` takes (and integers within its range)."""
    types = set(map(type, values))
    if datatype == BYTES:
        ok = types <= {str}
        expected = "strings"
    elif datatype == "BOOL":
        ok = types <= {bool}
        expected = "true or false"
    elif datatype in _FLOATS:
        ok = types <= {int, float}
        expected = "numbers"
    else:
        ok = types <= {int}
        expected = "integers"
        if ok and values:
            low, high = _INT_RANGE[datatype]
            if min(values) < low or max(values) > high:
                bad = next(v for v in values if v < low or v > high)
                raise InvalidInput(f"{where}: {bad} is outside the {datatype} range")
    if not ok:
        bad = next(v for v in values if not _fits(v, datatype))
        raise InvalidInput(f"{where}: {datatype} takes {expected}, got {_kind(bad)}")


def _fits(value: object, datatype: str) -> bool:
    if datatype == BYTES:
        return type(value) is str
    if datatype == "BOOL":
        return type(value) is bool
    if datatype in _FLOATS:
        return type(value) in (int, float)
    return type(value) is int


def _attach_binary(tensors: list[_Input], binary: memoryview) -> None:
    """Give each binary input its slice of the bytes after the JSON; they must add up."""
    offset = 0
    total = len(binary)
    for tensor in tensors:
        if tensor.binary_size is None:
            continue
        end = offset + tensor.binary_size
        if end > total:
            raise InvalidInput(
                f"{tensor.where}.parameters.{_BINARY_SIZE}: {tensor.binary_size} bytes, but "
                f"only {total - offset} bytes of binary data remain after the JSON"
            )
        tensor.raw = binary[offset:end].tobytes()
        offset = end
    if offset != total:
        what = "no input has" if offset == 0 else f"the inputs' {_BINARY_SIZE} add up to {offset}"
        raise InvalidInput(
            f"request body: {total} bytes of binary data after the JSON, but {what}"
            + (f" {_BINARY_SIZE}" if offset == 0 else "")
        )


def _requested_outputs(value: object, request: pb.ModelInferRequest) -> dict[str, bool]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise InvalidInput(f"outputs: expected an array, got {_kind(value)}")
    forms: dict[str, bool] = {}
    for index, item in enumerate(value):
        where = f"outputs[{index}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where}: expected an object, got {_kind(item)}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}.name: expected a non-empty string, got {_kind(name)}")
        where = f"{where} ({name!r})"
        parameters = _parameters(item.get("parameters"), f"{where}.parameters")
        if "binary_data" in parameters:
            forms[name] = _flag(parameters, _BINARY_DATA, f"{where}.parameters")
            parameters = {k: v for k, v in parameters.items() if k != _BINARY_DATA}
        if parameters.get("classification", 0):
            raise InvalidInput(f"{where}.parameters.classification: not supported by edgewise")
        output = request.outputs.add(name=name)
        _put_parameters(output.parameters, parameters, f"{where}.parameters")
    return forms


# ---- responses -----------------------------------------------------------------------------------


def render_infer(response: pb.ModelInferResponse, forms: OutputForms) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON part's length (the
    ``Inference-Header-Content-Length`` to send)."""
    document: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        document["model_version"] = response.model_version
    if response.id:
        document["id"] = response.id
    raw_contents = response.raw_output_contents
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(response.outputs):
        raw = raw_contents[index] if raw_contents else None
        shape = list(tensor.shape)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
        if forms.is_binary(tensor.name):
            blob = raw if raw is not None else _typed_bytes(tensor)
            entry["parameters"] = {_BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(tensor, raw)
        outputs.append(entry)
    document["outputs"] = outputs
    head = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join((head, *blobs)), len(head)


def _typed_bytes(tensor: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    values = getattr(tensor.contents, TYPED_FIELD[tensor.datatype])
    if tensor.datatype == BYTES:
        return _pack_bytes(values)
    return np.asarray(values, dtype=DATATYPE_TO_NUMPY[tensor.datatype]).tobytes()


def _pack_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary layout: each one's length (uint32 LE), then its bytes."""
    return b"".join(chain.from_iterable((_LENGTH.pack(len(item)), item) for item in items))


def _json_values(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> list[Any]:
    datatype = tensor.datatype
    if raw is None:
        values: list[Any] = list(getattr(tensor.contents, TYPED_FIELD[datatype]))
    elif datatype == BYTES:
        count = math.prod(tensor.shape)
        values = list(decode_bytes_raw(tensor.name, raw, count, "output"))
    else:
        values = np.frombuffer(raw, dtype=DATATYPE_TO_NUMPY[datatype]).tolist()
    if datatype == BYTES:
        try:
            return [item.decode("utf-8") for item in values]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {tensor.name!r}: a BYTES element is not UTF-8 text, which JSON cannot "
                f"carry; ask for it with parameters.{_BINARY_DATA} true"
            ) from None
    return values


def server_metadata_body(metadata: pb.ServerMetadataResponse, extensions: Sequence[str]) -> bytes:
    """The server metadata object; ``extensions``: the HTTP front end's own, added."""
    return _dumps(
        {
            "name": metadata.name,
            "version": metadata.version,
            "extensions": [*metadata.extensions, *extensions],
        }
    )


def model_metadata_body(metadata: pb.ModelMetadataResponse) -> bytes:
    def tensors(items: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return _dumps(
        {
            "name": metadata.name,
            "versions": list(metadata.versions),
            "platform": metadata.platform,
            "inputs": tensors(metadata.inputs),
            "outputs": tensors(metadata.outputs),
        }
    )


def model_ready_body(name: str, ready: bool) -> bytes:
    return _dumps({"name": name, "ready": ready})


def error_body(message: str) -> bytes:
    """The protocol's error object."""
    return _dumps({"error": message})


def _dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
