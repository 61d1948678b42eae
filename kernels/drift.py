"""Drift between a reference and a current distribution.

From counts (vectorised over features)
--------------------------------------
Every count function takes ``reference`` and ``current`` counts of the same shape, either
``[features, bins]`` or a single ``[bins]`` vector, with any integer or float dtype, and
returns one value per feature (shape ``[features]``, or a 0-d array for a 1-D input).
A feature whose reference or current counts total 0 (an empty window), or which has a
negative or non-finite count, gets NaN.

* :func:`psi` - Population Stability Index ``sum_i (q_i - p_i) ln(q_i / p_i)`` over the
  proportions ``p = reference / sum(reference)``, ``q = current / sum(current)``.
  **Epsilon rule:** each proportion is clipped from below, ``p_i <- max(p_i, eps)``,
  ``q_i <- max(q_i, eps)`` with ``eps = PSI_EPSILON = 1e-4`` by default, and *not*
  renormalised.  A bin empty on both sides therefore contributes exactly 0; a bin empty on
  one side contributes a finite, eps-bounded amount instead of infinity.
  **Smoothing rule** (``smoothing = a > 0``, what the monitor uses): additive smoothing of both
  histograms over the ``k`` columns non-empty on either side, ``p_i = (r_i + a) / (R + a k)``,
  ``q_i = (c_i + a) / (C + a k)``; columns empty on both sides are left out.  A column the
  reference has no row in then weighs as half a row of it (``a = 0.5``), not as the arbitrary
  ``eps`` share.
* :func:`jensenshannon` - Jensen-Shannon **distance** (the square root of the divergence),
  natural log unless ``base`` is given: the same value as
  ``scipy.spatial.distance.jensenshannon(reference, current, base)``.  A divergence that
  rounds to a tiny negative number is clamped to 0 (SciPy would return NaN).
* :func:`wasserstein_binned` - Wasserstein-1 between the two binned distributions, each
  bin's mass placed at ``support`` (non-decreasing): the same value as
  ``scipy.stats.wasserstein_distance(support, support, reference, current)``.
* :func:`ks_binned` - Kolmogorov-Smirnov statistic ``max_i |F_ref(i) - F_cur(i)|`` of the
  binned CDFs (a lower bound of the raw-sample statistic).
* :func:`chi2_homogeneity` - Pearson chi-square test of homogeneity of the 2 x k table
  ``[reference, current]``, mirroring ``scipy.stats.chi2_contingency(table)`` (default
  ``correction=True``: Yates' correction when the test has 1 degree of freedom).
  **Empty bins:** columns that are 0 in *both* rows are dropped before the test (SciPy raises
  on them because their expected frequency is 0); ``dof = (non-empty columns) - 1``.  With a
  single non-empty column ``dof = 0``, statistic 0 and p-value 1, as SciPy.  The p-value is
  ``chi2.sf(statistic, dof)`` computed with an own regularised upper incomplete gamma.
  **Pooling** (``min_expected = m > 0``, what the monitor uses, ``m = 5``: Cochran's rule):
  the non-empty columns are pooled in column order, left to right, each pool closing once its
  expected count in the smaller row, ``min(R, C) * pool / (R + C)``, reaches ``m``; a last
  pool short of ``m`` joins the pool before it.  The test is then
  ``chi2_contingency`` of the pooled table (same statistic, p-value and dof), valid where
  the chi-square approximation needs adequate expected counts.  ``m = 0`` pools nothing.
* :func:`linf_distance` - L-infinity distance ``max_i |p_i - q_i|`` of the frequency vectors
  (meant for categorical counts).
* :func:`drift_scores` - all of the above for many features in ONE kernel call.  For a
  numeric histogram (``edges`` given, layout of :mod:`edgewise.kernels.histograms`) PSI,
  Jensen-Shannon, chi-square and L-infinity use every column *including* underflow,
  overflow and the NaN column (a change in missing-value rate is drift); Wasserstein and the
  binned KS use the ordered columns underflow..overflow only (NaN column excluded), with
  :attr:`BinEdges.support` as bin values (under/overflow mass sits at the outer edges, so
  the Wasserstein distance is a lower bound when values fall outside the reference range).
  For categorical counts (``edges=None``) the ordered statistics are NaN.
* :func:`open_ended` - numeric histogram counts with the underflow folded into the first bin
  and the overflow into the last (open outer bins), as the monitor scores them.
* :func:`holm` - Holm-Bonferroni adjusted p-values (family-wise error control over features).

From raw samples
----------------
* :func:`ks_2samp` - two-sided two-sample Kolmogorov-Smirnov statistic and p-value with the
  semantics of ``scipy.stats.ks_2samp(x, y, method=...)``: ``method="auto"`` is exact when
  ``max(n1, n2) <= 10000`` and asymptotic otherwise; ``"exact"`` falls back to ``"asymp"``
  (with a ``RuntimeWarning``) when ``lcm(n1, n2)`` does not fit an int32 or the exact
  computation fails; ``"asymp"`` uses ``kstwo.sf(d, round(n1 n2 / (n1 + n2)))``.
  NaN input gives NaN results (``nan_policy="propagate"``) or is dropped
  (``nan_policy="omit"``).  An empty sample gives NaN results, as SciPy.
* :func:`wasserstein_samples` - ``scipy.stats.wasserstein_distance(u, v)``; NaN input gives
  NaN, an empty sample gives NaN (SciPy raises).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from . import _checks, _native
from ._checks import F32, F64, counts_2d
from ._config import jit
from ._special import (
    _chi2_sf,
    _ks2_prob_outside_band,
    _ks2_prob_outside_square,
    _kstwo_sf,
)
from .histograms import BinEdges

__all__ = [
    "KS_AUTO_EXACT_MAX_N",
    "PSI_EPSILON",
    "Chi2Result",
    "DriftScores",
    "KSResult",
    "chi2_homogeneity",
    "drift_scores",
    "holm",
    "jensenshannon",
    "ks_2samp",
    "ks_binned",
    "linf_distance",
    "open_ended",
    "psi",
    "wasserstein_binned",
    "wasserstein_samples",
]

#: Default lower clip for bin proportions in :func:`psi`.
PSI_EPSILON: Final = 1e-4
#: ``ks_2samp(method="auto")`` is exact up to this sample size (SciPy's ``MAX_AUTO_N``).
KS_AUTO_EXACT_MAX_N: Final = 10000
_INT32_MAX: Final = 2**31 - 1

# Rows of the drift_scores output.
_PSI: Final = 0
_JS: Final = 1
_WASSERSTEIN: Final = 2
_KS: Final = 3
_CHI2: Final = 4
_CHI2_P: Final = 5
_CHI2_DOF: Final = 6
_LINF: Final = 7
_N_SCORES: Final = 8


# --------------------------------------------------------------------------------------------
# Row kernels (one feature)


@jit
def _total(row: npt.NDArray[np.float64]) -> float:
    """Sum of a count row, or -1.0 if a count is negative or not finite."""
    s = 0.0
    for v in row:
        if not (v >= 0.0 and v < np.inf):
            return -1.0
        s += v
    return s


@jit
def _psi_row(
    r: npt.NDArray[np.float64], c: npt.NDArray[np.float64], eps: float, smoothing: float
) -> float:
    tr = _total(r)
    tc = _total(c)
    if not (tr > 0.0 and tc > 0.0):
        return np.nan
    s = 0.0
    if smoothing > 0.0:
        # Additive smoothing over the columns non-empty on either side.
        k = 0
        for i in range(r.shape[0]):
            if r[i] + c[i] > 0.0:
                k += 1
        sr = tr + smoothing * k
        sc = tc + smoothing * k
        for i in range(r.shape[0]):
            if r[i] + c[i] > 0.0:
                p = (r[i] + smoothing) / sr
                q = (c[i] + smoothing) / sc
                s += (q - p) * math.log(q / p)
        return s
    for i in range(r.shape[0]):
        p = max(r[i] / tr, eps)
        q = max(c[i] / tc, eps)
        s += (q - p) * math.log(q / p)
    return s


@jit
def _js_row(r: npt.NDArray[np.float64], c: npt.NDArray[np.float64], log_base: float) -> float:
    tr = _total(r)
    tc = _total(c)
    if not (tr > 0.0 and tc > 0.0):
        return np.nan
    left = 0.0
    right = 0.0
    for i in range(r.shape[0]):
        p = r[i] / tr
        q = c[i] / tc
        m = (p + q) / 2.0
        if p > 0.0:
            left += p * math.log(p / m)
        if q > 0.0:
            right += q * math.log(q / m)
    js = left + right
    if log_base > 0.0:
        js /= log_base
    return math.sqrt(max(js / 2.0, 0.0))


@jit
def _wasserstein_row(
    r: npt.NDArray[np.float64], c: npt.NDArray[np.float64], support: npt.NDArray[np.float64]
) -> float:
    tr = _total(r)
    tc = _total(c)
    if not (tr > 0.0 and tc > 0.0):
        return np.nan
    cr = 0.0
    cc = 0.0
    s = 0.0
    for i in range(r.shape[0] - 1):
        cr += r[i]
        cc += c[i]
        s += abs(cr / tr - cc / tc) * (support[i + 1] - support[i])
    return s


@jit
def _ks_binned_row(r: npt.NDArray[np.float64], c: npt.NDArray[np.float64]) -> float:
    tr = _total(r)
    tc = _total(c)
    if not (tr > 0.0 and tc > 0.0):
        return np.nan
    cr = 0.0
    cc = 0.0
    d = 0.0
    for i in range(r.shape[0]):
        cr += r[i]
        cc += c[i]
        d = max(d, abs(cr / tr - cc / tc))
    return d


@jit
def _linf_row(r: npt.NDArray[np.float64], c: npt.NDArray[np.float64]) -> float:
    tr = _total(r)
    tc = _total(c)
    if not (tr > 0.0 and tc > 0.0):
        return np.nan
    d = 0.0
    for i in range(r.shape[0]):
        d = max(d, abs(r[i] / tr - c[i] / tc))
    return d


@jit
def _yates(observed: float, expected: float) -> float:
    diff = expected - observed
    step = min(0.5, abs(diff))
    if diff > 0.0:
        return observed + step
    if diff < 0.0:
        return observed - step
    return observed


@jit
def _chi2_row(
    r: npt.NDArray[np.float64],
    c: npt.NDArray[np.float64],
    correction: bool,
    min_expected: float,
) -> tuple[float, float, float]:
    """(statistic, p-value, dof) of chi2_contingency on [r, c] pooled: all-zero columns dropped,
    adjacent columns pooled until both expected counts reach ``min_expected`` (0: no pooling)."""
    tr = _total(r)
    tc = _total(c)
    if not (tr > 0.0 and tc > 0.0):
        return np.nan, np.nan, np.nan
    total = tr + tc
    # A pooled column of total ``col`` expects min(tr, tc) * col / total in its smaller row.
    need = min_expected * total / min(tr, tc)
    pooled_r = np.zeros(r.shape[0])
    pooled_c = np.zeros(r.shape[0])
    n_cols = 0
    open_total = 0.0
    for i in range(r.shape[0]):
        col = r[i] + c[i]
        if col > 0.0:
            pooled_r[n_cols] += r[i]
            pooled_c[n_cols] += c[i]
            open_total += col
            if open_total >= need:
                n_cols += 1
                open_total = 0.0
    if open_total > 0.0:  # a last pool short of the minimum joins the one before it
        if n_cols > 0:
            pooled_r[n_cols - 1] += pooled_r[n_cols]
            pooled_c[n_cols - 1] += pooled_c[n_cols]
        else:
            n_cols = 1
    dof = n_cols - 1
    if dof == 0:
        return 0.0, 1.0, 0.0
    yates = correction and dof == 1
    stat = 0.0
    for i in range(n_cols):
        col = pooled_r[i] + pooled_c[i]
        er = tr * col / total
        ec = tc * col / total
        o_r = pooled_r[i]
        o_c = pooled_c[i]
        if yates:
            o_r = _yates(o_r, er)
            o_c = _yates(o_c, ec)
        stat += (o_r - er) ** 2 / er + (o_c - ec) ** 2 / ec
    return stat, _chi2_sf(stat, float(dof)), float(dof)


# --------------------------------------------------------------------------------------------
# Vectorised kernels


@jit
def _psi_2d(
    ref: npt.NDArray[np.float64], cur: npt.NDArray[np.float64], eps: float, smoothing: float
) -> npt.NDArray[np.float64]:
    out = np.empty(ref.shape[0])
    for f in range(ref.shape[0]):
        out[f] = _psi_row(ref[f], cur[f], eps, smoothing)
    return out


@jit
def _js_2d(
    ref: npt.NDArray[np.float64], cur: npt.NDArray[np.float64], log_base: float
) -> npt.NDArray[np.float64]:
    out = np.empty(ref.shape[0])
    for f in range(ref.shape[0]):
        out[f] = _js_row(ref[f], cur[f], log_base)
    return out


@jit
def _wasserstein_2d(
    ref: npt.NDArray[np.float64], cur: npt.NDArray[np.float64], support: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    out = np.empty(ref.shape[0])
    for f in range(ref.shape[0]):
        out[f] = _wasserstein_row(ref[f], cur[f], support[f])
    return out


@jit
def _ks_binned_2d(
    ref: npt.NDArray[np.float64], cur: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    out = np.empty(ref.shape[0])
    for f in range(ref.shape[0]):
        out[f] = _ks_binned_row(ref[f], cur[f])
    return out


@jit
def _linf_2d(ref: npt.NDArray[np.float64], cur: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out = np.empty(ref.shape[0])
    for f in range(ref.shape[0]):
        out[f] = _linf_row(ref[f], cur[f])
    return out


@jit
def _chi2_2d(
    ref: npt.NDArray[np.float64],
    cur: npt.NDArray[np.float64],
    correction: bool,
    min_expected: float,
) -> npt.NDArray[np.float64]:
    out = np.empty((3, ref.shape[0]))
    for f in range(ref.shape[0]):
        stat, p, dof = _chi2_row(ref[f], cur[f], correction, min_expected)
        out[0, f] = stat
        out[1, f] = p
        out[2, f] = dof
    return out


@jit
def _drift_all(
    ref: npt.NDArray[np.float64],
    cur: npt.NDArray[np.float64],
    support: npt.NDArray[np.float64],
    ordered: bool,
    eps: float,
    log_base: float,
    correction: bool,
    smoothing: float,
    min_expected: float,
) -> npt.NDArray[np.float64]:
    n_features = ref.shape[0]
    n_ordered = ref.shape[1] - 1  # all but the NaN column
    out = np.empty((8, n_features))
    for f in range(n_features):
        r = ref[f]
        c = cur[f]
        out[0, f] = _psi_row(r, c, eps, smoothing)
        out[1, f] = _js_row(r, c, log_base)
        if ordered:
            out[2, f] = _wasserstein_row(r[:n_ordered], c[:n_ordered], support[f])
            out[3, f] = _ks_binned_row(r[:n_ordered], c[:n_ordered])
        else:
            out[2, f] = np.nan
            out[3, f] = np.nan
        stat, p, dof = _chi2_row(r, c, correction, min_expected)
        out[4, f] = stat
        out[5, f] = p
        out[6, f] = dof
        out[7, f] = _linf_row(r, c)
    return out


@jit
def _ks_statistic(
    a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]
) -> tuple[float, float, int]:
    """(D, location, sign) of the two-sided statistic for sorted NaN-free samples.

    Mirrors ks_2samp: the ECDF difference ``i/n1 - j/n2`` is evaluated at every observed
    value; the location is the first value, in the order "sample 1 sorted, then sample 2
    sorted", where the extreme difference is reached.
    """
    n1 = a.shape[0]
    n2 = b.shape[0]
    i = 0
    j = 0
    max_a = -np.inf
    loc_max_a = np.nan
    max_b = -np.inf
    loc_max_b = np.nan
    min_a = np.inf
    loc_min_a = np.nan
    min_b = np.inf
    loc_min_b = np.nan
    while i < n1 or j < n2:
        v = a[i] if j >= n2 or (i < n1 and a[i] <= b[j]) else b[j]
        in_a = i < n1 and a[i] == v
        while i < n1 and a[i] == v:
            i += 1
        while j < n2 and b[j] == v:
            j += 1
        diff = i / n1 - j / n2
        if in_a:
            if diff > max_a:
                max_a = diff
                loc_max_a = v
            if diff < min_a:
                min_a = diff
                loc_min_a = v
        else:
            if diff > max_b:
                max_b = diff
                loc_max_b = v
            if diff < min_b:
                min_b = diff
                loc_min_b = v
    if max_a >= max_b:
        max_s = max_a
        loc_max = loc_max_a
    else:
        max_s = max_b
        loc_max = loc_max_b
    if min_a <= min_b:
        min_d = min_a
        loc_min = loc_min_a
    else:
        min_d = min_b
        loc_min = loc_min_b
    min_s = min(max(-min_d, 0.0), 1.0)
    if min_s > max_s:
        return min_s, loc_min, -1
    return max_s, loc_max, 1


@jit
def _wasserstein_sorted(u: npt.NDArray[np.floating], v: npt.NDArray[np.floating]) -> float:
    """``sum |U(x_k) - V(x_k)| (x_{k+1} - x_k)`` over the merged sorted values ``x``."""
    nu = u.shape[0]
    nv = v.shape[0]
    i = 0
    j = 0
    s = 0.0
    while i < nu or j < nv:
        x = np.float64(u[i]) if j >= nv or (i < nu and u[i] <= v[j]) else np.float64(v[j])
        mult = 0
        while i < nu and u[i] == x:
            i += 1
            mult += 1
        while j < nv and v[j] == x:
            j += 1
            mult += 1
        gap = abs(i / nu - j / nv)
        if mult > 1:
            # SciPy adds gap * diff(x) for the repeats: 0, or NaN for repeated infinities.
            s += gap * (0.0 if math.isfinite(x) else np.nan)
        if i == nu and j == nv:
            break
        nxt = np.float64(u[i]) if j >= nv or (i < nu and u[i] <= v[j]) else np.float64(v[j])
        s += gap * (nxt - x)
    return s


# --------------------------------------------------------------------------------------------
# Public wrappers: counts


def _pair(
    reference: npt.NDArray[np.number], current: npt.NDArray[np.number]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], bool]:
    """Both count arrays as float64 ``[features, bins]``; flag whether input was 1-D."""
    one_d = isinstance(reference, np.ndarray) and reference.ndim == 1
    ref = counts_2d("reference", reference)
    cur = counts_2d("current", current)
    _checks.same_shape("reference", ref, "current", cur)
    return ref, cur, one_d


def _shape_out(values: npt.NDArray[np.float64], one_d: bool) -> npt.NDArray[np.float64]:
    return values.reshape(()) if one_d else values


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, float | int) and 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a float in (0, 1), got {eps!r}")
    return float(eps)


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not (isinstance(value, float | int) and 0.0 <= value < np.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def psi(
    reference: npt.NDArray[np.number],
    current: npt.NDArray[np.number],
    eps: float = PSI_EPSILON,
    smoothing: float = 0.0,
) -> npt.NDArray[np.float64]:
    """Population Stability Index per feature (epsilon and smoothing rules: module docstring)."""
    eps = _check_eps(eps)
    smoothing = _check_non_negative("smoothing", smoothing)
    ref, cur, one_d = _pair(reference, current)
    return _shape_out(_psi_2d(ref, cur, eps, smoothing), one_d)


def _log_base(base: float | None) -> float:
    if base is None:
        return 0.0
    if not (isinstance(base, float | int) and base > 0.0 and base != 1.0):
        raise ValueError(f"base must be a positive number other than 1, got {base!r}")
    return math.log(base)


def jensenshannon(
    reference: npt.NDArray[np.number], current: npt.NDArray[np.number], base: float | None = None
) -> npt.NDArray[np.float64]:
    """Jensen-Shannon distance per feature (natural log unless ``base``), as SciPy's."""
    log_base = _log_base(base)
    ref, cur, one_d = _pair(reference, current)
    return _shape_out(_js_2d(ref, cur, log_base), one_d)


