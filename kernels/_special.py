"""Special functions needed by the drift p-values, written for numba (private).

SciPy may not be imported by ``edgewise.kernels``, so this module provides:

* :func:`_gammaincc`: the regularised upper incomplete gamma function ``Q(a, x)``
  (series for ``P`` when ``x < a + 1``, modified Lentz continued fraction for ``Q``
  otherwise), giving the chi-square survival function ``chi2.sf(x, k) = Q(k/2, x/2)``.
* :func:`_kstwo_sf`: the survival function of the one-sample two-sided Kolmogorov statistic
  ``D_n`` (``scipy.stats.kstwo.sf``), following the algorithm choice of Simard & L'Ecuyer
  (2011) as SciPy does: Ruben-Gambino closed forms at the extremes, ``2 * smirnov`` where
  the two one-sided tails do not overlap, the Durbin matrix method (Marsaglia-Tsang-Wang
  evaluation) and the Pelz-Good asymptotic series.  Where SciPy uses Pomeranz' recursion
  (n <= 140, 0.754693 < n d^2 <= 4) the Durbin matrix method is used instead: it is exact
  there as well and agrees to ~1e-12.
* :func:`_smirnov_sf`: the one-sided ``Pr(D_n^+ >= d)`` (``scipy.special.smirnov``) from the
  Birnbaum-Tingey sum, each term a binomial probability evaluated in Loader's saddle-point
  form (agrees with SciPy's double-double evaluation to ~1e-12 up to n = 1e6; above that
  the same asymptotic formula as SciPy).
* :func:`_ks2_prob_outside_square` and :func:`_ks2_prob_outside_band`: exact two-sided
  two-sample Kolmogorov-Smirnov p-values by lattice-path counting (Hodges 1958), the first
  by the reflection series for equal sample sizes, the second by the "inside" recursion kept
  in probability form (Viehmann 2021), i.e. the recursion is run directly on the fraction of
  paths that have already left the band, so nothing overflows.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._config import JIT_DISABLED, jit

_EPS: Final = 2.220446049250313e-16
_TINY: Final = 1e-300
_SCALE_UP: Final = 2.0**128
_SCALE_DOWN: Final = 2.0**-128
_LN2: Final = math.log(2.0)
_MIN_LOG: Final = -708.3964185322641  # log of the smallest normal double, as cephes' MINLOG
_SQRT_2PI: Final = math.sqrt(2.0 * math.pi)
_LOG_2PI: Final = math.log(2.0 * math.pi)
_PI2: Final = math.pi**2
_PI4: Final = math.pi**4
_PI6: Final = math.pi**6


# --------------------------------------------------------------------------------------------
# Incomplete gamma / chi-square


@jit
def _gammaincc(a: float, x: float) -> float:
    """Regularised upper incomplete gamma ``Q(a, x) = Gamma(a, x) / Gamma(a)``."""
    if math.isnan(a) or math.isnan(x) or a <= 0.0 or x < 0.0:
        return np.nan
    if x == 0.0:
        return 1.0
    if x == np.inf:
        return 0.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        # P(a, x) = x^a e^-x / Gamma(a + 1) * sum_n x^n / ((a+1)...(a+n))
        ap = a
        term = 1.0 / a
        total = term
        for _ in range(100000):
            ap += 1.0
            term *= x / ap
            total += term
            if term < total * _EPS:
                break
        q = 1.0 - total * math.exp(log_prefactor)
        return max(q, 0.0)
    # Q(a, x) = x^a e^-x / Gamma(a) * 1/(x+1-a- 1(1-a)/(x+3-a- 2(2-a)/(x+5-a- ...)))
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _TINY:
            d = _TINY
        c = b + an / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return min(math.exp(log_prefactor) * h, 1.0)


@jit
def _chi2_sf(x: float, dof: float) -> float:
    """Chi-square survival function, ``scipy.stats.chi2.sf(x, dof)``."""
    if x <= 0.0:
        return 1.0
    return float(_gammaincc(0.5 * dof, 0.5 * x))


# --------------------------------------------------------------------------------------------
# One-sample Kolmogorov distribution


@jit
def _matmul_loops(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    m = a.shape[0]
    out = np.zeros((m, m))
    for i in range(m):
        for k in range(m):
            aik = a[i, k]
            if aik != 0.0:
                for j in range(m):
                    out[i, j] += aik * b[k, j]
    return out


def _matmul_numpy(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    return a @ b


# Under NUMBA_DISABLE_JIT the triple loop would run in the interpreter; numpy's matmul gives
# the same product there.  Compiled kernels use the loops (numba's np.dot would need SciPy's
# BLAS, and edgewise.kernels must not depend on SciPy).
_matmul: Any = _matmul_numpy if JIT_DISABLED else _matmul_loops


@jit
def _kolmogorov_cdf_durbin(n: int, d: float) -> float:
    """``Pr(D_n <= d)`` by Durbin's matrix method (Marsaglia, Tsang & Wang 2003)."""
    if d >= 1.0:
        return 1.0
    nd = n * d
    if nd <= 0.5:
        return 0.0
    k = math.ceil(nd)
    h = k - nd
    m = 2 * k - 1
    inv_fact = np.empty(m + 1)
    inv_fact[0] = 1.0
    for i in range(1, m + 1):
        inv_fact[i] = inv_fact[i - 1] / i
    hm = np.zeros((m, m))
    for r in range(m):
        for c in range(1, m):
            p = r - c + 1
            if p >= 0:
                hm[r, c] = inv_fact[p]
        hm[r, 0] = (1.0 - h ** (r + 1)) * inv_fact[r + 1]
    for c in range(m):
        hm[m - 1, c] = (1.0 - h ** (m - c)) * inv_fact[m - c]
    hm[m - 1, 0] = (1.0 - 2.0 * h**m + max(0.0, 2.0 * h - 1.0) ** m) * inv_fact[m]

    # hm^n with separate binary exponents for the running power and the running square.
    power = np.eye(m)
    power_exp = 0
    square_exp = 0
    e = n
    while True:
        if e & 1:
            power = _matmul(power, hm)
            power_exp += square_exp
            big = np.max(np.abs(power))
            if big > _SCALE_UP:
                power = power * _SCALE_DOWN
                power_exp += 128
        e >>= 1
        if e == 0:
            break
        hm = _matmul(hm, hm)
        square_exp *= 2
        big = np.max(np.abs(hm))
        if big > _SCALE_UP:
            hm = hm * _SCALE_DOWN
            square_exp += 128
    p = power[k - 1, k - 1]
    # times n! / n^n
    for i in range(1, n + 1):
        p = p * i / n
        if abs(p) < _SCALE_DOWN:
            p *= _SCALE_UP
            power_exp -= 128
    return math.ldexp(p, power_exp)


