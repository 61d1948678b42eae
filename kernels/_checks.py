"""Argument checks shared by the public wrappers (private).

The fast paths in the wrappers test a handful of attributes inline (``ndim``, ``shape``,
``dtype is ...``, ``flags.c_contiguous``); only when that test fails do they call into this
module, which either builds a precise ``ValueError`` naming the argument or returns a
C-contiguous copy of an otherwise acceptable array.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

F64: Final = np.dtype(np.float64)
F32: Final = np.dtype(np.float32)
I64: Final = np.dtype(np.int64)
I32: Final = np.dtype(np.int32)

FloatBatch: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.float64]
CodeBatch: TypeAlias = npt.NDArray[np.int32] | npt.NDArray[np.int64]


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"object of type {type(x).__name__}"


def float_batch(name: str, batch: object, n_features: int) -> FloatBatch:
    """Slow path: validate a ``[rows, n_features]`` float32/float64 batch.

    Returns the batch itself, or a C-contiguous copy when it is a strided view (the kernels are
    compiled for C-contiguous input only, so a view would otherwise trigger a compile).
    """
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {_describe(batch)}")
    if batch.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got {_describe(batch)}")
    if batch.shape[1] != n_features:
        raise ValueError(f"{name} must have {n_features} feature columns, got {_describe(batch)}")
    native = batch.dtype.newbyteorder("=")
    if native not in (F64, F32):
        raise ValueError(f"{name} must have dtype float32 or float64, got {_describe(batch)}")
    out = np.ascontiguousarray(batch, dtype=native)
    # Kernels are compiled for aligned arrays; a misaligned buffer view would need a compile.
    return out if out.flags.aligned else out.copy()


def code_batch(name: str, codes: object, n_features: int) -> CodeBatch:
    """Slow path: validate a ``[rows, n_features]`` int32/int64 batch of category codes."""
    if not isinstance(codes, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {_describe(codes)}")
    if codes.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got {_describe(codes)}")
    if codes.shape[1] != n_features:
        raise ValueError(f"{name} must have {n_features} feature columns, got {_describe(codes)}")
    native = codes.dtype.newbyteorder("=")
    if native not in (I64, I32):
        raise ValueError(f"{name} must have dtype int32 or int64, got {_describe(codes)}")
    out = np.ascontiguousarray(codes, dtype=native)
    return out if out.flags.aligned else out.copy()


def counts_2d(name: str, counts: object) -> npt.NDArray[np.float64]:
    """Return ``counts`` as a C-contiguous float64 array of shape ``[features, bins]``.

    A 1-D vector is treated as a single feature.  Integer and float dtypes are accepted.
    """
    if not isinstance(counts, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {_describe(counts)}")
    if counts.ndim == 1:
        counts = counts[np.newaxis, :]
    elif counts.ndim != 2:
        raise ValueError(
            f"{name} must be 1-D [bins] or 2-D [features, bins], got {_describe(counts)}"
        )
    if counts.dtype.kind not in "iuf":
        raise ValueError(f"{name} must have an integer or float dtype, got {_describe(counts)}")
    if counts.shape[1] == 0:
        raise ValueError(f"{name} must have at least one bin, got {_describe(counts)}")
    out = np.ascontiguousarray(counts, dtype=np.float64)
    # One compiled signature: numba types read-only arrays separately, so copy those.
    return out if out.flags.writeable else out.copy()


def same_shape(name_a: str, a: npt.NDArray[Any], name_b: str, b: npt.NDArray[Any]) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}"
        )
