from __future__ import annotations

import contextlib
import math
import random
import struct

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.datatypes import DATATYPE_TO_NUMPY, datatype_of
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.admission import estimate_request_bytes
from edgewise.runtime.serving.codecs import (
    MAX_ELEMENTS,
    MAX_RANK,
    decode_bytes_raw,
    decode_inputs,
    decode_outputs,
    element_count,
    encode_bytes_raw,
    encode_inputs,
    encode_outputs,
    plan_inputs,
)
from tests.fuzz.requests import InputSpec, RequestBuilder
from tests.fuzz.targets import DECODE_BYTES_PER_WIRE_BYTE, DECODE_SLACK_BYTES, traced_peak

NUMERIC = [d for d in DATATYPE_TO_NUMPY if d != "BYTES"]


def sample_array(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        flat = np.empty(int(np.prod(shape)), dtype=object)
        flat[:] = [f"v{i}".encode() * (i % 3) for i in range(flat.size)]
        return flat.reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def round_trip_request(arrays: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(model_name="m")
    encode_inputs(request, arrays, raw=raw)
    wire = pb.ModelInferRequest.FromString(request.SerializeToString())
    return {t.name: t.array for t in decode_inputs(wire)}


# FP16 exists only as raw contents in the protocol (its typed refusal is tested below).
@pytest.mark.parametrize(
    ("datatype", "raw"),
    [(d, r) for d in [*NUMERIC, "BYTES"] for r in (True, False) if not (d == "FP16" and not r)],
)
def test_every_datatype_round_trips(datatype: str, raw: bool) -> None:
    array = sample_array(datatype, (3, 4))
    decoded = round_trip_request({"x": array}, raw)["x"]
    assert decoded.shape == (3, 4)
    if datatype == "BYTES":
        assert decoded.tolist() == array.tolist()
    else:
        assert decoded.dtype == DATATYPE_TO_NUMPY[datatype]
        np.testing.assert_array_equal(decoded, array)


def test_typed_fp16_input_is_refused_with_the_tensor_name() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="half", datatype="FP16", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match=r"'half'.*FP16"):
        decode_inputs(request)
    with pytest.raises(InvalidInput, match="FP16"):
        encode_inputs(pb.ModelInferRequest(), {"h": np.zeros(2, np.float16)}, raw=False)


def test_raw_decoding_does_not_copy() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    request = pb.ModelInferRequest()
    encode_inputs(request, {"x": array})
    decoded = decode_inputs(request)[0].array
    assert not decoded.flags.owndata
    assert not decoded.flags.writeable
    # The array is a view over the bytes object protobuf hands out: no copy of our own.
    base = decoded
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("raw", [True, False])
def test_outputs_round_trip_in_the_requested_form(raw: bool) -> None:
    outputs = {
        "label": np.array([0, 1, 1], dtype=np.int64),
        "probabilities": np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], dtype=np.float32),
        "names": np.array(["a", "bb", ""], dtype=object),
    }
    response = pb.ModelInferResponse()
    encode_outputs(response, outputs, raw=raw)
    assert bool(response.raw_output_contents) is raw
    decoded = decode_outputs(pb.ModelInferResponse.FromString(response.SerializeToString()))
    np.testing.assert_array_equal(decoded["label"], outputs["label"])
    np.testing.assert_array_equal(decoded["probabilities"], outputs["probabilities"])
    assert decoded["names"].tolist() == [b"a", b"bb", b""]


def test_bytes_raw_format_is_length_prefixed_little_endian() -> None:
    encoded = encode_bytes_raw(np.array([b"ab", b""], dtype=object))
    assert encoded == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert decode_bytes_raw("t", encoded, 2).tolist() == [b"ab", b""]


