"""Build the native gRPC front end (see :mod:`edgewise.runtime.frontends.native.binding`).

    python -m edgewise.runtime.frontends.native.build [--output-dir DIR]

Compiles ``_front.cc`` with the C++ compiler against the system's gRPC C++ library, found with
pkg-config (Debian and Ubuntu: ``apt-get install libgrpc++-dev``), into this package's folder
as ``_front`` (an extension module that records the digest of the source it was built from),
with the fast path (fast_path.py) where onnxruntime's C API headers can be had (see ``--ort``).
Prints one line: the file written, or why nothing was built (exit status 1); without it the
server serves with grpcio alone.

    python -m edgewise.runtime.frontends.native.build --ort [--output-dir DIR]

Compiles ``_ort.cc`` instead (onnxruntime's C API, run without the GIL: ort_capi.py) into
``_ort``, with the headers ort_headers.py fetches with npm (pinned, verified, cached in
``.build/``); it links no onnxruntime: the module opens the wheel's own library at run time.
Prints one line likewise; without it nothing else changes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy

from edgewise.runtime.frontends.native.binding import SOURCE, source_digest
from edgewise.runtime.frontends.native.ort_capi import ORT_SOURCE, ort_source_digest
from edgewise.runtime.frontends.native.ort_headers import HeadersError, fetch_headers

__all__ = ["build", "build_ort"]


class BuildError(Exception):
    """The front end cannot be built here (no compiler, no gRPC C++ library, a failed build)."""


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        raise BuildError("pkg-config not found")
    done = subprocess.run(
        ["pkg-config", *args, "grpc++"], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BuildError(
            "the gRPC C++ library was not found (Debian: apt-get install libgrpc++-dev)"
        )
    return shlex.split(done.stdout)


def _compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler})")
    return compiler


def _compile(
    compiler: str, source: Path, name: str, target_dir: Path, flags: list[str], libs: list[str]
) -> Path:
    """Compile ``source`` into the extension module ``name`` in ``target_dir``, replacing the
    old one atomically (a running process keeps the file it mapped)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = target_dir / f"{name}{suffix}"
    with tempfile.TemporaryDirectory(dir=target_dir) as work:
        built = Path(work) / target.name
        command = [
            compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
            f"-I{sysconfig.get_paths()['include']}", *flags,
            str(source), "-o", str(built), *libs,
        ]  # fmt: skip
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"the compiler failed: {last}")
        os.replace(built, target)
    return target


def build(output_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Compile the front end (with the fast path where onnxruntime's C API headers can be had:
    ``cache_dir``, default ``.build/``); return the extension module's path."""
    compiler = _compiler()
    libs = _pkg_config("--cflags", "--libs")
    target_dir = output_dir if output_dir is not None else SOURCE.parent
    flags = [f'-DEDGEWISE_FRONT_DIGEST="{source_digest()}"']
    # The fast path (fast_path.py) needs onnxruntime's C API headers; without them, none.
    with contextlib.suppress(HeadersError):
        flags += [f"-I{fetch_headers(cache_dir)}", "-DEDGEWISE_FAST"]
    return _compile(compiler, SOURCE, "_front", target_dir, flags, libs)


def build_ort(output_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Fetch the C API headers (``cache_dir``: default ``.build/``) and compile ``_ort.cc``;
    return the extension module's path."""
    compiler = _compiler()
    try:
        include = fetch_headers(cache_dir)
    except HeadersError as exc:
        raise BuildError(str(exc)) from None
    target_dir = output_dir if output_dir is not None else ORT_SOURCE.parent
    flags = [
        f"-I{numpy.get_include()}",
        f"-I{include}",
        f'-DEDGEWISE_ORT_DIGEST="{ort_source_digest()}"',
    ]
    return _compile(compiler, ORT_SOURCE, "_ort", target_dir, flags, ["-ldl"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: the package's own folder"
    )
    parser.add_argument(
        "--ort",
        action="store_true",
        help="build the onnxruntime C API module (_ort) instead of the front end",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.ort:
        try:
            path = build_ort(args.output_dir)
        except BuildError as exc:
            print(f"onnxruntime C API module not built ({exc}); the C API path is unavailable")
            return 1
        print(f"onnxruntime C API module: {path} ({time.perf_counter() - started:.1f} s)")
        return 0
    try:
        path = build(args.output_dir)
    except BuildError as exc:
        print(f"native front end not built ({exc}); the server serves with grpcio")
        return 1
    print(f"native front end: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
