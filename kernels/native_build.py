"""Build the ahead-of-time compiled kernels (see :mod:`edgewise.kernels._native`).

    python -m edgewise.kernels.native_build [--cpu host|x86-64-v3|x86-64-v2] [--output-dir DIR]

Compiles the kernels of ``_native.EXPORTS`` with ``numba.pycc`` (numba and a C compiler are
needed here, not where the module is used) into this package's folder: ``_native_kernels`` for
this machine's CPU (``--cpu host``, the default), or a portable module for an x86-64 level, for
images that run on other machines (``_native_kernels_x86_64_v3``, used on any CPU with AVX2 and
the rest of that level). Prints one line: the file written, or why nothing was built (exit
status 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import _config, _native

__all__ = ["build"]


def _signatures() -> dict[str, Any]:
    from numba import types

    f64_1d = types.Array(types.float64, 1, "C")
    f64_2d = types.Array(types.float64, 2, "C")
    i64_1d = types.Array(types.int64, 1, "C")
    i64_2d = types.Array(types.int64, 2, "C")
    tuple_of: Any = types.Tuple  # a return of several values (untyped)
    signatures: dict[str, Any] = {}
    for suffix, dtype in (("f32", types.float32), ("f64", types.float64)):
        batch = types.Array(dtype, 2, "C")  # also accepts read-only arrays
        signatures[f"profile_update_{suffix}"] = types.void(
            f64_2d, i64_2d, batch, f64_2d, i64_1d, types.int64
        )
        signatures[f"histogram_update_{suffix}"] = types.void(
            i64_2d, batch, f64_2d, i64_1d, types.int64
        )
        signatures[f"moments_update_{suffix}"] = types.void(f64_2d, batch)
        signatures[f"reconstruction_update_{suffix}"] = types.void(
            f64_1d, batch, i64_1d, f64_1d, f64_1d, f64_2d, f64_1d
        )
    for suffix, code_type in (("i32", types.int32), ("i64", types.int64)):
        codes = types.Array(code_type, 2, "C")
        signatures[f"categorical_update_{suffix}"] = types.void(i64_2d, codes, i64_1d)
    for suffix, dtype in (("f32", types.float32), ("f64", types.float64)):
        sample = types.Array(dtype, 1, "C")  # sorted, NaN-free
        signatures[f"ks_statistic_{suffix}"] = tuple_of(
            (types.float64, types.float64, types.int64)
        )(sample, sample)
        signatures[f"wasserstein_sorted_{suffix}"] = types.float64(sample, sample)
    signatures["kstwo_sf"] = types.float64(types.int64, types.float64)
    signatures["ks2_prob_outside_square"] = types.float64(types.int64, types.int64)
    signatures["ks2_prob_outside_band"] = types.float64(
        types.int64, types.int64, types.int64, types.int64
    )
    i8_1d = types.Array(types.int8, 1, "C")
    signatures["ddm_restart"] = types.void(f64_1d)
    signatures["ddm_update"] = types.int64(
        f64_1d, f64_1d, types.float64, types.float64, types.float64, i8_1d, i64_1d
    )
    signatures["adwin_restart"] = types.void(f64_1d, i64_1d, i64_1d, f64_2d, f64_2d)
    signatures["adwin_update"] = types.int64(
        f64_1d, i64_1d, i64_1d, f64_2d, f64_2d, f64_1d,
        types.float64, types.int64, types.int64, types.float64, types.float64, i64_1d,
    )  # fmt: skip
    signatures["moments_merge"] = types.void(f64_2d, f64_2d)
    signatures["moments_subtract"] = types.int64(f64_2d, f64_2d)
    signatures["drift_all"] = f64_2d(
        f64_2d,
        f64_2d,
        f64_2d,
        types.boolean,
        types.float64,
        types.float64,
        types.boolean,
        types.float64,
        types.float64,
    )
    return signatures


def build(output_dir: Path | None = None, target: str = _native.HOST) -> Path:
    """Compile the exported kernels for ``target`` (see :data:`_native.LEVELS`); return the
    extension module's path."""
    name = _native.module_name(target)
    with warnings.catch_warnings():  # pycc's pending deprecation: see _native's docstring
        warnings.simplefilter("ignore")
        pycc: Any = importlib.import_module("numba.pycc")  # untyped

    # Kernels that call kernels must see numba dispatchers, not lazy placeholders.
    _config._make_dispatchers()
    signatures = _signatures()
    missing = set(_native.EXPORTS) ^ set(signatures)
    if missing:
        raise RuntimeError(f"exports and signatures differ: {sorted(missing)}")
    folder = output_dir or Path(__file__).resolve().parent
    compiler = pycc.CC(name)
    compiler.output_dir = str(folder)
    compiler.verbose = False
    # By default for this machine's CPU, as numba's JIT would compile (generic x86-64 code ran
    # 1.7x slower on 1,000-row batches); _native's digest includes the CPU's flags, so a host
    # module built on another kind of CPU is never used. A level's digest names the level.
    compiler.target_cpu = target
    for export, (module_name, kernel_name) in _native.EXPORTS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        kernel = getattr(module, kernel_name)
        compiler.export(export, signatures[export])(kernel.py_func)
    digest = _native.source_digest(target)

    def source_digest() -> int:  # numba compiles the closure's value in as a constant
        return digest

    compiler.export("source_digest", "int64()")(source_digest)
    compiler.compile()
    built = sorted(folder.glob(f"{name}.*"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise RuntimeError(f"numba.pycc wrote no {name} module in {folder}")
    return built[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu",
        choices=[_native.HOST, *_native.LEVELS],
        default=_native.HOST,
        help="the CPUs the code is for: this machine's kind (default) or an x86-64 level",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: the package's own folder"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = build(args.output_dir, args.cpu)
    except Exception as exc:  # a missing compiler, numba without pycc: the JIT serves instead
        print(f"native kernels not built ({type(exc).__name__}: {exc}); numba's JIT serves")
        return 1
    print(f"native kernels: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
