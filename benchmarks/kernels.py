"""Benchmarks of edgewise.kernels: prints ONE JSON line per case.

Run from the repository root::

    .venv/bin/python benchmarks/kernels.py            # full run
    .venv/bin/python benchmarks/kernels.py --quick    # a few seconds
    .venv/bin/python benchmarks/kernels.py --case drift_from_counts

Every case is a module-level function ``bench_<name>(cfg) -> dict`` registered in ``CASES``;
timings are medians over ``cfg.rounds`` rounds.  Where a baseline exists (plain numpy or
SciPy on the same data) it is measured in the same run and ``ratio`` is
``baseline_median / median`` (> 1: the kernel is faster).  Kernels run single-threaded, so
rows/s figures are per core.  To add a case (e.g. a whole-server request), write another
``bench_*`` function returning :func:`result` and append it to ``CASES``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from scipy import stats
from scipy.spatial import distance

import edgewise.kernels as kernels

N_FEATURES = 32


@dataclass(frozen=True)
class Config:
    rounds: int
    calls_per_round: int  # for sub-microsecond per-call cases
    batch_rows: int  # throughput batch
    ks_rounds: int  # the KS cases take tens to hundreds of ms per call


FULL = Config(rounds=25, calls_per_round=20_000, batch_rows=200_000, ks_rounds=9)
QUICK = Config(rounds=5, calls_per_round=2_000, batch_rows=50_000, ks_rounds=3)


def per_call_seconds(fn: Callable[[], object], calls: int, rounds: int) -> list[float]:
    """Seconds per call of ``fn``, one value per round (``calls`` calls per round)."""
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls)
    return out


def result(
    case: str,
    unit: str,
    samples: list[float],
    *,
    target: str | None = None,
    meets_target: bool | None = None,
    baseline: str | None = None,
    baseline_samples: list[float] | None = None,
    higher_is_better: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    med = statistics.median(samples)
    row: dict[str, Any] = {
        "case": case,
        "unit": unit,
        "median": round(med, 4),
        "min": round(min(samples), 4),
        "max": round(max(samples), 4),
        "rounds": len(samples),
    }
    if target is not None:
        row["target"] = target
        row["meets_target"] = meets_target
    if baseline is not None and baseline_samples is not None:
        base_med = statistics.median(baseline_samples)
        row["baseline"] = baseline
        row["baseline_median"] = round(base_med, 4)
        ratio = med / base_med if higher_is_better else base_med / med
        row["ratio"] = round(ratio, 2)
        row["ratio_meaning"] = "baseline/kernel time (>1: kernel faster)"
    row.update(extra)
    return row


def _reference(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(20_000, N_FEATURES))


# --------------------------------------------------------------------------------------------
# Cases


_FIRST_WARMUP_S: list[float] = []


def ensure_warm() -> None:
    """Run warmup() once per process (main does this before any case is timed)."""
    if not _FIRST_WARMUP_S:
        _FIRST_WARMUP_S.append(kernels.warmup())


def bench_warmup(cfg: Config) -> dict[str, Any]:
    """First call of warmup() in this process: compile, or load numba's on-disk cache."""
    ensure_warm()
    again = kernels.warmup()
    return result(
        "warmup",
        "s",
        _FIRST_WARMUP_S[:1],
        second_call_s=round(again, 4),
        note="cold compile if numba's cache (kernels/__pycache__) is empty, else cache load",
    )


