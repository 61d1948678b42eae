"""DDM and ADWIN against river's detectors on the same streams: same detection indices.

river (a test-only dependency) is the oracle: each stream is fed to river one value at a time
and to our detector in chunks; the indices where a drift (and, for DDM, a warning) is flagged
must be identical, and so must ADWIN's window (width, total, sum of squares) after every value.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
from river import drift as river_drift  # the oracle; a test-only dependency

from edgewise.kernels import ADWIN, DDM, _config
from edgewise.kernels import detectors as det
from tests.kernels.kernel_paths import use_numba_kernels

SEEDS = range(8)


# -- streams ------------------------------------------------------------------------------------


def bernoulli_abrupt(rng: np.random.Generator) -> np.ndarray:
    """Error rate 0.1, then 0.3, then back to 0.05: abrupt changes."""
    return np.concatenate(
        [rng.random(1500) < 0.1, rng.random(1500) < 0.3, rng.random(1000) < 0.05]
    ).astype(np.float64)


def bernoulli_gradual(rng: np.random.Generator) -> np.ndarray:
    """Error rate ramping linearly from 0.05 to 0.35 over 2000 values, after 1000 stable ones."""
    rate = np.concatenate([np.full(1000, 0.05), np.linspace(0.05, 0.35, 2000), np.full(500, 0.35)])
    return (rng.random(rate.shape[0]) < rate).astype(np.float64)


def bernoulli_stable(rng: np.random.Generator) -> np.ndarray:
    return (rng.random(3000) < 0.2).astype(np.float64)


def real_abrupt(rng: np.random.Generator) -> np.ndarray:
    """Mean 0 -> 0.8 -> 0.3 with the spread doubling in the last part."""
    return np.concatenate(
        [rng.normal(0.0, 1.0, 2000), rng.normal(0.8, 1.0, 2000), rng.normal(0.3, 2.0, 2000)]
    )


def real_gradual(rng: np.random.Generator) -> np.ndarray:
    """A loss-like stream whose mean drifts slowly upwards (a gradual concept drift)."""
    mean = np.concatenate([np.full(1500, 1.0), np.linspace(1.0, 2.0, 3000)])
    return rng.gamma(2.0, mean / 2.0)


def real_stable(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(5.0, 1.0, 4000)


DDM_STREAMS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "abrupt": bernoulli_abrupt,
    "gradual": bernoulli_gradual,
    "stable": bernoulli_stable,
}
ADWIN_STREAMS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "abrupt": real_abrupt,
    "gradual": real_gradual,
    "stable": real_stable,
    "bernoulli": bernoulli_abrupt,
}


# -- river, one value at a time -------------------------------------------------------------------


def river_ddm(stream: np.ndarray, **params: float) -> tuple[list[int], list[int]]:
    detector = river_drift.binary.DDM(**params)
    drifts, warnings = [], []
    for i, value in enumerate(stream):
        detector.update(bool(value))
        if detector.drift_detected:
            drifts.append(i)
        if detector.warning_detected:
            warnings.append(i)
    return drifts, warnings


def river_adwin(
    stream: np.ndarray, **params: float
) -> tuple[list[int], list[tuple[float, float, float]]]:
    detector = river_drift.ADWIN(**params)
    drifts, windows = [], []
    for i, value in enumerate(stream):
        detector.update(float(value))
        if detector.drift_detected:
            drifts.append(i)
        windows.append((float(detector.width), detector.total, detector.variance))
    return drifts, windows


def ours_in_chunks(
    update: Callable[[np.ndarray], np.ndarray], stream: np.ndarray, chunk: int
) -> list[int]:
    found: list[int] = []
    for start in range(0, stream.shape[0], chunk):
        found.extend((update(stream[start : start + chunk]) + start).tolist())
    return found


# -- DDM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DDM_STREAMS))
@pytest.mark.parametrize("seed", SEEDS)
def test_ddm_matches_river(kind: str, seed: int) -> None:
    stream = DDM_STREAMS[kind](np.random.default_rng(seed))
    want_drifts, want_warnings = river_ddm(stream)
    ours = DDM()
    status = np.concatenate(
        [ours.update_status(stream[s : s + 97]) for s in range(0, stream.shape[0], 97)]
    )
    assert np.flatnonzero(status == DDM.DRIFT).tolist() == want_drifts
    assert np.flatnonzero(status == DDM.WARNING).tolist() == want_warnings
    assert ours.n_detections == len(want_drifts)
    assert ours.n_seen == stream.shape[0]
    if kind == "abrupt":
        assert want_drifts, "the abrupt stream must make river detect a drift"


@pytest.mark.parametrize(
    "params",
    [
        {"warm_start": 5, "warning_threshold": 1.0, "drift_threshold": 1.5},
        {"warm_start": 100, "warning_threshold": 2.5, "drift_threshold": 4.0},
        {"warm_start": 0},
    ],
)
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_ddm_parameters_match_river(params: dict[str, float], seed: int) -> None:
    stream = bernoulli_gradual(np.random.default_rng(100 + seed))
    want_drifts, want_warnings = river_ddm(stream, **params)
    ours = DDM(**params)  # type: ignore[arg-type]
    status = ours.update_status(stream)
    assert np.flatnonzero(status == DDM.DRIFT).tolist() == want_drifts
    assert np.flatnonzero(status == DDM.WARNING).tolist() == want_warnings


def test_ddm_river_docstring_example() -> None:
    # The example in river's DDM docstring: warning at 1084, drift at 1334.
    rng = random.Random(42)
    stream = rng.choices([0, 1], k=1000) + rng.choices([0, 1], k=1000, weights=[0.3, 0.7])
    ours = DDM()
    status = ours.update_status(np.array(stream, dtype=bool))
    assert np.flatnonzero(status == DDM.DRIFT).tolist()[0] == 1334
    assert np.flatnonzero(status == DDM.WARNING).tolist()[0] == 1084


def test_ddm_zero_error_start_is_river_quirk() -> None:
    # p_min = s_min = 0 after an error-free warm-up, so the first error is a drift (as river).
    stream = np.zeros(50)
    stream[40] = 1.0
    want, _ = river_ddm(stream)
    assert want == [40]
    assert DDM().update(stream).tolist() == [40]


def test_ddm_state_and_restart_after_drift() -> None:
    stream = bernoulli_abrupt(np.random.default_rng(3))
    ours = DDM()
    drifts = ours.update(stream[:2000])
    assert drifts.size >= 1
    # Stop right at a drift: the state is the one at the detection, as in river.
    first = int(drifts[0])
    again = DDM()
    again.update(stream[: first + 1])
    assert again.drift_detected and not again.warning_detected
    assert again.n == first + 1
    assert again.error_rate == pytest.approx(stream[: first + 1].mean(), rel=1e-12)
    again.update(stream[first + 1 : first + 2])
    assert again.n == 1 and not again.drift_detected
    again.reset()
    assert (again.n, again.n_seen, again.n_detections, again.error_rate) == (0, 0, 0, 0.0)
    assert again.update(stream).tolist() == DDM().update(stream).tolist()


def test_ddm_inputs() -> None:
    ours = DDM()
    assert ours.update([]).tolist() == []
    assert ours.update(np.array([True, False])).tolist() == []
    assert ours.update(1).tolist() == []  # a scalar is one value
    assert ours.n_seen == 3
    assert ours.update(np.array([0, 1, 1], dtype=np.int8)).tolist() == []
    before = ours.n
    with pytest.raises(ValueError, match=r"values\[1\] = 0\.5"):
        ours.update([0.0, 0.5, 1.0])
    assert ours.n == before  # nothing was updated
    with pytest.raises(ValueError, match="1-D"):
        ours.update(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="numbers"):
        ours.update(np.array(["a"]))
    with pytest.raises(ValueError, match="warm_start"):
        DDM(warm_start=-1)
    with pytest.raises(ValueError, match="drift_threshold"):
        DDM(drift_threshold=float("nan"))
    frozen = np.zeros(40)
    frozen.setflags(write=False)
    assert DDM().update(frozen).tolist() == []
    assert DDM().update(np.zeros(80)[::2]).tolist() == []  # strided view


# -- ADWIN --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ADWIN_STREAMS))
@pytest.mark.parametrize("seed", SEEDS)
def test_adwin_matches_river(kind: str, seed: int) -> None:
    stream = ADWIN_STREAMS[kind](np.random.default_rng(seed))
    want, _ = river_adwin(stream)
    ours = ADWIN()
    assert ours_in_chunks(ours.update, stream, 101) == want
    assert ours.n_detections == len(want)
    if kind in ("abrupt", "bernoulli"):
        assert want, "the abrupt stream must make river detect a drift"
    if kind == "stable":
        assert want == []


@pytest.mark.parametrize(
    "params",
    [
        {"clock": 1},
        {"delta": 0.05, "clock": 8},
        {"delta": 1e-5},
        {"max_buckets": 2, "min_window_length": 2, "grace_period": 0, "clock": 4},
        {"max_buckets": 1, "clock": 3},
        {"max_buckets": 9, "min_window_length": 20, "grace_period": 200},
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_adwin_parameters_match_river(params: dict[str, float], seed: int) -> None:
    stream = real_abrupt(np.random.default_rng(200 + seed))[:3000]
    want, _ = river_adwin(stream, **params)
    assert ADWIN(**params).update(stream).tolist() == want  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_adwin_window_matches_river_after_every_value(seed: int) -> None:
    # Bit for bit: the same operations in the same order give the same rounding.
    stream = real_abrupt(np.random.default_rng(300 + seed))[:2500]
    want_drifts, windows = river_adwin(stream, clock=4)
    ours = ADWIN(clock=4)
    drifts = []
    for i, value in enumerate(stream):
        if ours.update(stream[i : i + 1]).size:
            drifts.append(i)
        width, total, m2 = windows[i]
        assert (ours.width, ours.total, ours.m2) == (width, total, m2), (i, value)
        assert ours.estimation == (total / width if width else 0.0)
    assert drifts == want_drifts
    assert want_drifts


def test_adwin_river_docstring_example() -> None:
    # The example in river's ADWIN docstring: a drift at index 1023.
    rng = random.Random(12345)
    stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    assert ADWIN().update(np.array(stream, dtype=np.int64)).tolist() == [1023]


def test_adwin_bucket_structure() -> None:
    # 100 values with max_buckets=5: levels hold 2**i values each and sum to the width.
    ours = ADWIN(clock=1_000_000)
    ours.update(np.arange(100, dtype=np.float64))
    levels = int(ours._istate[det._A_LEVELS])
    counts = ours._counts[:levels]
    assert all(1 <= c <= ours.max_buckets for c in counts[1:])
    assert int(sum(int(c) << i for i, c in enumerate(counts))) == ours.width == 100
    assert ours.total == float(np.arange(100).sum())
    assert ours.variance == pytest.approx(np.arange(100).var(), rel=1e-12)
    assert ours.m2 == pytest.approx(np.arange(100).var() * 100, rel=1e-12)


def test_adwin_restart_after_drift_and_reset() -> None:
    stream = real_abrupt(np.random.default_rng(1))
    ours = ADWIN()
    first = int(ours.update(stream)[0])
    again = ADWIN()
    again.update(stream[: first + 1])
    assert again.drift_detected
    assert 0 < again.width < first + 1  # the oldest buckets were dropped at the detection
    again.update(stream[first + 1 : first + 2])
    assert again.width == 1 and not again.drift_detected
    again.reset()
    assert (again.width, again.total, again.n_seen, again.n_detections) == (0, 0.0, 0, 0)
    assert again.variance == 0.0 and again.estimation == 0.0
    assert again.update(stream).tolist() == ADWIN().update(stream).tolist()


def test_adwin_inputs() -> None:
    ours = ADWIN()
    assert ours.update([]).tolist() == []
    assert ours.update(3.5).tolist() == []
    assert ours.update(np.array([1, 2, 3], dtype=np.int32)).tolist() == []
    assert ours.width == 4
    with pytest.raises(ValueError, match=r"values\[2\] = nan"):
        ours.update([1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        ours.update([float("inf")])
    assert ours.width == 4  # nothing was updated
    for bad in ({"delta": 0.0}, {"delta": 1.0}, {"clock": 0}, {"max_buckets": 0},
                {"min_window_length": 0}, {"grace_period": -1}, {"clock": 1.5}):  # fmt: skip
        with pytest.raises(ValueError):
            ADWIN(**bad)  # type: ignore[arg-type]


def test_repr() -> None:
    assert "n_detections=0" in repr(DDM())
    assert "width=0" in repr(ADWIN())


@pytest.mark.skipif(_config.JIT_DISABLED, reason="inspects numba dispatchers; no JIT here")
def test_no_compile_after_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgewise.kernels as kernels

    use_numba_kernels(monkeypatch)  # the dispatchers, also where the compiled kernels serve
    kernels.warmup()
    dispatchers = (det._ddm_update, det._adwin_update)
    before = [len(d.signatures) for d in dispatchers]
    assert all(before)
    frozen: np.ndarray = np.frombuffer(np.zeros(40).tobytes())
    assert not frozen.flags.writeable
    for values in (frozen, np.zeros(10), np.zeros(20, dtype=bool), np.zeros(30)[::3], [0, 1]):
        DDM().update(values)
        ADWIN().update(values)
    assert [len(d.signatures) for d in dispatchers] == before
