"""The ahead-of-time compiled kernels, when built: numba's machine code for the kernels a server
runs all the time, in an extension module that imports neither numba nor LLVM.

A serving process with monitoring on would otherwise import numba and load LLVM (about 110 MB
resident) only to load its kernels from numba's cache. :mod:`edgewise.kernels.native_build`
compiles the same Python functions with ``numba.pycc`` into ``_native_kernels`` beside this
module, for the dtypes a server uses; the wrappers in this package call those functions when
they are here, and the numba dispatchers otherwise (and for every kernel not listed in
:data:`EXPORTS`, which numba then loads on first use).

The compiled functions check nothing: an array of another dtype or layout than their signature
is read as if it had theirs (a float32 array where float64 is expected crashes the process).
Only the validating wrappers of this package call them, with arrays they made or checked.

The module is used only when it was built from exactly these kernel sources, for this kind of CPU
(a digest of every module of the package, numpy's version and the CPU's model and flags is
compiled into it; the code uses the CPU's own instructions, as numba's JIT does), and never
under ``NUMBA_DISABLE_JIT=1`` nor with ``EDGEWISE_NATIVE_KERNELS=0``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Final

import numpy as np

from ._config import JIT_DISABLED

__all__ = ["EXPORTS", "MODULE_NAME", "NATIVE", "STATUS", "functions", "source_digest"]

#: The extension module's name inside this package.
MODULE_NAME: Final = "_native_kernels"

#: Exported name -> (module, kernel) it is compiled from. The signatures are in native_build.
EXPORTS: Final[dict[str, tuple[str, str]]] = {
    "profile_update_f32": ("profile", "_profile_update"),
    "profile_update_f64": ("profile", "_profile_update"),
    "histogram_update_f32": ("histograms", "_histogram_update"),
    "histogram_update_f64": ("histograms", "_histogram_update"),
    "moments_update_f32": ("moments", "_moments_update"),
    "moments_update_f64": ("moments", "_moments_update"),
    "categorical_update_i32": ("histograms", "_categorical_update"),
    "categorical_update_i64": ("histograms", "_categorical_update"),
    "moments_merge": ("moments", "_moments_merge"),
    "moments_subtract": ("moments", "_moments_subtract"),
    "drift_all": ("drift", "_drift_all"),
}


def _cpu_identity() -> bytes:
    """This CPU's model and feature flags (Linux), as the module's code is built for the CPU it
    is built on: on another model it is not used, rather than crash on a missing instruction."""
    try:
        with open("/proc/cpuinfo", "rb") as handle:
            lines = handle.read().split(b"\n\n", 1)[0].splitlines()
    except OSError:
        return b""
    keys = (b"vendor_id", b"cpu family", b"model", b"flags")
    return b"\n".join(line for line in lines if line.split(b":", 1)[0].strip() in keys)


def source_digest() -> int:
    """A signed 64-bit digest of this package's sources, numpy's version and the CPU."""
    digest = hashlib.sha256(np.__version__.encode())
    digest.update(_cpu_identity())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def _load() -> tuple[Any, str]:
    if JIT_DISABLED:
        return None, "off (NUMBA_DISABLE_JIT=1)"
    if os.environ.get("EDGEWISE_NATIVE_KERNELS", "1") == "0":
        return None, "off (EDGEWISE_NATIVE_KERNELS=0)"
    try:
        module = importlib.import_module(f"{__package__}.{MODULE_NAME}")
    except ImportError:
        return None, "not built (python -m edgewise.kernels.native_build)"
    if module.source_digest() != source_digest():
        return None, "stale: built from other kernel sources (rebuild it)"
    return module, "loaded"


#: The compiled module, or None (then every kernel runs through numba); STATUS says why.
NATIVE, STATUS = _load()


def functions(*names: str) -> tuple[Any, ...] | None:
    """The compiled functions ``names`` (see :data:`EXPORTS`), or None without the module."""
    if NATIVE is None:
        return None
    return tuple(getattr(NATIVE, name) for name in names)
