"""The public face of the capability packages: every name ``__all__`` promises is there, and
the serving core's package imports its modules on first use, so the client (which imports the
core's codecs) never loads onnxruntime or numba."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

PUBLIC = [
    "edgewise.kernels",
    "edgewise.runtime.client",
    "edgewise.runtime.package",
    "edgewise.runtime.serving",
]
HEAVY = ("onnxruntime", "numba", "onnx", "edgewise.runtime.serving.repository")


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    public = list(module.__all__)
    assert public, f"{name}.__all__ is empty"
    assert len(set(public)) == len(public), f"{name}.__all__ names a name twice"
    assert [n for n in public if not hasattr(module, n)] == []


def test_serving_names_load_their_module_on_first_use() -> None:
    code = (
        "import json, sys\n"
        "import edgewise.runtime.client\n"
        f"before = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "import edgewise.runtime.serving as serving\n"
        "serving.ModelRepository\n"
        f"after = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps([before, after]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    before, after = json.loads(done.stdout)
    assert before == []
    assert "edgewise.runtime.serving.repository" in after
