"""MomentState against a naive numpy implementation, merge/subtract algebra, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.kernels import MomentState

from .kernel_strategies import float_batches, naive_moments

SETTINGS = settings(max_examples=100, deadline=None)


def _scale(*batches: np.ndarray) -> float:
    vals = [np.abs(b[np.isfinite(b)].astype(np.float64)) for b in batches]
    vals = [v for v in vals if v.size]
    return max([1.0, *[float(v.max()) for v in vals]])


def assert_matches_naive(state: MomentState, batch: np.ndarray) -> None:
    ref = naive_moments(batch)
    scale = _scale(batch)
    n = max(batch.shape[0], 1)
    np.testing.assert_array_equal(state.count, ref["count"])
    np.testing.assert_array_equal(state.nan_count, ref["nan_count"])
    np.testing.assert_array_equal(state.inf_count, ref["inf_count"])
    np.testing.assert_array_equal(state.min, ref["min"])
    np.testing.assert_array_equal(state.max, ref["max"])
    np.testing.assert_allclose(state.mean, ref["mean"], rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(state.m2, ref["m2"], rtol=1e-9, atol=1e-12 * scale * scale * n)


@SETTINGS
@given(float_batches())
def test_update_matches_naive(batch: np.ndarray) -> None:
    state = MomentState(batch.shape[1])
    state.update(batch)
    assert_matches_naive(state, batch)


@SETTINGS
@given(float_batches(max_rows=10))
def test_row_by_row_equals_batch(batch: np.ndarray) -> None:
    one = MomentState(batch.shape[1])
    for i in range(batch.shape[0]):
        one.update(batch[i : i + 1])
    assert_matches_naive(one, batch)


@SETTINGS
@given(st.data())
def test_merge_equals_sequential_updates(data: st.DataObject) -> None:
    a = data.draw(float_batches())
    b = data.draw(float_batches(n_features=a.shape[1]))
    sequential = MomentState(a.shape[1])
    sequential.update(a)
    sequential.update(b)
    merged = MomentState.from_batch(a)
    merged.merge(MomentState.from_batch(b))
    scale = _scale(a, b)
    n = a.shape[0] + b.shape[0] + 1
    np.testing.assert_array_equal(merged.count, sequential.count)
    np.testing.assert_array_equal(merged.nan_count, sequential.nan_count)
    np.testing.assert_array_equal(merged.inf_count, sequential.inf_count)
    np.testing.assert_array_equal(merged.min, sequential.min)
    np.testing.assert_array_equal(merged.max, sequential.max)
    np.testing.assert_allclose(merged.mean, sequential.mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.m2, sequential.m2, rtol=1e-9, atol=1e-12 * scale**2 * n)
    assert merged.extrema_exact
    # And both equal the naive moments of the concatenation.
    assert_matches_naive(merged, np.concatenate([a.astype(np.float64), b.astype(np.float64)]))


@SETTINGS
@given(st.data())
def test_subtract_inverts_merge(data: st.DataObject) -> None:
    a = data.draw(float_batches())
    b = data.draw(float_batches(n_features=a.shape[1]))
    state_a = MomentState.from_batch(a)
    window = state_a.copy()
    window.merge(MomentState.from_batch(b))
    window.subtract(MomentState.from_batch(b))
    scale = _scale(a, b)
    n = a.shape[0] + b.shape[0] + 1
    np.testing.assert_array_equal(window.count, state_a.count)
    np.testing.assert_array_equal(window.nan_count, state_a.nan_count)
    np.testing.assert_array_equal(window.inf_count, state_a.inf_count)
    # Subtracting is ill-conditioned relative to the larger window's scale, not A's.
    np.testing.assert_allclose(window.mean, state_a.mean, rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(window.m2, state_a.m2, rtol=1e-7, atol=1e-9 * scale**2 * n)
    assert np.all(window.m2 >= 0.0)
    # Extrema are bounds after a subtraction, exact again where a feature became empty.
    has_data = window.count > 0
    assert np.all(window.min[has_data] <= state_a.min[has_data])
    assert np.all(window.max[has_data] >= state_a.max[has_data])
    assert np.all(np.isnan(window.min[~has_data]))
    assert window.extrema_exact == (not has_data.any())


def test_subtract_everything_resets_to_empty() -> None:
    batch = np.array([[1.0, np.nan], [3.0, np.inf]])
    state = MomentState.from_batch(batch)
    state.subtract(MomentState.from_batch(batch))
    np.testing.assert_array_equal(state.to_array(), MomentState(2).to_array())
    assert state.extrema_exact


def test_subtract_more_than_present_raises_and_leaves_state() -> None:
    small = MomentState.from_batch(np.array([[1.0, 2.0]]))
    big = MomentState.from_batch(np.array([[1.0, 2.0], [3.0, 4.0]]))
    before = small.to_array()
    with pytest.raises(ValueError, match="feature 0"):
        small.subtract(big)
    np.testing.assert_array_equal(small.to_array(), before)
    nan_only = MomentState.from_batch(np.array([[np.nan, 2.0]]))
    with pytest.raises(ValueError, match="feature 0"):
        small.subtract(nan_only)


def test_welford_single_rows_exact_values() -> None:
    state = MomentState(1)
    for x in (2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0):
        state.update(np.array([[x]]))
    assert state.count[0] == 8
    assert state.mean[0] == 5.0
    assert state.m2[0] == 32.0
    assert state.variance()[0] == 4.0
    assert state.std()[0] == 2.0
    assert state.variance(ddof=1)[0] == pytest.approx(32.0 / 7.0, rel=1e-15)


def test_empty_state_and_variance_ddof() -> None:
    state = MomentState(3)
    assert state.count.tolist() == [0, 0, 0]
    assert np.isnan(state.mean).all() and np.isnan(state.min).all() and np.isnan(state.max).all()
    assert state.m2.tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(state.variance()).all()
    state.update(np.array([[1.0, np.nan, 2.0]]))
    var0 = state.variance(0)
    var1 = state.variance(1)
    assert var0[0] == 0.0 and np.isnan(var0[1]) and var0[2] == 0.0
    assert np.isnan(var1).all()  # one observation, ddof=1
    with pytest.raises(ValueError, match="ddof"):
        state.variance(-1)


def test_empty_batch_changes_nothing() -> None:
    state = MomentState.from_batch(np.array([[1.0, 2.0]]))
    before = state.to_array()
    state.update(np.empty((0, 2)))
    state.update(np.empty((0, 2), dtype=np.float32))
    np.testing.assert_array_equal(state.to_array(), before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_agree(dtype: type) -> None:
    rng = np.random.default_rng(3)
    batch = rng.normal(size=(50, 4)).astype(np.float32)
    a = MomentState.from_batch(batch.astype(dtype))
    b = MomentState.from_batch(batch.astype(np.float64))
    np.testing.assert_allclose(a.to_array(), b.to_array(), rtol=1e-12)


def test_non_contiguous_batch_is_accepted() -> None:
    rng = np.random.default_rng(4)
    wide = rng.normal(size=(20, 6))
    view = wide[:, ::2]
    assert not view.flags.c_contiguous
    a = MomentState.from_batch(view)
    b = MomentState.from_batch(np.ascontiguousarray(view))
    np.testing.assert_array_equal(a.to_array(), b.to_array())
    fortran = np.asfortranarray(wide)
    np.testing.assert_array_equal(
        MomentState.from_batch(fortran).to_array(), MomentState.from_batch(wide).to_array()
    )


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros(3), "batch must be 2-D"),
        (np.zeros((2, 4)), "batch must have 3 feature columns"),
        (np.zeros((2, 3), dtype=np.int64), "batch must have dtype float32 or float64"),
        (np.zeros((2, 3), dtype=np.float16), "batch must have dtype float32 or float64"),
        ([[1.0, 2.0, 3.0]], "batch must be a numpy.ndarray"),
    ],
)
def test_update_validation_names_argument(bad: object, match: str) -> None:
    state = MomentState(3)
    with pytest.raises(ValueError, match=match):
        state.update(bad)  # type: ignore[arg-type]


def test_big_endian_batch_is_converted() -> None:
    batch = np.array([[1.0, 2.0], [3.0, 5.0]], dtype=">f8")
    a = MomentState.from_batch(batch)
    np.testing.assert_array_equal(a.mean, [2.0, 3.5])


def test_constructor_and_merge_validation() -> None:
    with pytest.raises(ValueError, match="n_features"):
        MomentState(0)
    with pytest.raises(ValueError, match="other has 2 features"):
        MomentState(3).merge(MomentState(2))
    with pytest.raises(ValueError, match="other must be a MomentState"):
        MomentState(3).merge("x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data must be"):
        MomentState.from_array(np.zeros((6, 2)))


def test_array_round_trip_and_reset() -> None:
    state = MomentState.from_batch(np.array([[1.0, np.inf], [2.0, np.nan]]))
    copy = MomentState.from_array(state.to_array(), extrema_exact=False)
    np.testing.assert_array_equal(copy.to_array(), state.to_array())
    assert not copy.extrema_exact
    copy.reset()
    np.testing.assert_array_equal(copy.to_array(), MomentState(2).to_array())
    assert copy.extrema_exact
    assert "n_features=2" in repr(state)


def test_large_offset_keeps_precision() -> None:
    rng = np.random.default_rng(5)
    noise = rng.normal(scale=1e-3, size=(10_000, 1))
    batch = 1e9 + noise
    state = MomentState(1)
    for chunk in np.array_split(batch, 7):
        state.update(chunk)
    # Sum-of-squares formulas lose every digit here (offset/std = 1e12); the streaming state
    # is limited only by the float64 spacing of the running mean (1.2e-7 at 1e9).
    assert state.variance(ddof=1)[0] == pytest.approx(np.var(batch, ddof=1), rel=1e-5)
    naive = np.mean(batch**2) - np.mean(batch) ** 2
    assert abs(naive - np.var(batch)) > 1e-3 * np.var(batch)
