"""``<repo>/<model>/config.json``: a model's version policy, pinned default version and the
monitoring, batching and quality sections, and the one rule for the version a model answers
when none is named. Part of the repository's on-disk format, so the agent, batch and the CLI
read and write it without importing the serving core (and onnxruntime)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.errors import InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.package.manifest import list_versions

__all__ = [
    "MODEL_CONFIG_FILE",
    "ModelConfig",
    "VersionPolicy",
    "default_version",
    "pick_default",
    "read_model_config",
    "write_model_config",
]

MODEL_CONFIG_FILE: Final = "config.json"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk a model serves: the latest N, all, or a specific list."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def select(self, available: list[int]) -> list[int]:
        if self.all:
            return sorted(available)
        if self.specific:
            return sorted(v for v in available if v in self.specific)
        count = self.latest or 1
        return sorted(available)[-count:]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VersionPolicy:
        if data.get("all"):
            return cls(latest=None, all=True)
        if "specific" in data:
            versions = tuple(int(v) for v in data["specific"])
            if not versions or any(v < 1 for v in versions):
                raise ValueError("specific versions must be a non-empty list of integers >= 1")
            return cls(latest=None, specific=versions)
        latest = int(data.get("latest", 1))
        if latest < 1:
            raise ValueError("latest must be >= 1")
        return cls(latest=latest)

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """From a CLI string: ``latest:N``, ``all`` or ``specific:1,3``."""
        kind, _, arg = text.partition(":")
        try:
            if kind == "all" and not arg:
                return cls(latest=None, all=True)
            if kind == "latest":
                return cls.from_json({"latest": int(arg or 1)})
            if kind == "specific":
                return cls.from_json({"specific": [int(v) for v in arg.split(",") if v]})
        except ValueError as exc:
            raise InvalidInput(f"version policy {text!r}: {exc}") from None
        raise InvalidInput(f"version policy {text!r}: use latest:N, all, or specific:V1,V2")


@dataclass(frozen=True)
class ModelConfig:
    """``<repo>/<model>/config.json``: the version policy and an optional pinned default version
    (the sync agent pins the last good version here so a restarted server serves it)."""

    version_policy: VersionPolicy
    default_version: int | None = None
    monitoring: Mapping[str, Any] | None = None
    batching: Mapping[str, Any] | None = None
    quality: Mapping[str, Any] | None = None
    capture: Mapping[str, Any] | None = None  # {"rate": R}: this model's capture sampling rate
    features: Mapping[str, Any] | None = None  # feature lookups (docs/features.md)

    def to_json(self) -> dict[str, Any]:
        policy = self.version_policy
        if policy.all:
            policy_json: dict[str, Any] = {"all": True}
        elif policy.specific:
            policy_json = {"specific": list(policy.specific)}
        else:
            policy_json = {"latest": policy.latest or 1}
        data: dict[str, Any] = {"version_policy": policy_json}
        if self.default_version is not None:
            data["default_version"] = self.default_version
        if self.monitoring is not None:
            data["monitoring"] = dict(self.monitoring)
        if self.batching is not None:
            data["batching"] = dict(self.batching)
        if self.quality is not None:
            data["quality"] = dict(self.quality)
        if self.capture is not None:
            data["capture"] = dict(self.capture)
        if self.features is not None:
            data["features"] = dict(self.features)
        return data


def read_model_config(model_dir: Path, default_policy: VersionPolicy) -> ModelConfig:
    path = model_dir / MODEL_CONFIG_FILE
    if not path.exists():
        return ModelConfig(default_policy)
    try:
        data = json.loads(path.read_text())
        policy = (
            VersionPolicy.from_json(data["version_policy"])
            if "version_policy" in data
            else default_policy
        )
        default = data.get("default_version")
        sections = {}
        for key in ("monitoring", "batching", "quality", "capture", "features"):
            value = data.get(key)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{key} must be an object")
            sections[key] = value
        return ModelConfig(policy, None if default is None else int(default), **sections)
    except (
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise PackageError(f"{path}: invalid model config: {exc}") from None


def write_model_config(model_dir: Path, config: ModelConfig) -> None:
    """Write ``config.json`` atomically (:func:`edgewise.runtime._fs.write_text_atomic`)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(model_dir / MODEL_CONFIG_FILE, json.dumps(config.to_json(), indent=2) + "\n")


def pick_default(available: Iterable[int], config: ModelConfig) -> int | None:
    """The one rule for the version a model answers when none is named, everywhere (the
    server, ``edgewise batch``, ``evaluate``, ``gate``): ``config.json``'s ``default_version``
    when it is among ``available``, else the highest version the version policy selects from
    them, else the highest of them; None when there is none."""
    versions = sorted(set(available))
    if not versions:
        return None
    if config.default_version in versions:
        return config.default_version
    selected = config.version_policy.select(versions)
    return max(selected or versions)


def default_version(model_dir: Path) -> int:
    """:func:`pick_default` over the versions on disk of the model in ``model_dir``, under the
    version policy of its ``config.json``, else ``latest:1`` (``edgewise batch``, ``evaluate``
    and ``gate`` do not know a server's ``--version-policy``): the version a server serves by
    default unless a server-wide ``specific:`` policy applies (``latest:N`` and ``all`` select
    the highest version too). :class:`ModelNotFound` when the model has no versions."""
    picked = pick_default(list_versions(model_dir), read_model_config(model_dir, VersionPolicy()))
    if picked is None:
        raise ModelNotFound(f"model {model_dir.name!r} has no versions in {model_dir.parent}")
    return picked