@jit
def _kolmogorov_cdf_pelz_good(n: int, x: float) -> float:
    """Pelz & Good (1976) asymptotic series for ``Pr(D_n <= x)``, as in Simard & L'Ecuyer."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    z = math.sqrt(n) * x
    z2 = z * z
    z3 = z2 * z
    z4 = z2 * z2
    z6 = z4 * z2
    z7 = z6 * z
    z8 = z4 * z4
    z10 = z8 * z2
    log_q = -_PI2 / (8.0 * z2)
    if log_q < -708.0:
        return 0.0
    kmax = math.ceil(16.0 * z / math.pi)
    k0 = 0.0
    k1 = 0.0
    k2 = 0.0
    k3 = 0.0
    for k in range(kmax, 0, -1):
        m = 2.0 * k - 1.0
        m2 = m * m
        m4 = m2 * m2
        m6 = m4 * m2
        w = math.exp(log_q * m2)  # exp(-(2k-1)^2 pi^2 / (8 z^2))
        k0 += w
        k1 += (_PI2 * m2 / 4.0 - z2) * w
        k2 += (
            (6.0 * z6 + 2.0 * z4)
            + _PI2 * (2.0 * z4 - 5.0 * z2) * m2 / 4.0
            + _PI4 * (1.0 - 2.0 * z2) * m4 / 16.0
        ) * w
        k3 += (
            (-30.0 * z6 - 90.0 * z8)
            + _PI2 * (135.0 * z4 - 96.0 * z6) * m2 / 4.0
            + _PI4 * (212.0 * z4 - 60.0 * z2) * m4 / 16.0
            + _PI6 * (5.0 - 30.0 * z2) * m6 / 64.0
        ) * w
    k0 *= _SQRT_2PI / z
    k1 *= _SQRT_2PI / (6.0 * z4)
    k2 *= _SQRT_2PI / (72.0 * z7)
    k3 *= _SQRT_2PI / (6480.0 * z10)
    extra2 = 0.0
    extra3 = 0.0
    log_r = -_PI2 / (2.0 * z2)
    for k in range(kmax, 0, -1):
        kk = float(k) * float(k)
        w = math.exp(log_r * kk)
        extra2 += kk * w
        extra3 += (3.0 * z2 - _PI2 * kk) * kk * w
    k2 -= extra2 * _PI2 * _SQRT_2PI / (36.0 * z3)
    k3 += extra3 * _PI2 * _SQRT_2PI / (216.0 * z6)
    rn = math.sqrt(float(n))
    return k0 + k1 / rn + k2 / n + k3 / (n * rn)


@jit
def _stirlerr(k: float) -> float:
    """``log(k!) - log(sqrt(2 pi k) (k/e)^k)`` for ``k >= 1`` (Loader 2000)."""
    if k <= 15.0:
        return math.lgamma(k + 1.0) - (k + 0.5) * math.log(k) + k - 0.5 * _LOG_2PI
    k2 = k * k
    return (
        1.0 / 12.0
        - (1.0 / 360.0 - (1.0 / 1260.0 - (1.0 / 1680.0 - 1.0 / 1188.0 / k2) / k2) / k2) / k2
    ) / k


@jit
def _bd0(x: float, mean: float) -> float:
    """``x log(x / mean) + mean - x`` without cancellation when ``x ~ mean`` (Loader 2000)."""
    if abs(x - mean) < 0.1 * (x + mean):
        v = (x - mean) / (x + mean)
        s = (x - mean) * v
        ej = 2.0 * x * v
        v2 = v * v
        for j in range(1, 1000):
            ej *= v2
            s1 = s + ej / (2 * j + 1)
            if s1 == s:
                return s1
            s = s1
        return s
    return x * math.log(x / mean) + mean - x


@jit
def _smirnov_sf(n: int, x: float) -> float:
    """One-sided ``Pr(D_n^+ >= x)`` (``scipy.special.smirnov``)."""
    if n <= 0 or math.isnan(x) or x < 0.0 or x > 1.0:
        return np.nan
    if x == 0.0:
        return 1.0
    if x == 1.0:
        return 0.0
    if n == 1:
        return 1.0 - x
    nx = n * x
    if nx <= 1.0:
        # Only the v = n term of the upper sum: cdf = x (1 + x)^(n - 1).
        return 1.0 - x * math.exp((n - 1) * math.log1p(x))
    if -2.0 * n * x * x < _MIN_LOG:
        return 0.0
    if nx >= n - 1:
        return math.exp(n * math.log1p(-x))
    if n > 1000000:
        log_p = -((6.0 * nx + 1.0) ** 2) / 18.0 / n
        if log_p < -_LN2:
            return math.exp(log_p)
        return 1.0 + math.expm1(log_p)
    # Birnbaum-Tingey: sf = x * sum_{v=0}^{floor(n(1-x))} C(n,v) a_v^(v-1) (1-a_v)^(n-v) with
    # a_v = x + v/n.  Each term is binom_pmf(v; n, a_v) / a_v, evaluated with Loader's
    # saddle-point form (stirlerr + bd0), which stays accurate to ~1e-13 where the naive
    # log-binomial loses ~1e-9 for n ~ 1e5.
    v_max = math.floor(n - nx)
    total = math.exp(n * math.log1p(-x)) / x  # v = 0
    best = -np.inf
    log_n_part = _stirlerr(float(n))
    for v in range(1, v_max + 1):
        rest = (n - v) - nx  # n (1 - a_v)
        if rest <= 0.0:
            break
        mean = nx + v  # n a_v
        fv = float(v)
        fw = float(n - v)
        log_pmf = (
            log_n_part
            - _stirlerr(fv)
            - _stirlerr(fw)
            - _bd0(fv, mean)
            - _bd0(fw, rest)
            - 0.5 * (_LOG_2PI + math.log(fv) + math.log1p(-fv / n))
        )
        term = math.exp(log_pmf) * n / mean
        total += term
        if log_pmf > best:
            best = log_pmf
        elif 4.0 * (v_max - v) * term < _EPS * total:
            break
    return min(max(x * total, 0.0), 1.0)


@jit
def _kstwo_sf(n: int, x: float) -> float:
    """``scipy.stats.kstwo.sf(x, n)``: ``Pr(D_n >= x)`` for the two-sided statistic."""
    if math.isnan(x) or n <= 0:
        return np.nan
    if x >= 1.0:
        return 0.0
    if x <= 0.0:
        return 1.0
    t = n * x
    if t <= 1.0:
        if t <= 0.5:
            return 1.0
        # Ruben-Gambino: cdf = n!/n^n (2t - 1)^n for 1/2n <= x <= 1/n
        if n <= 140:
            cdf = 1.0
            for i in range(1, n + 1):
                cdf *= (i / n) * (2.0 * t - 1.0)
        else:
            cdf = math.exp(math.lgamma(n + 1.0) - n * math.log(n) + n * math.log(2.0 * t - 1.0))
        return min(max(1.0 - cdf, 0.0), 1.0)
    if t >= n - 1:
        return min(max(2.0 * (1.0 - x) ** n, 0.0), 1.0)
    if x >= 0.5:
        return min(max(2.0 * float(_smirnov_sf(n, x)), 0.0), 1.0)
    nxx = t * x
    if n <= 140:
        if nxx <= 4.0:
            return min(max(1.0 - float(_kolmogorov_cdf_durbin(n, x)), 0.0), 1.0)
        return min(max(2.0 * float(_smirnov_sf(n, x)), 0.0), 1.0)
    if nxx >= 370.0:
        return 0.0
    if nxx >= 2.2:
        return min(max(2.0 * float(_smirnov_sf(n, x)), 0.0), 1.0)
    if n <= 100000 and n * x**1.5 <= 1.4:
        cdf = float(_kolmogorov_cdf_durbin(n, x))
    else:
        cdf = float(_kolmogorov_cdf_pelz_good(n, x))
    return min(max(1.0 - cdf, 0.0), 1.0)


# --------------------------------------------------------------------------------------------
# Exact two-sample Kolmogorov-Smirnov (two-sided)


@jit
def _ks2_prob_outside_square(n: int, h: int) -> float:
    """``Pr(D_{n,n} >= h/n)`` for two samples of equal size ``n`` (``1 <= h <= n``).

    Reflection principle: ``P = 2 * sum_{k>=1} (-1)^(k+1) C(2n, n-kh) / C(2n, n)``.  With
    ``R_k = C(2n, n-kh) / C(2n, n-(k-1)h)`` the alternating sum is evaluated from the inside
    out, ``P = 2 R_1 (1 - R_2 (1 - R_3 (...)))``, which avoids subtracting large terms.
    """
    acc = 0.0
    for k in range(n // h, 0, -1):
        ratio = 1.0
        for j in range((k - 1) * h, k * h):
            ratio = ratio * (n - j) / (n + j + 1)
        acc = ratio * (1.0 - acc)
    return 2.0 * acc


@jit
def _ks2_prob_outside_band(m: int, n: int, g: int, h: int) -> float:
    """``Pr(D_{m,n} >= h / lcm(m, n))`` by counting lattice paths (``1 <= h``).

    A sample ordering is a monotone lattice path from (0, 0) to (m, n); the two ECDFs differ
    by ``|n x - m y| / (m n)`` at (x, y).  ``B(x, y)`` = fraction of the paths to (x, y) that
    have already touched the band edge ``|x n/g - y m/g| >= h``.  Points outside the band
    have ``B = 1``, ``B(0, y) = 0`` inside it, and ``B(x, y) = (x B(x-1, y) + y B(x, y-1))
    / (x + y)`` because that is how the ``C(x+y, x)`` paths to (x, y) split.  One column is
    kept, and each column only updates its band window ``lo..hi``.
    """
    if m < n:
        m, n = n, m
    mg = m // g
    ng = n // g
    col = np.ones(n + 1)
    # Column x = 0: (0, y) is inside while y * mg < h.
    hi = min((h - 1) // mg, n)
    for y in range(hi + 1):
        col[y] = 0.0
    for x in range(1, m + 1):
        lo = max((ng * x - h) // mg + 1, 0)
        hi = min(-((-(ng * x + h)) // mg) - 1, n)
        if hi < lo:
            return 1.0
        below = 1.0  # B(x, lo - 1): outside the band (unused when lo == 0)
        for y in range(lo, hi + 1):
            # col[y] still holds B(x-1, y), or 1.0 where (x-1, y) was above that column's band.
            # Written as ``c + d * below`` with c, d computed off the loop-carried chain
            # through ``below``: the recursion is latency-bound, and this halves its time.
            inv = 1.0 / (x + y)
            below = (x * inv) * col[y] + (y * inv) * below
            col[y] = below
    # The weights x/(x+y) and y/(x+y) are rounded separately and may sum to 1 + 1 ulp.
    return min(float(col[n]), 1.0)
