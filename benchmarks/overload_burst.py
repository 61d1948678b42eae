"""A burst of calls arriving together past the in-flight limit: how many each front end refuses
itself, with RESOURCE_EXHAUSTED and the retry hint, and how many gRPC's own machinery refuses
first (CANCELLED, no hint).

    .venv/bin/python benchmarks/overload_burst.py [--bursts 200,300,1000] [--rounds 2]
                                                  [--front-ends grpcio,native]

Serves the heavy forest of benchmarks/soak.py with ``serve --max-inflight 1``; per burst, one
costly call (200,000 rows) is admitted first and, while its model runs, ``N`` one-row calls are
started at once on the same connection. Prints one JSON line per front end, burst and round: the
answers by status code and how many refusals carried the hint. The grpc.aio event loop takes
calls in one at a time, so a burst waits in gRPC core's queue first (see
``shedding.pending_limits``); the native front end takes calls in on its own threads. Front ends
alternate within each round. A front end that is not built is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(ROOT))

from soak import build_model, metric, start_server  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(rows: int) -> bytes:
    import numpy as np

    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.codecs import encode_inputs

    request = pb.ModelInferRequest(model_name="heavy")
    features = np.random.default_rng(1).normal(size=(rows, 16)).astype(np.float32)
    encode_inputs(request, {"features": features}, raw=True)
    return request.SerializeToString()


def burst(target: str, metrics_port: int, costly: bytes, small: bytes, size: int) -> dict[str, Any]:
    import grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target, options) as channel:
        call = channel.unary_unary(METHOD)
        held = call.future(costly, timeout=300)
        while metric(metrics_port, "edgewise_inflight_requests") < 1:  # its model runs
            if held.done():
                raise RuntimeError("the costly call ended before its model was seen running")
            time.sleep(0.005)
        answers = [call.future(small, timeout=300) for _ in range(size)]
        codes: dict[str, int] = {}
        hinted = 0
        for answer in answers:
            error = answer.exception()
            code = "OK" if error is None else error.code().name
            codes[code] = codes.get(code, 0) + 1
            if error is not None and code == "RESOURCE_EXHAUSTED":
                hinted += "retry-after-ms" in dict(error.trailing_metadata() or ())
        still_running = not held.done()
        held.result()
    return {"codes": codes, "with_hint": hinted, "held_call_still_running": still_running}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", default="200,300,1000", help="burst sizes (200,300,1000)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (2)")
    parser.add_argument("--front-ends", default="grpcio,native", help="grpcio,native")
    args = parser.parse_args()
    sizes = [int(x) for x in args.bursts.split(",") if x]
    front_ends = [x for x in args.front_ends.split(",") if x]
    if not sizes or any(s < 1 for s in sizes) or not set(front_ends) <= {"grpcio", "native"}:
        parser.error("--bursts takes positive sizes, --front-ends grpcio and/or native")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with tempfile.TemporaryDirectory(prefix="burst-") as scratch:
        workdir = Path(scratch)
        build_model(workdir / "repo", rows=1)
        costly, small = request_bytes(200_000), request_bytes(1)
        for round_ in range(args.rounds):
            for front_end in front_ends:
                run_dir = workdir / f"{front_end}-{round_}"
                run_dir.mkdir()
                try:
                    server, port, metrics_port = start_server(
                        workdir / "repo", run_dir, 1, front_end
                    )
                except RuntimeError as exc:
                    line = str(exc).strip().splitlines()[-1:] or ["?"]
                    print(json.dumps({"front_end": front_end, "skipped": line[0]}), flush=True)
                    continue
                try:
                    for size in sizes:
                        result = burst(f"127.0.0.1:{port}", metrics_port, costly, small, size)
                        line_ = {"front_end": front_end, "round": round_, "burst": size, **result}
                        print(json.dumps(line_), flush=True)
                finally:
                    server.terminate()
                    server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