def _numpy_row_update(
    state: np.ndarray, counts: np.ndarray, row: np.ndarray, edges: kernels.BinEdges
) -> None:
    """Baseline: the same per-request update written with plain numpy calls."""
    x = row[0].astype(np.float64)
    finite = np.isfinite(x)
    n = state[0] + finite
    delta = np.where(finite, x - state[1], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        state[1] += np.where(finite, delta / n, 0.0)
    state[2] += np.where(finite, delta * (x - state[1]), 0.0)
    state[0] = n
    state[3] = np.fmin(state[3], np.where(finite, x, np.inf))
    state[4] = np.fmax(state[4], np.where(finite, x, -np.inf))
    state[5] += np.isnan(x)
    state[6] += np.isinf(x)
    for f in range(edges.n_features):
        e = edges.edges_of(f)
        v = x[f]
        if v != v:
            col = edges.nan_column
        else:
            pos = int(np.searchsorted(e, v, side="right"))
            col = pos if pos < e.size else (e.size - 1 if v == e[-1] else edges.overflow_column)
        counts[f, col] += 1


def bench_per_request_update(cfg: Config) -> dict[str, Any]:
    """FeatureProfile.update for one request row of 32 float64 features (moments+histogram)."""
    rng = np.random.default_rng(1)
    edges = kernels.quantile_edges(_reference(rng))
    profile = kernels.FeatureProfile(edges)
    row = rng.normal(size=(1, N_FEATURES))
    samples = per_call_seconds(lambda: profile.update(row), cfg.calls_per_round, cfg.rounds)
    state = kernels.MomentState(N_FEATURES).to_array()
    counts = np.zeros((N_FEATURES, edges.width), dtype=np.int64)
    base = per_call_seconds(
        lambda: _numpy_row_update(state, counts, row, edges),
        max(cfg.calls_per_round // 50, 20),
        cfg.rounds,
    )
    us = [s * 1e6 for s in samples]
    return result(
        "per_request_update_1x32",
        "us",
        us,
        target="<= 2 us",
        meets_target=statistics.median(us) <= 2.0,
        baseline="plain numpy (vectorised Welford + per-feature searchsorted)",
        baseline_samples=[s * 1e6 for s in base],
        dtype="float64",
        api="FeatureProfile.update (one kernel call)",
    )


def bench_per_request_update_separate(cfg: Config) -> dict[str, Any]:
    """MomentState.update + HistogramState.update (two kernel calls), float32 row."""
    rng = np.random.default_rng(2)
    edges = kernels.quantile_edges(_reference(rng))
    moments = kernels.MomentState(N_FEATURES)
    hist = kernels.HistogramState(edges)
    row = rng.normal(size=(1, N_FEATURES)).astype(np.float32)

    def both() -> None:
        moments.update(row)
        hist.update(row)

    us = [s * 1e6 for s in per_call_seconds(both, cfg.calls_per_round, cfg.rounds)]
    return result(
        "per_request_update_1x32_separate_states",
        "us",
        us,
        target="<= 2 us",
        meets_target=statistics.median(us) <= 2.0,
        dtype="float32",
        api="MomentState.update + HistogramState.update",
    )


def bench_batch_throughput(cfg: Config) -> dict[str, Any]:
    """Rows/s of FeatureProfile.update on a large [rows, 32] float64 batch (one core)."""
    rng = np.random.default_rng(3)
    edges = kernels.quantile_edges(_reference(rng))
    batch = rng.normal(size=(cfg.batch_rows, N_FEATURES))
    batch[rng.random(batch.shape) < 0.01] = np.nan
    profile = kernels.FeatureProfile(edges)
    rates = []
    for _ in range(cfg.rounds):
        start = time.perf_counter()
        profile.update(batch)
        rates.append(cfg.batch_rows / (time.perf_counter() - start) / 1e6)
    moments = kernels.MomentState(N_FEATURES)
    moment_rates = []
    for _ in range(cfg.rounds):
        start = time.perf_counter()
        moments.update(batch)
        moment_rates.append(cfg.batch_rows / (time.perf_counter() - start) / 1e6)
    return result(
        "batch_update_throughput_32_features",
        "M rows/s",
        rates,
        target=">= 2 M rows/s per core",
        meets_target=statistics.median(rates) >= 2.0,
        rows_per_batch=cfg.batch_rows,
        moments_only_median=round(statistics.median(moment_rates), 2),
        dtype="float64",
        api="FeatureProfile.update",
    )


def _scipy_drift(ref: np.ndarray, cur: np.ndarray, edges: kernels.BinEdges) -> None:
    """Baseline: the same statistics per feature with SciPy/numpy."""
    eps = kernels.PSI_EPSILON
    for f in range(ref.shape[0]):
        r = ref[f]
        c = cur[f]
        p = np.maximum(r / r.sum(), eps)
        q = np.maximum(c / c.sum(), eps)
        np.sum((q - p) * np.log(q / p))
        distance.jensenshannon(r, c)
        keep = (r + c) > 0
        stats.chi2_contingency(np.array([r[keep], c[keep]]))
        np.max(np.abs(r / r.sum() - c / c.sum()))
        ro = r[:-1]
        co = c[:-1]
        stats.wasserstein_distance(edges.support[f], edges.support[f], ro, co)
        np.max(np.abs(np.cumsum(ro) / ro.sum() - np.cumsum(co) / co.sum()))


def bench_drift_from_counts(cfg: Config) -> dict[str, Any]:
    """drift_scores for 32 features (10 bins + under/overflow/nan): all statistics."""
    rng = np.random.default_rng(4)
    reference = _reference(rng)
    edges = kernels.quantile_edges(reference)
    ref = kernels.histogram_counts(reference, edges)
    cur = kernels.histogram_counts(rng.normal(0.1, 1.1, size=(2_000, N_FEATURES)), edges)
    calls = max(cfg.calls_per_round // 20, 50)
    samples = per_call_seconds(lambda: kernels.drift_scores(ref, cur, edges), calls, cfg.rounds)
    base = per_call_seconds(lambda: _scipy_drift(ref, cur, edges), 3, max(cfg.rounds // 3, 3))
    us = [s * 1e6 for s in samples]
    return result(
        "drift_from_counts_32_features",
        "us",
        us,
        target="< 50 us",
        meets_target=statistics.median(us) < 50.0,
        baseline="scipy/numpy per feature (psi, jensenshannon, chi2_contingency, linf, "
        "wasserstein_distance, binned ks)",
        baseline_samples=[s * 1e6 for s in base],
        statistics="psi, jensenshannon, wasserstein, ks, chi2 + p-value, linf",
        counts_dtype="int64",
    )


def _ks_case(cfg: Config, method: str) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=100_000)
    y = rng.normal(0.02, size=10_000)
    ours = kernels.ks_2samp(x, y, method=method)  # type: ignore[arg-type]
    theirs = stats.ks_2samp(x, y, method=method)
    samples = per_call_seconds(lambda: kernels.ks_2samp(x, y, method=method), 1, cfg.ks_rounds)  # type: ignore[arg-type]
    base = per_call_seconds(lambda: stats.ks_2samp(x, y, method=method), 1, cfg.ks_rounds)
    return result(
        f"ks_2samp_100k_vs_10k_{method}",
        "ms",
        [s * 1e3 for s in samples],
        baseline="scipy.stats.ks_2samp, same data",
        baseline_samples=[s * 1e3 for s in base],
        method=method,
        statistic=ours.statistic,
        pvalue=ours.pvalue,
        scipy_statistic=float(theirs.statistic),
        scipy_pvalue=float(theirs.pvalue),
    )


def bench_ks_2samp_auto(cfg: Config) -> dict[str, Any]:
    """Exact statistic from raw samples; 'auto' -> asymptotic p-value (max(n) > 10000)."""
    return _ks_case(cfg, "auto")


def bench_ks_2samp_exact(cfg: Config) -> dict[str, Any]:
    """Exact statistic and exact p-value (lattice-path recursion), method='exact'."""
    return _ks_case(cfg, "exact")


def bench_server_monitoring(cfg: Config) -> dict[str, Any]:
    """Whole-server p50 at concurrency 1 (tritonclient, batch 1, 32 features) with monitoring on
    and off, in alternating rounds; and the per-request kernel update as a share of that p50."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tempfile

    import serving  # benchmarks/serving.py: model building, servers, the tritonclient driver

    work = Path(tempfile.mkdtemp(prefix="edgewise-kernels-bench-"))
    serving.build_models(work / "repo")
    servers = {}
    for mode in ("on", "off"):
        port_file = work / f"{mode}.port"
        servers[mode] = serving.Server(
            [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
             "--repo", str(work / "repo"), "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "-1", "--monitoring", mode, "--port-file", str(port_file)],
            port_file,
        )  # fmt: skip
    seconds = 1.5 if cfg is QUICK else 4.0
    rounds = 1 if cfg is QUICK else 3
    p50: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for mode, server in servers.items():
                stats = serving.drive(server.url, "logreg32", 1, seconds, server.process.pid)
                p50[mode].append(stats["p50_us"])
                cpu[mode].append(stats["server_cpu_us_per_req"])
    finally:
        for server in servers.values():
            server.stop()
    profile = kernels.FeatureProfile(kernels.quantile_edges(_reference(np.random.default_rng(0))))
    row = np.random.default_rng(1).normal(size=(1, N_FEATURES)).astype(np.float32)
    update_us = statistics.median(per_call_seconds(lambda: profile.update(row), 20_000, 5)) * 1e6
    on, off = statistics.median(p50["on"]), statistics.median(p50["off"])
    return {
        "case": "server_p50_monitoring_on_off",
        "unit": "us",
        "p50_monitoring_on": round(on, 1),
        "p50_monitoring_off": round(off, 1),
        "ratio_on_over_off": round(on / off, 3),
        "server_cpu_us_per_req_on": round(statistics.median(cpu["on"]), 1),
        "server_cpu_us_per_req_off": round(statistics.median(cpu["off"]), 1),
        "kernel_update_us": round(update_us, 3),
        "kernel_update_share_of_p50": round(update_us / on, 4),
        "target": "kernel update < 5% of the server's p50",
        "meets_target": update_us / on < 0.05,
        "rounds": rounds,
    }


def bench_detectors(cfg: Config) -> dict[str, Any]:
    """DDM and ADWIN: µs per value fed one value per call (the per-feedback path) and per value
    fed in arrays of 1,000, against river's detectors (one ``update`` per value) on the same
    stream, same run."""
    from river import drift

    rng = np.random.default_rng(0)
    n = max(cfg.calls_per_round, 2_000)
    errors = (rng.random(n) < np.linspace(0.1, 0.3, n)).astype(np.float64)
    losses = rng.normal(np.linspace(0.0, 1.0, n), 1.0)
    rows: dict[str, Any] = {}
    samples_all: dict[str, list[float]] = {}
    for name, ours_cls, river_cls, stream, cast in (
        ("ddm", kernels.DDM, drift.binary.DDM, errors, bool),
        ("adwin", kernels.ADWIN, drift.ADWIN, losses, float),
    ):
        singles = [stream[i : i + 1] for i in range(n)]
        chunks = [stream[i : i + 1000] for i in range(0, n, 1000)]
        python_values = [cast(v) for v in stream]
        one, batched, river = [], [], []
        for _ in range(cfg.rounds):
            ours = ours_cls()
            start = time.perf_counter()
            for single in singles:
                ours.update(single)
            one.append((time.perf_counter() - start) / n * 1e6)
            ours = ours_cls()
            start = time.perf_counter()
            for chunk in chunks:
                ours.update(chunk)
            batched.append((time.perf_counter() - start) / n * 1e6)
            theirs = river_cls()
            start = time.perf_counter()
            for value in python_values:
                theirs.update(value)
            river.append((time.perf_counter() - start) / n * 1e6)
        samples_all[name] = one
        rows[f"{name}_us_per_value_batch1"] = round(statistics.median(one), 4)
        rows[f"{name}_us_per_value_batch1000"] = round(statistics.median(batched), 4)
        rows[f"{name}_river_us_per_value"] = round(statistics.median(river), 4)
        rows[f"{name}_ratio_batch1"] = round(statistics.median(river) / statistics.median(one), 2)
        rows[f"{name}_ratio_batch1000"] = round(
            statistics.median(river) / statistics.median(batched), 2
        )
    return result(
        "detectors",
        "us/value",
        samples_all["adwin"],
        values_per_round=n,
        ratio_meaning="river time / ours (>1: ours faster)",
        **rows,
    )


CASES: list[Callable[[Config], dict[str, Any]]] = [
    bench_warmup,
    bench_per_request_update,
    bench_per_request_update_separate,
    bench_batch_throughput,
    bench_drift_from_counts,
    bench_ks_2samp_auto,
    bench_ks_2samp_exact,
    bench_server_monitoring,
    bench_detectors,
]


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "numba_disable_jit": bool(numba.config.DISABLE_JIT),  # type: ignore[attr-defined]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, small batches")
    parser.add_argument(
        "--case", action="append", default=[], help="run only cases whose name contains this"
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    env = environment()
    ensure_warm()
    for case in CASES:
        if args.case and not any(sel in case.__name__ for sel in args.case):
            continue
        row = case(cfg)
        row["quick"] = args.quick
        row["env"] = env
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