def wasserstein_binned(
    reference: npt.NDArray[np.number],
    current: npt.NDArray[np.number],
    support: npt.NDArray[np.floating],
) -> npt.NDArray[np.float64]:
    """Wasserstein-1 per feature of binned masses placed at ``support`` (non-decreasing).

    ``support`` has the shape of the counts.  For a histogram of
    :mod:`edgewise.kernels.histograms` pass the non-NaN columns and the edges' support:
    ``wasserstein_binned(ref[:, :-1], cur[:, :-1], edges.support)``.
    """
    ref, cur, one_d = _pair(reference, current)
    sup = counts_2d("support", support)
    _checks.same_shape("reference", ref, "support", sup)
    with np.errstate(invalid="ignore"):
        if np.any(np.diff(sup, axis=1) < 0.0):
            raise ValueError("support must be non-decreasing along the bins of every feature")
    return _shape_out(_wasserstein_2d(ref, cur, sup), one_d)


def ks_binned(
    reference: npt.NDArray[np.number], current: npt.NDArray[np.number]
) -> npt.NDArray[np.float64]:
    """KS statistic of the binned CDFs per feature (columns must be in value order)."""
    ref, cur, one_d = _pair(reference, current)
    return _shape_out(_ks_binned_2d(ref, cur), one_d)


