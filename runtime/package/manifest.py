"""The model package: one folder ``<repo>/<model>/<version>/`` that the server, the agent and the
batch scorer all read.

Layout of a package folder::

    model.onnx        the model
    manifest.json     this module's :class:`Manifest` (format ``edgewise.package/1``)
    profile.json      optional reference profile of the training data (see ``profile`` in the
                      manifest; filled by the drift work, absent packages are served unmonitored)

The manifest is plain JSON (no pickle), versioned by its ``format`` field, and records the input
schema (which features go into which tensor, in which order), the outputs, the parity figures of
the conversion, the sha256 and size of every file, and the library versions that made it.

Packages are written atomically: files go to a hidden staging folder beside the final one, are
fsynced, and the folder is renamed into place, so a reader never sees half a package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from edgewise.runtime._fs import fsync_dir, write_text_atomic
from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.package.datatypes import V2_DATATYPES
from edgewise.runtime.package.paths import ensure_inside, resolve_inside, validate_relative_path

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "PACKAGE_FORMAT",
    "PROFILE_FILE",
    "Feature",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "list_versions",
    "parse_manifest",
    "read_manifest",
    "read_manifest_bytes",
    "sha256_file",
    "staging_dir",
    "validate_model_name",
    "verify_files",
    "write_manifest",
]

PACKAGE_FORMAT: Final = "edgewise.package/1"
MANIFEST_FILE: Final = "manifest.json"
MODEL_FILE: Final = "model.onnx"
PROFILE_FILE: Final = "profile.json"

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_VERSION_DIR_RE: Final = re.compile(r"^[1-9][0-9]{0,17}$")
_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_STAGING_PREFIX: Final = ".staging-"

FeatureKind = Literal["numeric", "categorical"]
Task = Literal["classification", "regression", "other"]


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name (letters, digits, ``_.-``; no path parts)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidInput(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the V2 protocol describes it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in V2_DATATYPES:
            raise PackageError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            datatype=str(data["datatype"]),
            shape=tuple(int(d) for d in data["shape"]),
        )


@dataclass(frozen=True)
class Feature:
    """One column of the training data and where it goes in the model's inputs.

    ``input`` names the tensor; ``column`` is the feature's index along that tensor's last axis
    (numeric features share one ``[batch, n]`` tensor; a categorical feature has its own).
    """

    name: str
    kind: FeatureKind
    input: str
    column: int
    dtype: str  # the dtype seen in the sample (e.g. "float64", "int64", "object")
    categories: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["categories"] = list(self.categories)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Feature:
        kind = str(data["kind"])
        if kind not in ("numeric", "categorical"):
            raise PackageError(f"feature {data.get('name')!r}: unknown kind {kind!r}")
        return cls(
            name=str(data["name"]),
            kind=kind,  # type: ignore[arg-type]
            input=str(data["input"]),
            column=int(data["column"]),
            dtype=str(data["dtype"]),
            categories=tuple(str(c) for c in data.get("categories", ())),
        )


@dataclass(frozen=True)
class FileEntry:
    """A file of the package with its checksum."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        path = validate_relative_path(str(data["path"]), "file path")
        sha256 = str(data["sha256"])
        if not _SHA256_RE.match(sha256):
            raise PackageError(f"file {path!r}: sha256 {sha256[:80]!r} is not 64 hex digits")
        size = int(data["size"])
        if size < 0:
            raise PackageError(f"file {path!r}: negative size {size}")
        return cls(path=path, sha256=sha256, size=size)


@dataclass(frozen=True)
class Manifest:
    """Everything a consumer needs to know about a package without opening the model."""

    name: str
    task: Task
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    features: tuple[Feature, ...]
    files: tuple[FileEntry, ...]
    opset: int
    parity: Mapping[str, Any] = field(default_factory=dict)
    libraries: Mapping[str, str] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    # None until the drift work fills it: {"file": "profile.json", "format": "..."}.
    profile: Mapping[str, Any] | None = None
    # Per-model serving configuration (batching, monitoring windows, ...), free-form for now.
    config: Mapping[str, Any] = field(default_factory=dict)
    format: str = PACKAGE_FORMAT

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise PackageError(f"manifest of {self.name!r} lists no file {path!r}")

    @property
    def model_sha256(self) -> str:
        return self.file(MODEL_FILE).sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "task": self.task,
            "opset": self.opset,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "features": [f.to_json() for f in self.features],
            "files": [f.to_json() for f in self.files],
            "parity": dict(self.parity),
            "libraries": dict(self.libraries),
            "source": dict(self.source),
            "created_at": self.created_at,
            "profile": None if self.profile is None else dict(self.profile),
            "config": dict(self.config),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            fmt = str(data["format"])
            if fmt != PACKAGE_FORMAT:
                raise PackageError(f"unknown package format {fmt!r} (expected {PACKAGE_FORMAT!r})")
            task = str(data.get("task", "other"))
            if task not in ("classification", "regression", "other"):
                raise PackageError(f"unknown task {task!r}")
            profile = data.get("profile")
            if profile is not None:
                profile = dict(profile)
                validate_relative_path(str(profile.get("file", PROFILE_FILE)), "profile file")
            return cls(
                format=fmt,
                name=validate_model_name(str(data["name"])),
                task=task,  # type: ignore[arg-type]
                opset=int(data["opset"]),
                inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
                features=tuple(Feature.from_json(f) for f in data.get("features", ())),
                files=tuple(FileEntry.from_json(f) for f in data["files"]),
                parity=dict(data.get("parity", {})),
                libraries={str(k): str(v) for k, v in dict(data.get("libraries", {})).items()},
                source=dict(data.get("source", {})),
                created_at=str(data.get("created_at", "")),
                profile=None if profile is None else dict(profile),
                config=dict(data.get("config", {})),
            )
        except PackageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, InvalidInput) as e:
            raise PackageError(f"malformed manifest: {type(e).__name__}: {e}") from None


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: Path, relative: str) -> FileEntry:
    """A :class:`FileEntry` for ``folder/relative`` as it is on disk now."""
    path = folder / relative
    return FileEntry(path=relative, sha256=sha256_file(path), size=path.stat().st_size)


