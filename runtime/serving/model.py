"""The onnxruntime session wrapper: the only module that imports onnxruntime for serving.

A :class:`LoadedModel` is one version of one model package, fully loaded: the session is created,
its inputs and outputs are checked against the manifest, and a warm-up run has succeeded before
anyone can see it. onnxruntime's errors are translated into edgewise's own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgewise.runtime.errors import InvalidInput, ModelLoadError, PackageError
from edgewise.runtime.package.datatypes import BYTES, numpy_dtype
from edgewise.runtime.package.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    TensorSpec,
    parse_manifest,
    read_manifest_bytes,
    verify_files,
)
from edgewise.runtime.package.paths import check_external_data, resolve_inside
from edgewise.runtime.package.schema import onnxruntime_inputs

if TYPE_CHECKING:
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.package.performance_estimation import PerformanceEstimator
    from edgewise.runtime.package.signing import TrustedKeys
    from edgewise.runtime.serving.batching import BatchingConfig
    from edgewise.runtime.serving.features import FeatureLookup
    from edgewise.runtime.serving.monitor import ModelMonitor
    from edgewise.runtime.serving.quality import OnlineQuality

__all__ = ["LoadedModel", "SessionSettings", "load_model"]


@dataclass(frozen=True)
class SessionSettings:
    """How onnxruntime sessions are built. Never "all host cores" unless asked for."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # Spinning keeps a second core busy even at batch 1; off unless asked for.
    allow_spinning: bool = False
    graph_optimization: str = "all"  # disabled | basic | extended | all
    # The CPU arena grows in doublings and never gives memory back: off under small memory limits.
    memory_arena: bool = True

    @classmethod
    def of(cls, settings: ServerSettings) -> SessionSettings:
        """The sessions a server with ``settings`` builds (also what batch and gate use, so a
        model is measured as it is served)."""
        return cls(
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            memory_arena=settings.memory_arena,
        )

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options.graph_optimization_level = levels[self.graph_optimization]
        options.enable_cpu_mem_arena = self.memory_arena
        options.enable_mem_pattern = self.memory_arena
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.log_severity_level = 3
        return options


def _edgewise_error(what: str, exc: Exception) -> Exception:
    """onnxruntime's exception ``exc`` as an edgewise error (ours pass through unchanged)."""
    if isinstance(exc, (InvalidInput, ModelLoadError)):
        return exc
    name = type(exc).__name__
    if name in ("InvalidArgument", "InvalidProtobuf", "NoSuchFile", "NotImplemented"):
        return InvalidInput(f"{what}: {exc}")
    return ModelLoadError(f"{what}: {name}: {exc}")


@dataclass(frozen=True, slots=True)
class _InputPlan:
    spec: TensorSpec
    dtype: np.dtype[Any]
    is_string: bool


