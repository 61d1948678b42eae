"""Concept-drift detectors on a stream of errors or losses: DDM and ADWIN.

Both are streaming state objects whose :meth:`update` takes a whole array of new observations,
processes it in one kernel call, and returns the positions (indices into that array) at which a
drift was detected.  Their rules are those of river's ``drift.binary.DDM`` and ``drift.ADWIN``
(river 0.26), with river's source read as the specification and the arithmetic done in the
same order, so that the same stream gives the same detection indices and, for ADWIN, the same
window bit for bit (``tests/kernels/test_detectors.py`` checks this against river itself).

:class:`DDM` (Gama et al., 2004) watches a Bernoulli error stream (1: the prediction was wrong,
0: it was right).  With ``p`` the running error rate over the ``n`` values seen since the last
drift and ``s = sqrt(p (1 - p) / n)``:

* nothing is judged while ``n <= warm_start``;
* then ``(p_min, s_min)`` are the ``(p, s)`` of the step where ``p + s`` was smallest (ties take
  the later step);
* *warning* when ``p + s > p_min + warning_threshold * s_min``;
* *drift* when ``p + s > p_min + drift_threshold * s_min`` (a drift clears the warning).

:class:`ADWIN` (Bifet & Gavaldà, 2007; the ADWIN2 bucket compression) keeps a window of recent
real values in exponential-histogram buckets: level ``i`` holds up to ``max_buckets`` summaries
(total and variance) of ``2**i`` values each; when a level gets ``max_buckets + 1`` the two
oldest are merged into one summary of the next level.  Every ``clock`` values, once the window
holds more than ``grace_period`` values, every split of the window into an older part ``W0``
and a newer part ``W1`` at a bucket boundary (both at least ``min_window_length`` long) is
tested, oldest boundary first; a drift is detected when::

    |mean(W0) - mean(W1)| > sqrt(2 m v d') + 2/3 d' m

with ``m = 1/(n0 - L + 1) + 1/(n1 - L + 1)`` (``L`` the minimum window length), ``v`` the
window's variance per value and ``d' = ln(2 ln(width) / delta)``.  On a detection the oldest
bucket is dropped and the scan starts again until no split is significant.

Like river, both detectors start afresh on the value *after* a detection: the state seen between
a detection and the next update (``width``, ``error_rate``...) is the state at the detection.

Storage: each detector's state is a few small C-contiguous numpy arrays that the kernel updates
in place; the kernels are compiled for float64 values (writable and read-only), which the
wrappers convert to.  A state object is not thread-safe.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from . import _native
from ._config import jit

__all__ = ["ADWIN", "DDM", "DRIFT", "STABLE", "WARNING"]

#: Per-value status codes returned by :meth:`DDM.update_status`.
STABLE: Final = 0
WARNING: Final = 1
DRIFT: Final = 2

# DDM state (float64 vector).
_D_N: Final = 0  # values seen since the last (re)start
_D_MEAN: Final = 1  # running error rate p
_D_PMIN: Final = 2
_D_SMIN: Final = 3
_D_PSMIN: Final = 4  # p_min + s_min (inf until the warm-up is over)
_D_WARNING: Final = 5  # 1.0 while in the warning zone after the last value
_D_DRIFT: Final = 6  # 1.0 when the last value was a drift: restart on the next one
_D_SIZE: Final = 7

# ADWIN float state.
_A_TOTAL: Final = 0
_A_VARIANCE: Final = 1  # sum of squared deviations of the window (not divided by width)
_A_WIDTH: Final = 2
_A_SIZE: Final = 3
# ADWIN integer state.
_A_TICK: Final = 0
_A_LEVELS: Final = 1  # bucket levels in use (always >= 1)
_A_DRIFT: Final = 2  # 1 when the last value was a drift: restart on the next one
_A_ISIZE: Final = 3

#: Bucket levels kept for ADWIN: level i summarises 2**i values, so 62 levels hold any stream
#: that fits in memory many times over (2**62 values).
ADWIN_MAX_LEVELS: Final = 62


# --------------------------------------------------------------------------------------------
# DDM kernel


@jit
def _ddm_restart(state: npt.NDArray[np.float64]) -> None:
    state[_D_N] = 0.0
    state[_D_MEAN] = 0.0
    state[_D_PMIN] = math.nan
    state[_D_SMIN] = math.nan
    state[_D_PSMIN] = math.inf
    state[_D_WARNING] = 0.0
    state[_D_DRIFT] = 0.0


@jit
def _ddm_update(
    state: npt.NDArray[np.float64],
    values: npt.NDArray[np.float64],
    warm_start: float,
    warning_threshold: float,
    drift_threshold: float,
    status: npt.NDArray[np.int8],
    drifts: npt.NDArray[np.int64],
) -> int:
    """Feed ``values`` (0/1) to the DDM ``state``; write each value's status code to ``status``
    and the indices of drifts to the start of ``drifts``.

    Returns the number of drifts, or ``-1 - i`` where ``values[i]`` is the first value that is
    not 0 or 1 (nothing is updated then).
    """
    n_values = values.shape[0]
    for i in range(n_values):
        x = values[i]
        if x != 0.0 and x != 1.0:  # noqa: PLR1714 (a set literal is slow in numba)
            return -1 - i
    n_drifts = 0
    for i in range(n_values):
        if state[_D_DRIFT] != 0.0:
            _ddm_restart(state)
        x = values[i]
        n = state[_D_N] + 1.0
        state[_D_N] = n
        # The running mean, in the order river's stats.Mean computes it.
        p = state[_D_MEAN] + (1.0 / n) * (x - state[_D_MEAN])
        state[_D_MEAN] = p
        var = p * (1.0 - p) / n
        s = math.sqrt(var) if var > 0.0 else 0.0
        code = STABLE
        if n > warm_start:
            ps = p + s
            if ps <= state[_D_PSMIN]:
                state[_D_PMIN] = p
                state[_D_SMIN] = s
                state[_D_PSMIN] = p + s
            p_min = state[_D_PMIN]
            s_min = state[_D_SMIN]
            state[_D_WARNING] = 1.0 if ps > p_min + warning_threshold * s_min else 0.0
            if ps > p_min + drift_threshold * s_min:
                state[_D_DRIFT] = 1.0
                state[_D_WARNING] = 0.0
                code = DRIFT
                drifts[n_drifts] = i
                n_drifts += 1
            elif state[_D_WARNING] != 0.0:
                code = WARNING
        status[i] = code
    return n_drifts


# --------------------------------------------------------------------------------------------
# ADWIN kernels


@jit
def _adwin_restart(
    fstate: npt.NDArray[np.float64],
    istate: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    totals: npt.NDArray[np.float64],
    variances: npt.NDArray[np.float64],
) -> None:
    fstate[:] = 0.0
    istate[_A_TICK] = 0
    istate[_A_LEVELS] = 1
    istate[_A_DRIFT] = 0
    counts[:] = 0
    totals[:, :] = 0.0
    variances[:, :] = 0.0


# The hot path (one value in, amortised O(1) bucket merges) is written out in _adwin_update
# itself: a call to another kernel with array arguments costs an atomic incref and decref per
# array, which is more than the work of an insert. Only the scan (every `clock` values) and the
# rare removal of the oldest bucket are separate functions.


@jit
def _adwin_delete_oldest(
    fstate: npt.NDArray[np.float64],
    istate: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    totals: npt.NDArray[np.float64],
    variances: npt.NDArray[np.float64],
) -> None:
    """Drop the oldest summary of the window (the first of the highest level)."""
    last = istate[_A_LEVELS] - 1
    size = float(1 << last)
    u = totals[last, 0]
    v = variances[last, 0]
    mu = u / size
    width = fstate[_A_WIDTH] - size
    fstate[_A_WIDTH] = width
    total = fstate[_A_TOTAL] - u
    fstate[_A_TOTAL] = total
    mu_window = total / width
    fstate[_A_VARIANCE] -= v + size * width * (mu - mu_window) * (mu - mu_window) / (size + width)
    count = counts[last]
    for k in range(count - 1):
        totals[last, k] = totals[last, k + 1]
        variances[last, k] = variances[last, k + 1]
    totals[last, count - 1] = 0.0
    variances[last, count - 1] = 0.0
    counts[last] = count - 1
    if count == 1 and last > 0:
        istate[_A_LEVELS] = last


@jit
def _adwin_scan(
    fstate: npt.NDArray[np.float64],
    istate: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    totals: npt.NDArray[np.float64],
    variances: npt.NDArray[np.float64],
    delta: float,
    min_window_length: float,
) -> bool:
    """Test every split of the window, oldest boundary first; on a significant one drop the
    oldest bucket and start again. Returns whether any split was significant."""
    change = False
    reduce_width = True
    while reduce_width:
        reduce_width = False
        n0 = 0.0
        n1 = fstate[_A_WIDTH]
        u0 = 0.0
        u1 = fstate[_A_TOTAL]
        # ln(2 ln(width) / delta) and the variance per value are the same for every split of
        # one scan: computed once, with the same operations as per split.
        delta_prime = math.log(2.0 * math.log(n1) / delta)
        variance_per_value = fstate[_A_VARIANCE] / n1
        done = False
        level = istate[_A_LEVELS] - 1
        while level >= 0 and not done:
            size = float(1 << level)
            count = counts[level]
            for k in range(count):
                n0 += size
                n1 -= size
                t = totals[level, k]
                u0 += t
                u1 -= t
                if level == 0 and k == count - 1:
                    done = True  # the newest value is never a window of its own
                    break
                if n1 < min_window_length or n0 < min_window_length:
                    continue
                delta_mean = (u0 / n0) - (u1 / n1)  # n0, n1 >= min_window_length >= 1
                m_recip = 1.0 / (n0 - min_window_length + 1.0) + 1.0 / (
                    n1 - min_window_length + 1.0
                )
                epsilon = (
                    math.sqrt(2.0 * m_recip * variance_per_value * delta_prime)
                    + 2.0 / 3.0 * delta_prime * m_recip
                )
                if abs(delta_mean) > epsilon:
                    reduce_width = True
                    change = True
                    if fstate[_A_WIDTH] > 0.0:
                        _adwin_delete_oldest(fstate, istate, counts, totals, variances)
                        done = True  # rescan the shrunk window from its oldest bucket
                        break
            level -= 1
    return change


@jit
def _adwin_update(
    fstate: npt.NDArray[np.float64],
    istate: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    totals: npt.NDArray[np.float64],
    variances: npt.NDArray[np.float64],
    values: npt.NDArray[np.float64],
    delta: float,
    clock: int,
    max_buckets: int,
    min_window_length: float,
    grace_period: float,
    drifts: npt.NDArray[np.int64],
) -> int:
    """Feed ``values`` to the ADWIN state; write the indices of drifts to the start of
    ``drifts``.

    Returns the number of drifts, or ``-1 - i`` where ``values[i]`` is the first value that is
    not finite (nothing is updated then).
    """
    n_values = values.shape[0]
    for i in range(n_values):
        if not math.isfinite(values[i]):
            return -1 - i
    max_levels = counts.shape[0]
    n_drifts = 0
    for i in range(n_values):
        if istate[_A_DRIFT] != 0:
            # Start afresh after a detection (river replaces its window object).
            fstate[:] = 0.0
            istate[_A_TICK] = 0
            istate[_A_LEVELS] = 1
            istate[_A_DRIFT] = 0
            counts[:] = 0
            totals[:, :] = 0.0
            variances[:, :] = 0.0
        value = values[i]
        # Insert: a new summary of one value at level 0, and the window's running sums.
        k = counts[0]
        totals[0, k] = value
        variances[0, k] = 0.0
        counts[0] = k + 1
        width = fstate[_A_WIDTH] + 1.0
        fstate[_A_WIDTH] = width
        increment = 0.0
        if width > 1.0:
            dv = value - fstate[_A_TOTAL] / (width - 1.0)
            increment = (width - 1.0) * dv * dv / width
        fstate[_A_VARIANCE] += increment
        fstate[_A_TOTAL] += value
        # Merge the two oldest summaries of every level that overflowed into the next level.
        level = 0
        while counts[level] == max_buckets + 1:
            size = float(1 << level)
            t0 = totals[level, 0]
            t1 = totals[level, 1]
            mu0 = t0 / size
            mu1 = t1 / size
            merged_variance = (
                variances[level, 0] + variances[level, 1] + size * 0.5 * (mu0 - mu1) * (mu0 - mu1)
            )
            nxt = level + 1
            if nxt >= max_levels:  # pragma: no cover - 2**62 values
                raise OverflowError("ADWIN window is full")
            if nxt >= istate[_A_LEVELS]:
                istate[_A_LEVELS] = nxt + 1
                counts[nxt] = 0
            c = counts[nxt]
            totals[nxt, c] = t0 + t1
            variances[nxt, c] = merged_variance
            counts[nxt] = c + 1
            kept = max_buckets - 1  # the entries left at this level after the merge
            for j in range(kept):
                totals[level, j] = totals[level, j + 2]
                variances[level, j] = variances[level, j + 2]
            for j in range(kept, max_buckets + 1):
                totals[level, j] = 0.0
                variances[level, j] = 0.0
            counts[level] = kept
            if c + 1 <= max_buckets:
                break
            level = nxt
        # Detect, every `clock` values once the window is longer than the grace period.
        istate[_A_TICK] += 1
        if (
            istate[_A_TICK] % clock == 0
            and width > grace_period
            and _adwin_scan(fstate, istate, counts, totals, variances, delta, min_window_length)
        ):
            istate[_A_DRIFT] = 1
            drifts[n_drifts] = i
            n_drifts += 1
    return n_drifts


#: Compiled (``_native``), else numba's.
(_DDM_RESTART,) = _native.kernels(_ddm_restart, "ddm_restart")
(_DDM_UPDATE,) = _native.kernels(_ddm_update, "ddm_update")
(_ADWIN_RESTART,) = _native.kernels(_adwin_restart, "adwin_restart")
(_ADWIN_UPDATE,) = _native.kernels(_adwin_update, "adwin_update")


# --------------------------------------------------------------------------------------------
# Wrappers


def _values(name: str, values: object) -> npt.NDArray[np.float64]:
    """``values`` as a 1-D C-contiguous aligned float64 array (a scalar is one value)."""
    if (
        isinstance(values, np.ndarray)
        and values.ndim == 1
        and values.dtype == np.float64
        and values.flags.c_contiguous
        and values.flags.aligned
    ):
        return values
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers, got {type(values).__name__}: {exc}") from None
    if array.ndim > 1:
        raise ValueError(f"{name} must be a 1-D array or a scalar, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers or booleans, got dtype {array.dtype}")
    out = np.ascontiguousarray(array.reshape(-1), dtype=np.float64)
    return out if out.flags.aligned else out.copy()


class DDM:
    """Drift Detection Method on a 0/1 error stream (river's ``drift.binary.DDM`` rules).

    ``warm_start`` values are seen before anything is judged; ``warning_threshold`` and
    ``drift_threshold`` are the multiples of ``s_min`` above ``p_min`` that mean a warning
    and a drift (the defaults are river's: 30, 2.0, 3.0).
    """

    __slots__ = (
        "_state",
        "drift_threshold",
        "n_detections",
        "n_seen",
        "warm_start",
        "warning_threshold",
    )

    #: Status codes of :meth:`update_status` (also module constants).
    STABLE: Final = STABLE
    WARNING: Final = WARNING
    DRIFT: Final = DRIFT

    def __init__(
        self, warm_start: int = 30, warning_threshold: float = 2.0, drift_threshold: float = 3.0
    ) -> None:
        if int(warm_start) != warm_start or warm_start < 0:
            raise ValueError(f"warm_start must be an integer >= 0, got {warm_start!r}")
        if not (math.isfinite(warning_threshold) and warning_threshold >= 0):
            raise ValueError(f"warning_threshold must be >= 0, got {warning_threshold!r}")
        if not (math.isfinite(drift_threshold) and drift_threshold >= 0):
            raise ValueError(f"drift_threshold must be >= 0, got {drift_threshold!r}")
        self.warm_start = int(warm_start)
        self.warning_threshold = float(warning_threshold)
        self.drift_threshold = float(drift_threshold)
        self._state = np.empty(_D_SIZE, dtype=np.float64)
        #: Values fed since construction or :meth:`reset` (drifts do not restart it).
        self.n_seen = 0
        #: Drifts detected since construction or :meth:`reset`.
        self.n_detections = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything, as a newly constructed detector."""
        _DDM_RESTART(self._state)
        self.n_seen = 0
        self.n_detections = 0

    def _feed(self, values: object) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int64]]:
        x = _values("values", values)
        status = np.empty(x.shape[0], dtype=np.int8)
        drifts = np.empty(x.shape[0], dtype=np.int64)
        found = _DDM_UPDATE(
            self._state,
            x,
            float(self.warm_start),
            self.warning_threshold,
            self.drift_threshold,
            status,
            drifts,
        )
        if found < 0:
            bad = -1 - found
            raise ValueError(
                f"values[{bad}] = {float(x[bad])!r}: DDM takes 0/1 (error) values only"
            )
        self.n_seen += x.shape[0]
        self.n_detections += found
        return status, drifts[:found]

    def update_status(self, values: object) -> npt.NDArray[np.int8]:
        """Feed a 1-D array of 0/1 values (bool, int or float; 1 = error) and return one status
        code per value: :data:`STABLE`, :data:`WARNING` or :data:`DRIFT`.

        Raises ``ValueError`` (and changes nothing) if a value is not 0 or 1.
        """
        return self._feed(values)[0]

    def update(self, values: object) -> npt.NDArray[np.int64]:
        """Feed a 1-D array of 0/1 values; return the indices (into ``values``) of drifts.

        Raises ``ValueError`` (and changes nothing) if a value is not 0 or 1.
        """
        return self._feed(values)[1]

    @property
    def drift_detected(self) -> bool:
        """Whether the last value was a drift (the next value starts a fresh detector)."""
        return bool(self._state[_D_DRIFT] != 0.0)

    @property
    def warning_detected(self) -> bool:
        """Whether the last value left the detector in the warning zone."""
        return bool(self._state[_D_WARNING] != 0.0)

    @property
    def error_rate(self) -> float:
        """The running error rate ``p`` since the last (re)start (0.0 before any value)."""
        return float(self._state[_D_MEAN])

    @property
    def n(self) -> int:
        """Values seen since the last (re)start."""
        return int(self._state[_D_N])

    def __repr__(self) -> str:
        return (
            f"DDM(warm_start={self.warm_start}, warning_threshold={self.warning_threshold}, "
            f"drift_threshold={self.drift_threshold}; n={self.n}, "
            f"error_rate={self.error_rate:.4g}, n_detections={self.n_detections})"
        )


