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

An image built on one machine and run on others carries portable builds instead
(``native_build --cpu x86-64-v3`` and ``--cpu x86-64-v2``, one module each): their digest names
the level rather than a CPU, and a level is used only on a CPU whose flags include all the
instructions it may use (:data:`LEVELS`). The host build, when present and current, comes first.

``numba.pycc`` is pending deprecation upstream; if a numba release drops it, nothing gets built
and numba's JIT serves every kernel, as it does without a C compiler.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Final

import numpy as np

from ._config import JIT_DISABLED

__all__ = [
    "EXPORTS",
    "HOST",
    "LEVELS",
    "MODULE_NAME",
    "NATIVE",
    "STATUS",
    "kernels",
    "module_name",
    "source_digest",
]

#: The extension module's name inside this package (built for this machine's CPU).
MODULE_NAME: Final = "_native_kernels"

_V2: Final = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3: Final = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}

#: Portable builds (for images that run on CPUs other than the build machine's): the x86-64
#: micro-architecture level -> the /proc/cpuinfo flags a CPU needs to run its code. Tried after
#: the host build, best level first; a CPU without a level's flags skips that level.
LEVELS: Final[dict[str, frozenset[str]]] = {"x86-64-v3": _V3, "x86-64-v2": _V2}

#: Where a build's code may run: "host" (this machine's kind of CPU) or a level of LEVELS.
HOST: Final = "host"


def module_name(target: str = HOST) -> str:
    """The extension module's name for a build for ``target``."""
    if target == HOST:
        return MODULE_NAME
    if target not in LEVELS:
        raise ValueError(f"unknown CPU target {target!r}: {HOST} or one of {', '.join(LEVELS)}")
    return f"{MODULE_NAME}_{target.replace('-', '_')}"


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
    "reconstruction_update_f32": ("multivariate", "_reconstruction_update"),
    "reconstruction_update_f64": ("multivariate", "_reconstruction_update"),
    # A drift report's exact tests (GetDriftReport exact=True) and the online quality detectors:
    # with these a server runs nothing through numba.
    "ks_statistic_f32": ("drift", "_ks_statistic"),
    "ks_statistic_f64": ("drift", "_ks_statistic"),
    "wasserstein_sorted_f32": ("drift", "_wasserstein_sorted"),
    "wasserstein_sorted_f64": ("drift", "_wasserstein_sorted"),
    "kstwo_sf": ("_special", "_kstwo_sf"),
    "ks2_prob_outside_square": ("_special", "_ks2_prob_outside_square"),
    "ks2_prob_outside_band": ("_special", "_ks2_prob_outside_band"),
    "ddm_restart": ("detectors", "_ddm_restart"),
    "ddm_update": ("detectors", "_ddm_update"),
    "adwin_restart": ("detectors", "_adwin_restart"),
    "adwin_update": ("detectors", "_adwin_update"),
}


def _cpuinfo() -> list[bytes]:
    """The first processor's lines of /proc/cpuinfo (Linux), or none."""
    try:
        with open("/proc/cpuinfo", "rb") as handle:
            return handle.read().split(b"\n\n", 1)[0].splitlines()
    except OSError:
        return []


def _cpu_identity() -> bytes:
    """This CPU's model and feature flags (Linux), as a host build's code is made for the CPU it
    is built on: on another model it is not used, rather than crash on a missing instruction."""
    keys = (b"vendor_id", b"cpu family", b"model", b"flags")
    return b"\n".join(line for line in _cpuinfo() if line.split(b":", 1)[0].strip() in keys)


def _cpu_flags() -> frozenset[str]:
    for line in _cpuinfo():
        key, _, value = line.partition(b":")
        if key.strip() == b"flags":
            return frozenset(value.decode("ascii", "replace").split())
    return frozenset()


def source_digest(target: str = HOST) -> int:
    """A signed 64-bit digest of this package's sources, numpy's version and where the code may
    run: this CPU (a host build) or the portable level's name."""
    digest = hashlib.sha256(np.__version__.encode())
    digest.update(_cpu_identity() if target == HOST else f"portable {target}".encode())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def _load() -> tuple[Any, str]:
    if JIT_DISABLED:
        return None, "off (NUMBA_DISABLE_JIT=1)"
    if os.environ.get("EDGEWISE_NATIVE_KERNELS", "1") == "0":
        return None, "off (EDGEWISE_NATIVE_KERNELS=0)"
    flags = _cpu_flags()
    targets = [HOST, *(level for level, needs in LEVELS.items() if needs <= flags)]
    found = []
    for target in targets:
        try:
            module = importlib.import_module(f"{__package__}.{module_name(target)}")
        except ImportError:
            continue
        if module.source_digest() == source_digest(target):
            return module, "loaded" if target == HOST else f"loaded ({target} build)"
        found.append(target)
    if found:
        built = ", ".join(found)
        return None, f"stale: built from other kernel sources or for another CPU ({built})"
    return None, "not built (python -m edgewise.kernels.native_build)"


#: The compiled module, or None (then every kernel runs through numba); STATUS says why.
NATIVE, STATUS = _load()


def kernels(fallback: Any, *names: str) -> tuple[Any, ...]:
    """The compiled functions ``names`` (see :data:`EXPORTS`), or ``fallback`` (the numba
    kernel they are compiled from) in each place without the module. A wrapper calls
    ``KERNELS[batch.dtype.itemsize == 8]`` for a float32/float64 pair."""
    if NATIVE is None:
        return (fallback,) * len(names)
    return tuple(getattr(NATIVE, name) for name in names)
