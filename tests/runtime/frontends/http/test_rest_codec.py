"""The REST codec: tritonclient.http's own request bodies (JSON and the binary extension) become
the protobuf requests the gRPC front end would get, the core's responses become bodies
tritonclient.http reads back to the same arrays, and every malformed body is InvalidInput
naming its field."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import np_to_triton_dtype

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.rest_codec import (
    HEADER_LENGTH,
    OutputForms,
    header_length,
    parse_infer,
    render_infer,
)
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode_inputs, encode_outputs

# The protocol's fixed-size datatypes and BYTES, as numpy dtypes tritonclient sends.
DTYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


def triton_body(
    arrays: dict[str, np.ndarray], binary: bool | dict[str, bool], **extra: Any
) -> tuple[bytes, int | None]:
    """The body and JSON length tritonclient.http sends for ``arrays`` (its own encoder)."""
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        as_binary = binary if isinstance(binary, bool) else binary[name]
        tensor.set_data_from_numpy(array, binary_data=as_binary)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(n, binary_data=b) for n, b in extra.pop("outputs", [])]
    generate = triton.InferenceServerClient.generate_request_body
    body, length = generate(inputs, outputs=outputs or None, **extra)
    return body, length


def parse(body: bytes, length: int | None, model: str = "m") -> Any:
    return parse_infer(
        body, header_length(None if length is None else str(length), len(body)), model
    )


def refused(body: bytes | dict[str, Any], length: int | None = None) -> str:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(InvalidInput) as info:
        parse(data, length)
    return info.value.message


def decoded(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    return {item.name: item.array for item in decode_inputs(request)}


# ---- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_arrives_as_tritonclient_sent_it(binary: bool) -> None:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {
        name.lower(): (
            rng.integers(0, 2, (2, 3)) if name == "BOOL" else rng.normal(size=(2, 3)) * 9
        ).astype(dtype)
        for name, dtype in DTYPES.items()
    }
    arrays["text"] = np.array([["a", "bé"], ["", "d\x00"]], dtype=object)
    body, length = triton_body(arrays, binary)
    call = parse(body, length)
    # JSON inputs go typed, binary (or FP16) ones raw: FP16 makes this request raw either way
    assert len(call.request.raw_input_contents) == len(arrays)
    got = decoded(call.request)
    for name, array in arrays.items():
        expected = (
            np.array([v.encode() for v in array.ravel()], dtype=object).reshape(array.shape)
            if array.dtype == object
            else array
        )
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
        assert got[name].dtype == expected.dtype


def test_json_inputs_without_fp16_go_as_typed_contents() -> None:
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([1, 2], np.int64)}
    body, length = triton_body(arrays, False, request_id="r1", timeout=2500)
    call = parse(body, length, "logreg")
    request = call.request
    assert length is None and not request.raw_input_contents
    assert list(request.inputs[0].contents.fp32_contents) == [0, 1, 2, 3, 4, 5]
    assert (request.model_name, request.id, call.timeout_us) == ("logreg", "r1", 2500)
    np.testing.assert_array_equal(decoded(request)["x"], arrays["x"])


def test_binary_and_json_inputs_mixed_all_go_raw() -> None:
    arrays = {"x": np.arange(4, dtype=np.float64), "t": np.array([b"ab", b"c"], dtype=object)}
    body, length = triton_body(arrays, {"x": True, "t": False})
    assert length is not None and length < len(body)
    got = decoded(parse(body, length).request)
    np.testing.assert_array_equal(got["x"], arrays["x"])
    assert list(got["t"]) == [b"ab", b"c"]


def test_nested_json_data_is_read_row_major() -> None:
    body = {
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]
    }
    got = decoded(parse(json.dumps(body).encode(), None).request)
    np.testing.assert_array_equal(got["x"], [[1, 2], [3, 4]])


def test_requested_outputs_and_the_binary_default() -> None:
    arrays = {"x": np.zeros((1, 2), np.float32)}
    body, length = triton_body(arrays, False, outputs=[("label", False), ("probabilities", True)])
    call = parse(body, length)
    assert [o.name for o in call.request.outputs] == ["label", "probabilities"]
    assert not call.outputs.is_binary("label") and call.outputs.is_binary("probabilities")
    body, length = triton_body(arrays, False)  # no outputs named: tritonclient asks all binary
    forms = parse(body, length).outputs
    assert forms.binary_by_default and forms.is_binary("anything")


DROP = object()


def one(**fields: Any) -> dict[str, Any]:
    """A request with one input ``x`` (FP32 ``[1]``, data ``[1]``) changed by ``fields``."""
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1], **fields}
    return {"inputs": [{k: v for k, v in tensor.items() if v is not DROP}]}


X = "inputs[0] ('x')"
SIZE = {"binary_data_size": 4}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": "x"}, "inputs: expected an array"),
        ({}, "inputs: missing"),
        ({"inputs": [], "id": 3}, "id: expected a string"),
        ({"inputs": [], "parameters": []}, "parameters: expected an object"),
        ({"inputs": [], "parameters": {"binary_data_output": 1}}, "parameters.binary_data_output"),
        ({"inputs": [], "parameters": {"timeout": -5}}, "parameters.timeout"),
        ({"inputs": [], "parameters": {"p": [1]}}, "parameters.p"),
        ({"inputs": [7]}, "inputs[0]: expected an object"),
        (one(name=DROP), "inputs[0].name"),
        (one(datatype="F"), f"{X}.datatype: unknown datatype 'F'"),
        (one(datatype=DROP), f"{X}.datatype"),
        (one(shape=[-1]), f"{X}.shape"),
        (one(shape=[1.5]), f"{X}.shape"),
        (one(shape=[True]), f"{X}.shape"),
        (one(shape=[2], data=DROP), f"{X}.data: missing"),
        (one(shape=[2], data=1), f"{X}.data: expected an array"),
        (one(shape=[2]), f"{X}.data: has 1 values, expected 2"),
        (one(shape=[2], data=[1, "2"]), f"{X}.data: FP32 takes numbers, got a string"),
        (one(shape=[2], datatype="INT64", data=[1, 2.5]), f"{X}.data: INT64 takes integers"),
        (one(datatype="INT32", data=[True]), "INT32 takes integers, got a boolean"),
        (one(datatype="BOOL"), "BOOL takes true or false"),
        (one(datatype="BYTES"), "BYTES takes strings"),
        (one(datatype="UINT8", data=[256]), "256 is outside the UINT8 range"),
        (one(datatype="INT64", data=[2**63]), "is outside the INT64 range"),
        (one(datatype="FP64", data=[10**400]), f"{X}.data: a value is outside the FP64 range"),
        (one(shape=[2, 1], data=[[1], 2]), "mixes arrays and values"),
        (one(parameters=SIZE), "has both data and parameters.binary_data_size"),
        (one(data=DROP, parameters={"binary_data_size": -4}), "binary_data_size: expected an"),
        (one(data=DROP, parameters=SIZE), "only 0 bytes of binary data remain"),
        ({"inputs": [], "outputs": {}}, "outputs: expected an array"),
        ({"inputs": [], "outputs": [{"name": ""}]}, "outputs[0].name"),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
            "outputs[0] ('y').parameters.binary_data",
        ),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
            "outputs[0] ('y').parameters.classification",
        ),
    ],
)
def test_a_malformed_body_names_its_field(body: dict[str, Any], field: str) -> None:
    assert field in refused(body)


def test_shapes_past_the_element_limit_are_refused_before_any_data_is_copied() -> None:
    huge = {"name": "x", "shape": [1 << 40], "datatype": "FP32", "data": [1]}
    assert "too large" in refused({"inputs": [huge]})
    rank = {"name": "x", "shape": [1] * 65, "datatype": "FP32", "data": [1]}
    assert "dimensions" in refused({"inputs": [rank]})
    # nested data with more values than the shape: counted level by level, refused
    nested = {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2, 3], [4, 5]]}
    assert "more than 4" in refused({"inputs": [nested]})


def test_body_level_errors() -> None:
    assert "not valid JSON" in refused(b"{", None)
    assert "not UTF-8" in refused(b'{"inputs": ["\xff"]}', None)
    assert "expected a JSON object" in refused(b"[1]", None)
    assert "nests too deeply" in refused(b"[" * 100_000 + b"]" * 100_000, None)
    binary = json.dumps({"inputs": []}).encode()
    assert "but no input has binary_data_size" in refused(binary + b"xx", len(binary))
    for value in ("0", "-1", "abc", "1e3", str(len(binary) + 1)):
        with pytest.raises(InvalidInput) as info:
            header_length(value, len(binary))
        assert HEADER_LENGTH in info.value.message


# ---- responses -----------------------------------------------------------------------------------


def triton_result(body: bytes, length: int | None) -> Any:
    return triton.InferResult.from_response_body(body, header_length=length)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_by_tritonclient(raw: bool, binary: bool) -> None:
    outputs = {
        "label": np.array([2, 0, 1], np.int64),
        "probabilities": np.array([[0.1, 0.9], [0.25, 0.75], [1e-8, 1.0]], np.float32),
        "names": np.array([b"a", b"b\xc3\xa9", b""], dtype=object),
        "flags": np.array([True, False, True]),
    }
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    encode_outputs(response, outputs, raw=raw)
    body, length = render_infer(response, OutputForms(binary, {}))
    assert (length is not None) == binary
    result = triton_result(body, length)
    document = result.get_response()
    assert (document["model_name"], document["model_version"], document["id"]) == ("m", "1", "r")
    for name, array in outputs.items():
        got = result.as_numpy(name)
        if array.dtype == object:
            got = np.array([v if isinstance(v, bytes) else v.encode() for v in got.ravel()], object)
        np.testing.assert_array_equal(got, array, err_msg=name)


def test_a_non_utf8_bytes_output_asks_for_binary_data() -> None:
    response = pb.ModelInferResponse(model_name="m")
    encode_outputs(response, {"b": np.array([b"\xff"], dtype=object)}, raw=True)
    with pytest.raises(InvalidInput, match="binary_data"):
        render_infer(response, OutputForms(False, {}))
    body, length = render_infer(response, OutputForms(False, {"b": True}))
    assert triton_result(body, length).as_numpy("b")[0] == b"\xff"


# ---- round trips -------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, np.ndarray]:
    count = draw(st.integers(1, 3))
    arrays: dict[str, np.ndarray] = {}
    for index in range(count):
        datatype = draw(st.sampled_from([*DTYPES, "BYTES"]))
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
        if datatype == "BYTES":
            items = draw(
                st.lists(
                    st.text(max_size=5), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
                )
            )
            arrays[f"t{index}"] = np.array(items or [], dtype=object).reshape(shape)
        else:
            dtype = np.dtype(DTYPES[datatype])
            elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
            arrays[f"t{index}"] = draw(hnp.arrays(dtype, shape, elements=elements))
    return arrays


@settings(max_examples=150, deadline=None, derandomize=True)
@given(tensors(), st.data())
def test_round_trip_through_tritonclient_bodies(
    arrays: dict[str, np.ndarray], data: st.DataObject
) -> None:
    binary = {name: data.draw(st.booleans()) for name in arrays}
    body, length = triton_body(arrays, binary)
    got = decoded(parse(body, length).request)
    for name, array in arrays.items():
        expected = array
        if array.dtype == object:
            expected = np.array([v.encode("utf-8", "surrogatepass") for v in array.ravel()], object)
            expected = expected.reshape(array.shape)
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
        # and back: the core's answer, rendered, read by tritonclient
        response = pb.ModelInferResponse(model_name="m")
        encode_outputs(response, {name: got[name]}, raw=data.draw(st.booleans()))
        out, out_length = render_infer(response, OutputForms(binary[name], {}))
        back = triton_result(out, out_length).as_numpy(name)
        if array.dtype == object:
            back = np.array(
                [v if isinstance(v, bytes) else v.encode() for v in back.ravel()], object
            )
        np.testing.assert_array_equal(back.reshape(array.shape), expected, err_msg=name)


def test_bytes_elements_keep_their_trailing_nul_bytes() -> None:
    body = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a\u0000"]},
                       {"name": "h", "shape": [1], "datatype": "FP16", "data": [1]}]}  # fmt: skip
    request = parse(json.dumps(body).encode(), None).request  # raw, because of FP16
    assert request.raw_input_contents[0] == struct.pack("<I", 2) + b"a\x00"
