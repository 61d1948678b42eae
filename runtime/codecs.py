"""V2 tensors (raw and typed contents) to numpy arrays and back.

Decoding checks everything a malformed request can get wrong (unknown datatype, negative or
overflowing shapes, element counts, byte sizes, raw and typed contents mixed, stray values in the
wrong typed field, BYTES elements whose length prefixes overrun the buffer) and raises
:class:`~edgewise.runtime.errors.InvalidInput` with a message naming the tensor. Raw fixed-size
tensors are decoded without copying (``np.frombuffer`` over the request's bytes, read-only).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgewise.runtime.datatypes import BYTES, DATATYPE_TO_NUMPY, datatype_of
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2 as pb

__all__ = [
    "MAX_ELEMENTS",
    "DecodedInput",
    "decode_bytes_raw",
    "decode_inputs",
    "decode_outputs",
    "encode_bytes_raw",
    "encode_inputs",
    "encode_outputs",
]

# A guard against shapes whose product overflows or asks for absurd allocations: no tensor may
# claim more elements than this, whatever bytes it carries.
MAX_ELEMENTS: Final = 1 << 31

# Which InferTensorContents field carries which datatype, and the value range for the narrow ones.
_TYPED_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
_ALL_TYPED_FIELDS: Final = tuple(sorted(set(_TYPED_FIELD.values())))
_NARROW: Final[dict[str, tuple[int, int]]] = {
    "INT8": (-(1 << 7), (1 << 7) - 1),
    "INT16": (-(1 << 15), (1 << 15) - 1),
    "UINT8": (0, (1 << 8) - 1),
    "UINT16": (0, (1 << 16) - 1),
}
_LENGTH: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class DecodedInput:
    """One decoded input tensor as the client declared it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: npt.NDArray[Any]