def linf_distance(
    reference: npt.NDArray[np.number], current: npt.NDArray[np.number]
) -> npt.NDArray[np.float64]:
    """L-infinity distance of the frequency vectors per feature."""
    ref, cur, one_d = _pair(reference, current)
    return _shape_out(_linf_2d(ref, cur), one_d)


class Chi2Result(NamedTuple):
    """Per-feature chi-square homogeneity test (see :func:`chi2_homogeneity`)."""

    statistic: npt.NDArray[np.float64]
    pvalue: npt.NDArray[np.float64]
    #: Degrees of freedom as float (NaN where the test is undefined).
    dof: npt.NDArray[np.float64]


def chi2_homogeneity(
    reference: npt.NDArray[np.number],
    current: npt.NDArray[np.number],
    correction: bool = True,
    min_expected: float = 0.0,
) -> Chi2Result:
    """``chi2_contingency([reference, current], correction)`` per feature, empty bins dropped
    and, with ``min_expected``, sparse columns pooled (pooling rule: module docstring)."""
    min_expected = _check_non_negative("min_expected", min_expected)
    ref, cur, one_d = _pair(reference, current)
    out = _chi2_2d(ref, cur, bool(correction), min_expected)
    return Chi2Result(
        _shape_out(out[0], one_d), _shape_out(out[1], one_d), _shape_out(out[2], one_d)
    )


