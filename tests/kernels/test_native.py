"""The ahead-of-time compiled kernels: the same results as numba's dispatchers, used only when
built from these sources, and a process that runs them never imports numba."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.kernels import _config, _native, drift, histograms, moments, native_build, profile
from edgewise.kernels.histograms import quantile_edges
from tests.fresh import run_python
from tests.prerequisites import requires

pytestmark = pytest.mark.skipif(
    _config.JIT_DISABLED, reason="compares compiled kernels; NUMBA_DISABLE_JIT=1 compiles none"
)

needs_native = requires(  # skipped with the reason; failed under CI
    f"native kernels {_native.STATUS} and no C compiler here to build them"
    if _native.NATIVE is None and shutil.which("cc") is None
    else None
)


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A portable x86-64-v2 build of the kernels, in a folder of its own (not the package's)."""
    folder = tmp_path_factory.mktemp("portable")
    path = native_build.build(folder, "x86-64-v2")
    assert path.name.startswith("_native_kernels_x86_64_v2.")
    return path


@pytest.fixture(scope="module")
def host_native() -> Any:
    """The host build, as `make` leaves it in the package."""
    if _native.NATIVE is None:
        pytest.fail(
            f"native kernels {_native.STATUS}: `make` builds them "
            "(python -m edgewise.kernels.native_build)"
        )
    return _native.NATIVE


@pytest.fixture(scope="module", params=["host", "x86-64-v2"])
def native(request: pytest.FixtureRequest) -> Any:
    """The host build and a portable build (as an image carries it)."""
    if request.param == "host":
        return request.getfixturevalue("host_native")
    path = request.getfixturevalue("portable_build")
    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dispatcher(module: Any, name: str) -> Any:
    """The numba dispatcher of a kernel, made now if nothing made it yet."""
    kernel = getattr(module, name)
    if isinstance(kernel, _config.LazyKernel):
        _config._make_dispatchers()
        kernel = getattr(module, name)
    return kernel


def awkward_batch(rng: np.random.Generator, dtype: type, rows: int = 200) -> np.ndarray:
    batch = rng.normal(size=(rows, 5)) * 3
    batch[rng.random(batch.shape) < 0.05] = np.nan
    batch[0, 0], batch[1, 1] = np.inf, -np.inf
    batch[2, 2] = np.finfo(dtype).max  # finite, far past the last edge
    out = np.ascontiguousarray(batch.astype(dtype))
    out.setflags(write=False)  # as decoded from request bytes
    return out


@needs_native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numeric_updates_equal_numba(native: Any, dtype: type) -> None:
    rng = np.random.default_rng(1)
    edges = quantile_edges(rng.normal(size=(500, 5)), n_bins=7)
    batch = awkward_batch(rng, dtype)
    suffix = "f32" if dtype is np.float32 else "f64"

    def run(kernel: Any, with_moments: bool, with_counts: bool) -> tuple[Any, Any]:
        state = moments.MomentState(5).to_array()  # the kernels' layout: 7 rows x features
        counts = np.zeros((5, edges.width), dtype=np.int64)
        args: list[Any] = []
        if with_moments:
            args.append(state)
        if with_counts:
            args.append(counts)
        args.append(batch)
        if with_counts:
            args += [edges.search_table, edges.sizes, edges.search_top]
        kernel(*args)
        return state, counts

    cases = (
        ("profile_update", profile, "_profile_update", True, True),
        ("histogram_update", histograms, "_histogram_update", False, True),
        ("moments_update", moments, "_moments_update", True, False),
    )
    for export, module, name, with_moments, with_counts in cases:
        compiled = run(getattr(native, f"{export}_{suffix}"), with_moments, with_counts)
        jitted = run(dispatcher(module, name), with_moments, with_counts)
        np.testing.assert_array_equal(compiled[1], jitted[1], err_msg=export)
        np.testing.assert_array_equal(compiled[0], jitted[0], err_msg=export)


@needs_native
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_categorical_update_equals_numba(native: Any, dtype: type) -> None:
    codes = np.random.default_rng(2).integers(-2, 6, size=(300, 3)).astype(dtype)
    n_categories = np.array([3, 4, 5], dtype=np.int64)
    compiled = np.zeros((3, 6), dtype=np.int64)
    jitted = np.zeros((3, 6), dtype=np.int64)
    suffix = "i32" if dtype is np.int32 else "i64"
    getattr(native, f"categorical_update_{suffix}")(compiled, codes, n_categories)
    dispatcher(histograms, "_categorical_update")(jitted, codes, n_categories)
    np.testing.assert_array_equal(compiled, jitted)
    assert compiled.sum() == codes.size


