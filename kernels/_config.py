"""Numba compilation flags for every kernel in ``edgewise.kernels``, in one place.

All kernels are decorated with :data:`jit`, never with ``numba.njit`` directly, so the flags
below are the only place where compilation behaviour is decided:

``nopython=True``
    A kernel that cannot be compiled to native code must fail at compile time (in
    :func:`edgewise.kernels.warmup`), not silently fall back to the object mode interpreter.
``cache=True``
    Compiled machine code is written next to the modules (``__pycache__/*.nbi``/``*.nbc``) and
    loaded by later processes, so a restarted server does not pay the compile cost again.
``nogil=True``
    Kernels release the GIL: a threaded gRPC server can update statistics for different models
    concurrently.  Kernels never touch Python objects, so this is safe; callers must still not
    update the *same* state object from two threads at once.
``fastmath=False``
    Deliberately off for every kernel.  (a) The kernels test ``math.isnan``/``math.isfinite``
    to route NaN and inf values to their own counters and histogram column, and NaN
    comparisons decide bins; LLVM's ``nnan``/``ninf`` fast-math flags allow the optimiser to
    assume those cases away and delete exactly those checks.  (b) The drift statistics are
    tested against SciPy to ~1e-9..1e-12 relative and the same tests run under
    ``NUMBA_DISABLE_JIT=1``; ``reassoc``/``contract``/``arcp`` would make compiled rounding
    differ from the interpreted pass and from SciPy.  (c) Nothing needs it: the throughput
    and latency targets are met without it (``benchmarks/kernels.py``), and the one
    latency-bound recursion (exact two-sample KS) is rearranged by hand instead.
"""

from __future__ import annotations

from typing import Any, Final

import numba

__all__ = ["FASTMATH", "JIT_DISABLED", "jit"]

#: The explicit fast-math choice for every kernel (see the module docstring).
FASTMATH: Final = False

#: True when ``NUMBA_DISABLE_JIT=1``: the kernels then run as plain Python functions.
JIT_DISABLED: Final[bool] = bool(getattr(numba.config, "DISABLE_JIT", 0))

_FLAGS: Final[dict[str, bool]] = {
    "nopython": True,
    "cache": True,
    "nogil": True,
    "fastmath": FASTMATH,
}


def jit(fn: Any) -> Any:
    """Compile ``fn`` lazily with the package-wide flags (``nopython``, ``cache``, ``nogil``).

    The result is a numba dispatcher (or ``fn`` itself under ``NUMBA_DISABLE_JIT=1``) and is
    typed ``Any``: kernels are private and only called from typed public wrappers.
    """
    return numba.jit(
        fn,
        nopython=_FLAGS["nopython"],
        cache=_FLAGS["cache"],
        nogil=_FLAGS["nogil"],
        fastmath=_FLAGS["fastmath"],
    )