@dataclass(frozen=True)
class DriftScores:
    """All count-based drift statistics, one value per feature (rows of :attr:`table`)."""

    table: npt.NDArray[np.float64]
    """``[8, features]``: psi, jensenshannon, wasserstein, ks, chi2, chi2_pvalue, chi2_dof,
    linf."""

    def _row(self, index: int) -> npt.NDArray[np.float64]:
        row: npt.NDArray[np.float64] = self.table[index]
        return row

    @property
    def psi(self) -> npt.NDArray[np.float64]:
        return self._row(_PSI)

    @property
    def jensenshannon(self) -> npt.NDArray[np.float64]:
        return self._row(_JS)

    @property
    def wasserstein(self) -> npt.NDArray[np.float64]:
        return self._row(_WASSERSTEIN)

    @property
    def ks(self) -> npt.NDArray[np.float64]:
        return self._row(_KS)

    @property
    def chi2(self) -> npt.NDArray[np.float64]:
        return self._row(_CHI2)

    @property
    def chi2_pvalue(self) -> npt.NDArray[np.float64]:
        return self._row(_CHI2_P)

    @property
    def chi2_dof(self) -> npt.NDArray[np.float64]:
        return self._row(_CHI2_DOF)

    @property
    def linf(self) -> npt.NDArray[np.float64]:
        return self._row(_LINF)


