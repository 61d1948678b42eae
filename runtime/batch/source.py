"""Where a batch job's model comes from: a repository folder (``--repo REPO --model NAME[:V]``)
or a metadata store by URI (``--model models:/NAME@ALIAS`` or ``models:/NAME/VERSION``).

A store's version is downloaded into a cache folder with the agent's own transfer
(:func:`~edgewise.runtime.store.transfer.fetch_file`: resumable, size and sha256 of every file
checked against the store's record) and laid out as a repository, ``CACHE/<store>/<sha256>/NAME/
VERSION``: content-addressed, so a cached version is never reused for other bytes. The manifest's
model sha256 must be the store's; the job's load (:func:`~edgewise.runtime.serving.model.
load_model`) then checks every file against the manifest and, with trusted keys, the signature
first, as the agent's validation does: it must sign this model as the store's version number,
and, as the cache holds no ``config.json``, with no config sections (see
:mod:`edgewise.runtime.package.signing`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgewise.runtime.errors import InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.package.manifest import read_manifest, validate_model_name

__all__ = [
    "MODELS_SCHEME",
    "ModelRef",
    "ModelSource",
    "default_cache",
    "parse_model_uri",
    "resolve",
]

MODELS_SCHEME: Final = "models:/"


@dataclass(frozen=True)
class ModelRef:
    """``models:/NAME@ALIAS`` (alias) or ``models:/NAME/VERSION`` (version)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{MODELS_SCHEME}{self.name}@{self.alias}"
        return f"{MODELS_SCHEME}{self.name}/{self.version}"


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a repository-shaped folder (``model_dir/VERSION``)."""

    name: str
    pinned: int | None  # the version asked for (always set for a store)
    model_dir: Path
    where: str  # for messages: "the repository R" or "store S"
    uri: str | None = None  # the models:/ URI, for a store
    store_sha256: str | None = None  # the store's record of the model file's sha256


def parse_model_uri(text: str) -> ModelRef:
    """Parse ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (:class:`InvalidInput` naming
    what is wrong)."""
    from edgewise.runtime.store.base import validate_alias

    rest = text[len(MODELS_SCHEME) :]
    if "@" in rest:
        name, _, alias = rest.partition("@")
        validate_model_name(name)
        if not alias:
            raise InvalidInput(f"model {text!r}: the alias after '@' is empty")
        return ModelRef(name, alias=validate_alias(alias))
    name, sep, version = rest.partition("/")
    if not sep:
        raise InvalidInput(f"model {text!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    validate_model_name(name)
    if not version.isascii() or not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"model {text!r}: the version must be a positive integer")
    return ModelRef(name, version=int(version))


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/edgewise/models``, else ``~/.cache/edgewise/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgewise" / "models"


def resolve(
    model: str,
    repo: Path | None,
    store: str | None,
    store_timeout: float,
    cache: Path | None,
) -> ModelSource:
    """The model of ``--model``: from ``repo`` for ``NAME[:VERSION]``, from the store (downloaded
    and checked) for a ``models:/`` URI."""
    if not model.startswith(MODELS_SCHEME):
        from edgewise.runtime.batch.options import parse_model_ref

        name, pinned = parse_model_ref(model)
        if repo is None:
            raise InvalidInput(
                f"model {model!r}: give --repo, or a store URI (models:/NAME@ALIAS or "
                "models:/NAME/VERSION)"
            )
        model_dir = repo / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"no model {name!r} in the repository {repo}")
        return ModelSource(name, pinned, model_dir, f"the repository {repo}")
    if repo is not None:
        raise InvalidInput(f"model {model!r} comes from a store: drop --repo")
    ref = parse_model_uri(model)
    return _from_store(ref, store, store_timeout, cache or default_cache())


def _from_store(ref: ModelRef, store_text: str | None, timeout: float, cache: Path) -> ModelSource:
    from edgewise.runtime.store import open_store, parse_store_uri
    from edgewise.runtime.store.transfer import fetch_file

    uri = parse_store_uri(store_text or os.environ.get("EDGEWISE_STORE"))
    uri = uri.with_credentials(
        os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    )
    store = open_store(uri, timeout=timeout)
    try:
        if ref.alias is not None:
            record = store.resolve_alias(ref.name, ref.alias)
        else:
            assert ref.version is not None
            record = store.get_version(ref.name, ref.version)
        if record.name != ref.name:
            raise PackageError(f"store {uri} answered for model {record.name!r}, not {ref.name!r}")
        store_key = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
        model_dir = cache / store_key / record.model_sha256[:32] / ref.name
        version_dir = model_dir / str(record.version)
        for entry in record.files:
            fetch_file(store, record, entry, version_dir)
    finally:
        store.close()
    manifest = read_manifest(version_dir)
    if manifest.model_sha256 != record.model_sha256:
        raise PackageError(
            f"{ref}: the manifest's model sha256 {manifest.model_sha256[:12]}… differs from the "
            f"store's {record.model_sha256[:12]}…"
        )
    return ModelSource(
        ref.name, record.version, model_dir, f"store {uri}", str(ref), record.model_sha256
    )
