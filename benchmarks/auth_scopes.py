"""What the scope check adds to a call's token check, in-process: ``AuthInterceptor.authorize``
(token, then the method's scope) against ``AuthInterceptor.check`` (the token alone, as before
scopes), with 1, 10 and 100 tokens in the set (every accepted token is compared on every call,
in constant time), and the audit interceptor's test for a non-control method (a dict lookup).
Then the per-credential limits (serving.admission.CallQuotas) beside ``authorize``: with none
configured, and with a rate and a share on the token (``take_quota`` and ``give_back_quota``).

    .venv/bin/python benchmarks/auth_scopes.py [--calls 20000] [--repeats 5]
    .venv/bin/python benchmarks/auth_scopes.py --server [--seconds 4] [--rounds 3]

Prints one JSON line per case: the median over repeats of the mean seconds per call, and
``ratio`` against the baseline measured in the same run (``check`` with the same tokens;
``authorize`` for the limits).

``--server``: real ``edgewise serve --front-end grpcio`` processes on benchmarks/serving.py's
logistic regression (32 features, batch 1), taking turns round by round under one client
thread in this process (ModelInfer back to back): ``tokens`` (a tokens file, no limits: the
baseline), ``limits`` (the same token with ``rate=1000000/s burst=1000000 share=1``: checked on
every call, never refused) and ``no_tokens``, all with ``--max-inflight 64``. Per mode the
median over rounds of the server's CPU per request (user + system, psutil) and its ratio to
``tokens``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgewise.runtime.config.channels import CallLimits  # noqa: E402
from edgewise.runtime.frontends.audit import AUDITED  # noqa: E402
from edgewise.runtime.frontends.security import AuthInterceptor, TokenSet  # noqa: E402
from edgewise.runtime.serving.admission import CallQuotas  # noqa: E402

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def timed(call: Callable[[], object], calls: int, repeats: int) -> float:
    results = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        results.append((time.perf_counter() - began) / calls)
    return statistics.median(results)


def measure(count: int, calls: int, repeats: int) -> None:
    tokens = [f"benchmark-token-{index:04d}-0123456789" for index in range(count)]
    auth = AuthInterceptor(TokenSet(inline=" ".join(tokens)), registry=CollectorRegistry())
    # The last token: every comparison is made whichever matches, so any would do.
    metadata = (("authorization", f"Bearer {tokens[-1]}"),)
    assert auth.authorize(metadata, MODEL_INFER) is None and auth.check(metadata) is None
    baseline = timed(lambda: auth.check(metadata), calls, repeats)
    scoped = timed(lambda: auth.authorize(metadata, MODEL_INFER), calls, repeats)
    for case, seconds in (("check (token only)", baseline), ("authorize (token+scope)", scoped)):
        line = {"case": case, "tokens": count, "seconds_per_call": seconds}
        print(json.dumps({**line, "ratio": seconds / baseline}))


def measure_limits(calls: int, repeats: int) -> None:
    """authorize alone; then with CallQuotas and no limits; then with a rate and a share."""
    token = "benchmark-token-limits-0123456789"
    plain = AuthInterceptor(TokenSet(inline=token), registry=CollectorRegistry())
    metadata = (("authorization", f"Bearer {token}"),)

    def limited(auth: AuthInterceptor) -> Callable[[], object]:
        def call() -> object:
            credential, refusal = auth.admit(metadata, MODEL_INFER)
            assert refusal is None and auth.take_quota(credential, MODEL_INFER) is None
            auth.give_back_quota(credential, MODEL_INFER)
            return credential

        return call

    unlimited = AuthInterceptor(TokenSet(inline=token), registry=CollectorRegistry())
    unlimited.quotas = CallQuotas(CallLimits(), 64, 50, CollectorRegistry())
    with_limits = AuthInterceptor(TokenSet(inline=token), registry=CollectorRegistry())
    with_limits.quotas = CallQuotas(
        CallLimits(rate=1e9, burst=10**9, share=1.0), 64, 50, CollectorRegistry()
    )
    cases = (
        ("authorize (baseline)", lambda: plain.authorize(metadata, MODEL_INFER)),
        ("authorize + limits, none configured", limited(unlimited)),
        ("authorize + limits, rate and share", limited(with_limits)),
    )
    runs: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(repeats):  # the cases take turns: a noisy moment hits each alike
        for name, call in cases:
            runs[name].append(timed(call, calls, 1))
    seconds = {name: statistics.median(values) for name, values in runs.items()}
    base = seconds["authorize (baseline)"]
    for name, value in seconds.items():
        print(json.dumps({"case": name, "seconds_per_call": value, "ratio": value / base}))


def measure_server(seconds: float, rounds: int) -> None:
    import tempfile

    import grpc
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serving  # build_models, Server, cpu_seconds

    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    work = Path(tempfile.mkdtemp(prefix="edgewise-auth-scopes-"))
    serving.build_models(work / "repo")
    token = "benchmark-token-server-0123456789"
    files = {
        "tokens": f"{token} infer,read client\n",
        "limits": f"{token} infer,read client rate=1000000/s burst=1000000 share=1\n",
    }
    modes = ("tokens", "limits", "no_tokens")
    servers = {}
    try:
        for mode in modes:
            extra: list[str] = []
            if mode in files:
                (work / mode).write_text(files[mode])
                extra = ["--tokens-file", str(work / mode)]
            command = [
                sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
                "--repo", str(work / "repo"), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--port-file", str(work / f"{mode}.port"),
                "--front-end", "grpcio", "--max-inflight", "64", *extra,
            ]  # fmt: skip
            servers[mode] = serving.Server(command, work / f"{mode}.port")
        request = pb.ModelInferRequest(model_name="logreg32")
        request.inputs.add(name="features", datatype="FP32", shape=[1, serving.N_FEATURES])
        request.raw_input_contents.append(np.ones(serving.N_FEATURES, np.float32).tobytes())
        results: dict[str, list[float]] = {mode: [] for mode in modes}
        for index in range(rounds):
            turn = modes[index % len(modes) :] + modes[: index % len(modes)]
            for mode in turn:
                server = servers[mode]
                metadata = () if mode == "no_tokens" else (("authorization", f"Bearer {token}"),)
                with grpc.insecure_channel(server.url) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    for _ in range(200):  # warm-up
                        stub.ModelInfer(request, metadata=metadata, timeout=10)
                    cpu = serving.cpu_seconds(server.process.pid)
                    count, stop = 0, time.perf_counter() + seconds
                    while time.perf_counter() < stop:
                        stub.ModelInfer(request, metadata=metadata, timeout=10)
                        count += 1
                    used = serving.cpu_seconds(server.process.pid) - cpu
                results[mode].append(used / count * 1e6)
    finally:
        for server in servers.values():
            server.stop()
    base = statistics.median(results["tokens"])
    for mode in modes:
        value = statistics.median(results[mode])
        line = {
            "case": "server",
            "mode": mode,
            "server_cpu_us_per_req": round(value, 1),
            "cpu_ratio_to_tokens": round(value / base, 3),
            "rounds": [round(v, 1) for v in results[mode]],
            "seconds": seconds,
        }
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server", action="store_true", help="real servers (see the doc)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.server:
        measure_server(args.seconds, args.rounds)
        return
    for count in (1, 10, 100):
        measure(count, args.calls, args.repeats)
    lookup = timed(lambda: AUDITED.get(MODEL_INFER), args.calls, args.repeats)
    print(json.dumps({"case": "audit test of a non-control call", "seconds_per_call": lookup}))
    measure_limits(args.calls, args.repeats)


if __name__ == "__main__":
    main()