_NO_SUPPORT: Final = np.zeros((1, 1))
#: The compiled ``_drift_all`` (``_native``), else numba's.
(_DRIFT_ALL,) = _native.kernels(_drift_all, "drift_all")
#: [float32, float64] variants of the raw-sample statistics, and the KS p-values: compiled
#: (``_native``), else numba's.
_KS_STATISTIC = _native.kernels(_ks_statistic, "ks_statistic_f32", "ks_statistic_f64")
_WASSERSTEIN_SORTED = _native.kernels(
    _wasserstein_sorted, "wasserstein_sorted_f32", "wasserstein_sorted_f64"
)
(_KSTWO_SF,) = _native.kernels(_kstwo_sf, "kstwo_sf")
(_KS2_SQUARE,) = _native.kernels(_ks2_prob_outside_square, "ks2_prob_outside_square")
(_KS2_BAND,) = _native.kernels(_ks2_prob_outside_band, "ks2_prob_outside_band")


def drift_scores(
    reference: npt.NDArray[np.number],
    current: npt.NDArray[np.number],
    edges: BinEdges | None = None,
    *,
    eps: float = PSI_EPSILON,
    base: float | None = None,
    correction: bool = True,
    smoothing: float = 0.0,
    min_expected: float = 0.0,
) -> DriftScores:
    """Every count statistic for ``[features, columns]`` counts in one kernel call.

    With ``edges`` the counts must have the numeric histogram layout of those edges
    (``[features, edges.width]``); without, they are treated as categorical counts and the
    ordered statistics (wasserstein, ks) are NaN.  Column usage: see the module docstring.
    ``smoothing`` is PSI's (as :func:`psi`), ``min_expected`` the chi-square's pooling (as
    :func:`chi2_homogeneity`).
    """
    eps = _check_eps(eps)
    smoothing = _check_non_negative("smoothing", smoothing)
    min_expected = _check_non_negative("min_expected", min_expected)
    log_base = _log_base(base)
    ref, cur, _ = _pair(reference, current)
    if edges is None:
        support = _NO_SUPPORT
        ordered = False
    else:
        if not isinstance(edges, BinEdges):
            raise ValueError(f"edges must be a BinEdges or None, got {type(edges).__name__}")
        if ref.shape != (edges.n_features, edges.width):
            raise ValueError(
                f"reference must have shape {(edges.n_features, edges.width)} for these "
                f"edges, got {ref.shape}"
            )
        support = edges.support
        ordered = True
    table = _DRIFT_ALL(
        ref, cur, support, ordered, eps, log_base, bool(correction), smoothing, min_expected
    )
    return DriftScores(table)


