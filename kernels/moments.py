"""Per-feature streaming moments of a ``[rows, features]`` float batch.

:class:`MomentState` keeps, for every feature column,

* ``count``      number of *finite* values seen,
* ``mean``       mean of the finite values,
* ``m2``         sum of squared deviations from the mean (Welford's ``M2``),
* ``min``/``max`` smallest / largest finite value,
* ``nan_count``  number of NaN values,
* ``inf_count``  number of +inf or -inf values.

NaN and infinite values never enter count, mean, M2, min or max; they are only counted.

Updates are exact streaming updates: a batch is reduced by one kernel call (a corrected
two-pass mean/M2 of the batch, then Chan et al.'s parallel combination with the running state; for a
single row this is exactly Welford's update).  :meth:`MomentState.merge` combines two states
with the same formula and :meth:`MomentState.subtract` inverts it, so a sliding window can be
kept as ``window.merge(newest); window.subtract(oldest)``.

Subtracting and extrema
-----------------------
count, mean, M2, NaN and inf counts are subtracted exactly (up to rounding; M2 is clamped at
0).  Minimum and maximum cannot be subtracted: after :meth:`MomentState.subtract` they keep the
values of the larger state, which are then only *bounds* (``min`` <= true minimum, ``max`` >=
true maximum) and :attr:`MomentState.extrema_exact` becomes ``False``.  A feature whose count
drops to 0 is reset to the empty state, whose extrema are exact again.  ``merge`` of two states
with exact extrema gives exact extrema.

Storage
-------
The state is one C-contiguous float64 array ``[7, features]`` (rows in the order above), so a
per-request update passes two arrays to the kernel.  Counts are stored as float64, which is
exact up to 2**53 observations.  :meth:`MomentState.to_array` / :meth:`MomentState.from_array`
expose that array for persistence.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from . import _checks, _native
from ._checks import F32, F64, FloatBatch
from ._config import jit

__all__ = ["MomentState"]

_COUNT: Final = 0
_MEAN: Final = 1
_M2: Final = 2
_MIN: Final = 3
_MAX: Final = 4
_NAN: Final = 5
_INF: Final = 6
_N_ROWS: Final = 7


# --------------------------------------------------------------------------------------------
# Kernels


@jit
def _combine(state: npt.NDArray[np.float64], j: int, nb: float, mb: float, m2b: float) -> None:
    """Chan et al.: fold (nb, mb, m2b) into feature ``j`` of ``state``."""
    if nb == 0.0:
        return
    na = state[0, j]
    n = na + nb
    delta = mb - state[1, j]
    state[1, j] += delta * (nb / n)
    state[2, j] += m2b + delta * delta * (na * (nb / n))
    state[0, j] = n


@jit
def _moments_update(state: npt.NDArray[np.float64], batch: FloatBatch) -> None:
    rows = batch.shape[0]
    n_features = batch.shape[1]
    if rows == 1:
        # Welford's single-observation update: no scratch memory on the per-request path.
        for j in range(n_features):
            x = np.float64(batch[0, j])
            if math.isfinite(x):
                n = state[0, j] + 1.0
                delta = x - state[1, j]
                state[0, j] = n
                state[1, j] += delta / n
                state[2, j] += delta * (x - state[1, j])
                state[3, j] = min(state[3, j], x)
                state[4, j] = max(state[4, j], x)
            elif math.isnan(x):
                state[5, j] += 1.0
            else:
                state[6, j] += 1.0
        return
    # Two-pass batch statistics, row-major so the batch is read sequentially.
    cnt = np.zeros(n_features)
    tot = np.zeros(n_features)
    lo = np.full(n_features, np.inf)
    hi = np.full(n_features, -np.inf)
    nans = np.zeros(n_features)
    infs = np.zeros(n_features)
    for i in range(rows):
        for j in range(n_features):
            x = np.float64(batch[i, j])
            if math.isfinite(x):
                cnt[j] += 1.0
                tot[j] += x
                lo[j] = min(lo[j], x)
                hi[j] = max(hi[j], x)
            elif math.isnan(x):
                nans[j] += 1.0
            else:
                infs[j] += 1.0
    mean_b = np.zeros(n_features)
    for j in range(n_features):
        if cnt[j] > 0.0:
            mean_b[j] = tot[j] / cnt[j]
    # Corrected two-pass (Chan, Golub & LeVeque): the residual sum of the deviations repairs
    # the rounding error of the first-pass mean, to first order, in both mean and M2.
    m2_b = np.zeros(n_features)
    resid = np.zeros(n_features)
    for i in range(rows):
        for j in range(n_features):
            x = np.float64(batch[i, j])
            if math.isfinite(x):
                d = x - mean_b[j]
                m2_b[j] += d * d
                resid[j] += d
    for j in range(n_features):
        if cnt[j] > 0.0:
            correction = resid[j] / cnt[j]
            mean_b[j] += correction
            m2_b[j] = max(m2_b[j] - resid[j] * correction, 0.0)
        _combine(state, j, cnt[j], mean_b[j], m2_b[j])
        state[3, j] = min(state[3, j], lo[j])
        state[4, j] = max(state[4, j], hi[j])
        state[5, j] += nans[j]
        state[6, j] += infs[j]


@jit
def _moments_merge(state: npt.NDArray[np.float64], other: npt.NDArray[np.float64]) -> None:
    for j in range(state.shape[1]):
        _combine(state, j, other[0, j], other[1, j], other[2, j])
        state[3, j] = min(state[3, j], other[3, j])
        state[4, j] = max(state[4, j], other[4, j])
        state[5, j] += other[5, j]
        state[6, j] += other[6, j]


@jit
def _moments_subtract(state: npt.NDArray[np.float64], other: npt.NDArray[np.float64]) -> int:
    """Inverse of :func:`_moments_merge`.  Returns the first bad feature index, or -1.

    Nothing is modified when a count of ``other`` exceeds the matching count of ``state``.
    """
    for j in range(state.shape[1]):
        if other[0, j] > state[0, j] or other[5, j] > state[5, j] or other[6, j] > state[6, j]:
            return j
    for j in range(state.shape[1]):
        n = state[0, j]
        nb = other[0, j]
        na = n - nb
        if na == 0.0:
            state[0, j] = 0.0
            state[1, j] = 0.0
            state[2, j] = 0.0
            state[3, j] = np.inf
            state[4, j] = -np.inf
        elif nb > 0.0:
            mb = other[1, j]
            mean_a = state[1, j] + (state[1, j] - mb) * (nb / na)
            delta = mb - mean_a
            m2_a = state[2, j] - other[2, j] - delta * delta * (na * (nb / n))
            state[0, j] = na
            state[1, j] = mean_a
            state[2, j] = max(m2_a, 0.0)
        state[5, j] -= other[5, j]
        state[6, j] -= other[6, j]
    return -1


# --------------------------------------------------------------------------------------------
# Public API


#: Compiled (``_native``), else numba's; the update as a [float32, float64] pair.
_UPDATE = _native.kernels(_moments_update, "moments_update_f32", "moments_update_f64")
(_MERGE,) = _native.kernels(_moments_merge, "moments_merge")
(_SUBTRACT,) = _native.kernels(_moments_subtract, "moments_subtract")


def _empty(n_features: int) -> npt.NDArray[np.float64]:
    data = np.zeros((_N_ROWS, n_features), dtype=np.float64)
    data[_MIN] = np.inf
    data[_MAX] = -np.inf
    return data


class MomentState:
    """Streaming count/mean/M2/min/max/NaN/inf per feature (see the module docstring).

    Not thread-safe: one state must not be updated from two threads at once (the kernels
    release the GIL).
    """

    __slots__ = ("_data", "_extrema_exact", "_n")

    def __init__(self, n_features: int) -> None:
        if not isinstance(n_features, int | np.integer) or n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        self._n: int = int(n_features)
        self._data: npt.NDArray[np.float64] = _empty(self._n)
        self._extrema_exact: bool = True

    # -- construction / persistence ---------------------------------------------------------

    @classmethod
    def from_batch(cls, batch: FloatBatch) -> MomentState:
        """A new state holding the moments of ``batch`` ``[rows, features]``."""
        if not isinstance(batch, np.ndarray) or batch.ndim != 2:
            raise ValueError("batch must be a 2-D numpy.ndarray [rows, features]")
        state = cls(batch.shape[1])
        state.update(batch)
        return state

    @classmethod
    def from_array(
        cls, data: npt.NDArray[np.float64], *, extrema_exact: bool = True
    ) -> MomentState:
        """Rebuild a state from :meth:`to_array` output (copied)."""
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[0] != _N_ROWS:
            raise ValueError(f"data must be a float array of shape [{_N_ROWS}, features]")
        if data.shape[1] < 1:
            raise ValueError("data must have at least one feature column")
        state = cls(data.shape[1])
        state._data[...] = data
        state._extrema_exact = bool(extrema_exact)
        return state

    def to_array(self) -> npt.NDArray[np.float64]:
        """Copy of the raw state ``[7, features]``: count, mean, M2, min, max, NaN, inf."""
        return self._data.copy()

    def copy(self) -> MomentState:
        return MomentState.from_array(self._data, extrema_exact=self._extrema_exact)

    def reset(self) -> None:
        """Forget everything (back to the empty state)."""
        self._data[...] = _empty(self._n)
        self._extrema_exact = True

    # -- updates ----------------------------------------------------------------------------

    def update(self, batch: FloatBatch) -> None:
        """Add a ``[rows, features]`` float32 or float64 batch (one kernel call, no copy)."""
        try:
            ok = (
                batch.ndim == 2
                and batch.shape[1] == self._n
                and (batch.dtype is F64 or batch.dtype is F32)
                and (flags := batch.flags).c_contiguous
                and flags.aligned
            )
        except AttributeError:
            ok = False
        if not ok:
            batch = _checks.float_batch("batch", batch, self._n)
        _UPDATE[batch.dtype.itemsize == 8](self._data, batch)

    def merge(self, other: MomentState) -> None:
        """Add the observations summarised by ``other`` (Chan et al.'s parallel formula)."""
        self._check_other(other)
        _MERGE(self._data, other._data)
        self._extrema_exact = self._extrema_exact and other._extrema_exact

    def subtract(self, other: MomentState) -> None:
        """Remove the observations summarised by ``other`` (the inverse of :meth:`merge`).

        ``other`` must describe a subset of the observations in ``self`` (e.g. the oldest batch
        of a sliding window); this is not verifiable, only counts are checked: a
        ``ValueError`` is raised, and nothing is changed, if any count of ``other`` exceeds
        the matching count of ``self``.  Min/max become bounds, see the module docstring.
        """
        self._check_other(other)
        bad = int(_SUBTRACT(self._data, other._data))
        if bad >= 0:
            raise ValueError(
                f"other has more observations than this state for feature {bad}; "
                "subtract only a subset of what was merged"
            )
        if np.any(self._data[_COUNT] > 0.0):
            self._extrema_exact = False
        else:
            self._extrema_exact = True

    def _check_other(self, other: MomentState) -> None:
        if not isinstance(other, MomentState):
            raise ValueError(f"other must be a MomentState, got {type(other).__name__}")
        if other._n != self._n:
            raise ValueError(f"other has {other._n} features, this state has {self._n}")

    # -- read-out ---------------------------------------------------------------------------

    def _row(self, index: int) -> npt.NDArray[np.float64]:
        row: npt.NDArray[np.float64] = self._data[index]
        return row

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def extrema_exact(self) -> bool:
        """False once :meth:`subtract` made min/max bounds rather than exact values."""
        return self._extrema_exact

    @property
    def count(self) -> npt.NDArray[np.int64]:
        """Number of finite values per feature."""
        return self._row(_COUNT).astype(np.int64)

    @property
    def nan_count(self) -> npt.NDArray[np.int64]:
        return self._row(_NAN).astype(np.int64)

    @property
    def inf_count(self) -> npt.NDArray[np.int64]:
        """Number of +inf and -inf values per feature."""
        return self._row(_INF).astype(np.int64)

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        """Mean of the finite values; NaN for a feature without finite values."""
        return np.where(self._data[_COUNT] > 0.0, self._data[_MEAN], np.nan)

    @property
    def m2(self) -> npt.NDArray[np.float64]:
        """Sum of squared deviations from the mean (0 for a feature without finite values)."""
        return self._row(_M2).copy()

    @property
    def min(self) -> npt.NDArray[np.float64]:
        """Smallest finite value (a lower bound after ``subtract``); NaN if none."""
        return np.where(self._data[_COUNT] > 0.0, self._data[_MIN], np.nan)

    @property
    def max(self) -> npt.NDArray[np.float64]:
        """Largest finite value (an upper bound after ``subtract``); NaN if none."""
        return np.where(self._data[_COUNT] > 0.0, self._data[_MAX], np.nan)

    def variance(self, ddof: int = 0) -> npt.NDArray[np.float64]:
        """``M2 / (count - ddof)``; NaN where ``count - ddof <= 0``."""
        if not isinstance(ddof, int | np.integer) or ddof < 0:
            raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")
        denom = self._data[_COUNT] - float(ddof)
        out = np.full(self._n, np.nan)
        np.divide(self._data[_M2], denom, out=out, where=denom > 0.0)
        return out

    def std(self, ddof: int = 0) -> npt.NDArray[np.float64]:
        """Square root of :meth:`variance`."""
        return np.sqrt(self.variance(ddof))

    def __repr__(self) -> str:
        total = float(self._data[_COUNT].sum())
        return f"MomentState(n_features={self._n}, finite_values={total:.0f})"
