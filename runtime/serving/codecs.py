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
from typing import Any, Final, NoReturn, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY, datatype_of
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb

__all__ = [
    "MAX_ELEMENTS",
    "MAX_RANK",
    "TYPED_FIELD",
    "DecodedInput",
    "TensorPlan",
    "decode",
    "decode_bytes_raw",
    "decode_inputs",
    "decode_outputs",
    "element_count",
    "encode_bytes_raw",
    "encode_inputs",
    "encode_outputs",
    "not_valid",
    "plan_inputs",
]

# A guard against shapes whose product overflows or asks for absurd allocations: no tensor may
# claim more elements than this, whatever bytes it carries.
MAX_ELEMENTS: Final = 1 << 31
# Numpy 1 shapes at most 32 dimensions (numpy 2: 64); no model takes more.
MAX_RANK: Final = 32

#: Which InferTensorContents field carries which datatype (every front end's typed contents).
TYPED_FIELD: Final[dict[str, str]] = {
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
_ALL_TYPED_FIELDS: Final = tuple(sorted(set(TYPED_FIELD.values())))
# The value range of the narrow integer types (carried in wider typed fields).
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


def element_count(name: str, shape: Sequence[int], kind: str = "input") -> int:
    """The number of elements ``shape`` declares, after checking numpy can hold it: at most
    :data:`MAX_RANK` dimensions, none negative, and the non-zero ones multiplying to at most
    :data:`MAX_ELEMENTS` (a zero does not make ``[0, 2**62, 4]`` an array numpy can shape).
    Reads no more than ``MAX_RANK`` dimensions, whatever the request declares; one pass over
    them (this runs for every input of every request)."""
    rank = len(shape)
    if rank > MAX_RANK:
        raise InvalidInput(
            f"{kind} {name!r}: shape has {rank} dimensions; at most {MAX_RANK} are accepted"
        )
    span = 1  # the product of the non-zero dimensions
    empty = False
    for dim in shape:
        if dim > 1:
            span *= dim
            if span > MAX_ELEMENTS:
                _raise_bad_shape(name, shape, kind)
        elif dim < 0:
            _raise_bad_shape(name, shape, kind)
        elif dim == 0:
            empty = True
    return 0 if empty else span


def _raise_bad_shape(name: str, shape: Sequence[int], kind: str) -> NoReturn:
    """The message for a shape :func:`element_count` refuses, formatted only when refusing."""
    dims = [int(dim) for dim in shape]
    if any(dim < 0 for dim in dims):
        raise InvalidInput(f"{kind} {name!r}: shape {dims} has a negative dimension")
    what = "non-zero dimensions multiply" if 0 in dims else "dimensions multiply"
    raise InvalidInput(
        f"{kind} {name!r}: shape {dims} is too large: its {what} to more than "
        f"{MAX_ELEMENTS} elements"
    )


def _check_bytes_raw_size(name: str, raw: bytes, count: int, kind: str) -> None:
    if len(raw) < _LENGTH.size * count:
        raise InvalidInput(
            f"{kind} {name!r}: raw BYTES content has {len(raw)} bytes, too few for {count} "
            f"elements (each takes at least its {_LENGTH.size}-byte length)"
        )


def decode_bytes_raw(
    name: str, raw: bytes, count: int, kind: str = "input"
) -> npt.NDArray[np.object_]:
    """Split a raw BYTES buffer (4-byte little-endian length, then the bytes) into ``count``
    elements; the buffer must hold exactly that many. Nothing is allocated for a ``count`` the
    buffer cannot hold."""
    _check_bytes_raw_size(name, raw, count, kind)
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    total = len(raw)
    for index in range(count):
        if offset + 4 > total:
            raise InvalidInput(
                f"{kind} {name!r}: raw BYTES content ends after {index} of {count} elements"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidInput(
                f"{kind} {name!r}: BYTES element {index} claims {length} bytes, "
                f"only {total - offset} remain"
            )
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != total:
        raise InvalidInput(
            f"{kind} {name!r}: raw BYTES content has {total - offset} bytes after its "
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


@dataclass(slots=True)
class TensorPlan:
    """A tensor whose declaration (name, datatype, shape) and payload size have been checked
    against each other; nothing is allocated until :meth:`decode`. Checks that need to read
    every element (BYTES length prefixes, value ranges) are left to :meth:`decode`, whose
    allocations the payload's size bounds. Not frozen: one is built per input of every request,
    and a frozen dataclass's ``__init__`` costs an ``object.__setattr__`` per field."""

    kind: str
    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    raw: bytes | None  # None: typed contents
    contents: pb.InferTensorContents | None

    def decode(self) -> npt.NDArray[Any]:
        if self.raw is not None:
            return self._decode_raw(self.raw)
        assert self.contents is not None
        return self._decode_typed(self.contents)

    def _decode_raw(self, raw: bytes) -> npt.NDArray[Any]:
        if self.datatype == BYTES:
            return decode_bytes_raw(self.name, raw, self.count, self.kind).reshape(self.shape)
        if self.datatype == "BOOL" and raw and np.frombuffer(raw, dtype=np.uint8).max() > 1:
            raise InvalidInput(
                f"{self.kind} {self.name!r}: raw BOOL content has a byte other than 0 or 1"
            )
        return np.frombuffer(raw, dtype=DATATYPE_TO_NUMPY[self.datatype]).reshape(self.shape)

    def _decode_typed(self, contents: pb.InferTensorContents) -> npt.NDArray[Any]:
        datatype, count = self.datatype, self.count
        field = TYPED_FIELD[datatype]
        values = getattr(contents, field)
        if datatype == BYTES:
            array = np.empty(count, dtype=object)
            array[:] = list(values)
            return array.reshape(self.shape)
        dtype = DATATYPE_TO_NUMPY[datatype]
        if datatype in _NARROW:
            low, high = _NARROW[datatype]
            wide = np.array(values, dtype=np.int64)
            if count and (wide.min() < low or wide.max() > high):
                raise InvalidInput(
                    f"{self.kind} {self.name!r}: a value in contents.{field} is outside the "
                    f"{datatype} range"
                )
            return wide.astype(dtype).reshape(self.shape)
        return np.array(values, dtype=dtype).reshape(self.shape)


def _check_raw_size(
    kind: str, name: str, datatype: str, shape: tuple[int, ...], count: int, raw: bytes
) -> None:
    if datatype == BYTES:
        _check_bytes_raw_size(name, raw, count, kind)
        return
    expected = count * DATATYPE_TO_NUMPY[datatype].itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"{kind} {name!r}: raw content has {len(raw)} bytes, expected {expected} "
            f"for {datatype} shape {list(shape)}"
        )


def _check_typed_count(
    kind: str,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    contents: pb.InferTensorContents,
) -> None:
    if datatype == "FP16":
        raise InvalidInput(f"{kind} {name!r}: FP16 is only accepted as raw_{kind}_contents")
    field = TYPED_FIELD[datatype]
    for other in _ALL_TYPED_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInput(
                f"{kind} {name!r}: datatype {datatype} belongs in contents.{field}, "
                f"but contents.{other} has values"
            )
    given = len(getattr(contents, field))
    if given != count:
        raise InvalidInput(
            f"{kind} {name!r}: contents.{field} has {given} values, expected {count} "
            f"for shape {list(shape)}"
        )


def _has_typed_values(tensor: Any) -> bool:
    return bool(tensor.HasField("contents")) and any(
        len(getattr(tensor.contents, field)) for field in _ALL_TYPED_FIELDS
    )


def _plan_tensor(kind: str, index: int, tensor: Any, raw: bytes | None) -> TensorPlan:
    name = tensor.name
    if not name:
        raise InvalidInput(f"{kind} {index}: the tensor has no name")
    datatype = tensor.datatype
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidInput(f"{kind} {name!r}: unknown datatype {datatype!r}")
    shape = tuple(tensor.shape)
    count = element_count(name, shape, kind)
    if raw is None:
        _check_typed_count(kind, name, datatype, shape, count, tensor.contents)
        return TensorPlan(kind, name, datatype, shape, count, None, tensor.contents)
    if _has_typed_values(tensor):
        raise InvalidInput(
            f"{kind} {name!r}: has typed contents while raw_{kind}_contents is used; "
            "raw and typed contents cannot be mixed"
        )
    _check_raw_size(kind, name, datatype, shape, count, raw)
    return TensorPlan(kind, name, datatype, shape, count, raw, None)


def _plan_tensors(
    tensors: Sequence[Any], raw_contents: Sequence[bytes], kind: str
) -> list[TensorPlan]:
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(tensors):
        raise InvalidInput(
            f"raw_{kind}_contents has {len(raw_contents)} entries for {len(tensors)} {kind}s"
        )
    plans: list[TensorPlan] = []
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        plan = _plan_tensor(kind, index, tensor, raw_contents[index] if use_raw else None)
        if plan.name in seen:
            raise InvalidInput(f"{kind} {plan.name!r}: given more than once")
        seen.add(plan.name)
        plans.append(plan)
    return plans


def plan_inputs(request: pb.ModelInferRequest) -> list[TensorPlan]:
    """Check every input's declaration against its payload, allocating nothing: decode each
    with :meth:`TensorPlan.decode` once the caller has checked them against the model too."""
    return _plan_tensors(request.inputs, request.raw_input_contents, "input")


def decode_inputs(request: pb.ModelInferRequest) -> list[DecodedInput]:
    """Decode every input of a request, raw or typed, checking sizes and shapes (every input's
    declaration first, then the contents)."""
    return [
        DecodedInput(name=plan.name, datatype=plan.datatype, shape=plan.shape, array=plan.decode())
        for plan in plan_inputs(request)
    ]


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    """Decode every output of a response (the client side), raw or typed."""
    plans = _plan_tensors(response.outputs, response.raw_output_contents, "output")
    return {plan.name: plan.decode() for plan in plans}


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
    getattr(contents, TYPED_FIELD[datatype]).extend(flat.tolist())


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


class _Message(Protocol):
    @classmethod
    def FromString(cls, body: bytes) -> Any: ...


M = TypeVar("M", bound=_Message)


def decode(message_type: type[M], body: bytes) -> M:
    """``body`` parsed as a ``message_type``, or InvalidInput (the status every front end gives
    a body that is not the method's request message; see frontends/wire.py)."""
    try:
        message: M = message_type.FromString(body)
    except DecodeError:
        raise InvalidInput(not_valid(message_type)) from None
    return message


def not_valid(message_type: object) -> str:
    """The message of a body that does not parse as ``message_type``."""
    name = getattr(getattr(message_type, "DESCRIPTOR", None), "name", "request message")
    return f"the request is not a valid {name}"