def open_ended(counts: npt.NDArray[np.integer], edges: BinEdges) -> npt.NDArray[np.int64]:
    """Numeric histogram counts with open outer bins: the underflow column added to the first
    bin and the overflow column to each feature's last bin (both then 0), the NaN column kept.

    Both tables of a comparison are folded the same way: a window's values just outside the
    reference range then count as the outer bin's, not as a column the reference has no share
    of, and a reference's own +-inf rows (its edges come from its finite values) meet the
    window's in the same outer bins.
    """
    arr = np.array(counts, dtype=np.int64)  # a copy
    if arr.shape != (edges.n_features, edges.width):
        raise ValueError(
            f"counts must have shape {(edges.n_features, edges.width)}, got {arr.shape}"
        )
    over = edges.overflow_column
    features = np.arange(edges.n_features)
    last_bin = edges.sizes - 1  # bin k-1 of a feature with k bins sits in column k
    arr[:, 1] += arr[:, 0]
    arr[:, 0] = 0
    arr[features, last_bin] += arr[:, over]
    arr[:, over] = 0
    return arr


def holm(pvalues: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1) over the finite
    entries of ``pvalues``; NaN entries stay NaN and do not count as tests.  Rejecting where the
    adjusted p-value is <= alpha keeps the family-wise error rate at alpha for any dependence
    between the tests (as ``statsmodels.stats.multitest.multipletests(p, method="holm")``)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = tested.size
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * (m - np.arange(m))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Public wrappers: raw samples