def _element_count(name: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count *= dim
        if count > MAX_ELEMENTS:
            raise InvalidInput(
                f"input {name!r}: shape {list(shape)} has more than {MAX_ELEMENTS} elements"
            )
    return count


def decode_bytes_raw(name: str, raw: bytes, count: int) -> npt.NDArray[np.object_]:
    """Split a raw BYTES buffer (4-byte little-endian length, then the bytes) into ``count``
    elements; the buffer must hold exactly that many."""
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    total = len(raw)
    for index in range(count):
        if offset + 4 > total:
            raise InvalidInput(
                f"input {name!r}: raw BYTES content ends after {index} of {count} elements"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidInput(
                f"input {name!r}: BYTES element {index} claims {length} bytes, "
                f"only {total - offset} remain"
            )
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != total:
        raise InvalidInput(
            f"input {name!r}: raw BYTES content has {total - offset} bytes after its "
            f"{count} elements"
        )
    return out


def encode_bytes_raw(array: npt.NDArray[Any]) -> bytes:
    """The raw form of a BYTES tensor: each element as its length (uint32 LE) and its bytes."""
    parts: list[bytes] = []
    for item in array.ravel():
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _decode_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> npt.NDArray[Any]:
    count = _element_count(name, shape)
    if datatype == BYTES:
        return decode_bytes_raw(name, raw, count).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: raw content has {len(raw)} bytes, expected {expected} "
            f"for {datatype} shape {list(shape)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _decode_typed(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> npt.NDArray[Any]:
    count = _element_count(name, shape)
    if datatype == "FP16":
        raise InvalidInput(f"input {name!r}: FP16 is only accepted as raw_input_contents")
    field = _TYPED_FIELD[datatype]
    for other in _ALL_TYPED_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInput(
                f"input {name!r}: datatype {datatype} belongs in contents.{field}, "
                f"but contents.{other} has values"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: contents.{field} has {len(values)} values, expected {count} "
            f"for shape {list(shape)}"
        )
    if datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype in _NARROW:
        low, high = _NARROW[datatype]
        wide = np.array(values, dtype=np.int64)
        if count and (wide.min() < low or wide.max() > high):
            raise InvalidInput(
                f"input {name!r}: a value in contents.{field} is outside the {datatype} range"
            )
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _decode_tensors(
    tensors: Sequence[Any], raw_contents: Sequence[bytes], kind: str
) -> list[DecodedInput]:
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(tensors):
        raise InvalidInput(
            f"raw_{kind}_contents has {len(raw_contents)} entries for {len(tensors)} {kind}s"
        )
    decoded: list[DecodedInput] = []
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise InvalidInput(f"{kind} {index}: the tensor has no name")
        if name in seen:
            raise InvalidInput(f"{kind} {name!r}: given more than once")
        seen.add(name)
        datatype = tensor.datatype
        if datatype not in DATATYPE_TO_NUMPY:
            raise InvalidInput(f"{kind} {name!r}: unknown datatype {datatype!r}")
        shape = tuple(tensor.shape)
        if use_raw:
            if tensor.HasField("contents") and any(
                len(getattr(tensor.contents, f)) for f in _ALL_TYPED_FIELDS
            ):
                raise InvalidInput(
                    f"{kind} {name!r}: has typed contents while raw_{kind}_contents is used; "
                    "raw and typed contents cannot be mixed"
                )
            array = _decode_raw(name, datatype, shape, raw_contents[index])
        else:
            array = _decode_typed(name, datatype, shape, tensor.contents)
        decoded.append(DecodedInput(name=name, datatype=datatype, shape=shape, array=array))
    return decoded


def decode_inputs(request: pb.ModelInferRequest) -> list[DecodedInput]:
    """Decode every input of a request, raw or typed, checking sizes and shapes."""
    return _decode_tensors(request.inputs, request.raw_input_contents, "input")


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    """Decode every output of a response (the client side), raw or typed."""
    decoded = _decode_tensors(response.outputs, response.raw_output_contents, "output")
    return {tensor.name: tensor.array for tensor in decoded}


def _fill_typed(contents: pb.InferTensorContents, datatype: str, array: npt.NDArray[Any]) -> None:
    flat = array.ravel()
    if datatype == BYTES:
        contents.bytes_contents.extend(
            item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in flat
        )
        return
    if datatype == "FP16":
        # Typed contents have no FP16 field; widen to FP32 as the spec allows for responses.
        contents.fp32_contents.extend(flat.astype(np.float32).tolist())
        return
    getattr(contents, _TYPED_FIELD[datatype]).extend(flat.tolist())


def _encode_tensors(
    tensors: Any, raw_contents: Any, arrays: Mapping[str, npt.NDArray[Any]], raw: bool
) -> None:
    for name, array in arrays.items():
        datatype = datatype_of(array.dtype)
        tensor = tensors.add()
        tensor.name = name
        tensor.shape.extend(array.shape)
        if raw:
            tensor.datatype = datatype
            if datatype == BYTES:
                raw_contents.append(encode_bytes_raw(array))
            else:
                contiguous = np.ascontiguousarray(array)
                if contiguous.dtype.byteorder == ">":
                    contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"))
                raw_contents.append(contiguous.tobytes())
        else:
            tensor.datatype = "FP32" if datatype == "FP16" else datatype
            _fill_typed(tensor.contents, datatype, array)


def encode_outputs(
    response: pb.ModelInferResponse,
    outputs: Mapping[str, npt.NDArray[Any]],
    *,
    raw: bool,
) -> None:
    """Append ``outputs`` (name -> array, in order) to a response, raw or typed."""
    _encode_tensors(response.outputs, response.raw_output_contents, outputs, raw)


def encode_inputs(
    request: pb.ModelInferRequest,
    inputs: Mapping[str, npt.NDArray[Any]],
    *,
    raw: bool = True,
) -> None:
    """Append ``inputs`` (name -> array) to a request (the client side), raw or typed.

    Typed FP16 does not exist in the protocol: FP16 inputs must be sent raw.
    """
    if not raw and any(a.dtype == np.float16 for a in inputs.values()):
        raise InvalidInput("FP16 inputs can only be sent as raw contents")
    _encode_tensors(request.inputs, request.raw_input_contents, inputs, raw)
