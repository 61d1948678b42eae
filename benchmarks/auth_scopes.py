"""What the scope check adds to a call's token check, in-process: ``AuthInterceptor.authorize``
(token, then the method's scope) against ``AuthInterceptor.check`` (the token alone, as before
scopes), with 1, 10 and 100 tokens in the set (every accepted token is compared on every call,
in constant time), and the audit interceptor's test for a non-control method (a dict lookup).

    .venv/bin/python benchmarks/auth_scopes.py [--calls 20000] [--repeats 5]

Prints one JSON line per case: the median over repeats of the mean seconds per call, and
``ratio`` against ``check`` with the same tokens (the baseline, measured in the same run).
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

from edgewise.runtime.frontends.audit import AUDITED  # noqa: E402
from edgewise.runtime.frontends.security import AuthInterceptor, TokenSet  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for count in (1, 10, 100):
        measure(count, args.calls, args.repeats)
    lookup = timed(lambda: AUDITED.get(MODEL_INFER), args.calls, args.repeats)
    print(json.dumps({"case": "audit test of a non-control call", "seconds_per_call": lookup}))


if __name__ == "__main__":
    main()
