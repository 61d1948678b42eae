"""Which kernels the package's wrappers call in a test: the ahead-of-time compiled functions
(where built, the package's default) or numba's dispatchers they are built from."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest

from edgewise.kernels import _config, _native

#: Each wrapper's kernels: (module, attribute) -> the compiled functions in it when the
#: ahead-of-time module serves; a pair ([float32, float64] or [int32, int64]) is a tuple there,
#: a single function is the attribute itself.
WRAPPERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("moments", "_UPDATE"): ("moments_update_f32", "moments_update_f64"),
    ("moments", "_MERGE"): ("moments_merge",),
    ("moments", "_SUBTRACT"): ("moments_subtract",),
    ("histograms", "_HISTOGRAM_UPDATE"): ("histogram_update_f32", "histogram_update_f64"),
    ("histograms", "_CATEGORICAL_UPDATE"): ("categorical_update_i32", "categorical_update_i64"),
    ("profile", "_UPDATE"): ("profile_update_f32", "profile_update_f64"),
    ("drift", "_DRIFT_ALL"): ("drift_all",),
    ("multivariate", "_UPDATE"): ("reconstruction_update_f32", "reconstruction_update_f64"),
    ("drift", "_KS_STATISTIC"): ("ks_statistic_f32", "ks_statistic_f64"),
    ("drift", "_WASSERSTEIN_SORTED"): ("wasserstein_sorted_f32", "wasserstein_sorted_f64"),
    ("drift", "_KSTWO_SF"): ("kstwo_sf",),
    ("drift", "_KS2_SQUARE"): ("ks2_prob_outside_square",),
    ("drift", "_KS2_BAND"): ("ks2_prob_outside_band",),
    ("detectors", "_DDM_RESTART"): ("ddm_restart",),
    ("detectors", "_DDM_UPDATE"): ("ddm_update",),
    ("detectors", "_ADWIN_RESTART"): ("adwin_restart",),
    ("detectors", "_ADWIN_UPDATE"): ("adwin_update",),
}


def kernel_module(name: str) -> Any:
    return importlib.import_module(f"edgewise.kernels.{name}")


def install_kernels(monkeypatch: pytest.MonkeyPatch, function_of: Callable[[str], Any]) -> None:
    """Every wrapper of WRAPPERS calls ``function_of(exported name)`` for this test."""
    for (module, attribute), names in WRAPPERS.items():
        functions = tuple(function_of(name) for name in names)
        monkeypatch.setattr(
            kernel_module(module), attribute, functions if len(names) > 1 else functions[0]
        )


def numba_kernel(name: str) -> Any:
    """The numba kernel the compiled function ``name`` is built from."""
    module, kernel = _native.EXPORTS[name]
    return getattr(kernel_module(module), kernel)


def use_numba_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba's dispatchers serve every wrapper for this test, also where the ahead-of-time
    kernels are loaded (which the package would call instead)."""
    _config._make_dispatchers()  # numba's dispatchers in place of the lazy kernels
    install_kernels(monkeypatch, numba_kernel)