class LoadedModel:
    """One model version, ready to run."""

    def __init__(
        self,
        name: str,
        version: int,
        folder: Path,
        manifest: Manifest,
        session: ort.InferenceSession,
        load_seconds: float,
    ) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.folder = folder
        self.manifest = manifest
        self.session = session
        self.load_seconds = load_seconds
        self.inputs: tuple[TensorSpec, ...] = manifest.inputs
        self.outputs: tuple[TensorSpec, ...] = manifest.outputs
        self.input_specs: dict[str, TensorSpec] = {t.name: t for t in manifest.inputs}
        self.output_names: tuple[str, ...] = tuple(t.name for t in manifest.outputs)
        self._plans = {
            t.name: _InputPlan(t, numpy_dtype(t.datatype), t.datatype == BYTES)
            for t in manifest.inputs
        }
        self._run = session.run
        # Set by the repository after loading: live statistics and drift (None: unmonitored,
        # with the reason in monitor_reason).
        self.monitor: ModelMonitor | None = None
        self.monitor_reason = "monitoring not set up"
        # Set by the repository from the model's config.json: dynamic batching, or None (off).
        self.batching: BatchingConfig | None = None
        # Set by the repository: the prediction join and online quality (None: off).
        self.quality: OnlineQuality | None = None
        # Set by the repository for a monitored classifier with a calibration: CBPE (None: off).
        self.performance: PerformanceEstimator | None = None
        # Set by the repository from config.json's features section: feature lookups (None: off).
        self.features: FeatureLookup | None = None

    @property
    def sha256(self) -> str:
        return self.manifest.model_sha256

    def check_input(self, name: str, datatype: str, shape: Sequence[int]) -> TensorSpec:
        """The spec of input ``name``, after checking the declared datatype and shape fit it."""
        spec = self.input_specs.get(name)
        if spec is None:
            expected = ", ".join(self.input_specs)
            raise InvalidInput(
                f"input {name!r} is not an input of model {self.name!r} (expected: {expected})"
            )
        if datatype != spec.datatype:
            raise InvalidInput(
                f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}"
            )
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise InvalidInput(
                f"input {name!r}: shape {list(shape)} does not match the model's "
                f"{list(spec.shape)} (-1 is any size)"
            )
        return spec

    def run(
        self,
        feeds: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run the model; ``feeds`` must hold every input, already checked by ``check_input``."""
        if len(feeds) != len(self._plans):
            missing = [n for n in self._plans if n not in feeds]
            raise InvalidInput(
                f"model {self.name!r} needs input(s) {', '.join(map(repr, missing))}"
            )
        prepared: dict[str, npt.NDArray[Any]] = {}
        for name, array in feeds.items():
            prepared[name] = _as_strings(name, array) if self._plans[name].is_string else array
        names = list(output_names) if output_names else list(self.output_names)
        try:
            results = self._run(names, prepared)
        except Exception as exc:
            translated = _edgewise_error(f"model {self.name!r} version {self.version}", exc)
            if translated is exc:
                raise
            raise translated from None
        return dict(zip(names, results, strict=True))


def _as_strings(name: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """onnxruntime string tensors want ``str`` objects; BYTES inputs arrive as ``bytes``."""
    return onnxruntime_inputs({name: array.astype(object, copy=False)})[name]


def _warmup_feeds(inputs: Sequence[TensorSpec]) -> dict[str, npt.NDArray[Any]]:
    feeds: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.datatype == BYTES:
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return feeds


def load_model(
    name: str,
    version: int,
    folder: Path,
    settings: SessionSettings,
    *,
    verify: bool = True,
    trusted: TrustedKeys | None = None,
) -> LoadedModel:
    """Load a package folder into a ready :class:`LoadedModel`.

    With ``trusted`` keys, the manifest's signature (``manifest.sig``) must verify against one
    of them first. ``verify`` checks every file against the manifest's sha256 and size. ONNX
    external data must stay inside the package (and, with ``verify``, be listed in it).

    Raises :class:`PackageError` for a bad package (:class:`~edgewise.runtime.package.signing.
    SignatureError` for a bad signature) and :class:`ModelLoadError` when onnxruntime refuses
    the model or the warm-up run fails; nothing half-loaded escapes.
    """
    started = time.perf_counter()
    raw_manifest = read_manifest_bytes(folder)
    if trusted is not None:
        from edgewise.runtime.package.signing import verify_package

        verify_package(folder, trusted, raw_manifest, name=name, version=version)
    manifest = parse_manifest(raw_manifest, str(folder / MANIFEST_FILE))
    if manifest.name != name:
        raise PackageError(f"{folder}: manifest names model {manifest.name!r}, not {name!r}")
    if verify:
        verify_files(folder, manifest)
    model_path = resolve_inside(folder, MODEL_FILE, "model file")
    try:
        # Read once: what is checked is what onnxruntime gets (no swap between check and load).
        content = model_path.read_bytes()
    except OSError as exc:
        raise PackageError(f"{model_path}: cannot read: {exc.strerror}") from None
    if verify and hashlib.sha256(content).hexdigest() != manifest.model_sha256:
        raise PackageError(f"{model_path}: changed while it was being loaded")
    external = check_external_data(
        model_path, folder, [f.path for f in manifest.files] if verify else None, content
    )
    try:
        session = ort.InferenceSession(
            # External data is opened relative to the model's path, so such a model loads by path.
            str(model_path) if external else content,
            sess_options=settings.session_options(),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:
        raise ModelLoadError(f"{model_path}: onnxruntime cannot load it: {exc}") from None
    del content
    session_inputs = {i.name for i in session.get_inputs()}
    declared = {t.name for t in manifest.inputs}
    if session_inputs != declared:
        raise ModelLoadError(
            f"{folder}: manifest inputs {sorted(declared)} differ from the model's "
            f"{sorted(session_inputs)}"
        )
    session_outputs = {o.name for o in session.get_outputs()}
    missing = [t.name for t in manifest.outputs if t.name not in session_outputs]
    if missing:
        raise ModelLoadError(f"{folder}: model has no output(s) {missing}")
    model = LoadedModel(name, version, folder, manifest, session, 0.0)
    try:
        model.run(_warmup_feeds(manifest.inputs))
    except (InvalidInput, ModelLoadError) as exc:
        raise ModelLoadError(f"{folder}: warm-up run failed: {exc}") from None
    model.load_seconds = time.perf_counter() - started
    return model
