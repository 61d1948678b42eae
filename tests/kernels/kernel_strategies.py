"""Hypothesis strategies shared by the kernel tests (imported as a plain module)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

FLOAT_DTYPES = (np.float32, np.float64)

# Magnitudes stay well inside float32 so float32 and float64 batches can share strategies and
# sums of squares cannot overflow.
_BOUND = 1e6


@st.composite
def float_batches(
    draw: st.DrawFn,
    *,
    min_rows: int = 0,
    max_rows: int = 24,
    min_features: int = 1,
    max_features: int = 5,
    n_features: int | None = None,
    dtype: Any = None,
) -> np.ndarray:
    """A ``[rows, features]`` float32/float64 batch whose columns are of mixed kinds.

    Column kinds: random finite values, a constant, all NaN, a random mix with NaN/+inf/-inf,
    values on a coarse grid (ties), and a huge offset plus small noise (cancellation).
    """
    if dtype is None:
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rows = draw(st.integers(min_rows, max_rows))
    if n_features is None:
        n_features = draw(st.integers(min_features, max_features))
    out = np.empty((rows, n_features), dtype=np.float64)
    for f in range(n_features):
        kind = draw(st.sampled_from(["random", "constant", "nan", "specials", "grid", "offset"]))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        if kind == "random":
            scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
            col = rng.normal(scale=scale, size=rows)
        elif kind == "constant":
            col = np.full(rows, draw(st.floats(-_BOUND, _BOUND, width=32)))
        elif kind == "nan":
            col = np.full(rows, np.nan)
        elif kind == "specials":
            col = rng.normal(size=rows)
            pick = rng.integers(0, 4, size=rows)
            col[pick == 1] = np.nan
            col[pick == 2] = np.inf
            col[pick == 3] = -np.inf
        elif kind == "grid":
            col = rng.integers(-3, 4, size=rows).astype(np.float64) * 0.5
        else:
            col = 1000.0 + rng.normal(scale=1e-2, size=rows)
        out[:, f] = col
    return out.astype(dtype)


def naive_moments(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Reference moments per column from plain numpy (float64, two-pass)."""
    x = batch.astype(np.float64)
    finite = np.isfinite(x)
    count = finite.sum(axis=0)
    safe = np.where(finite, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, safe.sum(axis=0) / np.maximum(count, 1), np.nan)
    dev = np.where(finite, x - np.nan_to_num(mean), 0.0)
    m2 = (dev * dev).sum(axis=0)
    lo = np.where(count > 0, np.where(finite, x, np.inf).min(axis=0, initial=np.inf), np.nan)
    hi = np.where(count > 0, np.where(finite, x, -np.inf).max(axis=0, initial=-np.inf), np.nan)
    return {
        "count": count.astype(np.int64),
        "mean": mean,
        "m2": m2,
        "min": lo,
        "max": hi,
        "nan_count": np.isnan(x).sum(axis=0).astype(np.int64),
        "inf_count": np.isinf(x).sum(axis=0).astype(np.int64),
    }


@st.composite
def count_pairs(
    draw: st.DrawFn, *, max_features: int = 4, max_bins: int = 12, allow_empty: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Two ``[features, bins]`` int64 count arrays with zeros, empty bins and empty rows."""
    n_features = draw(st.integers(1, max_features))
    n_bins = draw(st.integers(1, max_bins))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, draw(st.sampled_from([2, 10, 1000])), size=(n_features, n_bins))
    cur = rng.integers(0, draw(st.sampled_from([2, 10, 1000])), size=(n_features, n_bins))
    # Bins empty on both sides, on one side, and (optionally) whole empty windows.
    both = rng.random(n_bins) < 0.2
    ref[:, both] = 0
    cur[:, both] = 0
    ref[:, rng.random(n_bins) < 0.15] = 0
    cur[:, rng.random(n_bins) < 0.15] = 0
    if allow_empty and draw(st.booleans()):
        row = draw(st.integers(0, n_features - 1))
        (ref if draw(st.booleans()) else cur)[row] = 0
    return ref.astype(np.int64), cur.astype(np.int64)
