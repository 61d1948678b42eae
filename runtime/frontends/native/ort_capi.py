"""onnxruntime sessions through its C API, run without the GIL: the first step of issue 26.

``_ort.cc`` (built by ``python -m edgewise.runtime.frontends.native.build --ort``, with the
headers :mod:`~edgewise.runtime.frontends.native.ort_headers` fetches) opens the onnxruntime
wheel's own ``libonnxruntime.so`` by absolute path (no second copy) and makes sessions from a
model's bytes with the options the Python side uses
(:meth:`~edgewise.runtime.serving.model.SessionSettings.session_options`). :meth:`CapiSession.run`
checks every feed against the session (name, dtype, rank, fixed dimensions) with the GIL held,
then releases the GIL for the whole of onnxruntime's run: threads running the same session run
in parallel, and Python threads keep running meanwhile.

The native front end's fast path (fast_path.py) serves through these sessions: C++ takes the
session's reference-counted handle (:attr:`CapiSession.shared`, ort_shared.h) and runs it
itself, without the GIL.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import numpy.typing as npt

from edgewise.runtime.errors import InvalidInput, ModelLoadError

if TYPE_CHECKING:
    from edgewise.runtime.serving.model import SessionSettings

__all__ = ["ORT_SOURCE", "CapiSession", "library_path", "load_ort", "ort_source_digest"]

ORT_SOURCE: Final = Path(__file__).with_name("_ort.cc")
MODULE: Final = "edgewise.runtime.frontends.native._ort"


def ort_source_digest() -> str:
    """The digest of ``_ort.cc`` (and ``ort_shared.h``, its contract with the native front
    end) a built module must carry to be used."""
    digest = hashlib.sha256(ORT_SOURCE.read_bytes())
    digest.update(ORT_SOURCE.with_name("ort_shared.h").read_bytes())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """The onnxruntime wheel's ``libonnxruntime.so.*`` (found without importing onnxruntime)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the onnxruntime package is not installed")
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    found = sorted(capi.glob("libonnxruntime.so*"))
    if not found:
        raise FileNotFoundError(f"{capi}: no libonnxruntime.so* (the wheel ships one)")
    return found[-1]


@functools.cache
def load_ort() -> tuple[ModuleType | None, str]:
    """The built C API module with the wheel's library opened, or None; and a line saying which
    (or why not). Decided once per process."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        return None, (
            f"the onnxruntime C API module is not built ({exc}; build it with `make native` or "
            "`python -m edgewise.runtime.frontends.native.build --ort`, which need npm)"
        )
    if ORT_SOURCE.exists() and str(getattr(module, "SOURCE_DIGEST", "")) != ort_source_digest():
        return None, "the onnxruntime C API module is stale (built from another _ort.cc)"
    try:
        version = module.init(str(library_path()))
    except (OSError, RuntimeError) as exc:
        return None, f"the onnxruntime C API is unusable: {exc}"
    return module, f"loaded (onnxruntime {version}, C API version {module.API_VERSION})"


class CapiSession:
    """One onnxruntime session made through the C API from a model's bytes."""

    def __init__(self, model: bytes, settings: SessionSettings, name: str = "model") -> None:
        module, reason = load_ort()
        if module is None:
            raise ModelLoadError(reason)
        self.name = name
        try:
            self._session: Any = module.Session(
                model,
                intra_op_threads=settings.intra_op_threads,
                inter_op_threads=settings.inter_op_threads,
                graph_optimization=settings.graph_optimization,
                memory_arena=settings.memory_arena,
                allow_spinning=settings.allow_spinning,
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from None
        ports = self._session.inputs, self._session.outputs
        #: ``(name, element type, shape)`` of each input and output, -1 for any size.
        self.inputs: tuple[tuple[str, str, tuple[int, ...]], ...] = ports[0]
        self.outputs: tuple[tuple[str, str, tuple[int, ...]], ...] = ports[1]
        self.output_names: tuple[str, ...] = tuple(o[0] for o in self.outputs)

    @property
    def shared(self) -> object:
        """The reference-counted session as a capsule, for the native front end's fast path
        (fast_path.py); valid while this object lives (the front end takes its own reference)."""
        return self._session.shared

    @property
    def running(self) -> int:
        """How many runs are inside onnxruntime now (only ever seen above 0 from Python because
        the GIL is released around them)."""
        return int(self._session.running)

    def run(
        self,
        feeds: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run the model without the GIL; every output asked for (all by default) as an array.
        A feed that does not fit the model raises :class:`InvalidInput` naming it."""
        names = list(output_names) if output_names else list(self.output_names)
        try:
            results = self._session.run(dict(feeds), names)
        except ValueError as exc:  # the request's fault (onnxruntime's INVALID_ARGUMENT too)
            raise InvalidInput(f"model {self.name!r}: {exc}") from None
        except RuntimeError as exc:
            raise ModelLoadError(f"model {self.name!r}: {exc}") from None
        return dict(zip(names, results, strict=True))
