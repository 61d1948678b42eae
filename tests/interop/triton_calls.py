"""Runs tritonclient (the real third-party client) against a server and prints JSON results.

Run in its own process: tritonclient's generated code and edgewise's both register the
``inference`` protobuf package, so they cannot share one interpreter.

    python tests/interop/triton_calls.py HOST:PORT REQUEST.json
REQUEST.json: {"model": "...", "version": "", "inputs": {name: {"datatype", "data" (.npy path)}},
               "outputs": [names] | null, "id": "..."}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main() -> int:
    url, request_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(request_path).read_text())
    client = triton.InferenceServerClient(url=url)
    result: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(spec["model"], spec.get("version", "")),
    }
    meta = client.get_server_metadata(as_json=True)
    result["server_name"] = meta["name"]
    try:
        model_meta = client.get_model_metadata(spec["model"], spec.get("version", ""), as_json=True)
        result["model_metadata"] = model_meta
    except InferenceServerException as exc:
        result["metadata_error"] = {"status": exc.status(), "message": exc.message()}
    inputs = []
    for name, tensor in spec["inputs"].items():
        array = np.load(tensor["data"], allow_pickle=True)
        infer_input = triton.InferInput(name, list(array.shape), tensor["datatype"])
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    outputs = None
    if spec.get("outputs"):
        outputs = [triton.InferRequestedOutput(name) for name in spec["outputs"]]
    try:
        response = client.infer(
            spec["model"],
            inputs,
            model_version=spec.get("version", ""),
            outputs=outputs,
            request_id=spec.get("id", ""),
        )
    except InferenceServerException as exc:
        result["infer_error"] = {"status": exc.status(), "message": exc.message()}
    else:
        as_json = response.get_response(as_json=True)
        result["response"] = {
            "model_name": as_json["model_name"],
            "model_version": as_json["model_version"],
            "id": as_json.get("id", ""),
            "outputs": {
                out["name"]: response.as_numpy(out["name"]).tolist() for out in as_json["outputs"]
            },
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
