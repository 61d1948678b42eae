"""onnxruntime's C API session (ort_capi.py, run without the GIL) against its Python
``InferenceSession.run``, per call, in one run: prints ONE JSON line per case.

    .venv/bin/python benchmarks/ort_capi.py [--rounds 7] [--calls 2000] [--models logreg,forest]

Needs the C API module (``make native``, or ``python -m edgewise.runtime.frontends.native.build
--ort``). Models: the suite's ``logreg`` (StandardScaler + LogisticRegression, 30 features) and
``forest`` (30 trees, depth 6, 13 features), converted as edgewise converts them; both sessions
are made from the same model bytes with edgewise's default session options (one intra-op
thread, so the whole run is on the calling thread).

A case is (model, rows): the first 1 or 32 rows of the model's training data, as the float32
``features`` tensor a V2 request carries. Each round runs ``--calls`` calls of each session on
those rows, in alternating order (flipped each round), measuring wall time (perf_counter) and
the process's CPU time (process_time) around the calls. A line gives the medians over rounds of
microseconds per call for each (``capi_*``, ``python_*``) and the medians of the per-round ratios
``capi / python`` (``wall_ratio``, ``cpu_ratio``: below 1, the C API path is cheaper). The
outputs of the two are checked equal before timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _measure(call: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per call over ``calls`` calls."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        call()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return wall / calls * 1e6, cpu / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000, help="calls per session per round")
    parser.add_argument("--models", default="logreg,forest")
    parser.add_argument("--rows", default="1,32")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE.parent.parent))
    import numpy as np
    import onnxruntime as ort

    from edgewise.runtime.frontends.native.ort_capi import CapiSession, load_ort
    from edgewise.runtime.package.manifest import MODEL_FILE, parse_manifest, read_manifest_bytes
    from edgewise.runtime.package.schema import frame_to_inputs
    from edgewise.runtime.serving.model import SessionSettings
    from tests.models import TRAINERS, convert_model

    module, reason = load_ort()
    if module is None:
        print(f"ort_capi: {reason}", file=sys.stderr)
        return 1
    settings = SessionSettings()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name in args.models.split(","):
            convert_model(name, repo)
            folder = repo / name / "1"
            content = (folder / MODEL_FILE).read_bytes()
            manifest = parse_manifest(read_manifest_bytes(folder), str(folder))
            python = ort.InferenceSession(
                content,
                sess_options=settings.session_options(),
                providers=["CPUExecutionProvider"],
            )
            capi = CapiSession(content, settings, name)
            names = [o.name for o in python.get_outputs()]
            _, X, _ = TRAINERS[name]()
            for rows in (int(r) for r in args.rows.split(",")):
                feeds: dict[str, Any] = frame_to_inputs(manifest, X.iloc[:rows])
                want = python.run(names, feeds)
                got = capi.run(feeds, names)
                for key, expected in zip(names, want, strict=True):
                    np.testing.assert_allclose(got[key], expected, rtol=1e-6, atol=1e-6)

                run_python = functools.partial(python.run, names, feeds)
                run_capi = functools.partial(capi.run, feeds, names)
                for _ in range(200):  # warm both
                    run_python()
                    run_capi()
                timings: dict[str, list[tuple[float, float]]] = {"capi": [], "python": []}
                for round_ in range(args.rounds):
                    order: list[tuple[str, Callable[[], object]]] = [
                        ("capi", run_capi),
                        ("python", run_python),
                    ]
                    for label, call in order if round_ % 2 == 0 else order[::-1]:
                        timings[label].append(_measure(call, args.calls))
                capi_t, python_t = timings["capi"], timings["python"]
                print(
                    json.dumps(
                        {
                            "benchmark": "ort_capi",
                            "model": name,
                            "rows": rows,
                            "rounds": args.rounds,
                            "calls_per_round": args.calls,
                            "onnxruntime": ort.__version__,
                            "capi_wall_us": round(statistics.median(w for w, _ in capi_t), 2),
                            "python_wall_us": round(statistics.median(w for w, _ in python_t), 2),
                            "capi_cpu_us": round(statistics.median(c for _, c in capi_t), 2),
                            "python_cpu_us": round(statistics.median(c for _, c in python_t), 2),
                            "wall_ratio": round(
                                statistics.median(
                                    c[0] / p[0] for c, p in zip(capi_t, python_t, strict=True)
                                ),
                                3,
                            ),
                            "cpu_ratio": round(
                                statistics.median(
                                    c[1] / p[1] for c, p in zip(capi_t, python_t, strict=True)
                                ),
                                3,
                            ),
                            "python_version": platform.python_version(),
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