class KSResult(NamedTuple):
    """Result of :func:`ks_2samp` (field names as ``scipy.stats.ks_2samp``)."""

    statistic: float
    pvalue: float
    #: The value at which the extreme ECDF difference is reached (NaN if undefined).
    statistic_location: float
    #: +1 if ECDF(sample1) - ECDF(sample2) is maximal there, -1 if minimal, 0 if undefined.
    statistic_sign: int


_KS_NAN: Final = KSResult(math.nan, math.nan, math.nan, 0)


def _sorted_sample(name: str, sample: npt.ArrayLike) -> npt.NDArray[np.floating]:
    arr = np.asarray(sample)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype is not F64 and arr.dtype is not F32:
        if arr.dtype.kind not in "iufb":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    return np.sort(arr)  # NaNs sort to the end


def _drop_nan(sorted_arr: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    if sorted_arr.size and sorted_arr[-1] != sorted_arr[-1]:
        return sorted_arr[: int(np.searchsorted(sorted_arr, np.nan, side="left"))]
    return sorted_arr


def _has_nan(sorted_arr: npt.NDArray[np.floating]) -> bool:
    return bool(sorted_arr.size and sorted_arr[-1] != sorted_arr[-1])


def _same_dtype(
    a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]]:
    if a.dtype is not b.dtype:
        return a.astype(np.float64), b.astype(np.float64)
    return a, b


