"""The native front end against a bare C++ gRPC server, in one run: how far from the floor.

    .venv/bin/python benchmarks/native_floor.py [--rounds 5] [--seconds 3] [--old PYTHONPATH]
                                                [--monitoring on|off] [--fast]

Builds suite.py's three models (a logistic regression, a 100-tree random forest and an MLP on 32
features of scikit-learn's digits), serves them with ``edgewise serve --front-end native``
(this checkout; with ``--old``, also the checkout under that PYTHONPATH, prepared as
ab_checkouts.py's docstring says), and compiles ``echo_server.cc`` with g++ and
``pkg-config grpc++``: a bare gRPC C++ server answering every call with one canned message, here
edgewise's own answer to a one-row request for that model (one echo server per model). The
same client as serving.py (tritonclient's asyncio client, one row per request, in separate
processes) drives each server at concurrency 1 and 8; rounds alternate between the servers and
the order flips each round, so drift on a shared machine hits them all.

Prints one JSON line per (model, concurrency): the medians of p50, server CPU per request (read
from /proc over the measurement window) and throughput for each server, and the medians of the
per-round ratios: edgewise over the echo server (``ratio_new_vs_echo_*``), and with ``--old``
old over echo and new over old.

With ``--fast``, a third edgewise server (``fast``) serves the same models with the native
front end's fast path on (``EDGEWISE_NATIVE_FAST_PATH=1``: runtime/frontends/native/fast_path.py;
``new`` has it off, today's path), in the same alternating rounds, with the ratios fast over echo
and fast over new.

The echo server plus onnxruntime's C API (``echo_ort``: native_echo_ort.cc, the compute floor
served natively: the model run once per call on one row, then the canned answer) is built too
where the C API headers can be had (ort_headers.py fetches them, pinned), with the ratios of
each edgewise server over it (``ratio_*_vs_echo_ort_*``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


serving: Any = _load("serving")
suite: Any = _load("suite")
ab: Any = _load("ab_checkouts")


def _compile(
    source: str, binary: Path, *, before: tuple[str, ...] = (), after: tuple[str, ...] = ()
) -> Path:
    """Compile ``source`` (next to this file) against grpc++ into ``binary``; its path."""
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++"], check=True, capture_output=True, text=True
    ).stdout
    compiler = os.environ.get("CXX", "g++")
    subprocess.run(
        [compiler, "-O2", "-std=c++17", *before, str(HERE / source), "-o", str(binary),
         *shlex.split(flags), *after],
        check=True,
    )  # fmt: skip
    return binary


def build_echo(work: Path) -> Path:
    """Compile echo_server.cc; the binary's path."""
    return _compile("echo_server.cc", work / "echo_server")


def build_echo_ort(work: Path) -> Path | None:
    """Compile native_echo_ort.cc (the echo server plus onnxruntime's C API); None when the C
    API headers cannot be had here."""
    from edgewise.runtime.frontends.native.ort_headers import HeadersError, fetch_headers

    try:
        include = fetch_headers()
    except HeadersError as exc:
        print(f"native_floor: no echo_ort ({exc})", file=sys.stderr)
        return None
    return _compile(
        "native_echo_ort.cc", work / "echo_ort", before=(f"-I{include}",), after=("-ldl",)
    )


def one_row_answer(url: str, model: str) -> bytes:
    """edgewise's serialised answer to a one-row request for ``model`` (the echo's canned one)."""
    import grpc
    import numpy as np

    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=[1, serving.N_FEATURES])
    request.raw_input_contents.append(np.ones((1, serving.N_FEATURES), np.float32).tobytes())
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        answer: bytes = call(request.SerializeToString(), timeout=30)
    return answer


