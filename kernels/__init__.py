"""edgewise.kernels: Numba-JIT statistics and drift kernels (numpy and numba only).

Per-request feature statistics (:class:`MomentState`, :class:`HistogramState`,
:class:`CategoricalState`, or both numeric ones fused in :class:`FeatureProfile`), drift
scores between reference and current counts or raw samples (:mod:`edgewise.kernels.drift`),
and concept-drift detectors on error or loss streams (:class:`DDM`, :class:`ADWIN`).

Call :func:`warmup` once at server start: it compiles every kernel for the dtypes the server
uses (or loads them from numba's on-disk cache), so no request pays a JIT compile. The kernels a
server runs all the time can also be compiled ahead of time (``python -m
edgewise.kernels.native_build``, done by ``make``); they then run without numba or LLVM in the
process (:func:`native_status`).
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from . import _native
from ._checks import CodeBatch, FloatBatch
from ._config import JIT_DISABLED
from .detectors import ADWIN, DDM
from .drift import (
    KS_AUTO_EXACT_MAX_N,
    PSI_EPSILON,
    Chi2Result,
    DriftScores,
    KSResult,
    chi2_homogeneity,
    drift_scores,
    holm,
    jensenshannon,
    ks_2samp,
    ks_binned,
    linf_distance,
    open_ended,
    psi,
    wasserstein_binned,
    wasserstein_samples,
)
from .histograms import (
    DEFAULT_N_BINS,
    BinEdges,
    CategoricalState,
    HistogramState,
    categorical_counts,
    histogram_counts,
    quantile_edges,
)
from .moments import MomentState
from .multivariate import ReconstructionState, reconstruction_errors
from .profile import FeatureProfile

__all__ = [
    "ADWIN",
    "DDM",
    "DEFAULT_N_BINS",
    "KS_AUTO_EXACT_MAX_N",
    "PSI_EPSILON",
    "BinEdges",
    "CategoricalState",
    "Chi2Result",
    "DriftScores",
    "FeatureProfile",
    "HistogramState",
    "KSResult",
    "MomentState",
    "ReconstructionState",
    "categorical_counts",
    "chi2_homogeneity",
    "drift_scores",
    "histogram_counts",
    "holm",
    "jensenshannon",
    "ks_2samp",
    "ks_binned",
    "linf_distance",
    "native_status",
    "open_ended",
    "psi",
    "quantile_edges",
    "reconstruction_errors",
    "unavailable",
    "warmup",
    "warmup_request_path",
    "wasserstein_binned",
    "wasserstein_samples",
]


def native_status() -> str:
    """Whether the ahead-of-time compiled kernels serve (``"loaded"``) or numba's, and why."""
    return _native.STATUS


def unavailable() -> str | None:
    """Why the kernels cannot run in this process, or None when they can: they run from the
    ahead-of-time compiled module (:func:`native_status`), through numba's JIT (the ``jit``
    extra: ``pip install 'edgewise[jit]'``), or as Python under ``NUMBA_DISABLE_JIT=1``. Without
    any of these, a first call would raise ModuleNotFoundError; callers switch monitoring off
    with this reason instead."""
    if _native.NATIVE is not None or JIT_DISABLED:
        return None
    try:
        found = importlib.util.find_spec("numba") is not None
    except ImportError:  # an import hook that refuses it (as a test's blocker does)
        found = False
    if found:
        return None
    return (
        f"the drift kernels need their ahead-of-time build (here: {_native.STATUS}) or numba's "
        "JIT (pip install 'edgewise[jit]')"
    )


def warmup_request_path() -> float:
    """Compile (or load from cache) only the kernels a request runs: the fused numeric update
    and the categorical update, for float32/float64 batches and int32/int64 codes, writable and
    read-only. The drift kernels load on their first use, off the request path; loading only
    these keeps a server's memory small. With the ahead-of-time compiled kernels built
    (:func:`native_status`), these run from them and numba is not even imported.
    Returns the seconds spent."""
    start = time.perf_counter()
    reference = np.random.default_rng(0).normal(size=(64, 2))
    edges = quantile_edges(reference, n_bins=4)
    for batch in (reference.astype(np.float32), reference):
        frozen = batch.copy()
        frozen.setflags(write=False)
        reconstruction = ReconstructionState(2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]])
        for rows in (batch, batch[:1], frozen, frozen[:1]):
            FeatureProfile(edges).update(rows)
            reconstruction.update(rows)
    codes64 = np.zeros((4, 2), dtype=np.int64)
    for codes in (codes64.astype(np.int32), codes64):
        frozen_codes = codes.copy()
        frozen_codes.setflags(write=False)
        CategoricalState([3, 2]).update(codes)
        CategoricalState([3, 2]).update(frozen_codes)
    return time.perf_counter() - start


def warmup() -> float:
    """Compile (or load from cache) every kernel for float32/float64 batches and int32/int64
    codes by running each public entry point once on tiny inputs.  Returns the seconds spent.

    Batches are compiled for C-contiguous layout, writable *and* read-only (numba types them
    apart; ``np.frombuffer`` on request bytes gives read-only arrays), so neither kind
    triggers a compile later.  The wrappers copy any other layout to C order first.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(64, 2))
    edges = quantile_edges(reference, n_bins=4)
    batches: tuple[FloatBatch, ...] = (reference.astype(np.float32), reference)
    for batch in batches:
        frozen = batch.copy()
        frozen.setflags(write=False)
        for readonly in (frozen, frozen[:1]):
            MomentState(2).update(readonly)
            ReconstructionState(2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]]).update(readonly)
            reconstruction_errors(readonly, [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]])
            HistogramState(edges).update(readonly)
            FeatureProfile(edges).update(readonly)
        moments = MomentState(2)
        moments.update(batch)
        moments.update(batch[:1])
        other = MomentState.from_batch(batch[:8])
        moments.merge(other)
        moments.subtract(other)
        hist = HistogramState(edges)
        hist.update(batch)
        profile = FeatureProfile(edges)
        profile.update(batch[:1])
        ReconstructionState(2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]]).update(batch)
        sample = batch[:, 0]
        ks_2samp(sample, sample[:32])  # exact, unequal sizes
        ks_2samp(sample[:32], sample[32:])  # exact, equal sizes
        ks_2samp(sample, sample[:32], method="asymp")
        wasserstein_samples(sample, sample[:32])
    codes64 = rng.integers(-1, 3, size=(16, 2)).astype(np.int64)
    code_batches: tuple[CodeBatch, ...] = (codes64.astype(np.int32), codes64)
    for codes in code_batches:
        CategoricalState([3, 2]).update(codes)
        frozen_codes = codes.copy()
        frozen_codes.setflags(write=False)
        CategoricalState([3, 2]).update(frozen_codes)
    counts = histogram_counts(reference, edges)
    moved = histogram_counts(reference + 0.5, edges)
    drift_scores(counts, moved, edges)
    drift_scores(counts, moved)
    psi(counts, moved)
    jensenshannon(counts, moved)
    wasserstein_binned(counts[:, :-1], moved[:, :-1], edges.support)
    ks_binned(counts[:, :-1], moved[:, :-1])
    linf_distance(counts, moved)
    chi2_homogeneity(counts, moved)
    errors = (rng.random(64) < 0.2).astype(np.float64)
    frozen_errors = errors.copy()
    frozen_errors.setflags(write=False)
    for stream in (errors, frozen_errors):
        DDM(warm_start=8).update(stream)
        ADWIN(clock=4).update(stream)
    return time.perf_counter() - start
