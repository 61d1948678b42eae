"""tritonclient over TLS (optionally mutual) with a bearer token, in a process of its own
(tritonclient's generated code and edgewise's cannot share one interpreter).

    python tests/interop/triton_secure_calls.py HOST:PORT SPEC.json
SPEC.json: {"ca": path, "cert": path | null, "key": path | null, "token": str | null,
            "model": str, "input": {"name", "datatype", "data" (.npy path)}}
Prints one JSON object: live, model_ready, infer outputs or the error's status and message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main() -> int:
    url, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    client = triton.InferenceServerClient(
        url=url,
        ssl=True,
        root_certificates=spec["ca"],
        private_key=spec.get("key"),
        certificate_chain=spec.get("cert"),
    )
    headers = {"authorization": f"Bearer {spec['token']}"} if spec.get("token") else None
    result: dict[str, object] = {}
    try:
        result["live"] = client.is_server_live(headers=headers)
        result["model_ready"] = client.is_model_ready(spec["model"], headers=headers)
        array = np.load(spec["input"]["data"])
        infer_input = triton.InferInput(
            spec["input"]["name"], list(array.shape), spec["input"]["datatype"]
        )
        infer_input.set_data_from_numpy(array)
        response = client.infer(spec["model"], [infer_input], headers=headers)
        result["outputs"] = {
            output["name"]: response.as_numpy(output["name"]).tolist()
            for output in response.get_response(as_json=True)["outputs"]
        }
    except InferenceServerException as exc:
        result["error"] = {"status": exc.status(), "message": exc.message()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
