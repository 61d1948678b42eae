"""The serving core: repository, onnxruntime model, codecs, batching, admission,
shedding, the request pipeline every front end calls, monitoring, online quality, metrics.

The public names are imported on first use: the client imports the codecs from here
without loading onnxruntime or numba."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgewise.runtime.serving.dataplane import DataPlane
    from edgewise.runtime.serving.model import LoadedModel, SessionSettings, load_model
    from edgewise.runtime.serving.monitor import DriftReport, ModelMonitor
    from edgewise.runtime.serving.pipeline import InferenceCore
    from edgewise.runtime.serving.repository import ModelConfig, ModelRepository, VersionPolicy

__all__ = [
    "DataPlane",
    "DriftReport",
    "InferenceCore",
    "LoadedModel",
    "ModelConfig",
    "ModelMonitor",
    "ModelRepository",
    "SessionSettings",
    "VersionPolicy",
    "load_model",
]

_HOMES = {
    "DataPlane": "edgewise.runtime.serving.dataplane",
    "LoadedModel": "edgewise.runtime.serving.model",
    "SessionSettings": "edgewise.runtime.serving.model",
    "load_model": "edgewise.runtime.serving.model",
    "DriftReport": "edgewise.runtime.serving.monitor",
    "ModelMonitor": "edgewise.runtime.serving.monitor",
    "InferenceCore": "edgewise.runtime.serving.pipeline",
    "ModelConfig": "edgewise.runtime.serving.repository",
    "ModelRepository": "edgewise.runtime.serving.repository",
    "VersionPolicy": "edgewise.runtime.serving.repository",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
