"""Drift statistics against SciPy and naive numpy implementations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import distance

from edgewise.kernels import (
    PSI_EPSILON,
    BinEdges,
    chi2_homogeneity,
    drift_scores,
    histogram_counts,
    holm,
    jensenshannon,
    ks_2samp,
    ks_binned,
    linf_distance,
    open_ended,
    psi,
    quantile_edges,
    wasserstein_binned,
    wasserstein_samples,
)

from .kernel_strategies import count_pairs

SETTINGS = settings(max_examples=100, deadline=None)


def _empty(row: np.ndarray) -> bool:
    return bool(row.sum() == 0)


# -- count statistics -------------------------------------------------------------------------


def naive_psi(r: np.ndarray, c: np.ndarray, eps: float) -> float:
    if _empty(r) or _empty(c):
        return math.nan
    p = np.maximum(r / r.sum(), eps)
    q = np.maximum(c / c.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


@SETTINGS
@given(count_pairs(), st.sampled_from([PSI_EPSILON, 1e-6, 0.01]))
def test_psi_matches_naive(pair: tuple[np.ndarray, np.ndarray], eps: float) -> None:
    ref, cur = pair
    got = psi(ref, cur, eps=eps)
    want = [naive_psi(r, c, eps) for r, c in zip(ref, cur, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_psi_epsilon_rule() -> None:
    # A bin empty on both sides contributes exactly 0; empty on one side a bounded amount.
    base = psi(np.array([5, 5]), np.array([5, 5]))
    assert base == 0.0
    with_empty = psi(np.array([5, 5, 0]), np.array([5, 5, 0]))
    assert with_empty == 0.0
    one_sided = psi(np.array([10, 0]), np.array([5, 5]))
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - PSI_EPSILON) * math.log(0.5 / PSI_EPSILON)
    assert one_sided == pytest.approx(expected, rel=1e-14)
    assert np.isfinite(one_sided)
    assert np.isnan(psi(np.array([0, 0]), np.array([1, 1])))
    with pytest.raises(ValueError, match="eps"):
        psi(np.array([1]), np.array([1]), eps=0.0)


@SETTINGS
@given(count_pairs(), st.sampled_from([None, 2.0, 10.0]))
def test_jensenshannon_matches_scipy(
    pair: tuple[np.ndarray, np.ndarray], base: float | None
) -> None:
    ref, cur = pair
    got = jensenshannon(ref, cur, base=base)
    for f in range(ref.shape[0]):
        if _empty(ref[f]) or _empty(cur[f]):
            assert np.isnan(got[f])
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            want = distance.jensenshannon(ref[f], cur[f], base=base)
        if np.isnan(want):  # SciPy: sqrt of a divergence that rounded below 0
            assert got[f] == 0.0
        else:
            # Compare the divergences: sqrt magnifies rounding near 0.
            assert got[f] ** 2 == pytest.approx(want**2, rel=1e-10, abs=1e-15)


def test_jensenshannon_known_values() -> None:
    assert jensenshannon(np.array([1, 0]), np.array([0, 1])) == pytest.approx(
        math.sqrt(math.log(2))
    )
    assert jensenshannon(np.array([1, 0]), np.array([0, 1]), base=2) == pytest.approx(1.0)
    assert jensenshannon(np.array([3, 3]), np.array([1, 1])) == 0.0
    with pytest.raises(ValueError, match="base"):
        jensenshannon(np.array([1]), np.array([1]), base=1.0)


@SETTINGS
@given(count_pairs(), st.integers(0, 2**32 - 1))
def test_wasserstein_binned_matches_scipy(pair: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    ref, cur = pair
    rng = np.random.default_rng(seed)
    support = np.sort(rng.choice(np.arange(-50.0, 50.0, 0.25), size=ref.shape), axis=1)
    if ref.shape[1] > 1:
        support[:, -1] = support[:, -2]  # a tie in the support
    got = wasserstein_binned(ref, cur, support)
    for f in range(ref.shape[0]):
        if _empty(ref[f]) or _empty(cur[f]):
            assert np.isnan(got[f])
            continue
        want = stats.wasserstein_distance(support[f], support[f], ref[f], cur[f])
        assert got[f] == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_wasserstein_binned_validation_and_1d() -> None:
    value = wasserstein_binned(np.array([1, 0]), np.array([0, 1]), np.array([0.0, 3.0]))
    assert value.shape == ()
    assert float(value) == 3.0
    with pytest.raises(ValueError, match="support must be non-decreasing"):
        wasserstein_binned(np.array([1, 0]), np.array([0, 1]), np.array([3.0, 0.0]))
    with pytest.raises(ValueError, match="reference and support must have the same shape"):
        wasserstein_binned(np.array([1, 0]), np.array([0, 1]), np.array([0.0, 1.0, 2.0]))


def naive_ks_binned(r: np.ndarray, c: np.ndarray) -> float:
    if _empty(r) or _empty(c):
        return math.nan
    return float(np.max(np.abs(np.cumsum(r) / r.sum() - np.cumsum(c) / c.sum())))


def naive_linf(r: np.ndarray, c: np.ndarray) -> float:
    if _empty(r) or _empty(c):
        return math.nan
    return float(np.max(np.abs(r / r.sum() - c / c.sum())))


@SETTINGS
@given(count_pairs())
def test_ks_binned_and_linf_match_naive(pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, cur = pair
    np.testing.assert_allclose(
        ks_binned(ref, cur),
        [naive_ks_binned(r, c) for r, c in zip(ref, cur, strict=True)],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        linf_distance(ref, cur),
        [naive_linf(r, c) for r, c in zip(ref, cur, strict=True)],
        rtol=1e-12,
    )


def scipy_chi2(r: np.ndarray, c: np.ndarray, correction: bool) -> tuple[float, float, float]:
    if _empty(r) or _empty(c):
        return math.nan, math.nan, math.nan
    keep = (r + c) > 0
    res = stats.chi2_contingency(np.array([r[keep], c[keep]]), correction=correction)
    return float(res.statistic), float(res.pvalue), float(res.dof)


@SETTINGS
@given(count_pairs(max_bins=8), st.booleans())
def test_chi2_matches_scipy_contingency(
    pair: tuple[np.ndarray, np.ndarray], correction: bool
) -> None:
    ref, cur = pair
    got = chi2_homogeneity(ref, cur, correction=correction)
    for f in range(ref.shape[0]):
        stat, p, dof = scipy_chi2(ref[f], cur[f], correction)
        if math.isnan(stat):
            assert np.isnan(got.statistic[f]) and np.isnan(got.pvalue[f]) and np.isnan(got.dof[f])
            continue
        assert got.dof[f] == dof
        assert got.statistic[f] == pytest.approx(stat, rel=1e-12, abs=1e-12)
        assert got.pvalue[f] == pytest.approx(p, rel=1e-9, abs=1e-300)


def test_chi2_edge_cases() -> None:
    # 2x2 with Yates' correction (dof 1), and without.
    ref = np.array([30, 10])
    cur = np.array([20, 25])
    for corr in (True, False):
        want = stats.chi2_contingency(np.array([ref, cur]), correction=corr)
        got = chi2_homogeneity(ref, cur, correction=corr)
        assert float(got.statistic) == pytest.approx(want.statistic, rel=1e-12)
        assert float(got.pvalue) == pytest.approx(want.pvalue, rel=1e-10)
    # One non-empty column: dof 0 -> statistic 0, p 1 (as SciPy).
    got = chi2_homogeneity(np.array([4, 0, 0]), np.array([7, 0, 0]))
    assert (float(got.statistic), float(got.pvalue), float(got.dof)) == (0.0, 1.0, 0.0)
    want = stats.chi2_contingency(np.array([[4], [7]]))
    assert (want.statistic, want.pvalue, want.dof) == (0.0, 1.0, 0)
    # Huge statistic: p-value underflows smoothly like SciPy's.
    big = chi2_homogeneity(np.array([100000, 0, 5]), np.array([0, 100000, 5]))
    want = stats.chi2_contingency(np.array([[100000, 0, 5], [0, 100000, 5]]))
    assert float(big.statistic) == pytest.approx(want.statistic, rel=1e-12)
    assert float(big.pvalue) == want.pvalue == 0.0


def naive_pool(r: np.ndarray, c: np.ndarray, m: float) -> np.ndarray:
    """The pooling rule written out: the 2 x k table of pooled non-empty columns."""
    need = m * (r.sum() + c.sum()) / min(r.sum(), c.sum())
    pools: list[list[float]] = []
    open_pool = [0.0, 0.0]
    for a, b in zip(r, c, strict=True):
        if a + b == 0:
            continue
        open_pool = [open_pool[0] + a, open_pool[1] + b]
        if sum(open_pool) >= need:
            pools.append(open_pool)
            open_pool = [0.0, 0.0]
    if sum(open_pool) > 0:
        if pools:
            pools[-1] = [pools[-1][0] + open_pool[0], pools[-1][1] + open_pool[1]]
        else:
            pools.append(open_pool)
    return np.array(pools).T


@SETTINGS
@given(count_pairs(max_bins=12), st.sampled_from([1.0, 5.0]), st.booleans())
def test_pooled_chi2_matches_scipy_on_the_pooled_table(
    pair: tuple[np.ndarray, np.ndarray], min_expected: float, correction: bool
) -> None:
    ref, cur = pair
    got = chi2_homogeneity(ref, cur, correction=correction, min_expected=min_expected)
    for f in range(ref.shape[0]):
        if _empty(ref[f]) or _empty(cur[f]):
            assert np.isnan(got.pvalue[f])
            continue
        table = naive_pool(ref[f], cur[f], min_expected)
        stat, p, dof = scipy_chi2(table[0], table[1], correction)
        assert got.dof[f] == dof
        assert got.statistic[f] == pytest.approx(stat, rel=1e-12, abs=1e-12)
        assert got.pvalue[f] == pytest.approx(p, rel=1e-9, abs=1e-300)
        if dof > 0:  # every pooled expected count reaches the minimum
            assert stats.contingency.expected_freq(table).min() >= min_expected * (1 - 1e-12)


def test_pooling_leaves_adequate_tables_alone_and_merges_sparse_columns() -> None:
    ref = np.array([40, 0, 50, 60, 3, 0])
    cur = np.array([30, 0, 45, 20, 1, 0])
    plain = chi2_homogeneity(ref, cur)
    pooled = chi2_homogeneity(ref, cur, min_expected=2.0)
    want = stats.chi2_contingency(np.array([[40, 50, 63], [30, 45, 21]]))
    assert float(pooled.dof) == want.dof == 2  # the sparse last column joins the one before
    assert float(pooled.statistic) == pytest.approx(want.statistic, rel=1e-12)
    assert float(pooled.pvalue) == pytest.approx(want.pvalue, rel=1e-10)
    assert float(plain.dof) == 3
    # Everything below the minimum: one pool, no test (dof 0, p 1).
    tiny = chi2_homogeneity(np.array([1, 2]), np.array([2, 1]), min_expected=5.0)
    assert (float(tiny.statistic), float(tiny.pvalue), float(tiny.dof)) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="min_expected"):
        chi2_homogeneity(ref, cur, min_expected=-1.0)


def naive_smoothed_psi(r: np.ndarray, c: np.ndarray, a: float) -> float:
    keep = (r + c) > 0
    r, c = r[keep], c[keep]
    p = (r + a) / (r.sum() + a * r.size)
    q = (c + a) / (c.sum() + a * c.size)
    return float(np.sum((q - p) * np.log(q / p)))


@SETTINGS
@given(count_pairs(), st.sampled_from([0.5, 1.0]))
def test_smoothed_psi_matches_naive(pair: tuple[np.ndarray, np.ndarray], a: float) -> None:
    ref, cur = pair
    got = psi(ref, cur, smoothing=a)
    for f in range(ref.shape[0]):
        if _empty(ref[f]) or _empty(cur[f]):
            assert np.isnan(got[f])
        else:
            assert got[f] == pytest.approx(naive_smoothed_psi(ref[f], cur[f], a), abs=1e-12)


def test_smoothing_bounds_what_an_empty_window_bin_adds() -> None:
    # 100 window rows, one of ten equal reference bins empty (probability 0.9**100 under no
    # drift): with eps clipping the empty bin alone adds 0.1 ln(0.1 / 1e-4) = 0.69 PSI.
    ref = np.full(10, 100)
    cur = np.array([0] + [11] * 9 + [1])[:10]
    cur[1] += 100 - cur.sum()
    clipped = float(psi(ref, cur))
    smoothed = float(psi(ref, cur, smoothing=0.5))
    assert clipped > 0.69
    assert smoothed < clipped / 2
    assert smoothed == pytest.approx(naive_smoothed_psi(ref, cur, 0.5), abs=1e-12)
    with pytest.raises(ValueError, match="smoothing"):
        psi(ref, cur, smoothing=-0.5)


def test_open_ended_folds_outer_columns_into_the_outer_bins() -> None:
    edges = BinEdges.from_ragged([np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0])])
    values = np.array([[-5.0, 0.5], [0.5, 7.0], [9.0, np.nan], [2.5, -1.0]])
    counts = histogram_counts(values, edges)
    folded = open_ended(counts, edges)
    assert folded.sum() == counts.sum()
    np.testing.assert_array_equal(folded[:, 0], 0)
    np.testing.assert_array_equal(folded[:, edges.overflow_column], 0)
    np.testing.assert_array_equal(folded[:, edges.nan_column], counts[:, edges.nan_column])
    # Feature 0 (3 bins): -5 joins bin 0, 9 joins bin 2; feature 1 (1 bin): -1 and 7 join it.
    assert folded[0, 1:4].tolist() == [2, 0, 2]
    assert folded[1, 1] == 3
    np.testing.assert_array_equal(counts, histogram_counts(values, edges))  # input untouched
    with pytest.raises(ValueError, match="shape"):
        open_ended(counts[:, :-1], edges)


def naive_holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down rule written out: the smallest alpha at which each test is rejected."""
    m = p.size
    order = np.argsort(p)
    out = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out