@needs_native
def test_merge_subtract_and_drift_equal_numba(native: Any) -> None:
    rng = np.random.default_rng(3)
    edges = quantile_edges(rng.normal(size=(400, 4)))
    big, small = moments.MomentState(4), moments.MomentState(4)
    big.update(rng.normal(size=(100, 4)))
    small.update(rng.normal(size=(30, 4)))
    a, b = big.to_array(), big.to_array()
    native.moments_merge(a, small.to_array())
    dispatcher(moments, "_moments_merge")(b, small.to_array())
    np.testing.assert_array_equal(a, b)
    a, b = big.to_array(), big.to_array()
    assert native.moments_subtract(a, small.to_array()) == -1
    assert dispatcher(moments, "_moments_subtract")(b, small.to_array()) == -1
    np.testing.assert_array_equal(a, b)
    # Subtracting more than was merged names the first bad feature, and changes nothing.
    assert native.moments_subtract(small.to_array(), big.to_array()) == 0

    reference = histograms.histogram_counts(rng.normal(size=(500, 4)), edges).astype(np.float64)
    current = histograms.histogram_counts(rng.normal(0.3, 1, size=(80, 4)), edges)
    current = current.astype(np.float64)
    kernel = dispatcher(drift, "_drift_all")
    for support, ordered in ((edges.support, True), (drift._NO_SUPPORT, False)):
        for correction, smoothing, min_expected in ((True, 0.0, 0.0), (False, 0.5, 5.0)):
            args = (
                reference,
                current,
                support,
                ordered,
                1e-4,
                np.e,
                correction,
                smoothing,
                min_expected,
            )
            np.testing.assert_array_equal(native.drift_all(*args), kernel(*args))


@needs_native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_tests_and_detectors_equal_numba(native: Any, dtype: type) -> None:
    """The exact tests of a drift report and the online quality detectors."""
    from edgewise.kernels import _special, detectors

    rng = np.random.default_rng(4)
    suffix = "f32" if dtype is np.float32 else "f64"
    a = np.sort(rng.normal(size=70)).astype(dtype)
    b = np.sort(np.round(rng.normal(0.2, 1.0, size=45), 1)).astype(dtype)  # ties
    for export, name in (
        ("ks_statistic", "_ks_statistic"),
        ("wasserstein_sorted", "_wasserstein_sorted"),
    ):
        assert getattr(native, f"{export}_{suffix}")(a, b) == dispatcher(drift, name)(a, b), export
    for export, args in (
        ("kstwo_sf", (40, 0.2)),
        ("ks2_prob_outside_square", (30, 7)),
        ("ks2_prob_outside_band", (70, 45, 5, 11)),
    ):
        assert getattr(native, export)(*args) == dispatcher(_special, f"_{export}")(*args), export
    errors = (rng.random(400) < np.linspace(0.05, 0.6, 400)).astype(np.float64)
    results = []
    for ddm_restart, ddm_update, adwin_restart, adwin_update in (
        (native.ddm_restart, native.ddm_update, native.adwin_restart, native.adwin_update),
        tuple(
            dispatcher(detectors, n)
            for n in ("_ddm_restart", "_ddm_update", "_adwin_restart", "_adwin_update")
        ),
    ):
        ddm = detectors.DDM(warm_start=20)
        ddm_restart(ddm._state)
        status = np.empty(errors.size, np.int8)
        drifts = np.empty(errors.size, np.int64)
        found = ddm_update(ddm._state, errors, 20.0, 2.0, 3.0, status, drifts)
        adwin = detectors.ADWIN(clock=8)
        adwin_restart(adwin._fstate, adwin._istate, adwin._counts, adwin._totals, adwin._variances)
        adwin_drifts = np.empty(errors.size, np.int64)
        adwin_found = adwin_update(
            adwin._fstate, adwin._istate, adwin._counts, adwin._totals, adwin._variances,
            errors, 0.002, 8, 5, 5.0, 10.0, adwin_drifts,
        )  # fmt: skip
        results.append((found, status, drifts[:found], ddm._state, adwin_found,
                        adwin_drifts[:adwin_found], adwin._fstate, adwin._totals))  # fmt: skip
    compiled, jitted = results
    assert compiled[0] > 0 and compiled[4] > 0  # both detectors saw the error rate climb
    for index, (x, y) in enumerate(zip(compiled, jitted, strict=True)):
        np.testing.assert_array_equal(x, y, err_msg=str(index))


def test_a_module_built_from_other_sources_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "source_digest", lambda target="host": 12345)
    module, status = _native._load()
    if _native.NATIVE is None and "not built" in _native.STATUS:
        assert module is None and "not built" in status
    else:
        assert module is None and status.startswith("stale")
    monkeypatch.setenv("EDGEWISE_NATIVE_KERNELS", "0")
    assert _native._load() == (None, "off (EDGEWISE_NATIVE_KERNELS=0)")


@pytest.fixture()
def only_portable(monkeypatch: pytest.MonkeyPatch, portable_build: Path) -> None:
    """The package as an image ships it: the portable build beside it, no host build."""
    package = importlib.import_module("edgewise.kernels")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(portable_build.parent)])
    monkeypatch.setitem(sys.modules, f"edgewise.kernels.{_native.MODULE_NAME}", None)
    monkeypatch.delitem(sys.modules, "edgewise.kernels._native_kernels_x86_64_v2", raising=False)