def raw_request(
    datatype: str, shape: list[int], raw: bytes, name: str = "x"
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (raw_request("FP32", [2, 2], b"\0" * 15), r"'x'.*15 bytes, expected 16"),
        (raw_request("FP64", [-1, 2], b""), r"'x'.*negative"),
        (raw_request("FLOAT", [1], b"\0" * 4), r"'x'.*unknown datatype 'FLOAT'"),
        (raw_request("INT32", [1 << 20, 1 << 20], b""), r"'x'.*more than"),
        (raw_request("BYTES", [2], struct.pack("<I", 4) + b"abcd"), r"'x'.*ends after 1 of 2"),
        (raw_request("BYTES", [2], struct.pack("<I", 1) + b"a"), r"'x'.*5 bytes, too few for 2"),
        (raw_request("BYTES", [1], struct.pack("<I", 9) + b"a"), r"'x'.*claims 9 bytes"),
        (raw_request("BYTES", [1], struct.pack("<I", 1) + b"ab"), r"'x'.*1 bytes after"),
    ],
)
def test_malformed_raw_inputs_name_the_tensor(request_: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_inputs(request_)


def test_mixed_raw_and_typed_contents_are_refused() -> None:
    request = raw_request("FP32", [1], b"\0" * 4)
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match=r"'x'.*cannot be mixed"):
        decode_inputs(request)


def test_raw_entry_count_must_match_inputs() -> None:
    request = raw_request("FP32", [1], b"\0" * 4)
    request.inputs.add(name="y", datatype="FP32", shape=[1])
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        decode_inputs(request)


def test_typed_contents_checks() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="t", datatype="INT8", shape=[2])
    tensor.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidInput, match=r"'t'.*outside the INT8 range"):
        decode_inputs(request)
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="t", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match=r"'t'.*2 values, expected 3"):
        decode_inputs(request)
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="t", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    tensor.contents.int64_contents.append(1)
    with pytest.raises(InvalidInput, match=r"'t'.*contents.int64_contents has values"):
        decode_inputs(request)


def test_duplicate_and_unnamed_inputs() -> None:
    request = raw_request("FP32", [1], b"\0" * 4)
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInput, match=r"'x'.*more than once"):
        decode_inputs(request)
    with pytest.raises(InvalidInput, match="input 0: the tensor has no name"):
        decode_inputs(raw_request("FP32", [1], b"\0" * 4, name=""))


def test_datatype_table_is_consistent() -> None:
    for name, dtype in DATATYPE_TO_NUMPY.items():
        assert datatype_of(dtype) == name
    assert datatype_of(np.dtype(">f4")) == "FP32"
    with pytest.raises(ValueError, match="complex"):
        datatype_of(np.dtype(np.complex64))
    assert MAX_ELEMENTS > 0


# ---- fuzzing: whatever bytes arrive, decoding either works or raises InvalidInput ----------------

tensor_strategy = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4),
        "datatype": st.sampled_from([*DATATYPE_TO_NUMPY, "FLOAT", ""]),
        "shape": st.lists(st.integers(-3, 1 << 33), max_size=4),
        "fp32": st.lists(st.floats(width=32), max_size=6),
        "ints": st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=6),
        "bytes": st.lists(st.binary(max_size=6), max_size=4),
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.lists(tensor_strategy, max_size=3),
    raws=st.lists(st.binary(max_size=40), max_size=3),
)
def test_fuzz_decoder_only_raises_invalid_input(tensors: list[dict], raws: list[bytes]) -> None:
    request = pb.ModelInferRequest()
    for spec in tensors:
        tensor = request.inputs.add(
            name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
        )
        tensor.contents.fp32_contents.extend(spec["fp32"])
        tensor.contents.int_contents.extend(spec["ints"])
        tensor.contents.bytes_contents.extend(spec["bytes"])
    request.raw_input_contents.extend(raws)
    try:
        decoded = decode_inputs(request)
    except InvalidInput as exc:
        assert exc.message
        return
    for tensor in decoded:
        assert tensor.array.shape == tensor.shape