@SETTINGS
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_holm_matches_the_step_down_rule(values: list[float]) -> None:
    p = np.array(values)
    np.testing.assert_allclose(holm(p), naive_holm(p), rtol=1e-15, atol=0.0)


def test_holm_skips_untested_features() -> None:
    got = holm([0.01, np.nan, 0.04, 0.2])
    np.testing.assert_allclose(got[[0, 2, 3]], naive_holm(np.array([0.01, 0.04, 0.2])))
    assert np.isnan(got[1])
    assert np.isnan(holm([np.nan])).all()
    assert holm([]).shape == (0,)


def test_negative_or_nonfinite_counts_give_nan() -> None:
    ref = np.array([[1.0, 2.0], [1.0, np.nan], [1.0, -1.0]])
    cur = np.ones((3, 2))
    for fn in (psi, jensenshannon, ks_binned, linf_distance):
        out = fn(ref, cur)
        assert np.isfinite(out[0]) and np.isnan(out[1:]).all()
    assert np.isnan(chi2_homogeneity(ref, cur).pvalue[1:]).all()


def test_count_validation_names_arguments() -> None:
    with pytest.raises(ValueError, match="reference and current must have the same shape"):
        psi(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"current must be a numpy\.ndarray"):
        psi(np.ones(3), [1, 1, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference must be 1-D"):
        psi(np.ones((1, 1, 3)), np.ones((1, 1, 3)))
    with pytest.raises(ValueError, match="reference must have an integer or float dtype"):
        psi(np.array(["a"]), np.array(["b"]))
    with pytest.raises(ValueError, match="at least one bin"):
        psi(np.ones((2, 0)), np.ones((2, 0)))


# -- drift_scores ------------------------------------------------------------------------------


def test_drift_scores_equal_the_individual_functions() -> None:
    rng = np.random.default_rng(7)
    reference = np.column_stack(
        [rng.normal(size=2000), rng.exponential(size=2000), np.full(2000, 1.0)]
    )
    reference[rng.random(2000) < 0.05, 1] = np.nan
    edges = quantile_edges(reference)
    current = np.column_stack(
        [rng.normal(0.3, size=500), rng.exponential(2.0, size=500), np.full(500, 2.0)]
    )
    current[rng.random(500) < 0.2, 1] = np.nan
    ref = histogram_counts(reference, edges)
    cur = histogram_counts(current, edges)
    scores = drift_scores(ref, cur, edges)
    np.testing.assert_array_equal(scores.psi, psi(ref, cur))
    np.testing.assert_array_equal(scores.jensenshannon, jensenshannon(ref, cur))
    np.testing.assert_array_equal(scores.linf, linf_distance(ref, cur))
    chi = chi2_homogeneity(ref, cur)
    np.testing.assert_array_equal(scores.chi2, chi.statistic)
    np.testing.assert_array_equal(scores.chi2_pvalue, chi.pvalue)
    np.testing.assert_array_equal(scores.chi2_dof, chi.dof)
    ordered_ref = ref[:, : edges.nan_column]
    ordered_cur = cur[:, : edges.nan_column]
    np.testing.assert_array_equal(scores.ks, ks_binned(ordered_ref, ordered_cur))
    np.testing.assert_array_equal(
        scores.wasserstein, wasserstein_binned(ordered_ref, ordered_cur, edges.support)
    )
    assert scores.table.shape == (8, 3)
    # The constant feature (1.0) moved entirely to 2.0, i.e. into overflow: maximal binned KS,
    # but overflow mass sits at the last edge, so the binned Wasserstein is only a lower bound.
    assert scores.ks[2] == 1.0
    assert 0.0 <= scores.wasserstein[2] < 1e-12
    assert wasserstein_samples(reference[:, 2], current[:, 2]) == 1.0
    # Binned Wasserstein approximates the raw-sample one for a located shift.
    assert scores.wasserstein[0] == pytest.approx(
        wasserstein_samples(reference[:, 0], current[:, 0]), rel=0.35
    )


def test_drift_scores_categorical_and_validation() -> None:
    ref = np.array([[10, 5, 0, 1], [3, 3, 3, 0]])
    cur = np.array([[2, 5, 0, 9], [3, 3, 3, 0]])
    scores = drift_scores(ref, cur)
    assert np.isnan(scores.wasserstein).all() and np.isnan(scores.ks).all()
    np.testing.assert_array_equal(scores.linf, linf_distance(ref, cur))
    assert scores.psi[1] == 0.0 and scores.chi2_pvalue[1] == 1.0
    edges = BinEdges.from_array([[0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"reference must have shape \(2, 4\)"):
        drift_scores(np.ones((2, 5)), np.ones((2, 5)), edges)
    with pytest.raises(ValueError, match="edges must be a BinEdges"):
        drift_scores(ref, cur, "edges")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        drift_scores(ref, cur, eps=2.0)


# -- raw samples: ks_2samp ---------------------------------------------------------------------


def assert_ks_matches_scipy(x: np.ndarray, y: np.ndarray, method: str, **kw: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = stats.ks_2samp(x, y, method=method, **kw)
        got = ks_2samp(x, y, method=method, **kw)  # type: ignore[arg-type]
    if np.isnan(want.statistic):
        assert np.isnan(got.statistic) and np.isnan(got.pvalue) and got.statistic_sign == 0
        return
    assert got.statistic == want.statistic
    assert got.pvalue == pytest.approx(want.pvalue, rel=1e-9, abs=1e-300, nan_ok=True)
    assert got.statistic_location == want.statistic_location
    assert got.statistic_sign == want.statistic_sign


@st.composite
def sample_pairs(draw: st.DrawFn, max_size: int = 60) -> tuple[np.ndarray, np.ndarray]:
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n1 = draw(st.integers(1, max_size))
    n2 = draw(st.integers(1, max_size))
    kind = draw(st.sampled_from(["continuous", "ties", "shifted", "single"]))
    if kind == "continuous":
        x, y = rng.normal(size=n1), rng.normal(size=n2)
    elif kind == "ties":
        x, y = rng.integers(0, 4, size=n1).astype(float), rng.integers(0, 5, size=n2).astype(float)
    elif kind == "shifted":
        x, y = rng.normal(size=n1), rng.normal(1.0, size=n2)
    else:
        x, y = np.full(n1, 1.5), rng.integers(1, 3, size=n2).astype(float)
    return x.astype(dtype), y.astype(dtype)


@settings(max_examples=150, deadline=None)
@given(sample_pairs(), st.sampled_from(["auto", "exact", "asymp"]))
def test_ks_2samp_matches_scipy(pair: tuple[np.ndarray, np.ndarray], method: str) -> None:
    assert_ks_matches_scipy(*pair, method=method)


@pytest.mark.parametrize(
    ("n1", "n2", "shift"),
    [
        (200, 200, 0.0),  # exact, equal sizes (reflection series)
        (200, 200, 0.4),
        (300, 170, 0.1),  # exact, band recursion
        (1000, 999, 0.15),
        (700, 7, 0.5),
        (3, 2000, 0.0),
    ],
)
def test_ks_2samp_exact_paths(n1: int, n2: int, shift: float) -> None:
    rng = np.random.default_rng(n1 * 7 + n2)
    x = rng.normal(size=n1)
    y = rng.normal(shift, size=n2)
    for method in ("auto", "exact", "asymp"):
        assert_ks_matches_scipy(x, y, method)


@pytest.mark.parametrize(
    ("n1", "n2", "shift"),
    [
        (10001, 150, 0.0),  # auto -> asymp; en ~ 148 > 140: Durbin matrix branch
        (10001, 150, 0.3),  # asymp, smirnov branch
        (12000, 9000, 0.0),  # asymp, large en
        (12000, 9000, 0.05),
        (20000, 40, 0.2),  # asymp, en <= 140
    ],
)
def test_ks_2samp_auto_switches_to_asymp(n1: int, n2: int, shift: float) -> None:
    rng = np.random.default_rng(n1 + n2)
    x = rng.normal(size=n1)
    y = rng.normal(shift, size=n2)
    assert_ks_matches_scipy(x, y, "auto")


def test_ks_2samp_exact_falls_back_for_huge_lcm() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=46349)
    y = rng.normal(size=46351)  # coprime sizes: lcm > int32 max
    with pytest.warns(RuntimeWarning, match="Switching to 'asymp'"):
        got = ks_2samp(x, y, method="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = stats.ks_2samp(x, y, method="exact")
    assert got.statistic == want.statistic
    assert got.pvalue == pytest.approx(want.pvalue, rel=1e-9)


def test_ks_2samp_nan_empty_and_validation() -> None:
    x = np.array([0.1, np.nan, 0.5, 0.7])
    y = np.array([0.2, 0.3, np.nan])
    assert_ks_matches_scipy(x, y, "auto")  # propagate -> NaN
    assert_ks_matches_scipy(x, y, "auto", nan_policy="omit")
    assert_ks_matches_scipy(np.array([]), y[:2], "auto")
    assert_ks_matches_scipy(np.array([np.nan]), y[:2], "auto", nan_policy="omit")
    # Integer samples are accepted (as float64); mixed float32/float64 too.
    assert_ks_matches_scipy(np.array([1, 2, 3]), np.array([2.5, 3.5], dtype=np.float32), "auto")
    with pytest.raises(ValueError, match="method"):
        ks_2samp(x, y, method="asym")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan_policy"):
        ks_2samp(x, y, nan_policy="raise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample1 must be 1-D"):
        ks_2samp(np.ones((2, 2)), y)
    with pytest.raises(ValueError, match="sample2 must be numeric"):
        ks_2samp(x, np.array(["a", "b"]))


def test_ks_2samp_complete_separation() -> None:
    x = np.arange(50.0)
    y = np.arange(100.0, 130.0)
    assert_ks_matches_scipy(x, y, "exact")
    assert_ks_matches_scipy(x, y, "asymp")
    assert ks_2samp(x, y).statistic == 1.0


# -- raw samples: Wasserstein -----------------------------------------------------------------


@SETTINGS
@given(sample_pairs())
def test_wasserstein_samples_matches_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = pair
    want = stats.wasserstein_distance(x, y)
    assert wasserstein_samples(x, y) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_wasserstein_samples_special_values() -> None:
    assert np.isnan(wasserstein_samples([np.nan, 1.0], [2.0]))
    assert np.isnan(wasserstein_samples([], [2.0]))
    with np.errstate(invalid="ignore"):
        for u, v in (
            ([np.inf, 1.0], [2.0, 3.0]),
            ([np.inf, np.inf], [1.0]),
            ([-np.inf, 0.0], [0.0]),
        ):
            want = stats.wasserstein_distance(u, v)
            got = wasserstein_samples(u, v)
            assert (np.isnan(got) and np.isnan(want)) or got == want
    assert wasserstein_samples([0.0, 1.0, 3.0], [5.0, 6.0]) == pytest.approx(
        stats.wasserstein_distance([0.0, 1.0, 3.0], [5.0, 6.0])
    )