@needs_native
@pytest.mark.skipif(not _native.LEVELS["x86-64-v2"] <= _native._cpu_flags(), reason="no x86-64-v2")
def test_a_portable_build_serves_on_a_cpu_with_its_level(only_portable: None) -> None:
    module, status = _native._load()
    assert status == "loaded (x86-64-v2 build)" and module is not None
    # Its functions are compared with numba's above (the `native` fixture's second build).
    state = moments.MomentState(3)
    state.update(np.ones((4, 3)))
    merged = state.to_array()
    module.moments_merge(merged, state.to_array())
    np.testing.assert_array_equal(merged[0], [8, 8, 8])  # the count row


@needs_native
def test_a_portable_build_is_skipped_on_a_cpu_without_its_level(
    only_portable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_native, "_cpu_flags", lambda: frozenset({"sse4_2", "popcnt"}))
    assert _native._load() == (None, "not built (python -m edgewise.kernels.native_build)")


@needs_native
def test_a_portable_build_from_other_sources_is_stale(
    only_portable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _native.LEVELS["x86-64-v2"] <= _native._cpu_flags():
        pytest.skip("this CPU lacks x86-64-v2: the build is skipped, not found stale")
    monkeypatch.setattr(_native, "source_digest", lambda target="host": 12345)
    module, status = _native._load()
    assert module is None and status.startswith("stale") and "x86-64-v2" in status


def test_an_unknown_cpu_target_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown CPU target 'pentium'"):
        _native.module_name("pentium")
    assert _native.module_name("x86-64-v3") == "_native_kernels_x86_64_v3"


@needs_native
def test_serving_kernels_never_import_numba(host_native: Any) -> None:
    """A fresh process runs what a server with monitoring runs (request updates, window merges,
    drift scores, exact tests, quality detectors): with the compiled kernels, neither numba nor
    LLVM is ever imported."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from edgewise import kernels
        kernels.warmup_request_path()
        rng = np.random.default_rng(0)
        edges = kernels.quantile_edges(rng.normal(size=(100, 3)))
        window, total = kernels.FeatureProfile(edges), kernels.FeatureProfile(edges)
        rows = np.frombuffer(rng.random((4, 3), np.float32).tobytes(), np.float32).reshape(4, 3)
        window.update(rows)
        total.merge(window)
        total.subtract(window)
        total.merge(window)
        codes = kernels.CategoricalState([2, 3])
        codes.update(np.array([[0, 2], [1, 5]], dtype=np.int64))
        reference = kernels.histogram_counts(rng.normal(size=(50, 3)), edges)
        kernels.drift_scores(reference, total.histogram.counts, edges)
        kernels.drift_scores(codes.counts, codes.counts)
        sample = rng.normal(size=60)
        kernels.ks_2samp(sample, sample[:30] + 0.1)  # a drift report's exact tests
        kernels.ks_2samp(sample.astype(np.float32), sample[:30].astype(np.float32), method="asymp")
        kernels.wasserstein_samples(sample, sample[:30])
        errors = (rng.random(100) < 0.3).astype(np.float64)  # online quality's detectors
        kernels.DDM().update(errors)
        kernels.ADWIN().update(errors)
        print(sorted(m for m in ("numba", "llvmlite") if m in sys.modules))
        """
    )
    out = run_python(script, env={"EDGEWISE_NATIVE_KERNELS": "1"})
    assert out.strip() == "[]", out


def test_lazy_kernels_become_dispatchers_everywhere_on_first_use() -> None:
    dispatcher(profile, "_profile_update")
    for module in (profile, histograms, moments, drift):
        lazy = [n for n, v in vars(module).items() if isinstance(v, _config.LazyKernel)]
        assert lazy == [], (module.__name__, lazy)
        held = [
            n
            for n, v in vars(module).items()
            if type(v) is tuple and any(isinstance(k, _config.LazyKernel) for k in v)
        ]
        assert held == [], (module.__name__, held)
    # profile.py imported _histogram_update and _moments_update from their modules: the same
    # dispatchers there and here, so profile's fused kernel compiles calls to them.
    assert profile._histogram_update is histograms._histogram_update
    assert profile._moments_update is moments._moments_update


def test_first_use_from_several_threads_makes_one_set_of_dispatchers() -> None:
    script = textwrap.dedent(
        """
        import threading
        import numpy as np
        from edgewise.kernels import _config, histograms, moments, profile

        states = [moments.MomentState(3) for _ in range(4)]
        start = threading.Barrier(4)

        def first_use(state):
            start.wait()
            state.update(np.ones((5, 3)))

        threads = [threading.Thread(target=first_use, args=(s,)) for s in states]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        def lazy_in(v):  # a lazy kernel, or a tuple of variants holding one
            return isinstance(v, _config.LazyKernel) or (
                type(v) is tuple and any(isinstance(k, _config.LazyKernel) for k in v))
        lazy = [n for m in (histograms, moments, profile) for n, v in vars(m).items()
                if lazy_in(v)]
        made = {id(k.dispatcher) for k in _config._LAZY if k.py_func.__name__ == "_moments_update"}
        print(lazy, [int(s.count[0]) for s in states], len(made))
        """
    )
    out = run_python(script, env={"EDGEWISE_NATIVE_KERNELS": "0"})  # numba's path, made lazily
    assert out.strip() == "[] [5, 5, 5, 5] 1", out
