"""Build the native gRPC front end (see :mod:`edgewise.runtime.frontends.native.binding`).

    python -m edgewise.runtime.frontends.native.build [--output-dir DIR]

Compiles ``_front.cc`` with the C++ compiler against the system's gRPC C++ library, found with
pkg-config (Debian and Ubuntu: ``apt-get install libgrpc++-dev``), into this package's folder
as ``_front`` (an extension module that records the digest of the source it was built from).
Prints one line: the file written, or why nothing was built (exit status 1); without it the
server serves with grpcio alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from edgewise.runtime.frontends.native.binding import SOURCE, source_digest

__all__ = ["build"]


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


def build(output_dir: Path | None = None) -> Path:
    """Compile the front end; return the extension module's path."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler})")
    flags = _pkg_config("--cflags", "--libs")
    target_dir = output_dir if output_dir is not None else SOURCE.parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = target_dir / f"_front{suffix}"
    with tempfile.TemporaryDirectory(dir=target_dir) as work:
        built = Path(work) / target.name
        command = [
            compiler,
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{sysconfig.get_paths()['include']}",
            f'-DEDGEWISE_FRONT_DIGEST="{source_digest()}"',
            str(SOURCE),
            "-o",
            str(built),
            *flags,
        ]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"the compiler failed: {last}")
        os.replace(built, target)  # atomic: a running server keeps the file it mapped
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: the package's own folder"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = build(args.output_dir)
    except BuildError as exc:
        print(f"native front end not built ({exc}); the server serves with grpcio")
        return 1
    print(f"native front end: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
