"""Counts of float batches on fixed per-feature reference edges, and categorical counts.

Numeric bins
------------
:class:`BinEdges` holds, for every feature ``f``, ``sizes[f] >= 2`` strictly increasing edges
``e_0 < e_1 < ... < e_k`` (``k = sizes[f] - 1`` bins) in the rows of a rectangular float64
array ``values[features, max_edges]``; rows with fewer edges are padded with NaN at the end.
Edges may be ``-inf``/``+inf``.

Every value ``x`` is placed by ONE binary search (``searchsorted(edges, x, side="right")``):

* ``x < e_0``                                 -> **underflow**
* ``e_{i} <= x < e_{i+1}`` for ``i < k - 1``  -> **bin i** (bins are left-closed, right-open)
* ``e_{k-1} <= x <= e_k``                      -> **bin k-1** (the last bin is closed on both
  sides, as in ``numpy.histogram``, so a reference maximum used as last edge lands in it)
* ``x > e_k``                                  -> **overflow**
* ``x`` is NaN                                 -> **nan**

``-inf`` therefore goes to underflow and ``+inf`` to overflow (unless an edge is infinite).

Counts layout (int64, ``[features, n_bins + 3]`` with ``n_bins = max_edges - 1``)::

    [underflow, bin_0, ..., bin_{n_bins-1}, overflow, nan]

A feature with fewer bins than ``n_bins`` has its unused bins, between its last bin and the
overflow column, always 0; such always-empty bins contribute nothing to any drift statistic
in :mod:`edgewise.kernels.drift`.

Categorical counts
------------------
Codes are ints already mapped through a category table: feature ``f`` has categories
``0 .. n_categories[f] - 1``.  Layout (int64, ``[features, max(n_categories) + 1]``)::

    [cat_0, ..., cat_{C-1}, unseen]

Any code outside ``[0, n_categories[f])`` (``-1`` for "not in the table", or out of range)
is counted in the last column, ``unseen``.  Columns ``n_categories[f] .. C-1`` of a feature
with fewer categories stay 0.

Counts of either kind are merged by addition (``merge``) and windowed by subtraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from . import _checks, _native
from ._checks import F32, F64, I32, I64, CodeBatch, FloatBatch
from ._config import jit

__all__ = [
    "DEFAULT_N_BINS",
    "MAX_EDGES",
    "BinEdges",
    "CategoricalState",
    "HistogramState",
    "categorical_counts",
    "histogram_counts",
    "quantile_edges",
]

#: Number of bins :func:`quantile_edges` makes by default.
DEFAULT_N_BINS: Final = 10
#: Most edges per feature a :class:`BinEdges` may have (the unrolled search has 10 levels).
MAX_EDGES: Final = 1023


# --------------------------------------------------------------------------------------------
# Kernels


@jit
def _histogram_update(
    counts: npt.NDArray[np.int64],
    batch: FloatBatch,
    table: npt.NDArray[np.float64],
    sizes: npt.NDArray[np.int64],
    top: int,
) -> None:
    """Add ``batch`` to ``counts``; ``table``/``top`` come from :attr:`BinEdges.search_table`.

    The binary search is unrolled (one predictable ``if`` per level instead of a loop): a
    search loop whose trip count the CPU cannot see through runs ~10x slower here, because
    the searches of neighbouring features can no longer overlap.
    """
    rows = batch.shape[0]
    n_features = batch.shape[1]
    nan_col = counts.shape[1] - 1
    over_col = nan_col - 1
    for i in range(rows):
        for j in range(n_features):
            x = np.float64(batch[i, j])
            if math.isnan(x):
                counts[j, nan_col] += 1
                continue
            # base = number of table entries <= x = searchsorted(edges, x, side="right") for
            # finite x (the +inf padding is never <= a finite x).
            base = 0
            if top >= 512:
                base += 512 * (table[j, base + 511] <= x)
            if top >= 256:
                base += 256 * (table[j, base + 255] <= x)
            if top >= 128:
                base += 128 * (table[j, base + 127] <= x)
            if top >= 64:
                base += 64 * (table[j, base + 63] <= x)
            if top >= 32:
                base += 32 * (table[j, base + 31] <= x)
            if top >= 16:
                base += 16 * (table[j, base + 15] <= x)
            if top >= 8:
                base += 8 * (table[j, base + 7] <= x)
            if top >= 4:
                base += 4 * (table[j, base + 3] <= x)
            if top >= 2:
                base += 2 * (table[j, base + 1] <= x)
            base += table[j, base] <= x
            size = sizes[j]
            col = base
            if base >= size:
                # x >= last edge: the closed last bin holds x == e_k, anything above overflows
                # (this also routes x == +inf, which the padding would count, correctly).
                col = size - 1 if x == table[j, size - 1] else over_col
            counts[j, col] += 1


@jit
def _categorical_update(
    counts: npt.NDArray[np.int64], codes: CodeBatch, n_categories: npt.NDArray[np.int64]
) -> None:
    rows = codes.shape[0]
    n_features = codes.shape[1]
    unseen = counts.shape[1] - 1
    for i in range(rows):
        for j in range(n_features):
            c = np.int64(codes[i, j])
            if c >= 0 and c < n_categories[j]:
                counts[j, c] += 1
            else:
                counts[j, unseen] += 1


#: [32-bit, 64-bit] variants: compiled (``_native``), else numba's.
_HISTOGRAM_UPDATE = _native.kernels(
    _histogram_update, "histogram_update_f32", "histogram_update_f64"
)
_CATEGORICAL_UPDATE = _native.kernels(
    _categorical_update, "categorical_update_i32", "categorical_update_i64"
)


# --------------------------------------------------------------------------------------------
# Edges


def _readonly(a: npt.NDArray[np.generic]) -> None:
    a.setflags(write=False)


@dataclass(frozen=True, eq=False)
class BinEdges:
    """Per-feature strictly increasing bin edges (see the module docstring for the rules).

    ``values`` ``[features, max_edges]`` float64, NaN-padded at the end of short rows;
    ``sizes`` ``[features]`` int64, the number of valid edges of each row (>= 2).
    Build with :meth:`from_array`, :meth:`from_ragged` or :func:`quantile_edges`; the arrays
    are validated once and made read-only.
    """

    values: npt.NDArray[np.float64]
    sizes: npt.NDArray[np.int64]
    #: Representative value of each non-NaN layout column ``[features, n_bins + 2]``:
    #: underflow -> first edge, bin -> midpoint of its edges, unused bins and overflow -> last
    #: edge.  Non-decreasing per feature; used by the binned Wasserstein distance.
    support: npt.NDArray[np.float64] = field(init=False, repr=False)
    #: Search table for the kernels: ``[features, 2**L - 1]`` with each row's edges followed
    #: by ``+inf`` (``2**L`` is the smallest power of two > ``max_edges``)...
    search_table: npt.NDArray[np.float64] = field(init=False, repr=False)
    #: ... and ``2**(L-1)``, the first step of the unrolled binary search.
    search_top: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = self.values
        sizes = self.sizes
        if not isinstance(values, np.ndarray) or values.ndim != 2 or values.dtype != F64:
            raise ValueError("values must be a float64 array [features, max_edges]")
        if not isinstance(sizes, np.ndarray) or sizes.ndim != 1 or sizes.dtype != I64:
            raise ValueError("sizes must be an int64 array [features]")
        n_features, max_edges = values.shape
        if n_features < 1:
            raise ValueError("values must describe at least one feature")
        if sizes.shape[0] != n_features:
            raise ValueError(f"sizes must have {n_features} entries, got {sizes.shape[0]}")
        if max_edges < 2:
            raise ValueError("values must hold at least 2 edges per feature")
        if max_edges > MAX_EDGES:
            raise ValueError(
                f"at most {MAX_EDGES} edges per feature are supported, got {max_edges}"
            )
        if np.any(sizes < 2) or np.any(sizes > max_edges):
            raise ValueError(f"sizes must lie in [2, {max_edges}], got {sizes.tolist()}")
        if int(sizes.max()) != max_edges:
            raise ValueError("values has trailing all-padding columns; trim them")
        cols = np.arange(max_edges)
        valid = cols[np.newaxis, :] < sizes[:, np.newaxis]
        if np.any(np.isnan(values[valid])):
            raise ValueError("values must not contain NaN edges (NaN is only padding)")
        if np.any(~np.isnan(values[~valid])):
            raise ValueError("values must be NaN-padded beyond each feature's size")
        steps_valid = valid[:, 1:]
        diffs = values[:, 1:] > values[:, :-1]
        bad = steps_valid & ~diffs
        if np.any(bad):
            feature = int(np.nonzero(bad.any(axis=1))[0][0])
            raise ValueError(f"values must be strictly increasing per feature (feature {feature})")
        values = np.ascontiguousarray(values)
        sizes = np.ascontiguousarray(sizes)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "support", _support(values, sizes))
        levels = int(max_edges).bit_length()  # 2**levels > max_edges
        table = np.full((n_features, 2**levels - 1), np.inf)
        table[:, :max_edges] = np.where(valid, values, np.inf)
        object.__setattr__(self, "search_table", table)
        object.__setattr__(self, "search_top", 2 ** (levels - 1))
        _readonly(self.values)
        _readonly(self.sizes)
        _readonly(self.support)
        _readonly(self.search_table)

    @classmethod
    def from_array(cls, edges: npt.ArrayLike) -> BinEdges:
        """From a rectangular ``[features, n_edges]`` array; trailing NaNs mark unused edges."""
        arr = np.array(edges, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"edges must be 2-D [features, n_edges], got shape {arr.shape}")
        sizes = np.sum(~np.isnan(arr), axis=1).astype(np.int64)
        if arr.shape[1] and sizes.size:
            arr = arr[:, : max(int(sizes.max()), 2)]
        return cls(arr, sizes)

    @classmethod
    def from_ragged(cls, edges: Sequence[npt.ArrayLike]) -> BinEdges:
        """From one 1-D edge vector per feature (lengths may differ)."""
        rows = [np.asarray(e, dtype=np.float64).ravel() for e in edges]
        if not rows:
            raise ValueError("edges must describe at least one feature")
        width = max(r.size for r in rows)
        values = np.full((len(rows), max(width, 2)), np.nan)
        for i, r in enumerate(rows):
            values[i, : r.size] = r
        return cls(values, np.array([r.size for r in rows], dtype=np.int64))

    @property
    def n_features(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_bins(self) -> int:
        """Number of regular bin columns in the counts layout (the widest feature's)."""
        return int(self.values.shape[1]) - 1

    @property
    def width(self) -> int:
        """Columns of a counts array: underflow + ``n_bins`` + overflow + nan."""
        return self.n_bins + 3

    @property
    def overflow_column(self) -> int:
        return self.n_bins + 1

    @property
    def nan_column(self) -> int:
        return self.n_bins + 2

    def edges_of(self, feature: int) -> npt.NDArray[np.float64]:
        """The valid edges of one feature (a read-only view)."""
        return self.values[feature, : int(self.sizes[feature])]


def _support(
    values: npt.NDArray[np.float64], sizes: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    n_features, max_edges = values.shape
    support = np.empty((n_features, max_edges + 1))
    for f in range(n_features):
        e = values[f, : sizes[f]]
        last = e[-1]
        support[f, 0] = e[0]
        with np.errstate(invalid="ignore", over="ignore"):
            support[f, 1 : e.size] = 0.5 * e[:-1] + 0.5 * e[1:]
        support[f, e.size :] = last
    return support


def quantile_edges(sample: npt.ArrayLike, n_bins: int = DEFAULT_N_BINS) -> BinEdges:
    """Reference edges from a ``[rows, features]`` sample (not for the request path).

    Per feature, over the *finite* values of the sample:

    * no finite value (e.g. an all-NaN column): one catch-all bin ``[-inf, +inf]``;
    * at most ``n_bins`` distinct values (constant, binary, small discrete columns): one bin per
      distinct value, edges = the distinct values followed by ``nextafter(max, +inf)``, so a
      constant column ``c`` gets the single bin ``[c, nextafter(c, inf)]``;
    * otherwise the ``n_bins + 1`` quantiles at ``linspace(0, 1, n_bins + 1)`` (numpy's
      default linear interpolation), deduplicated, so point masses never create empty
      zero-width bins.  The first/last edge are the sample minimum/maximum.
    """
    arr = np.asarray(sample)
    if arr.ndim == 1:
        arr = arr[:, np.newaxis]
    if arr.ndim != 2 or arr.dtype.kind not in "iuf":
        raise ValueError(f"sample must be a numeric [rows, features] array, got shape {arr.shape}")
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if arr.shape[1] < 1:
        raise ValueError("sample must have at least one feature column")
    probs = np.linspace(0.0, 1.0, int(n_bins) + 1)
    rows: list[npt.NDArray[np.float64]] = []
    for f in range(arr.shape[1]):
        col = arr[:, f].astype(np.float64)
        col = col[np.isfinite(col)]
        if col.size == 0:
            rows.append(np.array([-np.inf, np.inf]))
            continue
        distinct = np.unique(col)
        if distinct.size <= n_bins:
            rows.append(np.append(distinct, np.nextafter(distinct[-1], np.inf)))
        else:
            rows.append(np.unique(np.quantile(col, probs)))
    return BinEdges.from_ragged(rows)


# --------------------------------------------------------------------------------------------
# Stateful counters


class HistogramState:
    """Running counts of float batches on fixed :class:`BinEdges` (layout: module docstring)."""

    __slots__ = ("_counts", "_edges", "_n", "_sizes", "_table", "_top")

    def __init__(self, edges: BinEdges) -> None:
        if not isinstance(edges, BinEdges):
            raise ValueError(f"edges must be a BinEdges, got {type(edges).__name__}")
        self._edges = edges
        self._table = edges.search_table
        self._sizes = edges.sizes
        self._top = edges.search_top
        self._n = edges.n_features
        self._counts: npt.NDArray[np.int64] = np.zeros((self._n, edges.width), dtype=np.int64)

    @property
    def edges(self) -> BinEdges:
        return self._edges

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def counts(self) -> npt.NDArray[np.int64]:
        """Copy of the counts ``[features, n_bins + 3]``."""
        return self._counts.copy()

    def update(self, batch: FloatBatch) -> None:
        """Count a ``[rows, features]`` float32/float64 batch (one kernel call, no copy)."""
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
        _HISTOGRAM_UPDATE[batch.dtype.itemsize == 8](
            self._counts, batch, self._table, self._sizes, self._top
        )

    def merge(self, other: HistogramState) -> None:
        self._check_other(other)
        self._counts += other._counts

    def subtract(self, other: HistogramState) -> None:
        """Remove counts of a subset (e.g. the oldest batch of a window); exact."""
        self._check_other(other)
        if np.any(other._counts > self._counts):
            raise ValueError("other has more counts than this state in some bin")
        self._counts -= other._counts

    def copy(self) -> HistogramState:
        new = HistogramState(self._edges)
        new._counts[...] = self._counts
        return new

    def reset(self) -> None:
        self._counts[...] = 0

    def _check_other(self, other: HistogramState) -> None:
        if not isinstance(other, HistogramState):
            raise ValueError(f"other must be a HistogramState, got {type(other).__name__}")
        if other._edges is not self._edges and not (
            other._counts.shape == self._counts.shape
            and np.array_equal(other._edges.values, self._edges.values, equal_nan=True)
        ):
            raise ValueError("other must use the same BinEdges")


def histogram_counts(batch: FloatBatch, edges: BinEdges) -> npt.NDArray[np.int64]:
    """Counts ``[features, n_bins + 3]`` of one float batch on ``edges``."""
    if not isinstance(edges, BinEdges):
        raise ValueError(f"edges must be a BinEdges, got {type(edges).__name__}")
    state = HistogramState(edges)
    state.update(batch)
    return state._counts


def _as_n_categories(n_categories: npt.ArrayLike) -> npt.NDArray[np.int64]:
    arr = np.array(n_categories, dtype=np.int64, ndmin=1)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("n_categories must be a non-empty 1-D sequence of ints")
    if np.any(arr < 0):
        raise ValueError(f"n_categories must be >= 0, got {arr.tolist()}")
    arr.setflags(write=False)
    return arr


class CategoricalState:
    """Running per-feature category counts with an ``unseen`` bucket (last column)."""

    __slots__ = ("_counts", "_n", "_n_categories")

    def __init__(self, n_categories: npt.ArrayLike) -> None:
        self._n_categories = _as_n_categories(n_categories)
        self._n = int(self._n_categories.size)
        width = int(self._n_categories.max()) + 1
        self._counts: npt.NDArray[np.int64] = np.zeros((self._n, width), dtype=np.int64)

    @property
    def n_categories(self) -> npt.NDArray[np.int64]:
        return self._n_categories

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def counts(self) -> npt.NDArray[np.int64]:
        """Copy of the counts ``[features, max(n_categories) + 1]``; last column = unseen."""
        return self._counts.copy()

    def update(self, codes: CodeBatch) -> None:
        """Count a ``[rows, features]`` int32/int64 batch of codes (one kernel call)."""
        try:
            ok = (
                codes.ndim == 2
                and codes.shape[1] == self._n
                and (codes.dtype is I64 or codes.dtype is I32)
                and (flags := codes.flags).c_contiguous
                and flags.aligned
            )
        except AttributeError:
            ok = False
        if not ok:
            codes = _checks.code_batch("codes", codes, self._n)
        _CATEGORICAL_UPDATE[codes.dtype.itemsize == 8](self._counts, codes, self._n_categories)

    def merge(self, other: CategoricalState) -> None:
        self._check_other(other)
        self._counts += other._counts

    def subtract(self, other: CategoricalState) -> None:
        self._check_other(other)
        if np.any(other._counts > self._counts):
            raise ValueError("other has more counts than this state in some category")
        self._counts -= other._counts

    def copy(self) -> CategoricalState:
        new = CategoricalState(self._n_categories)
        new._counts[...] = self._counts
        return new

    def reset(self) -> None:
        self._counts[...] = 0

    def _check_other(self, other: CategoricalState) -> None:
        if not isinstance(other, CategoricalState):
            raise ValueError(f"other must be a CategoricalState, got {type(other).__name__}")
        if not np.array_equal(other._n_categories, self._n_categories):
            raise ValueError("other must have the same n_categories")


def categorical_counts(codes: CodeBatch, n_categories: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Counts ``[features, max(n_categories) + 1]`` of one batch of codes."""
    state = CategoricalState(n_categories)
    state.update(codes)
    return state._counts
