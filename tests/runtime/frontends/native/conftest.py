"""The native front end's fast-path tests share one gate: the front end built with the fast
path and the onnxruntime C API module loadable, or the test skips saying which is missing."""

from __future__ import annotations

from typing import Any

import pytest

from edgewise.runtime.frontends.native.ort_capi import load_ort
from tests.servers import native_front_or_unmet


@pytest.fixture(scope="module")
def fast_module() -> Any:
    module = native_front_or_unmet()
    if not getattr(module, "FAST_PATH", 0):
        pytest.skip("the native front end was built without the fast path (no C API headers)")
    if load_ort()[0] is None:
        pytest.skip(f"the onnxruntime C API module: {load_ort()[1]}")
    return module
