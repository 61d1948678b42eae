"""Moments and histogram of the same numeric features, updated by ONE kernel call.

:class:`FeatureProfile` is the per-request entry point for numeric features: it owns a
:class:`~edgewise.kernels.moments.MomentState` and a
:class:`~edgewise.kernels.histograms.HistogramState` on the same features and updates both with
a single dispatch into compiled code (one argument check, one kernel call).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import _checks, _native
from ._checks import F32, F64, FloatBatch
from ._config import jit
from .histograms import BinEdges, HistogramState, _histogram_update
from .moments import MomentState, _moments_update

__all__ = ["FeatureProfile"]


@jit
def _profile_update(
    state: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    batch: FloatBatch,
    table: npt.NDArray[np.float64],
    sizes: npt.NDArray[np.int64],
    top: int,
) -> None:
    _moments_update(state, batch)
    _histogram_update(counts, batch, table, sizes, top)


#: [float32, float64] variants: compiled (``_native``), else numba's.
_UPDATE = _native.kernels(_profile_update, "profile_update_f32", "profile_update_f64")


class FeatureProfile:
    """Streaming moments + reference-binned histogram of ``edges.n_features`` features."""

    __slots__ = ("_counts", "_hist", "_moments", "_n", "_sizes", "_state", "_table", "_top")

    def __init__(self, edges: BinEdges) -> None:
        if not isinstance(edges, BinEdges):
            raise ValueError(f"edges must be a BinEdges, got {type(edges).__name__}")
        self._n = edges.n_features
        self._moments = MomentState(self._n)
        self._hist = HistogramState(edges)
        # Direct references to the arrays the kernel mutates (no attribute chains per call).
        self._state = self._moments._data
        self._counts = self._hist._counts
        self._table = edges.search_table
        self._sizes = edges.sizes
        self._top = edges.search_top

    @property
    def moments(self) -> MomentState:
        """The live moment state (updated in place by :meth:`update`)."""
        return self._moments

    @property
    def histogram(self) -> HistogramState:
        """The live histogram state (updated in place by :meth:`update`)."""
        return self._hist

    @property
    def edges(self) -> BinEdges:
        return self._hist.edges

    @property
    def n_features(self) -> int:
        return self._n

    def update(self, batch: FloatBatch) -> None:
        """Add a ``[rows, features]`` float32/float64 batch to both states (one kernel call)."""
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
        _UPDATE[batch.dtype.itemsize == 8](
            self._state, self._counts, batch, self._table, self._sizes, self._top
        )

    def merge(self, other: FeatureProfile) -> None:
        self._check_other(other)
        self._moments.merge(other._moments)
        self._hist.merge(other._hist)

    def subtract(self, other: FeatureProfile) -> None:
        """Remove a subset (see :meth:`MomentState.subtract` for what happens to min/max)."""
        self._check_other(other)
        self._hist._check_other(other._hist)
        if np.any(other._counts > self._counts):
            raise ValueError("other has more counts than this profile in some bin")
        self._moments.subtract(other._moments)
        self._counts -= other._counts

    def copy(self) -> FeatureProfile:
        new = FeatureProfile(self._hist.edges)
        new._state[...] = self._state
        new._moments._extrema_exact = self._moments._extrema_exact
        new._counts[...] = self._counts
        return new

    def reset(self) -> None:
        self._moments.reset()
        self._hist.reset()

    def _check_other(self, other: FeatureProfile) -> None:
        if not isinstance(other, FeatureProfile):
            raise ValueError(f"other must be a FeatureProfile, got {type(other).__name__}")
