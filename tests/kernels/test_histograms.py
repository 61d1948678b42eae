"""Histogram and categorical counts against numpy references; edges and layout rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.kernels import (
    BinEdges,
    CategoricalState,
    HistogramState,
    categorical_counts,
    histogram_counts,
    quantile_edges,
)
from edgewise.kernels.histograms import MAX_EDGES

from .kernel_strategies import FLOAT_DTYPES, float_batches

SETTINGS = settings(max_examples=100, deadline=None)


def naive_histogram(batch: np.ndarray, edges: BinEdges) -> np.ndarray:
    """Layout [underflow, bins..., overflow, nan] from np.histogram and explicit rules."""
    out = np.zeros((edges.n_features, edges.width), dtype=np.int64)
    x_all = batch.astype(np.float64)
    for f in range(edges.n_features):
        e = edges.edges_of(f)
        x = x_all[:, f]
        nan = np.isnan(x)
        out[f, edges.nan_column] = nan.sum()
        x = x[~nan]
        out[f, 0] = np.sum(x < e[0])
        out[f, edges.overflow_column] = np.sum(x > e[-1])
        inside = x[(x >= e[0]) & (x <= e[-1])]
        if np.isfinite(e).all():
            # numpy.histogram: [e_i, e_i+1) and a closed last bin, as documented for BinEdges.
            out[f, 1 : e.size] = np.histogram(inside, bins=e)[0]
        else:
            idx = np.searchsorted(e, inside, side="right")
            idx[inside == e[-1]] = e.size - 1
            np.add.at(out[f], idx, 1)
    return out


@st.composite
def edges_and_batch(draw: st.DrawFn) -> tuple[BinEdges, np.ndarray]:
    n_features = draw(st.integers(1, 4))
    rows: list[np.ndarray] = []
    for _ in range(n_features):
        values = draw(
            st.lists(
                st.floats(-100, 100, allow_nan=False, width=32),
                min_size=2,
                max_size=14,
                unique=True,
            )
        )
        rows.append(np.sort(np.array(values, dtype=np.float64)))
    edges = BinEdges.from_ragged(rows)
    batch = draw(float_batches(n_features=n_features, max_rows=30))
    # Put exact edge values (and float32 neighbours of them) into the batch.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for f, e in enumerate(rows):
        hits = rng.random(batch.shape[0]) < 0.4
        picked = rng.choice(e, size=int(hits.sum()))
        batch[hits, f] = picked.astype(batch.dtype)
    return edges, batch


@SETTINGS
@given(edges_and_batch())
def test_counts_match_numpy_histogram(case: tuple[BinEdges, np.ndarray]) -> None:
    edges, batch = case
    counts = histogram_counts(batch, edges)
    np.testing.assert_array_equal(counts, naive_histogram(batch, edges))
    assert counts.sum() == batch.size
    # Unused padding bins of short features stay empty.
    for f in range(edges.n_features):
        assert not counts[f, int(edges.sizes[f]) : edges.overflow_column].any()


def test_boundary_rules_exactly() -> None:
    edges = BinEdges.from_array([[0.0, 1.0, 2.0]])
    values = [-np.inf, -1e-300, 0.0, 0.5, 1.0, 1.5, 2.0, np.nextafter(2.0, 3.0), np.inf, np.nan]
    counts = histogram_counts(np.array(values)[:, None], edges)
    # [underflow, [0,1), [1,2], overflow, nan]
    assert counts.tolist() == [[2, 2, 3, 2, 1]]
    assert edges.overflow_column == 3 and edges.nan_column == 4 and edges.width == 5


def test_infinite_edges_catch_everything_but_nan() -> None:
    edges = BinEdges.from_array([[-np.inf, np.inf]])
    batch = np.array([[-np.inf], [0.0], [np.inf], [np.nan], [1e308]])
    assert histogram_counts(batch, edges).tolist() == [[0, 4, 0, 1]]


@pytest.mark.parametrize("n_edges", [2, 3, 4, 7, 8, 9, 31, 64, 600, MAX_EDGES])
def test_every_search_depth(n_edges: int) -> None:
    rng = np.random.default_rng(n_edges)
    e = np.sort(rng.choice(np.arange(-5000, 5000), size=n_edges, replace=False)).astype(float) / 7
    edges = BinEdges.from_ragged([e, e[:2]])
    batch = np.column_stack([np.concatenate([e, rng.uniform(-800, 800, size=300)])] * 2)
    np.testing.assert_array_equal(histogram_counts(batch, edges), naive_histogram(batch, edges))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_float32_values_next_to_edges(dtype: type) -> None:
    edges = BinEdges.from_array([[0.1, 0.2, 0.3]])
    vals = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    batch = np.concatenate(
        [vals, np.nextafter(vals, np.float32(-1)), np.nextafter(vals, np.float32(1))]
    )
    batch = batch.astype(dtype)[:, None]
    np.testing.assert_array_equal(histogram_counts(batch, edges), naive_histogram(batch, edges))


@SETTINGS
@given(st.data())
def test_state_update_merge_subtract(data: st.DataObject) -> None:
    edges, a = data.draw(edges_and_batch())
    b = data.draw(float_batches(n_features=edges.n_features))
    whole = HistogramState(edges)
    whole.update(a)
    whole.update(b)
    rowwise = HistogramState(edges)
    for i in range(b.shape[0]):
        rowwise.update(b[i : i + 1])
    merged = HistogramState(edges)
    merged.update(a)
    merged.merge(rowwise)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    merged.subtract(rowwise)
    np.testing.assert_array_equal(merged.counts, histogram_counts(a, edges))


def test_state_errors_and_copy() -> None:
    edges = BinEdges.from_array([[0.0, 1.0], [0.0, 2.0]])
    state = HistogramState(edges)
    with pytest.raises(ValueError, match="batch must have 2 feature columns"):
        state.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="batch must have dtype float32 or float64"):
        state.update(np.zeros((1, 2), dtype=np.int32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"batch must be a numpy\.ndarray"):
        state.update([[0.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="edges must be a BinEdges"):
        HistogramState(np.zeros((2, 2)))  # type: ignore[arg-type]
    other = HistogramState(BinEdges.from_array([[0.0, 1.0], [0.0, 3.0]]))
    with pytest.raises(ValueError, match="same BinEdges"):
        state.merge(other)
    state.update(np.array([[0.5, 0.5]]))
    bigger = state.copy()
    bigger.update(np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="more counts"):
        state.subtract(bigger)
    equal_edges = HistogramState(BinEdges.from_array([[0.0, 1.0], [0.0, 2.0]]))
    equal_edges.merge(state)  # equal values, different object: accepted
    assert equal_edges.counts.sum() == 2
    state.reset()
    assert state.counts.sum() == 0


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([[0.0, 0.0, 1.0]], "strictly increasing"),
        ([[1.0, 0.0]], "strictly increasing"),
        ([[0.0, np.nan, 1.0]], "NaN"),
        ([[0.0]], "at least 2 edges"),
        ([[0.0, 1.0], [5.0, np.nan]], r"sizes must lie in \[2, 2\]"),
    ],
)
def test_edges_validation(values: list[list[float]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BinEdges.from_array(values)


def test_edges_validation_direct() -> None:
    with pytest.raises(ValueError, match="sizes must have 1 entries"):
        BinEdges(np.array([[0.0, 1.0]]), np.array([2, 2]))
    with pytest.raises(ValueError, match="values must be a float64 array"):
        BinEdges(np.array([[0, 1]]), np.array([2]))
    with pytest.raises(ValueError, match="NaN-padded"):
        BinEdges(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]), np.array([3, 2]))
    with pytest.raises(ValueError, match="at most"):
        BinEdges.from_ragged([np.arange(MAX_EDGES + 1.0)])
    edges = BinEdges.from_ragged([[0.0, 1.0, 2.0], [5.0, 6.0]])
    assert edges.sizes.tolist() == [3, 2]
    assert np.isnan(edges.values[1, 2])
    assert not edges.values.flags.writeable
    np.testing.assert_array_equal(edges.edges_of(1), [5.0, 6.0])
    # support: [underflow, bins..., overflow] representatives, non-decreasing.
    np.testing.assert_array_equal(edges.support, [[0.0, 0.5, 1.5, 2.0], [5.0, 5.5, 6.0, 6.0]])


def test_quantile_edges_rules() -> None:
    rng = np.random.default_rng(0)
    sample = np.column_stack(
        [
            rng.normal(size=500),  # continuous: 11 quantile edges
            np.full(500, 3.0),  # constant
            np.full(500, np.nan),  # all NaN
            rng.integers(0, 2, size=500).astype(float),  # binary
            np.where(rng.random(500) < 0.5, np.inf, rng.normal(size=500)),  # infinities ignored
            np.concatenate([np.zeros(450), rng.normal(size=50)]),  # point mass: deduplicated
        ]
    )
    edges = quantile_edges(sample, n_bins=10)
    np.testing.assert_array_equal(
        edges.edges_of(0), np.quantile(sample[:, 0], np.linspace(0, 1, 11))
    )
    np.testing.assert_array_equal(edges.edges_of(1), [3.0, np.nextafter(3.0, np.inf)])
    np.testing.assert_array_equal(edges.edges_of(2), [-np.inf, np.inf])
    np.testing.assert_array_equal(edges.edges_of(3), [0.0, 1.0, np.nextafter(1.0, 2.0)])
    assert np.isfinite(edges.edges_of(4)).all()
    e5 = edges.edges_of(5)
    assert np.all(np.diff(e5) > 0) and e5.size < 11
    counts = histogram_counts(sample, edges)
    # Every reference value lands in a regular bin: no under/overflow, NaNs in their column.
    assert not counts[:, 0].any()
    assert counts[[0, 1, 3, 5], edges.overflow_column].sum() == 0
    assert counts[2, edges.nan_column] == 500
    assert counts[3, 1] == np.sum(sample[:, 3] == 0) and counts[3, 2] == np.sum(sample[:, 3] == 1)
    assert counts[1, 1] == 500


@SETTINGS
@given(float_batches(min_rows=1), st.integers(1, 12))
def test_quantile_edges_cover_the_reference(sample: np.ndarray, n_bins: int) -> None:
    edges = quantile_edges(sample, n_bins=n_bins)
    assert edges.n_bins <= n_bins
    counts = histogram_counts(sample, edges)
    np.testing.assert_array_equal(counts[:, edges.nan_column], np.isnan(sample).sum(axis=0))
    for f in range(edges.n_features):
        col = sample[:, f]
        regular = counts[f, 1 : edges.overflow_column].sum()
        if np.isfinite(col).any():
            # Finite reference values all land in regular bins, infinities outside.
            assert counts[f, 0] == np.sum(col == -np.inf)
            assert counts[f, edges.overflow_column] == np.sum(col == np.inf)
            assert regular == np.isfinite(col).sum()
        else:
            # No finite reference value: one catch-all bin [-inf, inf] takes every non-NaN.
            np.testing.assert_array_equal(edges.edges_of(f), [-np.inf, np.inf])
            assert regular == np.sum(~np.isnan(col))


def test_quantile_edges_validation() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        quantile_edges(np.zeros((3, 2)), n_bins=0)
    with pytest.raises(ValueError, match="sample"):
        quantile_edges(np.zeros((2, 2, 2)))
    one_d = quantile_edges(np.arange(100.0), n_bins=4)
    np.testing.assert_array_equal(one_d.edges_of(0), [0.0, 24.75, 49.5, 74.25, 99.0])


# -- categorical ------------------------------------------------------------------------------


def naive_categorical(codes: np.ndarray, n_categories: list[int]) -> np.ndarray:
    out = np.zeros((len(n_categories), max(n_categories) + 1), dtype=np.int64)
    for f, k in enumerate(n_categories):
        for c in codes[:, f].tolist():
            out[f, c if 0 <= c < k else -1] += 1
    return out


@SETTINGS
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.integers(0, 30),
    st.sampled_from([np.int32, np.int64]),
    st.integers(0, 2**32 - 1),
)
def test_categorical_counts(n_categories: list[int], rows: int, dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes: np.ndarray = rng.integers(-3, 9, size=(rows, len(n_categories))).astype(dtype)
    counts = categorical_counts(codes, n_categories)
    np.testing.assert_array_equal(counts, naive_categorical(codes, n_categories))
    assert counts.sum() == codes.size


def test_categorical_unseen_and_state() -> None:
    state = CategoricalState([2, 3])
    state.update(np.array([[0, 2], [1, -1], [2, 5], [-7, 0]], dtype=np.int64))
    assert state.counts.tolist() == [[1, 1, 0, 2], [1, 0, 1, 2]]
    other = state.copy()
    other.update(np.array([[0, 0]], dtype=np.int32))
    state.merge(other)
    assert state.counts.tolist() == [[3, 2, 0, 4], [3, 0, 2, 4]]
    state.subtract(other)
    assert state.counts.tolist() == [[1, 1, 0, 2], [1, 0, 1, 2]]
    with pytest.raises(ValueError, match="more counts"):
        state.subtract(other)
    with pytest.raises(ValueError, match="same n_categories"):
        state.merge(CategoricalState([2, 4]))
    with pytest.raises(ValueError, match="codes must have dtype int32 or int64"):
        state.update(np.zeros((1, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="codes must have 2 feature columns"):
        state.update(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="n_categories"):
        CategoricalState([])
    with pytest.raises(ValueError, match="n_categories"):
        CategoricalState([-1])
    state.reset()
    assert state.counts.sum() == 0
    # Zero known categories: everything is unseen.
    assert categorical_counts(np.array([[0], [3]]), [0]).tolist() == [[2]]
