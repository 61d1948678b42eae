"""What splits, shadows and labels add to a request, in-process: the data plane's prepare (which
picks a version) and the core's after-answer offer, with no rollout, under a 90/10 split, and
with a shadow (the offer only queues; the worker's run is off the request path).

    .venv/bin/python benchmarks/rollout_overhead.py [--calls 20000] [--repeats 5]

Prints one JSON line per case: the median over repeats of the mean seconds per call of
``DataPlane.prepare`` (decode and checks included: the split's pick is a part of it) and of
``Rollouts.offer``, with ``prepare_ratio`` against the same calls with no rollout (the
baseline, measured in the same run). Model: a logistic regression on scikit-learn's breast
cancer data (30 inputs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from edgewise.runtime.serving.codecs import encode_inputs  # noqa: E402
from edgewise.runtime.serving.dataplane import DataPlane  # noqa: E402
from edgewise.runtime.serving.repository import ModelRepository  # noqa: E402
from edgewise.runtime.serving.rollout import Rollouts  # noqa: E402
from edgewise.runtime.serving.shadow import Shadow  # noqa: E402


def timed(call: Callable[[], object], calls: int, repeats: int) -> float:
    results = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        results.append((time.perf_counter() - began) / calls)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from tests.models import convert_model
    from tests.runtime.rollout.helpers import add_version, rows

    with tempfile.TemporaryDirectory(prefix="edgewise-rollout-") as temporary:
        repo = Path(temporary)
        convert_model("logreg", repo)
        add_version(repo, "good", 2)
        repository = ModelRepository(repo)
        repository.load("logreg", 1, make_default=True, persist=False)
        repository.load("logreg", 2)
        registry = CollectorRegistry()
        dataplane = DataPlane(repository)
        request = pb.ModelInferRequest(model_name="logreg", id="r")
        encode_inputs(request, rows(repo / "logreg" / "1", 1), raw=True)
        prepared = dataplane.prepare(request)
        response = dataplane.execute(prepared)

        def measure(case: str, rollouts: Rollouts | None) -> dict[str, float]:
            dataplane.rollouts = rollouts
            prepare = timed(lambda: dataplane.prepare(request), args.calls, args.repeats)
            offer = (
                timed(lambda: rollouts.offer(prepared, response), args.calls, args.repeats)
                if rollouts is not None
                else 0.0
            )
            return {"case": case, "prepare_seconds": prepare, "offer_seconds": offer}

        baseline = measure("no rollout", None)
        print(json.dumps({**baseline, "prepare_ratio": 1.0}), flush=True)
        rollouts = Rollouts(repository, registry, lambda: Shadow(repository, registry, 10**9))
        repository.labels = rollouts.label
        empty = measure("rollouts on, none set", rollouts)
        rollouts.set_split("logreg", [("1", 90), ("2", 10)], "request_id")
        split = measure("split 90/10 sticky by id", rollouts)
        rollouts.set_split("logreg", [])
        rollouts.set_shadow("logreg", "2", 1.0)
        assert rollouts.shadow is not None
        rollouts.shadow.close()  # its worker stopped: the offers queue, nothing runs them
        shadow = measure("shadow rate 1 (queued only)", rollouts)
        for result in (empty, split, shadow):
            ratio = result["prepare_seconds"] / baseline["prepare_seconds"]
            print(json.dumps({**result, "prepare_ratio": round(ratio, 3)}), flush=True)


if __name__ == "__main__":
    main()