def edgewise_server(
    site: str, repo: Path, port_file: Path, monitoring: str, fast: bool = False
) -> Any:
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = site
    os.environ["EDGEWISE_NATIVE_FAST_PATH"] = "1" if fast else "0"
    try:
        return serving.Server(
            [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
             "--repo", str(repo), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
             "--port-file", str(port_file), "--front-end", "native", "--monitoring", monitoring],
            port_file,
        )  # fmt: skip
    finally:
        os.environ.pop("EDGEWISE_NATIVE_FAST_PATH", None)
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--old", default="", help="PYTHONPATH of an older checkout to compare")
    parser.add_argument("--monitoring", choices=["on", "off"], default="on")
    parser.add_argument(
        "--fast", action="store_true", help="also serve with the native fast path on (fast)"
    )
    args = parser.parse_args()
    if shutil.which("pkg-config") is None:
        sys.exit("native_floor: pkg-config not found (Debian: apt-get install libgrpc++-dev)")
    work = Path(tempfile.mkdtemp(prefix="edgewise-floor-"))
    models = list(suite.build_models(work / "repo", work / "joblib"))
    echo = build_echo(work)
    echo_ort = build_echo_ort(work)
    sites = {"new": str(PROJECT)}
    if args.old:
        sites["old"] = args.old
    if args.fast:
        sites["fast"] = str(PROJECT)
    servers: dict[tuple[str, str], Any] = {}  # (label, model) -> server; edgewise serves all
    processes: list[Any] = []
    try:
        for label, site in sites.items():
            server = edgewise_server(
                site, work / "repo", work / f"{label}.port", args.monitoring, label == "fast"
            )
            processes.append(server)
            for model in models:
                servers[(label, model)] = server
        for model in models:
            canned = work / f"{model}.answer"
            canned.write_bytes(one_row_answer(servers[("new", model)].url, model))
            port_file = work / f"echo-{model}.port"
            server = serving.Server([str(echo), str(port_file), str(canned)], port_file)
            processes.append(server)
            servers[("echo", model)] = server
            if echo_ort is not None:
                from edgewise.runtime.frontends.native.ort_capi import library_path

                port_file = work / f"echo-ort-{model}.port"
                server = serving.Server(
                    [str(echo_ort), str(port_file), str(canned), str(library_path()),
                     str(work / "repo" / model / "1" / "model.onnx"), "features",
                     str(serving.N_FEATURES)],
                    port_file,
                )  # fmt: skip
                processes.append(server)
                servers[("echo_ort", model)] = server
        labels = ["echo", *(["echo_ort"] if echo_ort is not None else []), *sites]
        results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        for concurrency in (1, 8):
            for index in range(args.rounds):
                order = labels if index % 2 == 0 else labels[::-1]
                for model in models:
                    for label in order:
                        server = servers[(label, model)]
                        results.setdefault((model, concurrency, label), []).append(
                            ab.drive(server.url, model, concurrency, args.seconds,
                                     server.process.pid)
                        )  # fmt: skip
    finally:
        for server in processes:
            server.stop()
    pairs = [("new", "echo")] + ([("old", "echo"), ("new", "old")] if args.old else [])
    pairs += [("fast", "echo"), ("fast", "new")] if args.fast else []
    if echo_ort is not None:
        pairs += [(label, "echo_ort") for label in sites]
    for model in models:
        for concurrency in (1, 8):
            line: dict[str, Any] = {
                "case": "native_floor", "model": model, "concurrency": concurrency,
                "rounds": args.rounds, "seconds": args.seconds, "monitoring": args.monitoring,
            }  # fmt: skip
            for label in labels:
                rounds = results[(model, concurrency, label)]
                for key in ("p50_us", "server_cpu_us_per_req", "rps"):
                    line[f"{label}_{key}"] = round(statistics.median(r[key] for r in rounds), 2)
            for top, bottom in pairs:
                upper = results[(model, concurrency, top)]
                lower = results[(model, concurrency, bottom)]
                for key in ("p50_us", "server_cpu_us_per_req"):
                    ratios = [
                        u[key] / w[key] for u, w in zip(upper, lower, strict=True) if w[key] > 0
                    ]  # a round /proc measured no CPU in (its ticks are 10 ms) is left out
                    line[f"ratio_{top}_vs_{bottom}_{key}"] = (
                        round(statistics.median(ratios), 3) if ratios else None
                    )
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
