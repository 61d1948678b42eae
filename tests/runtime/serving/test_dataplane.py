"""DataPlane.execute: the monitor's statistics of a request answered on the event loop are taken
after the answer, on the loop's next turn; everywhere else before it."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.reference_profile import read_profile
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.dataplane import DataPlane, PreparedRequest
from edgewise.runtime.serving.model import LoadedModel, SessionSettings, load_model
from edgewise.runtime.serving.monitor import ModelMonitor, MonitorConfig
from edgewise.runtime.serving.repository import ModelRepository
from tests.fuzz.targets import traced_peak


@pytest.fixture
def monitored(model_repo: Path) -> LoadedModel:
    folder = model_repo / "logreg" / "1"
    model = load_model("logreg", 1, folder, SessionSettings())
    profile = read_profile(folder, read_manifest(folder))
    assert profile is not None
    model.monitor = ModelMonitor("logreg", "1", profile, MonitorConfig(window_rows=0))
    return model


def request(model: LoadedModel, rows: int) -> PreparedRequest:
    features = np.random.default_rng(rows).normal(10, 5, size=(rows, 30)).astype(np.float32)
    return PreparedRequest(model, {"features": features}, None, True, "", rows)


def monitored_rows(model: LoadedModel) -> int:
    assert model.monitor is not None
    return model.monitor.current.rows


def test_off_the_loop_statistics_are_taken_before_the_answer(monitored: LoadedModel) -> None:
    response = DataPlane.execute(request(monitored, 3))
    assert response.outputs[0].shape == [3]
    assert monitored_rows(monitored) == 3


def test_on_the_loop_statistics_follow_the_answer_on_the_next_turn(
    monitored: LoadedModel,
) -> None:
    async def scenario() -> tuple[int, int]:
        DataPlane.execute(request(monitored, 4), on_loop=True)
        DataPlane.execute(request(monitored, 2), on_loop=True)
        before = monitored_rows(monitored)  # answered, not yet counted
        await asyncio.sleep(0)  # one turn of the loop
        return before, monitored_rows(monitored)

    before, after = asyncio.run(scenario())
    assert (before, after) == (0, 6)


def test_a_failing_statistics_update_is_logged_and_the_answer_stands(
    monitored: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    assert monitored.monitor is not None

    def broken(feeds: object, outputs: object = None) -> None:
        raise RuntimeError("statistics broke")

    monitored.monitor.observe = broken  # type: ignore[method-assign]

    async def scenario() -> int:
        response = DataPlane.execute(request(monitored, 1), on_loop=True)
        await asyncio.sleep(0)
        return len(response.raw_output_contents)

    with caplog.at_level(logging.ERROR, logger="edgewise.runtime.serving.dataplane"):
        assert asyncio.run(scenario()) == 2
    assert "monitoring statistics of an answered request failed" in caplog.text
    assert "statistics broke" in caplog.text


# ---- validate, then allocate: a refused request decodes nothing (issue 18) ----------------------


def bytes_request(name: str, elements: int) -> pb.ModelInferRequest:
    """``elements`` empty BYTES elements in raw form: 4 bytes each on the wire."""
    request = pb.ModelInferRequest(model_name="logreg")
    request.inputs.add(name=name, datatype="BYTES", shape=[elements, 1])
    request.raw_input_contents.append(struct.pack("<I", 0) * elements)
    return request


@pytest.mark.parametrize(
    ("name", "message"),
    [("features", r"'features': datatype BYTES does not match"), ("stray", r"'stray' is not an")],
)
def test_inputs_the_model_refuses_are_not_decoded(
    model_repo: Path, name: str, message: str
) -> None:
    """Each object of a decoded BYTES tensor costs 8 bytes of array for 4 bytes of payload: a
    request the model refuses must be refused before that, not after."""
    repository = ModelRepository(model_repo)
    repository.load("logreg")
    plane = DataPlane(repository)
    request = bytes_request(name, 250_000)
    with pytest.raises(InvalidInput, match=message):
        plane.prepare(request)
    payload = len(request.raw_input_contents[0])
    # Reading the payload out of the message copies it (upb): that much, not the 2x of decoding.
    assert traced_peak(lambda: plane.prepare(request))[1] < payload + 64 * 1024


def test_a_missing_input_is_refused_before_the_others_are_decoded(model_repo: Path) -> None:
    repository = ModelRepository(model_repo)
    repository.load("mixed")
    plane = DataPlane(repository)
    request = bytes_request("alcohol_level", 250_000)
    request.model_name = "mixed"
    with pytest.raises(InvalidInput, match="missing input"):
        plane.prepare(request)
    payload = len(request.raw_input_contents[0])
    # Reading the payload out of the message copies it (upb): that much, not the 2x of decoding.
    assert traced_peak(lambda: plane.prepare(request))[1] < payload + 64 * 1024


def mixed_request(rows: int, outputs: list[str]) -> pb.ModelInferRequest:
    """A valid request for ``mixed`` (empty strings in both string columns), plus ``outputs``."""
    request = pb.ModelInferRequest(model_name="mixed")
    request.inputs.add(name="features", datatype="FP32", shape=[rows, 13])
    request.raw_input_contents.append(b"\0" * (rows * 13 * 4))
    for name in ("alcohol_level", "color_band"):
        request.inputs.add(name=name, datatype="BYTES", shape=[rows, 1])
        request.raw_input_contents.append(struct.pack("<I", 0) * rows)
    for name in outputs:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize(
    ("outputs", "message"),
    [(["nope"], r"requested output 'nope' is not an output"), (["label", "label"], "more than")],
)
def test_bad_requested_outputs_are_refused_before_decoding(
    model_repo: Path, outputs: list[str], message: str
) -> None:
    repository = ModelRepository(model_repo)
    repository.load("mixed")
    plane = DataPlane(repository)
    assert plane.prepare(mixed_request(2, ["label"])).feeds["color_band"].shape == (2, 1)
    request = mixed_request(100_000, outputs)
    with pytest.raises(InvalidInput, match=message):
        plane.prepare(request)
    payload = sum(len(raw) for raw in request.raw_input_contents)
    assert traced_peak(lambda: plane.prepare(request))[1] < payload + 64 * 1024
