"""The private special functions behind the p-values, against SciPy and brute force."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from edgewise.kernels._special import (
    _chi2_sf,
    _gammaincc,
    _ks2_prob_outside_band,
    _ks2_prob_outside_square,
    _kstwo_sf,
    _smirnov_sf,
)


@pytest.mark.parametrize("a", [0.5, 1.0, 1.5, 2.0, 4.5, 10.0, 50.0, 200.5, 1000.0])
def test_gammaincc_matches_scipy(a: float) -> None:
    xs = np.concatenate(
        [[0.0, 1e-8, 0.1, a - 1.0, a, a + 1.0, a + 1.5], np.linspace(0.0, 4 * a + 60, 40)]
    )
    xs = xs[xs >= 0.0]
    for x in xs:
        want = special.gammaincc(a, x)
        got = _gammaincc(a, float(x))
        assert got == pytest.approx(want, rel=1e-11, abs=1e-300), (a, x)


def test_gammaincc_domain() -> None:
    assert _gammaincc(2.0, math.inf) == 0.0
    assert _gammaincc(2.0, 0.0) == 1.0
    assert math.isnan(_gammaincc(0.0, 1.0))
    assert math.isnan(_gammaincc(1.0, -1.0))
    assert math.isnan(_gammaincc(1.0, math.nan))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 400), st.floats(0.0, 2000.0))
def test_chi2_sf_matches_scipy(dof: int, x: float) -> None:
    assert _chi2_sf(x, float(dof)) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-10, abs=1e-300)


# n values chosen to reach every branch of kstwo.sf: closed forms (t <= 1, t >= n - 1),
# 2 * smirnov (x >= 0.5 or large n x^2), Durbin's matrix (n <= 140, or n x^1.5 <= 1.4 up to
# n = 100000) and Pelz-Good (n > 100000 or n x^1.5 > 1.4).
KSTWO_NS = [1, 2, 3, 7, 20, 80, 140, 141, 400, 3000, 20000, 150000]


@pytest.mark.parametrize("n", KSTWO_NS)
def test_kstwo_sf_matches_scipy(n: int) -> None:
    xs = [0.0, 0.3 / n, 0.5 / n, 0.75 / n, 1.0 / n, 1.5 / n, 0.5, 0.75, 1 - 1.0 / n, 1.0]
    xs += [math.sqrt(c / n) for c in (0.2, 0.7, 0.8, 1.5, 2.1, 2.3, 3.9, 4.1, 10.0, 30.0, 100.0)]
    xs += [(1.3 / n) ** (2 / 3), (1.5 / n) ** (2 / 3)]
    for x in xs:
        if not 0.0 <= x <= 1.0:
            continue
        want = float(stats.kstwo.sf(x, n))
        got = _kstwo_sf(n, x)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (n, x)


def test_kstwo_sf_domain() -> None:
    assert math.isnan(_kstwo_sf(0, 0.5))
    assert math.isnan(_kstwo_sf(5, math.nan))
    assert _kstwo_sf(5, 1.5) == 0.0
    assert _kstwo_sf(5, -1.0) == 1.0


@pytest.mark.parametrize(
    ("n", "xs"),
    [
        (1, [0.0, 0.3, 1.0]),
        (2, [0.1, 0.5, 0.5000001, 0.9]),
        (10, [0.05, 0.1, 0.2, 0.35, 0.9, 0.95]),
        (1000, [0.0005, 0.001, 0.02, 0.05, 0.1, 0.3, 0.999]),
        (100000, [0.004, 0.03]),
        (2_000_000, [0.0001, 0.001]),  # above SciPy's exact limit: its approximation
    ],
)
def test_smirnov_sf_matches_scipy(n: int, xs: list[float]) -> None:
    for x in xs:
        want = special.smirnov(n, x)
        assert _smirnov_sf(n, x) == pytest.approx(want, rel=1e-10, abs=1e-300), (n, x)


def _brute_outside_prob(m: int, n: int, h: int) -> Fraction:
    """Exact Pr(D_{m,n} >= h / lcm): lattice paths that leave |x n/g - y m/g| < h."""
    g = math.gcd(m, n)
    inside = [[0] * (n + 1) for _ in range(m + 1)]
    for x in range(m + 1):
        for y in range(n + 1):
            if abs(x * (n // g) - y * (m // g)) >= h:
                continue
            if x == 0 and y == 0:
                inside[x][y] = 1
            else:
                inside[x][y] = (inside[x - 1][y] if x else 0) + (inside[x][y - 1] if y else 0)
    return 1 - Fraction(inside[m][n], math.comb(m + n, n))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 25), st.integers(1, 25), st.data())
def test_exact_two_sample_prob_against_brute_force(m: int, n: int, data: st.DataObject) -> None:
    g = math.gcd(m, n)
    lcm = m * n // g
    h = data.draw(st.integers(1, lcm))
    want = float(_brute_outside_prob(m, n, h))
    got = _ks2_prob_outside_band(m, n, g, h)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if m == n:
        # For equal sizes ks_2samp uses the reflection series, with d = h / n.
        hh = h // (lcm // n)
        if hh >= 1 and hh * (lcm // n) == h:
            assert _ks2_prob_outside_square(n, hh) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_exact_two_sample_prob_band_is_symmetric() -> None:
    assert _ks2_prob_outside_band(30, 20, 10, 25) == _ks2_prob_outside_band(20, 30, 10, 25)
    assert _ks2_prob_outside_band(7, 5, 1, 35) == pytest.approx(
        float(_brute_outside_prob(7, 5, 35)), rel=1e-12
    )