class ADWIN:
    """ADaptive WINdowing on a real-valued stream (river's ``drift.ADWIN`` rules).

    ``delta`` is the significance of the cut test, ``clock`` how often (every how many values)
    the window is tested, ``max_buckets`` the summaries kept per level before two are merged,
    ``min_window_length`` the smallest sub-window tested and ``grace_period`` the window length
    below which nothing is tested (the defaults are river's: 0.002, 32, 5, 5, 10).
    """

    __slots__ = (
        "_counts",
        "_fstate",
        "_istate",
        "_totals",
        "_variances",
        "clock",
        "delta",
        "grace_period",
        "max_buckets",
        "min_window_length",
        "n_detections",
        "n_seen",
    )

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        for label, value, low in (
            ("clock", clock, 1),
            ("max_buckets", max_buckets, 1),
            ("min_window_length", min_window_length, 1),
            ("grace_period", grace_period, 0),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        self.delta = float(delta)
        self.clock = int(clock)
        self.max_buckets = int(max_buckets)
        self.min_window_length = int(min_window_length)
        self.grace_period = int(grace_period)
        self._fstate = np.zeros(_A_SIZE, dtype=np.float64)
        self._istate = np.zeros(_A_ISIZE, dtype=np.int64)
        self._counts = np.zeros(ADWIN_MAX_LEVELS, dtype=np.int64)
        self._totals = np.zeros((ADWIN_MAX_LEVELS, self.max_buckets + 1), dtype=np.float64)
        self._variances = np.zeros_like(self._totals)
        #: Values fed since construction or :meth:`reset` (drifts do not restart it).
        self.n_seen = 0
        #: Drifts detected since construction or :meth:`reset`.
        self.n_detections = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything, as a newly constructed detector."""
        _ADWIN_RESTART(self._fstate, self._istate, self._counts, self._totals, self._variances)
        self.n_seen = 0
        self.n_detections = 0

    def update(self, values: object) -> npt.NDArray[np.int64]:
        """Feed a 1-D array of finite numbers; return the indices (into ``values``) of drifts.

        Raises ``ValueError`` (and changes nothing) if a value is NaN or infinite.
        """
        x = _values("values", values)
        drifts = np.empty(x.shape[0], dtype=np.int64)
        found = _ADWIN_UPDATE(
            self._fstate,
            self._istate,
            self._counts,
            self._totals,
            self._variances,
            x,
            self.delta,
            self.clock,
            self.max_buckets,
            float(self.min_window_length),
            float(self.grace_period),
            drifts,
        )
        if found < 0:
            bad = -1 - found
            raise ValueError(f"values[{bad}] = {float(x[bad])!r}: ADWIN takes finite numbers only")
        self.n_seen += x.shape[0]
        self.n_detections += found
        drifts = drifts[:found]
        return drifts

    @property
    def drift_detected(self) -> bool:
        """Whether the last value was a drift (the next value starts a fresh window)."""
        return bool(self._istate[_A_DRIFT] != 0)

    @property
    def width(self) -> int:
        """Values in the current window."""
        return int(self._fstate[_A_WIDTH])

    @property
    def total(self) -> float:
        """Sum of the values in the window."""
        return float(self._fstate[_A_TOTAL])

    @property
    def m2(self) -> float:
        """Sum of squared deviations from the mean of the window (the number river's
        ``ADWIN.variance`` returns)."""
        return float(self._fstate[_A_VARIANCE])

    @property
    def variance(self) -> float:
        """Variance of the window per value (``m2 / width``); 0.0 for an empty window."""
        width = self._fstate[_A_WIDTH]
        return float(self._fstate[_A_VARIANCE] / width) if width > 0 else 0.0

    @property
    def estimation(self) -> float:
        """Mean of the window (0.0 when empty)."""
        width = self._fstate[_A_WIDTH]
        return float(self._fstate[_A_TOTAL] / width) if width > 0 else 0.0

    def __repr__(self) -> str:
        return (
            f"ADWIN(delta={self.delta}, clock={self.clock}, max_buckets={self.max_buckets}, "
            f"min_window_length={self.min_window_length}, grace_period={self.grace_period}; "
            f"width={self.width}, estimation={self.estimation:.4g}, "
            f"n_detections={self.n_detections})"
        )
