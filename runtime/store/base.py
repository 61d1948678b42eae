"""What every metadata store offers, and the records it deals in.

A store holds, per registered model, numbered versions (each a model package's files with their
sha256 and size, and the lineage that made it), aliases naming a version (``production``), and
the state each edge node reports back (which version it serves, how healthy it is). Two
implementations: :mod:`.sqlite` (embedded, the default) and :mod:`.mlflow_rest` (the MLflow Model
Registry over its REST API, standard library only).

Store errors are edgewise errors: :class:`StoreUnavailable` (an :class:`Unavailable`: the store
cannot be reached, timed out or answered 5xx; worth retrying), :class:`StoreAuthError`
(credentials refused), :class:`~edgewise.runtime.errors.ModelNotFound` (no such model, version
or alias) and :class:`~edgewise.runtime.errors.PackageError` (the store holds something malformed
or unsafe, e.g. an artifact path that leaves the package folder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Final, Protocol

from edgewise.runtime.errors import (
    EdgewiseError,
    ErrorCode,
    InvalidInput,
    PackageError,
    Unavailable,
)
from edgewise.runtime.package.manifest import FileEntry
from edgewise.runtime.package.paths import validate_relative_path

__all__ = [
    "ALIAS_RE",
    "ArtifactCorrupt",
    "FileStream",
    "Lineage",
    "ModelSummary",
    "NodeReport",
    "Store",
    "StoreAuthError",
    "StoreUnavailable",
    "VersionRecord",
    "safe_join",
    "validate_alias",
    "validate_artifact_path",
    "validate_node_id",
]

ALIAS_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
_NODE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


class StoreUnavailable(Unavailable):
    """The store cannot be reached, timed out, or failed on its side (retry later)."""


class ArtifactCorrupt(PackageError):
    """A downloaded file does not have the sha256 or size the store recorded for it."""


class StoreAuthError(EdgewiseError):
    """The store refused the credentials (or their absence)."""

    code: ClassVar[ErrorCode] = ErrorCode.FAILED_PRECONDITION


def validate_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias) or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias):
        raise InvalidInput(
            f"alias {alias!r} is not valid: use 1-64 letters, digits, '_' or '-', starting with "
            "a letter or '_' ('latest' and 'v<number>' are reserved)"
        )
    return alias


def validate_node_id(node: str) -> str:
    if not _NODE_RE.match(node) or ".." in node:
        raise InvalidInput(
            f"node id {node!r} is not valid: use 1-100 letters, digits, '_', '.' or '-'"
        )
    return node


def validate_artifact_path(path: str) -> str:
    """Return ``path`` if it is a safe relative file path inside a package: POSIX separators,
    no empty, ``.`` or ``..`` segment, no absolute path, no backslash, each segment of letters,
    digits and ``_.-``. Anything else raises :class:`PackageError` (it never reaches the disk)."""
    return validate_relative_path(path, "artifact path")


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative`` after :func:`validate_artifact_path`, refusing symbolic links on the
    way (an existing link anywhere below ``root`` would let a write land outside it)."""
    validate_artifact_path(relative)
    target = root
    for segment in relative.split("/"):
        target = target / segment
        if target.is_symlink():
            raise PackageError(f"{target}: is a symbolic link; refusing to follow it")
    return target


@dataclass(frozen=True)
class Lineage:
    """Where a model version came from."""

    code_version: str = "unknown"  # git commit of the training code, or "unknown"
    code_dirty: bool | None = None  # uncommitted changes in the training code's work tree
    code_origin: str = ""  # the remote the commit can be found in, when known
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    data_fingerprint: str = ""  # "sha256:<hex>" over the training data files
    data_sources: tuple[str, ...] = ()
    created_at: str = ""  # when it was registered (UTC, ISO 8601)
    author: str = ""
    package_created_at: str = ""  # when the package was converted (its manifest)
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "code_version": self.code_version,
            "code_dirty": self.code_dirty,
            "code_origin": self.code_origin,
            "params": dict(self.params),
            "metrics": dict(self.metrics),
            "data_fingerprint": self.data_fingerprint,
            "data_sources": list(self.data_sources),
            "created_at": self.created_at,
            "author": self.author,
            "package_created_at": self.package_created_at,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lineage:
        try:
            dirty = data.get("code_dirty")
            return cls(
                code_version=str(data.get("code_version", "unknown")),
                code_dirty=None if dirty is None else bool(dirty),
                code_origin=str(data.get("code_origin", "")),
                params={str(k): str(v) for k, v in dict(data.get("params", {})).items()},
                metrics={str(k): float(v) for k, v in dict(data.get("metrics", {})).items()},
                data_fingerprint=str(data.get("data_fingerprint", "")),
                data_sources=tuple(str(s) for s in data.get("data_sources", ())),
                created_at=str(data.get("created_at", "")),
                author=str(data.get("author", "")),
                package_created_at=str(data.get("package_created_at", "")),
                extra={str(k): str(v) for k, v in dict(data.get("extra", {})).items()},
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise PackageError(f"malformed lineage: {exc}") from None


@dataclass(frozen=True)
class VersionRecord:
    """One version of a registered model, as the store describes it."""

    name: str
    version: int
    model_sha256: str
    files: tuple[FileEntry, ...]  # every file of the package, manifest.json included
    lineage: Lineage
    aliases: tuple[str, ...] = ()
    description: str = ""
    location: str = ""  # where the files are (store-specific, for messages)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise PackageError(f"{self.name} version {self.version} has no file {path!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model_sha256": self.model_sha256,
            "files": [f.to_json() for f in self.files],
            "lineage": self.lineage.to_json(),
            "aliases": list(self.aliases),
            "description": self.description,
            "location": self.location,
        }