def read_manifest_bytes(folder: Path) -> bytes:
    """The bytes of ``folder/manifest.json`` (what a signature covers); :class:`PackageError`
    if it is missing, unreadable or a symbolic link leaving ``folder``."""
    path = folder / MANIFEST_FILE
    try:
        if path.is_symlink():
            ensure_inside(folder, path, str(path))
        return path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{folder}: no {MANIFEST_FILE}") from None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read: {exc.strerror}") from None


def parse_manifest(raw: bytes, where: str = MANIFEST_FILE) -> Manifest:
    """A :class:`Manifest` from the bytes of a manifest file; :class:`PackageError` naming
    ``where`` for anything malformed."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise PackageError(f"{where}: nested too deeply") from None
    if not isinstance(data, dict):
        raise PackageError(f"{where}: expected a JSON object")
    return Manifest.from_json(data)


def read_manifest(folder: Path) -> Manifest:
    """Parse ``folder/manifest.json``; :class:`PackageError` if it is missing or malformed."""
    return parse_manifest(read_manifest_bytes(folder), str(folder / MANIFEST_FILE))


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check that every file the manifest lists exists inside ``folder`` (no symbolic link
    leaving it) with its recorded size and sha256."""
    for entry in manifest.files:
        path = resolve_inside(folder, entry.path, "file")
        if not path.is_file():
            raise PackageError(f"{folder}: missing file {entry.path!r}")
        size = path.stat().st_size
        if size != entry.size:
            raise PackageError(
                f"{path}: size {size} differs from the manifest's {entry.size} bytes"
            )
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise PackageError(f"{path}: sha256 {digest[:12]}… differs from the manifest's")


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` into ``folder`` atomically (:func:`write_text_atomic`)."""
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n"
    write_text_atomic(folder / MANIFEST_FILE, text)


def list_versions(model_dir: Path) -> list[int]:
    """Integer version folders of a model, ascending. Staging and stray entries are ignored, and
    so is a version folder that is a symbolic link leaving the repository (``model_dir``'s
    parent)."""
    if not model_dir.is_dir():
        return []
    versions = []
    for entry in model_dir.iterdir():
        if not _VERSION_DIR_RE.match(entry.name) or not entry.is_dir():
            continue
        if entry.is_symlink():
            try:
                ensure_inside(model_dir.parent, entry)
            except PackageError:
                continue
        versions.append(int(entry.name))
    return sorted(versions)


@contextlib.contextmanager
def staging_dir(repo: Path, name: str, version: int | None = None) -> Iterator[tuple[Path, int]]:
    """Build a package in a hidden staging folder and publish it atomically on success.

    Yields ``(folder, version)``. ``version`` None takes the next free integer. On leaving the
    block normally, every file in the folder is fsynced and the folder is renamed to
    ``repo/name/version``; if that version appeared meanwhile (a concurrent writer), the next free
    one is taken, unless ``version`` was given explicitly, which raises :class:`PackageError`. On an
    exception the staging folder is removed and nothing is published.
    """
    validate_model_name(name)
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    chosen = version if version is not None else (max(list_versions(model_dir), default=0) + 1)
    try:
        yield staging, chosen
        for child in staging.iterdir():
            if child.is_file():
                with child.open("rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(staging)
        while True:
            target = model_dir / str(chosen)
            try:
                os.rename(staging, target)  # fails if target exists and is non-empty
                break
            except OSError:
                if version is not None or not target.exists():
                    raise PackageError(f"{target} already exists") from None
                chosen = max(list_versions(model_dir), default=0) + 1
        fsync_dir(model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