def ks_2samp(
    sample1: npt.ArrayLike,
    sample2: npt.ArrayLike,
    method: Literal["auto", "exact", "asymp"] = "auto",
    nan_policy: Literal["propagate", "omit"] = "propagate",
) -> KSResult:
    """Two-sided two-sample KS test with ``scipy.stats.ks_2samp`` semantics (module doc)."""
    if method not in ("auto", "exact", "asymp"):
        raise ValueError(f"method must be 'auto', 'exact' or 'asymp', got {method!r}")
    if nan_policy not in ("propagate", "omit"):
        raise ValueError(f"nan_policy must be 'propagate' or 'omit', got {nan_policy!r}")
    a = _sorted_sample("sample1", sample1)
    b = _sorted_sample("sample2", sample2)
    if nan_policy == "omit":
        a = _drop_nan(a)
        b = _drop_nan(b)
    elif _has_nan(a) or _has_nan(b):
        return _KS_NAN
    n1 = int(a.size)
    n2 = int(b.size)
    if n1 == 0 or n2 == 0:
        return _KS_NAN
    a, b = _same_dtype(a, b)
    d, location, sign = _KS_STATISTIC[a.dtype.itemsize == 8](a, b)
    d = float(d)
    g = math.gcd(n1, n2)
    mode = method
    if mode == "auto":
        mode = "exact" if max(n1, n2) <= KS_AUTO_EXACT_MAX_N else "asymp"
    elif mode == "exact" and n1 // g >= _INT32_MAX / (n2 // g):
        mode = "asymp"
        warnings.warn(
            f"Exact ks_2samp calculation not possible with samples sizes {n1} and {n2}. "
            "Switching to 'asymp'.",
            RuntimeWarning,
            stacklevel=2,
        )
    prob = math.nan
    if mode == "exact":
        lcm = (n1 // g) * n2
        h = round(d * lcm)
        d = h / lcm
        if h == 0:
            prob = 1.0
        elif n1 == n2:
            prob = float(_KS2_SQUARE(n1, h))
        else:
            prob = float(_KS2_BAND(n1, n2, g, h))
        if not 0.0 <= prob <= 1.0:
            mode = "asymp"
            warnings.warn(
                "ks_2samp: Exact calculation unsuccessful. Switching to method=asymp.",
                RuntimeWarning,
                stacklevel=2,
            )
    if mode == "asymp":
        en = float(n1) * float(n2) / (float(n1) + float(n2))
        prob = float(_KSTWO_SF(round(en), d))
    prob = min(max(prob, 0.0), 1.0)
    return KSResult(d, prob, float(location), int(sign))


def wasserstein_samples(u_values: npt.ArrayLike, v_values: npt.ArrayLike) -> float:
    """Wasserstein-1 distance of two raw samples (``scipy.stats.wasserstein_distance``)."""
    u = _sorted_sample("u_values", u_values)
    v = _sorted_sample("v_values", v_values)
    if u.size == 0 or v.size == 0 or _has_nan(u) or _has_nan(v):
        return math.nan
    u, v = _same_dtype(u, v)
    return float(_WASSERSTEIN_SORTED[u.dtype.itemsize == 8](u, v))