@dataclass(frozen=True)
class ModelSummary:
    name: str
    latest_version: int | None
    aliases: Mapping[str, int]
    description: str = ""


@dataclass(frozen=True)
class NodeReport:
    """What a node's agent reports: the version it serves and how that went."""

    node: str
    model: str
    version: int | None  # the version being served (None: nothing deployed yet)
    sha256: str = ""
    health: str = "unknown"  # ok | degraded | failing | unknown
    state: str = ""  # idle | downloading | validating | switching | watching | rolled_back ...
    detail: str = ""  # last error or note, one line
    target_version: int | None = None  # what the alias names now
    updated_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "model": self.model,
            "version": self.version,
            "sha256": self.sha256,
            "health": self.health,
            "state": self.state,
            "detail": self.detail[:500],
            "target_version": self.target_version,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeReport:
        version = data.get("version")
        target = data.get("target_version")
        return cls(
            node=str(data["node"]),
            model=str(data["model"]),
            version=None if version is None else int(version),
            sha256=str(data.get("sha256", "")),
            health=str(data.get("health", "unknown")),
            state=str(data.get("state", "")),
            detail=str(data.get("detail", "")),
            target_version=None if target is None else int(target),
            updated_at=str(data.get("updated_at", "")),
        )


class FileStream(Protocol):
    """An open artifact, read from ``offset`` (0 when the store could not resume)."""

    offset: int

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


class Store(Protocol):
    """A metadata store. Implementations are used from one thread at a time."""

    uri: str

    def publish(
        self,
        name: str,
        folder: Path,
        files: tuple[FileEntry, ...],
        lineage: Lineage,
        description: str = "",
    ) -> VersionRecord:
        """Store the package files (listed with their checksums, already verified by the caller)
        as a new version; returns it. A crash leaves no half-written version."""
        ...

    def list_models(self) -> list[ModelSummary]: ...

    def list_versions(self, name: str) -> list[VersionRecord]:
        """Every version, newest first."""
        ...

    def get_version(self, name: str, version: int) -> VersionRecord: ...

    def resolve_alias(self, name: str, alias: str) -> VersionRecord: ...

    def set_alias(self, name: str, alias: str, version: int) -> None: ...

    def delete_alias(self, name: str, alias: str) -> None: ...

    def open_file(self, record: VersionRecord, entry: FileEntry, offset: int = 0) -> FileStream:
        """Stream one file of a version, from ``offset`` where the store can resume."""
        ...

    def report_node(self, report: NodeReport) -> None: ...

    def node_reports(self, name: str) -> list[NodeReport]: ...

    def set_model_tag(self, name: str, key: str, value: str | None) -> None:
        """Set a tag of a registered model (None: delete it; a missing one is no error): the
        rollout policy of an alias and the agents' rollout decisions (docs/rollout.md)."""
        ...

    def model_tags(self, name: str, prefix: str = "") -> dict[str, str]:
        """A model's tags whose keys start with ``prefix``."""
        ...

    def close(self) -> None: ...


class LocalFileStream:
    """A :class:`FileStream` over a local file."""

    def __init__(self, handle: BinaryIO, offset: int) -> None:
        self._handle = handle
        self.offset = offset

    def read(self, size: int) -> bytes:
        return self._handle.read(size)

    def close(self) -> None:
        self._handle.close()
