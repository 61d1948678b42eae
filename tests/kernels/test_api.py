"""The pinned public API, warmup, and the numpy/numba-only import rule."""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgewise.kernels as kernels
from edgewise.kernels import _config, _native, native_build
from tests.fresh import run_python
from tests.kernels.kernel_paths import (
    WRAPPERS,
    install_kernels,
    kernel_module,
    use_numba_kernels,
)
from tests.prerequisites import native_kernels_missing, unmet

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


@dataclass
class KernelPath:
    """Which kernels the package's wrappers call in a test: ``aot`` (the ahead-of-time compiled
    functions, each call checked against its signature and recorded in ``calls``) or ``jit``
    (numba's dispatchers)."""

    name: str
    calls: list[str] = field(default_factory=list)


def _check_arguments(name: str, signature: Any, args: tuple[Any, ...]) -> None:
    """The compiled functions check nothing (a wrong dtype is read as theirs): every argument a
    wrapper passes must have the type, dtype, rank and layout of the signature it was built
    for."""
    from numba import types

    assert len(args) == len(signature.args), (name, len(args))
    for index, (kind, arg) in enumerate(zip(signature.args, args, strict=True)):
        where = f"{name} argument {index}"
        if isinstance(kind, types.Array):
            assert isinstance(arg, np.ndarray), (where, type(arg))
            assert arg.dtype == np.dtype(str(kind.dtype)), (where, arg.dtype, kind)
            assert arg.ndim == kind.ndim, (where, arg.shape, kind)
            assert arg.flags.c_contiguous and arg.flags.aligned, (where, arg.flags)
        elif isinstance(kind, types.Boolean):
            assert isinstance(arg, bool | np.bool_), (where, type(arg))
        elif isinstance(kind, types.Integer):
            assert isinstance(arg, int | np.integer) and not isinstance(arg, bool), (where, arg)
        else:
            assert isinstance(kind, types.Float) and isinstance(arg, float | np.floating), where


@pytest.fixture(params=["aot", "jit"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> KernelPath:
    """Each test runs on both paths, whichever one this process loaded."""
    if _config.JIT_DISABLED:
        pytest.skip("NUMBA_DISABLE_JIT=1: the kernels run as Python, neither compiled path")
    path = KernelPath(request.param)
    if path.name == "jit":
        use_numba_kernels(monkeypatch)
        return path
    missing = native_kernels_missing()
    if missing is not None:
        unmet(missing)
    signatures = native_build._signatures()
    # The package calls the compiled functions where they are loaded; the spies stand in for them.
    for (module, attribute), names in WRAPPERS.items():
        loaded = tuple(getattr(_native.NATIVE, name) for name in names)
        expected = loaded if len(names) > 1 else loaded[0]
        assert getattr(kernel_module(module), attribute) == expected

    def spy(name: str) -> Callable[..., Any]:
        compiled = getattr(_native.NATIVE, name)

        def checked(*args: Any) -> Any:
            _check_arguments(name, signatures[name], args)  # before a wrong one can crash
            path.calls.append(name)
            return compiled(*args)

        return checked

    install_kernels(monkeypatch, spy)
    return path


def test_the_wrappers_table_covers_every_compiled_function() -> None:
    assert sorted(name for names in WRAPPERS.values() for name in names) == sorted(_native.EXPORTS)


@pytest.mark.skipif(_config.JIT_DISABLED, reason="numba.pycc signatures; no JIT in this pass")
def test_the_spies_refuse_arguments_a_compiled_function_was_not_built_for() -> None:
    signature = native_build._signatures()["moments_update_f64"]
    state = np.zeros((5, 3))
    _check_arguments("moments_update_f64", signature, (state, np.ones((2, 3))))
    for batch in (
        np.ones((2, 3), np.float32),  # the other dtype: read as float64, garbage or a crash
        np.asfortranarray(np.ones((2, 3))),  # another layout
        np.ones(3),  # another rank
    ):
        with pytest.raises(AssertionError):
            _check_arguments("moments_update_f64", signature, (state, batch))


def _exported_kernel_signatures() -> dict[str, int]:
    """Signatures numba compiled for the kernels the ahead-of-time module also holds."""
    out = {}
    for module, kernel in set(_native.EXPORTS.values()):
        dispatcher = getattr(kernel_module(module), kernel)
        out[f"{module}.{kernel}"] = len(getattr(dispatcher, "signatures", ()))  # lazy: none yet
    return out


def test_warmup_compiles_everything(kernel_path: KernelPath) -> None:
    from edgewise.kernels import drift, histograms, moments, profile

    before = _exported_kernel_signatures()
    seconds = kernels.warmup()
    assert seconds >= 0.0
    if kernel_path.name == "aot":
        # Every compiled function ran, each with arguments of its signature; numba compiled
        # none of the kernels they were built from.
        assert set(kernel_path.calls) == set(_native.EXPORTS)
        assert _exported_kernel_signatures() == before
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
    assert drift._drift_all.signatures and moments._moments_merge.signatures


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
    from edgewise.kernels import (
        _special,
        detectors,
        drift,
        histograms,
        moments,
        multivariate,
        profile,
    )

    out: dict[str, int] = {}
    for module in (moments, histograms, profile, drift, _special, multivariate, detectors):
        for name in dir(module):
            obj = getattr(module, name)
            if hasattr(obj, "signatures") and hasattr(obj, "py_func"):
                out[f"{module.__name__}.{name}"] = len(obj.signatures)
    return out


def test_no_compile_after_warmup_for_server_inputs(kernel_path: KernelPath) -> None:
    """After warmup, no input a server passes (read-only, sliced, Fortran-ordered, misaligned,
    both dtypes) makes numba compile; on the compiled path each reaches the compiled function in
    the dtype and layout of its signature (checked by the spies)."""
    kernels.warmup()
    before = _signature_counts()
    kernel_path.calls.clear()  # from here: what the server's inputs call
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
            kernels.ReconstructionState(4, [0, 2, 3], np.zeros(3), np.ones(3), [[1, 0, 0]]).update(
                batch
            )
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
    kernels.ks_2samp(sample, sample[:20], method="asymp")
    kernels.wasserstein_samples(sample, [1, 2, 3])
    kernels.wasserstein_samples(sample.astype(np.float32), sample[:9].astype(np.float32))
    # Online quality: labels fed to the detectors (a read-only array as decoded from a request).
    errors: Any = np.frombuffer(np.array([0.0, 1.0, 0.0, 0.0]).tobytes(), np.float64)
    kernels.DDM(warm_start=2).update(errors)
    kernels.ADWIN(clock=2).update(errors)
    assert _signature_counts() == before
    if kernel_path.name == "aot":  # every update ran compiled, fed the dtype it was built for
        merges = {"moments_merge", "moments_subtract"}  # a request merges no states
        assert set(kernel_path.calls) == set(_native.EXPORTS) - merges


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
