"""FeatureProfile: the fused per-request update equals the separate states."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.kernels import FeatureProfile, HistogramState, MomentState, quantile_edges

from .kernel_strategies import float_batches


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_profile_equals_separate_states(data: st.DataObject) -> None:
    reference = data.draw(float_batches(min_rows=1))
    edges = quantile_edges(reference, n_bins=data.draw(st.integers(1, 12)))
    batch = data.draw(float_batches(n_features=reference.shape[1]))
    profile = FeatureProfile(edges)
    for i in range(batch.shape[0]):
        profile.update(batch[i : i + 1])
    profile.update(batch)
    moments = MomentState(reference.shape[1])
    hist = HistogramState(edges)
    for state in (moments, hist):
        for i in range(batch.shape[0]):
            state.update(batch[i : i + 1])
        state.update(batch)
    np.testing.assert_array_equal(profile.histogram.counts, hist.counts)
    # Same arithmetic; the fused kernel is optimised as one unit, so allow last-bit noise.
    np.testing.assert_allclose(
        profile.moments.to_array(), moments.to_array(), rtol=1e-14, atol=1e-12
    )
    np.testing.assert_array_equal(profile.moments.count, moments.count)


def test_profile_window_merge_subtract_copy() -> None:
    rng = np.random.default_rng(2)
    edges = quantile_edges(rng.normal(size=(300, 3)))
    old = rng.normal(size=(40, 3))
    new = rng.normal(1.0, size=(25, 3))
    window = FeatureProfile(edges)
    window.update(old)
    oldest = window.copy()
    newest = FeatureProfile(edges)
    newest.update(new)
    window.merge(newest)
    window.subtract(oldest)
    expected = FeatureProfile(edges)
    expected.update(new)
    np.testing.assert_array_equal(window.histogram.counts, expected.histogram.counts)
    np.testing.assert_array_equal(window.moments.count, expected.moments.count)
    np.testing.assert_allclose(window.moments.mean, expected.moments.mean, rtol=1e-12)
    np.testing.assert_allclose(window.moments.m2, expected.moments.m2, rtol=1e-9)
    assert not window.moments.extrema_exact
    with pytest.raises(ValueError, match="more counts"):
        oldest.subtract(_bigger(oldest))
    window.reset()
    assert window.histogram.counts.sum() == 0 and window.moments.count.sum() == 0
    assert window.n_features == 3 and window.edges is edges


def _bigger(profile: FeatureProfile) -> FeatureProfile:
    out = profile.copy()
    out.update(np.zeros((1, profile.n_features)))
    return out


def test_profile_validation() -> None:
    edges = quantile_edges(np.arange(20.0).reshape(10, 2))
    profile = FeatureProfile(edges)
    with pytest.raises(ValueError, match="batch must have 2 feature columns"):
        profile.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="edges must be a BinEdges"):
        FeatureProfile(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="other must be a FeatureProfile"):
        profile.merge(MomentState(2))  # type: ignore[arg-type]
    # Strided views are copied, then counted like the contiguous batch.
    wide = np.arange(40.0).reshape(10, 4)
    profile.update(wide[:, ::2])
    assert profile.moments.count.tolist() == [10, 10]
