"""The pinned public API, warmup, and the numpy/numba-only import rule."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgewise.kernels as kernels
from edgewise.kernels import _config
from tests.fresh import run_python

PUBLIC_API = [
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
    "categorical_counts",
    "chi2_homogeneity",
    "drift_scores",
    "histogram_counts",
    "jensenshannon",
    "ks_2samp",
    "ks_binned",
    "linf_distance",
    "native_status",
    "psi",
    "quantile_edges",
    "wasserstein_binned",
    "wasserstein_samples",
    "warmup",
    "warmup_request_path",
]

PACKAGE_DIR = Path(kernels.__file__).resolve().parent
ALLOWED_IMPORTS = {  # numpy, numba and the standard library
    "numpy",
    "numba",
    "__future__",
    "argparse",
    "hashlib",
    "importlib",
    "os",
    "pathlib",
    "sys",
    "threading",
    "collections",
    "dataclasses",
    "math",
    "time",
    "typing",
    "warnings",
}


def test_public_api_is_pinned() -> None:
    assert sorted(kernels.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(kernels, name) is not None


def test_warmup_compiles_everything() -> None:
    seconds = kernels.warmup()
    assert seconds >= 0.0
    if not _config.JIT_DISABLED:
        from edgewise.kernels import _native, _special, drift, histograms, moments, profile

        if _native.NATIVE is not None:  # these run compiled ahead of time: nothing to JIT
            for dispatcher in (drift._ks_statistic, drift._wasserstein_sorted, _special._kstwo_sf):
                assert dispatcher.signatures
            return
        compiled = {
            "moments.update": moments._moments_update,
            "histograms.update": histograms._histogram_update,
            "histograms.categorical": histograms._categorical_update,
            "profile.update": profile._profile_update,
            "drift.ks_statistic": drift._ks_statistic,
            "drift.wasserstein": drift._wasserstein_sorted,
        }
        for name, dispatcher in compiled.items():
            sigs = " ".join(str(s) for s in dispatcher.signatures)
            assert sigs, name
            if name.startswith(("moments", "histograms.update", "profile", "drift")):
                assert "float32" in sigs and "float64" in sigs, (name, sigs)
        cat = " ".join(str(s) for s in histograms._categorical_update.signatures)
        assert "int32" in cat and "int64" in cat
        for dispatcher in (
            drift._drift_all,
            _special._kstwo_sf,
            _special._ks2_prob_outside_band,
            _special._ks2_prob_outside_square,
        ):
            assert dispatcher.signatures


def test_kernel_modules_import_only_numpy_and_numba() -> None:
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= ALLOWED_IMPORTS, (path.name, roots)


def test_config_flags() -> None:
    assert _config.FASTMATH is False
    assert _config._FLAGS == {"nopython": True, "cache": True, "nogil": True, "fastmath": False}
    doubled = _config.jit(lambda x: 2 * x)
    assert doubled(np.float64(2.0)) == 4.0


def _signature_counts() -> dict[str, int]:
    from edgewise.kernels import _special, drift, histograms, moments, profile

    out: dict[str, int] = {}
    for module in (moments, histograms, profile, drift, _special):
        for name in dir(module):
            obj = getattr(module, name)
            if hasattr(obj, "signatures") and hasattr(obj, "py_func"):
                out[f"{module.__name__}.{name}"] = len(obj.signatures)
    return out


@pytest.mark.skipif(_config.JIT_DISABLED, reason="inspects numba dispatchers; no JIT here")
def test_no_compile_after_warmup_for_server_inputs() -> None:
    kernels.warmup()
    before = _signature_counts()
    rng = np.random.default_rng(0)
    edges = kernels.quantile_edges(rng.normal(size=(100, 4)))
    for dtype in (np.float32, np.float64):
        raw = rng.normal(size=(3, 4)).astype(dtype).tobytes()
        request: Any = np.frombuffer(raw, dtype=dtype).reshape(3, 4)  # read-only, like gRPC
        assert not request.flags.writeable
        misaligned: Any = np.frombuffer(b"\0" + raw, dtype=dtype, offset=1).reshape(3, 4)
        assert not misaligned.flags.aligned
        variants = (request, request[:1], np.array(request), np.asfortranarray(request), misaligned)
        for batch in variants:
            kernels.MomentState(4).update(batch)
            kernels.HistogramState(edges).update(batch)
            kernels.FeatureProfile(edges).update(batch)
    for code_dtype in (np.int32, np.int64):
        codes: Any = np.frombuffer(np.arange(8, dtype=code_dtype).tobytes(), dtype=code_dtype)
        kernels.CategoricalState([3, 3, 3, 3]).update(codes.reshape(2, 4))
    counts = kernels.histogram_counts(rng.normal(size=(50, 4)), edges)
    frozen = counts.astype(np.float64)
    frozen.setflags(write=False)
    kernels.drift_scores(frozen, counts, edges)
    kernels.drift_scores(counts, counts)
    kernels.wasserstein_binned(frozen[:, :-1], counts[:, :-1], np.array(edges.support))
    sample = rng.normal(size=40)
    kernels.ks_2samp(sample, sample.astype(np.float32))
    kernels.ks_2samp(sample.astype(np.float32), sample[:7].astype(np.float32), method="exact")
    kernels.ks_2samp(sample, sample[:20])
    kernels.wasserstein_samples(sample, [1, 2, 3])
    assert _signature_counts() == before


@pytest.mark.skipif(_config.JIT_DISABLED, reason="counts numba signatures; no JIT in this pass")
def test_request_path_warmup_leaves_nothing_to_compile_for_a_request() -> None:
    """In a fresh process: after warmup_request_path(), the per-request updates of a server
    (read-only float32 rows decoded from request bytes, int64 codes) add no new signature."""
    script = textwrap.dedent(
        """
        import numpy as np
        from edgewise import kernels
        from edgewise.kernels import histograms, profile
        kernels.warmup_request_path()
        before = (len(profile._profile_update.signatures),
                  len(histograms._categorical_update.signatures))
        edges = kernels.quantile_edges(np.random.default_rng(0).normal(size=(50, 3)))
        row = np.frombuffer(np.ones((1, 3), np.float32).tobytes(), np.float32).reshape(1, 3)
        kernels.FeatureProfile(edges).update(row)
        kernels.FeatureProfile(edges).update(np.ones((5, 3)))
        kernels.CategoricalState([2, 4]).update(np.array([[0, 3]], dtype=np.int64))
        after = (len(profile._profile_update.signatures),
                 len(histograms._categorical_update.signatures))
        print(before == after, before, after)
        """
    )
    # numba's path, also where the ahead-of-time kernels are built (tests/kernels/test_native.py)
    out = run_python(script, env={"EDGEWISE_NATIVE_KERNELS": "0"})
    assert out.startswith("True"), out