@settings(max_examples=300, deadline=None)
@given(
    shape_of=st.binary(max_size=64),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=2),
)
def test_fuzz_wire_bytes(shape_of: bytes, edits: list[tuple[int, int]]) -> None:
    """Bytes on the wire: a structurally valid request (tests/fuzz/requests.py) with a few bytes
    overwritten, so most still parse and reach the decoder (arbitrary bytes reached a tensor in
    none of 3,000 payloads). Protobuf refuses them or the decoder answers InvalidInput."""
    payload = bytearray(RequestBuilder(FUZZ_MODELS).build(shape_of).SerializeToString())
    for position, value in edits:
        if payload:
            payload[position % len(payload)] = value
    try:
        request = pb.ModelInferRequest.FromString(bytes(payload))
    except DecodeError:  # gRPC's own parse refuses it before our code runs
        return
    with contextlib.suppress(InvalidInput):
        for tensor in decode_inputs(request):
            assert tensor.array.shape == tensor.shape


# ---- declarations a payload cannot back: refused before anything is allocated (issue 18) --------

RANK_65 = [1] * 65
ZERO_SPANNING = [0, 1 << 62, 4]


def typed_request(datatype: str, shape: list[int], name: str = "x") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (raw_request("FP32", RANK_65, b"\0" * 4), r"'x'.*65 dimensions.*at most"),
        (typed_request("FP32", RANK_65), r"'x'.*65 dimensions.*at most"),
        (raw_request("BYTES", RANK_65, b"\0" * 4), r"'x'.*65 dimensions.*at most"),
        (raw_request("FP32", ZERO_SPANNING, b""), r"'x'.*non-zero dimensions.*more than"),
        (typed_request("FP32", ZERO_SPANNING), r"'x'.*non-zero dimensions.*more than"),
        (raw_request("BYTES", ZERO_SPANNING, b""), r"'x'.*non-zero dimensions.*more than"),
        (typed_request("BYTES", [1 << 62, 0]), r"'x'.*non-zero dimensions.*more than"),
        (raw_request("INT64", [0, -1], b""), r"'x'.*negative"),
    ],
    ids=["rank65-raw", "rank65-typed", "rank65-bytes", "zero-raw", "zero-typed", "zero-bytes",
         "zero-typed-bytes", "zero-negative"],
)  # fmt: skip
def test_shapes_numpy_cannot_hold_are_invalid_input(
    request_: pb.ModelInferRequest, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_inputs(request_)


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(-2, 1 << 33) | st.sampled_from([0, 1, 2]), max_size=MAX_RANK))
def test_element_count_follows_the_product_of_the_shape(shape: list[int]) -> None:
    """The one-pass count against math.prod: a negative dimension is refused, the non-zero
    dimensions may multiply to at most MAX_ELEMENTS, and a zero makes the tensor empty."""
    non_zero = math.prod(dim for dim in shape if dim != 0)
    if any(dim < 0 for dim in shape):
        with pytest.raises(InvalidInput, match=r"'x'.*negative dimension"):
            element_count("x", shape)
    elif non_zero > MAX_ELEMENTS:
        with pytest.raises(InvalidInput, match=rf"'x': shape \[.*too large.*{MAX_ELEMENTS}"):
            element_count("x", shape)
    else:
        assert element_count("x", shape) == math.prod(shape)


def test_a_huge_rank_is_refused_with_a_short_message() -> None:
    """The message names the rank, not a shape of a million dimensions."""
    with pytest.raises(InvalidInput) as info:
        decode_inputs(raw_request("BYTES", [3] * 1_000_000, b"\0" * 4))
    assert "1000000 dimensions" in info.value.message
    assert len(info.value.message) < 200


@pytest.mark.parametrize(
    "request_",
    [
        # 35 bytes on the wire declaring 2**26 elements: 512 MiB of object pointers before.
        raw_request("BYTES", [1 << 26, 1], struct.pack("<I", 0)),
        raw_request("BYTES", [1 << 31], struct.pack("<I", 0) * 3),
        raw_request("BYTES", [1 << 26], b""),
    ],
    ids=["2^26", "2^31", "empty"],
)
def test_a_bytes_declaration_the_payload_cannot_hold_allocates_nothing(
    request_: pb.ModelInferRequest,
) -> None:
    with pytest.raises(InvalidInput, match=r"'x'.*too few for .* elements"):
        decode_inputs(request_)
    assert traced_peak(lambda: decode_inputs(request_))[1] < 64 * 1024


