"""Structurally valid ModelInferRequest messages with bad contents, built from fuzzer bytes.

Random bytes almost never parse as a request with a tensor in it (0 of 3,000 payloads of up to
200 bytes had an input), so a byte-level fuzzer spends its time in protobuf. Here the bytes
choose, for a model that is served, which of its inputs to send and how to get each one wrong:
the datatype, the shape (negative, zero-spanning, huge, rank over the limit), raw or typed
contents, a payload that is exact, short, long or empty, BYTES length prefixes that overrun or
declare more elements than the payload can hold, values in the wrong typed field, raw and typed
mixed, a raw entry too many or too few, requested outputs that do not exist or repeat. Most
choices keep the rest of the request right, so each message reaches the decoder's checks.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from tests.fuzz.choices import ByteReader

__all__ = ["DIMENSIONS", "InputSpec", "RequestBuilder"]

#: Dimensions a bad shape is made of: edges of the element limit, of int64 and of numpy.
DIMENSIONS = (
    0, 1, 2, 3, 13, 30, -1, -(1 << 63), (1 << 63) - 1, 1 << 26, (1 << 31) - 1, 1 << 31,
    (1 << 31) + 1, 1 << 32, 1 << 62,
)  # fmt: skip
_DATATYPES = (*DATATYPE_TO_NUMPY, "FLOAT", "", "fp32", "BYTES ")
_TYPED_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp32_contents", "fp64_contents", "bytes_contents",
)  # fmt: skip
_LENGTH = struct.Struct("<I")
_MOST = 4096  # the most elements an exact payload is made for


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


class RequestBuilder:
    """``build(data)``: a request for one of ``models`` (name -> input specs and output names),
    wrong in the ways ``data`` chooses."""

    def __init__(self, models: Mapping[str, tuple[Sequence[InputSpec], Sequence[str]]]) -> None:
        self.models = dict(models)

    def build(self, data: bytes) -> pb.ModelInferRequest:
        choose = ByteReader(data)
        names = sorted(self.models)
        model = str(choose.pick(names)) if not choose.chance(16) else "no-such-model"
        inputs, outputs = self.models.get(model, self.models[names[0]])
        request = pb.ModelInferRequest(model_name=model, id="fuzz" if choose.chance(4) else "")
        raw = not choose.chance(3)
        rows = int(choose.pick((1, 2, 3, 0, 7)))
        for spec in self._which_inputs(choose, inputs):
            self._add_input(choose, request, spec, rows, raw)
        self._break_raw_entries(choose, request, raw)
        self._request_outputs(choose, request, outputs)
        return request

    @staticmethod
    def _which_inputs(choose: ByteReader, inputs: Sequence[InputSpec]) -> list[InputSpec]:
        chosen = list(inputs)
        if choose.chance(8) and chosen:
            del chosen[choose.byte() % len(chosen)]  # one missing
        if choose.chance(8):
            chosen.append(InputSpec("stray", "FP32", (-1, 2)))  # one the model does not have
        if choose.chance(16) and chosen:
            chosen.append(chosen[0])  # one given twice
        return chosen

    def _add_input(
        self,
        choose: ByteReader,
        request: pb.ModelInferRequest,
        spec: InputSpec,
        rows: int,
        raw: bool,
    ) -> None:
        datatype = spec.datatype if not choose.chance(6) else str(choose.pick(_DATATYPES))
        shape = self._shape(choose, spec, rows)
        name = spec.name if not choose.chance(32) else ""
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        count = _product(shape)
        mode = choose.byte() % 8  # 0-4: an exact payload; then short, long, empty
        if count is None or count > _MOST:  # a payload for a few elements of a huge shape
            count, mode = choose.byte() % 8, 5 + mode % 3
        if raw:
            request.raw_input_contents.append(self._raw(choose, datatype, count, mode))
            if choose.chance(16):
                tensor.contents.fp32_contents.append(1.0)  # raw and typed mixed
        else:
            self._typed(choose, tensor.contents, datatype, count, mode)

    @staticmethod
    def _shape(choose: ByteReader, spec: InputSpec, rows: int) -> list[int]:
        shape = [rows if dim == -1 else dim for dim in spec.shape]
        if choose.chance(4):
            for _ in range(1 + choose.byte() % 3):
                position = choose.byte() % (len(shape) + 1)
                dim = int(choose.pick(DIMENSIONS))
                if position < len(shape) and not choose.chance(4):
                    shape[position] = dim
                else:
                    shape.insert(position, dim)
        if choose.chance(32):
            shape = [1] * int(choose.pick((33, 64, 65, 1000)))
        return shape

    @staticmethod
    def _raw(choose: ByteReader, datatype: str, count: int, mode: int) -> bytes:
        if datatype == BYTES or datatype not in DATATYPE_TO_NUMPY:
            payload = b"".join(
                _LENGTH.pack(len(item)) + item for item in (b"v%d" % i for i in range(count))
            )
            if mode < 5 and choose.chance(4):  # one length prefix overruns what follows
                payload = _LENGTH.pack(1 << choose.byte() % 32) + payload[_LENGTH.size :]
        else:
            payload = bytes(count * DATATYPE_TO_NUMPY[datatype].itemsize)
            if datatype == "BOOL" and count and choose.chance(4):
                payload = b"\x02" + payload[1:]
        if mode == 5:
            return payload[: max(0, len(payload) - 1 - choose.byte() % 8)]
        if mode == 6:
            return payload + bytes(1 + choose.byte() % 8)
        if mode == 7:
            return b""
        return payload

    @staticmethod
    def _typed(
        choose: ByteReader, contents: pb.InferTensorContents, datatype: str, count: int, mode: int
    ) -> None:
        given = {5: max(0, count - 1), 6: count + 1, 7: 0}.get(mode, count)
        field = {
            "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "FP16": "fp32_contents",
            BYTES: "bytes_contents",
        }.get(datatype, "fp32_contents")  # fmt: skip
        if choose.chance(8):
            field = str(choose.pick(_TYPED_FIELDS))  # the wrong field
        values = getattr(contents, field)
        if field == "bytes_contents":
            values.extend(b"v%d" % i for i in range(given))
        elif field == "bool_contents":
            values.extend([True] * given)
        elif field in ("fp32_contents", "fp64_contents"):
            values.extend([0.5] * given)
        else:  # out of the narrow types' range now and then
            value = int(choose.pick((0, 1, 127, 128, 255, 256, 65535, 65536)))
            values.extend([value] * given)

    @staticmethod
    def _break_raw_entries(choose: ByteReader, request: pb.ModelInferRequest, raw: bool) -> None:
        if not raw or not choose.chance(16):
            return
        entries = request.raw_input_contents
        if entries and choose.chance(2):
            del entries[len(entries) - 1]
        else:
            entries.append(b"\0" * 4)

    @staticmethod
    def _request_outputs(
        choose: ByteReader, request: pb.ModelInferRequest, outputs: Sequence[str]
    ) -> None:
        if not choose.chance(4):
            return
        for _ in range(1 + choose.byte() % 3):
            name = str(choose.pick(outputs)) if not choose.chance(4) else "no-such-output"
            output = request.outputs.add(name=name)
            if choose.chance(4):
                output.parameters["binary_data"].bool_param = True


def _product(shape: Sequence[int]) -> int | None:
    """The element count of a shape that could be sent for real; None for one that could not."""
    if len(shape) > 64 or any(dim < 0 for dim in shape):
        return None
    count = 1
    for dim in shape:
        count *= dim
        if count > 1 << 40:
            return None
    return count
