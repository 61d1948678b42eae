"""Multivariate drift: the PCA reconstruction error of a batch, accumulated per window.

NannyML's data-reconstruction drift, as a streaming statistic: the reference is standardised
(per column ``(x - mean) / scale``) and a PCA keeping most of its variance is fitted at convert
time (:mod:`edgewise.runtime.profile`); each new row is standardised the same way (a missing or
infinite value becomes the column's reference mean, as NannyML's mean imputation does), projected
on the components and back, and its *reconstruction error* is the Euclidean distance between the
standardised row and its reconstruction. Rows that break the reference's correlations are far
from the reference's principal subspace, so a window whose mean error rises has drifted as a
whole even when no single feature has.

:class:`ReconstructionState` keeps, per window, only the count, the sum and the sum of squares of
the errors (mergeable, picklable): the window's mean error and its variance, for the test of
:func:`edgewise.runtime.monitor` against the reference's own error distribution. The update is
one kernel call per batch, ``O(rows * components * columns)``: no per-row Python.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from . import _checks, _native
from ._checks import F32, F64, FloatBatch
from ._config import jit

__all__ = ["ReconstructionState", "reconstruction_errors"]


@jit
def _reconstruction_update(
    state: npt.NDArray[np.float64],
    batch: FloatBatch,
    columns: npt.NDArray[np.int64],
    mean: npt.NDArray[np.float64],
    inv_scale: npt.NDArray[np.float64],
    components: npt.NDArray[np.float64],
    errors: npt.NDArray[np.float64],
) -> None:
    """Add each row's reconstruction error to ``state`` = [count, sum, sum of squares]; also
    write it to ``errors`` when that has a slot per row (else it is a 0-length array)."""
    n_components = components.shape[0]
    width = columns.shape[0]
    z = np.empty(width, dtype=np.float64)
    keep = errors.shape[0] == batch.shape[0]
    for row in range(batch.shape[0]):
        norm = 0.0
        for j in range(width):
            value = np.float64(batch[row, columns[j]])
            standard = (value - mean[j]) * inv_scale[j] if math.isfinite(value) else 0.0
            z[j] = standard
            norm += standard * standard
        projected = 0.0
        for c in range(n_components):
            score = 0.0
            for j in range(width):
                score += components[c, j] * z[j]
            projected += score * score
        # |z - C'Cz|^2 = |z|^2 - |Cz|^2 for orthonormal rows of C.
        squared = norm - projected
        error = math.sqrt(squared) if squared > 0.0 else 0.0
        state[0] += 1.0
        state[1] += error
        state[2] += error * error
        if keep:
            errors[row] = error


#: [float32, float64] variants: compiled (``_native``), else numba's.
_UPDATE = _native.kernels(
    _reconstruction_update, "reconstruction_update_f32", "reconstruction_update_f64"
)
_NO_ERRORS = np.empty(0, dtype=np.float64)


class ReconstructionState:
    """Count, sum and sum of squares of the PCA reconstruction errors of the rows seen.

    ``columns``: which columns of the observed ``[rows, n_inputs]`` batch the model reads;
    ``mean`` / ``scale``: the reference's standardisation of those columns (``scale`` > 0);
    ``components``: ``[k, len(columns)]`` orthonormal rows (the PCA's principal axes).
    """

    __slots__ = ("_columns", "_components", "_inv_scale", "_mean", "_n_inputs", "_state")

    def __init__(
        self,
        n_inputs: int,
        columns: npt.ArrayLike,
        mean: npt.ArrayLike,
        scale: npt.ArrayLike,
        components: npt.ArrayLike,
    ) -> None:
        cols = np.ascontiguousarray(columns, dtype=np.int64)
        mu = np.ascontiguousarray(mean, dtype=np.float64)
        sd = np.ascontiguousarray(scale, dtype=np.float64)
        axes = np.ascontiguousarray(components, dtype=np.float64)
        if not isinstance(n_inputs, int | np.integer) or n_inputs < 1:
            raise ValueError(f"n_inputs must be a positive integer, got {n_inputs!r}")
        if cols.ndim != 1 or cols.size == 0:
            raise ValueError("columns must be a non-empty 1-D array of column indices")
        if cols.min() < 0 or cols.max() >= n_inputs:
            raise ValueError(f"columns must index the {n_inputs} input columns")
        if mu.shape != cols.shape or sd.shape != cols.shape:
            raise ValueError("mean and scale must have one value per column")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sd)) and np.all(sd > 0)):
            raise ValueError("mean must be finite and scale finite and > 0")
        if axes.ndim != 2 or axes.shape[1] != cols.size or axes.shape[0] < 1:
            raise ValueError(f"components must be [k >= 1, {cols.size}], got shape {axes.shape}")
        if not np.all(np.isfinite(axes)):
            raise ValueError("components must be finite")
        self._n_inputs = int(n_inputs)
        self._columns = cols
        self._mean = mu
        self._inv_scale = 1.0 / sd
        self._components = axes
        self._state = np.zeros(3, dtype=np.float64)

    def update(self, batch: FloatBatch) -> None:
        """Add a ``[rows, n_inputs]`` float32/float64 batch (one kernel call; the checks of the
        request path's usual batch inline, as :meth:`FeatureProfile.update` does)."""
        try:
            ok = (
                batch.ndim == 2
                and batch.shape[1] == self._n_inputs
                and (batch.dtype is F64 or batch.dtype is F32)
                and (flags := batch.flags).c_contiguous
                and flags.aligned
            )
        except AttributeError:
            ok = False
        if not ok:
            batch = _checks.float_batch("batch", batch, self._n_inputs)
        _UPDATE[batch.dtype.itemsize == 8](
            self._state, batch, self._columns, self._mean, self._inv_scale, self._components,
            _NO_ERRORS,
        )  # fmt: skip

    def errors(self, batch: FloatBatch) -> npt.NDArray[np.float64]:
        """Each row's reconstruction error, without adding the batch to the state."""
        batch = self._checked(batch)
        out = np.empty(batch.shape[0], dtype=np.float64)
        scratch = np.zeros(3, dtype=np.float64)
        _UPDATE[batch.dtype.itemsize == 8](
            scratch, batch, self._columns, self._mean, self._inv_scale, self._components, out
        )
        return out

    def _checked(self, batch: FloatBatch) -> FloatBatch:
        try:
            ok = (
                batch.ndim == 2
                and batch.shape[1] == self._n_inputs
                and (batch.dtype is F64 or batch.dtype is F32)
                and (flags := batch.flags).c_contiguous
                and flags.aligned
            )
        except AttributeError:
            ok = False
        return batch if ok else _checks.float_batch("batch", batch, self._n_inputs)

    def merge(self, other: ReconstructionState) -> None:
        if not isinstance(other, ReconstructionState) or other._components.shape != (
            self._components.shape
        ):
            raise ValueError("other must be a ReconstructionState of the same model")
        self._state += other._state

    def copy(self) -> ReconstructionState:
        new = ReconstructionState.__new__(ReconstructionState)
        new._n_inputs = self._n_inputs
        new._columns = self._columns
        new._mean = self._mean
        new._inv_scale = self._inv_scale
        new._components = self._components
        new._state = self._state.copy()
        return new

    def reset(self) -> None:
        self._state[:] = 0.0

    @property
    def count(self) -> int:
        return int(self._state[0])

    @property
    def mean(self) -> float:
        """The mean error of the rows seen (NaN before any)."""
        count = self._state[0]
        return float(self._state[1] / count) if count else math.nan

    @property
    def variance(self) -> float:
        """The sample variance (``ddof=1``) of the errors seen (NaN below two rows)."""
        count = self._state[0]
        if count < 2:
            return math.nan
        mean = self._state[1] / count
        return float(max(self._state[2] - count * mean * mean, 0.0) / (count - 1))


def reconstruction_errors(
    batch: npt.ArrayLike,
    mean: npt.ArrayLike,
    scale: npt.ArrayLike,
    components: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """Each row's reconstruction error of a ``[rows, columns]`` batch (every column used)."""
    arr = np.asarray(batch)
    if arr.ndim != 2:
        raise ValueError(f"batch must be 2-D [rows, columns], got shape {arr.shape}")
    state = ReconstructionState(arr.shape[1], np.arange(arr.shape[1]), mean, scale, components)
    return state.errors(np.ascontiguousarray(arr, dtype=np.float64))