def test_typed_bytes_must_carry_exactly_the_declared_count_before_allocating() -> None:
    request = typed_request("BYTES", [1 << 26, 1])
    request.inputs[0].contents.bytes_contents.append(b"a")
    with pytest.raises(InvalidInput, match=r"'x'.*1 values, expected 67108864"):
        decode_inputs(request)
    assert traced_peak(lambda: decode_inputs(request))[1] < 64 * 1024


def test_raw_bool_bytes_other_than_0_and_1_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"'x'.*BOOL.*0 or 1"):
        decode_inputs(raw_request("BOOL", [3], b"\x00\x01\x02"))
    decoded = decode_inputs(raw_request("BOOL", [2], b"\x00\x01"))[0].array
    assert decoded.tolist() == [False, True]


def test_output_errors_name_outputs() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="y", datatype="FP32", shape=[-1])
    with pytest.raises(InvalidInput, match=r"^output 'y'.*negative"):
        decode_outputs(response)


# ---- structured fuzzing: valid messages with bad contents, under a memory ceiling ---------------

FUZZ_MODELS = {
    "one": ([InputSpec("x", "FP32", (-1, 3))], ["y"]),
    "three": (
        [
            InputSpec("f", "FP32", (-1, 2)),
            InputSpec("i", "INT64", (-1, 1)),
            InputSpec("s", "BYTES", (-1, 1)),
        ],
        ["label", "probabilities"],
    ),
}


def reaches_the_tensor_checks(request: pb.ModelInferRequest) -> bool:
    """The decoder got past the message-level checks (an input, each named, a known datatype,
    one raw entry each) to a tensor's shape and contents."""
    try:
        plan_inputs(request)
    except InvalidInput as exc:
        message = exc.message
        return not (
            message.startswith("raw_input_contents")
            or "the tensor has no name" in message
            or "unknown datatype" in message
        )
    return len(request.inputs) > 0


def test_structured_requests_reach_the_decoder() -> None:
    """Random bytes reach a tensor in none of 3,000 payloads (test_fuzz_wire_bytes); the
    structured builder in most of them."""
    builder = RequestBuilder(FUZZ_MODELS)
    rng = random.Random(18)
    payloads = [rng.randbytes(rng.randrange(200)) for _ in range(3000)]
    wire = [pb.ModelInferRequest.FromString(builder.build(p).SerializeToString()) for p in payloads]
    reached = sum(reaches_the_tensor_checks(request) for request in wire)
    assert reached >= 0.8 * len(payloads)
    accepted = sum(_decodes(request) for request in wire)
    assert 0.1 * len(payloads) <= accepted <= 0.6 * len(payloads)  # right and wrong ones both


def _decodes(request: pb.ModelInferRequest) -> bool:
    try:
        decode_inputs(request)
    except InvalidInput:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_fuzz_structured_requests_stay_under_the_memory_ceiling(data: bytes) -> None:
    """Decoding a request holds no more memory than its bytes back (the 28-byte request that
    allocated 512 MiB), and no more than admission priced when it is accepted."""
    wire = RequestBuilder(FUZZ_MODELS).build(data).SerializeToString()
    request = pb.ModelInferRequest.FromString(wire)
    decoded, peak = traced_peak(lambda: decode_inputs(request))
    assert peak <= DECODE_SLACK_BYTES + DECODE_BYTES_PER_WIRE_BYTE * len(wire)
    if decoded is not None:
        assert peak <= estimate_request_bytes(request) + DECODE_SLACK_BYTES
        for tensor in decoded:
            assert tensor.array.shape == tensor.shape
