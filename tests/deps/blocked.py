"""Run edgewise in an interpreter where the packages a serving node goes without cannot be
imported: a ``sitecustomize`` module, found through ``PYTHONPATH``, puts a finder first on
``sys.meta_path`` that raises ``ModuleNotFoundError`` for each of them (and their submodules), as
if they were not installed. Each refused import is logged with its importer, so a failure names
the line that asked."""

from __future__ import annotations

import os
from pathlib import Path

#: What serving, the sync agent and the batch scorer must run without (pyproject's core
#: dependencies hold none of them): numba and llvmlite (the jit extra: the AOT kernels serve),
#: onnx and ml_dtypes (the convert extra), SciPy and scikit-learn (convert, test).
BLOCKED = ("numba", "llvmlite", "onnx", "ml_dtypes", "scipy", "sklearn", "skl2onnx")

_SITECUSTOMIZE = '''\
import os
import sys
import traceback

_BLOCKED = frozenset({blocked!r})
_LOG = {log!r}


class _NotInstalled:
    """Every blocked package reads as not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in _BLOCKED:
            return None
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
        caller = " <- ".join(f"{{f.filename}}:{{f.lineno}} {{f.name}}" for f in frames[::-1][:4])
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"{{os.getpid()}} blocked {{name}} <- {{caller}}\\n")
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)


sys.meta_path.insert(0, _NotInstalled())
with open(_LOG, "a", encoding="utf-8") as log:
    log.write(f"{{os.getpid()}} installed\\n")
'''


def blocked_environment(folder: Path) -> tuple[dict[str, str], Path]:
    """The environment variables of a process that runs without :data:`BLOCKED`, and the log
    its finder writes (one ``PID installed`` line per process, one line per refused import)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "blocked-imports.log"
    (folder / "sitecustomize.py").write_text(
        _SITECUSTOMIZE.format(blocked=tuple(BLOCKED), log=str(log)), encoding="utf-8"
    )
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}, log


def refused(log: Path) -> list[str]:
    """The imports the finder refused, as logged."""
    if not log.exists():
        return []
    return [line for line in log.read_text(encoding="utf-8").splitlines() if " blocked " in line]


def installed_in(log: Path) -> int:
    """How many processes ran with the finder installed."""
    if not log.exists():
        return 0
    lines = log.read_text(encoding="utf-8").splitlines()
    return sum(1 for line in lines if line.endswith(" installed"))
