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

import os
import sys
import threading
from typing import Any, Final

__all__ = ["FASTMATH", "JIT_DISABLED", "LazyKernel", "jit"]

#: The explicit fast-math choice for every kernel (see the module docstring).
FASTMATH: Final = False


def _env_flag(name: str) -> bool:
    """An integer environment flag read the way numba reads its own (non-integers are 0)."""
    try:
        return int(os.environ.get(name, "0") or "0") != 0
    except ValueError:
        return False


#: True when ``NUMBA_DISABLE_JIT=1``: the kernels then run as plain Python functions.
JIT_DISABLED: Final[bool] = _env_flag("NUMBA_DISABLE_JIT")

_FLAGS: Final[dict[str, bool]] = {
    "nopython": True,
    "cache": True,
    "nogil": True,
    "fastmath": FASTMATH,
}


class LazyKernel:
    """A kernel whose numba dispatcher is made on first use, so that importing
    ``edgewise.kernels`` does not import numba (nor load LLVM): a process that runs only the
    ahead-of-time compiled kernels (:mod:`edgewise.kernels._native`) never needs it.

    The first call of any lazy kernel makes every one of them a dispatcher and puts the
    dispatchers in place of the lazy kernels in the modules of this package (also inside
    module-level tuples, the wrappers' dtype variants), before numba compiles anything: kernels
    that call kernels then see dispatchers, and later calls go straight to them."""

    __slots__ = ("dispatcher", "py_func")

    def __init__(self, fn: Any) -> None:
        self.py_func = fn
        self.dispatcher: Any = None

    def __call__(self, *args: Any) -> Any:
        if self.dispatcher is None:
            _make_dispatchers()
        return self.dispatcher(*args)


_LAZY: list[LazyKernel] = []
_MAKING = threading.Lock()  # two threads' first calls make one set of dispatchers


def _make_dispatchers() -> None:
    import numba

    with _MAKING:
        for kernel in _LAZY:
            if kernel.dispatcher is None:
                kernel.dispatcher = numba.jit(
                    kernel.py_func,
                    nopython=_FLAGS["nopython"],
                    cache=_FLAGS["cache"],
                    nogil=_FLAGS["nogil"],
                    fastmath=_FLAGS["fastmath"],
                )
        package = __name__.rpartition(".")[0]
        for name, module in list(sys.modules.items()):
            if module is None or not (name == package or name.startswith(package + ".")):
                continue
            namespace = vars(module)
            for attribute, value in list(namespace.items()):
                if isinstance(value, LazyKernel):
                    namespace[attribute] = value.dispatcher
                elif type(value) is tuple and any(isinstance(v, LazyKernel) for v in value):
                    # A wrapper's variants (_native.kernels) without the compiled module.
                    namespace[attribute] = tuple(
                        v.dispatcher if isinstance(v, LazyKernel) else v for v in value
                    )


def jit(fn: Any) -> Any:
    """``fn`` as a kernel compiled with the package-wide flags (``nopython``, ``cache``,
    ``nogil``), lazily: see :class:`LazyKernel`.

    Typed ``Any``: kernels are private and only called from typed public wrappers.
    """
    kernel = LazyKernel(fn)
    _LAZY.append(kernel)
    return kernel
