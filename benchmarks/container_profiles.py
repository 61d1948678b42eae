"""The edgewise image per container profile, native front end against grpcio, inside podman.

    sudo .venv/bin/python benchmarks/container_profiles.py [--requests 20000] [--concurrency 8]
        [--profiles edge-tiny edge-small edge-medium]

Builds the image as benchmarks/container_start.py does (containers/build.sh in a private podman,
one small model: tests/models.py's logistic regression), then for each profile and each front
end (``serve --front-end native`` and ``--front-end grpcio``, in the same container limits:
the profile's --cpus and --memory, read-only root, no capability) starts one container and
prints one JSON line:

- ``image_mb``; ``ready_wall_s`` (``podman run`` to health SERVING) and ``ready_cpu_s`` (the
  server's CPU time then, /proc/PID/stat read from this host);
- ``idle_rss_mib`` (the server's VmRSS one second after SERVING) and ``rss_after_mib`` (after
  the requests);
- ``req_per_s`` and ``server_cpu_us_per_request``: REQUESTS ModelInfer calls of one row each,
  CONCURRENCY at a time (closed loop, grpc.aio with pre-serialised requests, in a separate
  process on this host), the server's CPU time over them divided by the calls answered.

With ``--start-rounds N``, first benchmarks/container_start.py's lines (edge-small, both front
ends, medians of N starts) from the same image. Then one ``ratio`` line per profile: native /
grpcio for req/s and CPU per request. One run per case (the issue's measure); the machine is
shared, so CPU per request is the stable figure.
Needs root and podman; says why and exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.container_start import (  # noqa: E402
    TAG,
    Container,
    bench_podman,
    proc_stat,
    rss_bytes,
    start_rounds,
)
from tests.containers.podman import image_size  # noqa: E402

MiB = 1 << 20
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(models: Path) -> bytes:
    """One ModelInferRequest for the logistic regression: one row of its training data."""
    import numpy as np

    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from tests import models as trained

    _, X, _ = trained.train_logreg()
    row = X.to_numpy(np.float32)[:1]
    request = pb.ModelInferRequest(model_name="logreg")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(row.shape))
    tensor.contents.fp32_contents.extend(row.ravel().tolist())
    return request.SerializeToString()


async def _drive(target: str, payload: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out
        remaining = requests
        ok = errors = 0

        async def worker() -> None:
            nonlocal remaining, ok, errors
            while remaining > 0:
                remaining -= 1
                try:
                    await call(payload, timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        await call(payload, timeout=10)  # the connection is up before the clock starts
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"seconds": time.perf_counter() - started, "ok": ok, "errors": errors}


def client_main(target: str, payload_file: str, requests: int, concurrency: int) -> None:
    payload = Path(payload_file).read_bytes()
    print(json.dumps(asyncio.run(_drive(target, payload, requests, concurrency))))


def run_case(
    podman: Any, models: Path, payload: Path, profile: str, front_end: str, args: Any
) -> dict[str, Any]:
    name = f"{profile}-{front_end}"
    with Container(podman, TAG, models, profile, front_end, name) as container:
        start = container.start()
        log = container.logs()
        assert f"(front end: {front_end})" in log, log
        time.sleep(1.0)
        idle_rss = rss_bytes(container.pid)
        cpu_before = proc_stat(container.pid)[1]
        client = subprocess.run(
            [sys.executable, __file__, "--client", container.target, str(payload),
             str(args.requests), str(args.concurrency)],
            check=True, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        cpu_used = proc_stat(container.pid)[1] - cpu_before
        load = json.loads(client.stdout)
        after_rss = rss_bytes(container.pid)
    return {
        "case": "container_profile",
        "profile": profile,
        "front_end": front_end,
        "image_mb": round(image_size(podman, TAG) / 1e6, 1),
        "ready_wall_s": round(start["ready_wall_s"], 3),
        "ready_cpu_s": round(start["ready_cpu_s"], 3),
        "idle_rss_mib": round(idle_rss / MiB, 1),
        "rss_after_mib": round(after_rss / MiB, 1),
        "requests": load["ok"],
        "errors": load["errors"],
        "concurrency": args.concurrency,
        "req_per_s": round(load["ok"] / load["seconds"]),
        "server_cpu_us_per_request": round(cpu_used / max(load["ok"], 1) * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--client":
        target, payload, requests, concurrency = sys.argv[2:6]
        client_main(target, payload, int(requests), int(concurrency))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["edge-tiny", "edge-small", "edge-medium"])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--start-rounds",
        type=int,
        default=0,
        help="also benchmarks/container_start.py's cases (edge-small, both front ends) with "
        "this many rounds, in the same podman (one image build)",
    )
    args = parser.parse_args(argv)
    with bench_podman(build=True) as (podman, models):
        payload = podman.workdir / "request.bin"
        payload.write_bytes(request_bytes(models))
        for front_end in ("native", "grpcio") if args.start_rounds else ():
            row = start_rounds(podman, TAG, models, "edge-small", front_end, args.start_rounds)
            print(json.dumps(row), flush=True)
        for profile in args.profiles:
            rows = {}
            for front_end in ("native", "grpcio"):
                rows[front_end] = run_case(podman, models, payload, profile, front_end, args)
                print(json.dumps(rows[front_end]), flush=True)
            native, grpcio = rows["native"], rows["grpcio"]
            print(
                json.dumps(
                    {
                        "case": "ratio",
                        "profile": profile,
                        "req_per_s_native_over_grpcio": round(
                            native["req_per_s"] / grpcio["req_per_s"], 2
                        ),
                        "cpu_per_request_native_over_grpcio": round(
                            native["server_cpu_us_per_request"]
                            / grpcio["server_cpu_us_per_request"],
                            2,
                        ),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
