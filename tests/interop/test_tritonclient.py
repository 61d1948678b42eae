"""Interoperability: the real tritonclient[grpc] against a real edgewise server.

tritonclient runs in a subprocess (see triton_calls.py for why)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

SCRIPT = Path(__file__).with_name("triton_calls.py")


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RunningServer]:
    running = start_server(
        model_repo, tmp_path_factory.mktemp("triton"), front_end_args(request.param)
    )
    yield running
    assert running.stop() == 0


def triton_call(
    server: RunningServer,
    tmp_path: Path,
    model: str,
    inputs: dict[str, np.ndarray],
    **extra: object,
) -> dict:
    spec: dict[str, object] = {"model": model, "inputs": {}, **extra}
    for name, array in inputs.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array, allow_pickle=True)
        datatype = (
            "BYTES"
            if array.dtype == object
            else {
                np.dtype(np.float32): "FP32",
                np.dtype(np.float64): "FP64",
                np.dtype(np.int64): "INT64",
            }[array.dtype]
        )
        spec["inputs"][name] = {"datatype": datatype, "data": str(path)}  # type: ignore[index]
    request = tmp_path / "request.json"
    request.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), server.target, str(request)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", ["logreg", "forest", "mixed"])
def test_tritonclient_health_metadata_and_inference(
    server: RunningServer, model_repo: Path, tmp_path: Path, name: str
) -> None:
    estimator, frame, _ = models.TRAINERS[name]()
    rows = frame.iloc[:16]
    manifest = read_manifest(model_repo / name / "1")
    result = triton_call(server, tmp_path, name, frame_to_inputs(manifest, rows), id="t-1")
    assert result["live"] and result["ready"] and result["model_ready"]
    assert result["server_name"] == "edgewise"
    meta = result["model_metadata"]
    assert meta["name"] == name
    assert [i["name"] for i in meta["inputs"]] == [t.name for t in manifest.inputs]
    assert [i["datatype"] for i in meta["inputs"]] == [t.datatype for t in manifest.inputs]
    response = result["response"]
    assert response["model_name"] == name
    assert response["model_version"] == "1"
    assert response["id"] == "t-1"
    np.testing.assert_allclose(
        np.array(response["outputs"]["probabilities"]), estimator.predict_proba(rows), atol=1e-4
    )
    np.testing.assert_array_equal(np.array(response["outputs"]["label"]), estimator.predict(rows))


def test_tritonclient_requested_outputs_and_errors(
    server: RunningServer, model_repo: Path, tmp_path: Path
) -> None:
    features = np.zeros((2, 30), np.float32)
    result = triton_call(server, tmp_path, "logreg", {"features": features}, outputs=["label"])
    assert list(result["response"]["outputs"]) == ["label"]
    missing = triton_call(server, tmp_path, "no-such-model", {"features": features})
    assert missing["model_ready"] is False
    assert missing["metadata_error"]["status"] == "StatusCode.NOT_FOUND"
    assert missing["infer_error"]["status"] == "StatusCode.NOT_FOUND"
    wrong = triton_call(server, tmp_path, "logreg", {"features": features.astype(np.float64)})
    assert wrong["infer_error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'features'" in wrong["infer_error"]["message"]
