"""Bounded fuzzing (hypothesis) of the REST codec: tritonclient.http's bodies for the real models,
their JSON mutated node by node (wrong types, huge and non-finite numbers, deep nesting, bad
shapes) and their binary part cut or padded, go through :func:`parse_infer` and then the data
plane's decode-and-check. Each must be accepted or refused with a documented error, and neither
step may hold more memory at once than the body's size backs (tests/fuzz/targets.py's ceiling):
a shape the payload does not back must never be allocated."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import np_to_triton_dtype

from edgewise.runtime.errors import EdgewiseError
from edgewise.runtime.frontends.rest_codec import header_length, parse_infer
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.serving.dataplane import DataPlane
from edgewise.runtime.serving.repository import ModelRepository
from tests import models
from tests.fuzz.requests import DIMENSIONS
from tests.fuzz.targets import (
    DECODE_BYTES_PER_WIRE_BYTE,
    DECODE_SLACK_BYTES,
    MemoryCeilingExceeded,
    Mutator,
    traced_peak,
)

FUZZ = settings(
    max_examples=300,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)


class RestTarget:
    """Seed bodies (JSON and binary) for ``logreg`` and ``mixed``, and a real data plane."""

    def __init__(self, repo: Path) -> None:
        repository = ModelRepository(repo)
        self.seeds: list[tuple[str, dict[str, Any], bytes]] = []
        for name in ("logreg", "mixed"):
            repository.load(name)
            _, frame, _ = models.TRAINERS[name]()
            arrays = frame_to_inputs(read_manifest(repo / name / "1"), frame.iloc[:3])
            for binary in (False, True):
                inputs = []
                for key, array in arrays.items():
                    tensor = triton.InferInput(
                        key, list(array.shape), np_to_triton_dtype(array.dtype)
                    )
                    tensor.set_data_from_numpy(array, binary_data=binary)
                    inputs.append(tensor)
                body, length = triton.InferenceServerClient.generate_request_body(inputs)
                head = body if length is None else body[:length]
                self.seeds.append((name, json.loads(head), body[len(head) :]))
        self.dataplane = DataPlane(repository)

    def body(self, data: bytes) -> tuple[str, bytes, str | None]:
        mutator = Mutator(data)
        name, document, binary = self.seeds[mutator.byte() % len(self.seeds)]
        document = mutator.mutate(document)
        if mutator.byte() % 4 == 0:  # a shape made of the element limit's edges
            inputs = document.get("inputs") if isinstance(document, dict) else None
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
                dims = [
                    DIMENSIONS[mutator.byte() % len(DIMENSIONS)]
                    for _ in range(1 + mutator.byte() % 3)
                ]
                document = {**document, "inputs": [{**inputs[0], "shape": dims}, *inputs[1:]]}
        cut = mutator.byte()
        if binary and cut % 3 == 0:
            binary = binary[: len(binary) - 1 - cut % 7]
        elif cut % 5 == 0:
            binary += bytes(1 + cut % 9)
        head = json.dumps(document, allow_nan=True).encode("utf-8", "surrogatepass")
        return name, head + binary, (str(len(head)) if binary else None)

    def __call__(self, data: bytes) -> None:
        name, body, length = self.body(data)
        ceiling = DECODE_SLACK_BYTES + DECODE_BYTES_PER_WIRE_BYTE * len(body)

        def parse() -> Any:
            return parse_infer(body, header_length(length, len(body)), name)

        call, peak = traced_peak(parse)
        if peak > ceiling:
            raise MemoryCeilingExceeded(f"parsing a {len(body)}-byte body held {peak} bytes")
        if call is None:
            return
        prepared, peak = traced_peak(lambda: self.dataplane.prepare(call.request))
        if peak > ceiling:
            raise MemoryCeilingExceeded(f"preparing a {len(body)}-byte body held {peak} bytes")
        if prepared is not None:
            with contextlib.suppress(EdgewiseError):
                self.dataplane.execute(prepared)


@pytest.fixture(scope="module")
def target(model_repo: Path) -> RestTarget:
    return RestTarget(model_repo)


def test_fuzz_rest_bodies(target: RestTarget) -> None:
    @FUZZ
    @given(st.binary(min_size=0, max_size=64))
    def run(data: bytes) -> None:
        target(data)

    run()


def test_the_seeds_are_served_and_mutations_reach_the_checks(target: RestTarget) -> None:
    """Unmutated seeds answer; most mutated bodies get past the JSON parser to be judged."""
    for name, document, binary in target.seeds:
        head = json.dumps(document).encode()
        call = parse_infer(head + binary, len(head) if binary else None, name)
        response = target.dataplane.execute(target.dataplane.prepare(call.request))
        assert response.outputs
    judged = 0
    for seed in range(200):
        data = bytes((seed * 7 + i * 13) % 256 for i in range(32))
        name, body, length = target.body(data)
        try:
            parse_infer(body, header_length(length, len(body)), name)
            judged += 1
        except EdgewiseError as exc:
            judged += "not valid JSON" not in exc.message
    assert judged > 150
