"""Path safety: every name, version and relative path that reaches the disk goes through here.

A model repository is written by people, scripts and the sync agent, and read by a server that
may run with more rights than whoever dropped a file into it. The rules:

- a relative path inside a package (a manifest's file list, a store's artifact list, ONNX
  external data) is POSIX, relative, made of short segments of letters, digits and ``_.-``, with
  no empty, ``.`` or ``..`` segment, no backslash and no leading slash
  (:func:`validate_relative_path`);
- a version is a positive decimal integer in ASCII digits (:func:`parse_version`): ``"²"`` and
  ``"٣"`` are digits to :meth:`str.isdigit` but not versions;
- a folder or file found inside the repository may be a symbolic link only if it resolves inside
  the folder it is checked against (:func:`ensure_inside`): links that stay inside (git-sync or a
  Kubernetes volume's ``..data``) are fine, links that leave are refused;
- ONNX external data (a tensor stored in another file, which onnxruntime opens relative to the
  model) must name a file of the package, inside the package (:func:`check_external_data`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.errors import InvalidInput, PackageError

__all__ = [
    "check_external_data",
    "ensure_inside",
    "external_data_locations",
    "parse_version",
    "resolve_inside",
    "validate_relative_path",
]

_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_VERSION_RE: Final = re.compile(r"^[1-9][0-9]{0,17}$")
MAX_PATH_CHARS: Final = 512
MAX_SEGMENTS: Final = 8


def validate_relative_path(path: str, what: str = "path") -> str:
    """Return ``path`` if it is a safe relative path inside a package, else raise
    :class:`PackageError` naming ``what`` (the path never reaches the disk)."""
    segments = path.split("/") if isinstance(path, str) else []
    if (
        not isinstance(path, str)
        or not path
        or len(path) > MAX_PATH_CHARS
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or len(segments) > MAX_SEGMENTS
        or any(s in ("", ".", "..") or not _SEGMENT_RE.match(s) for s in segments)
    ):
        raise PackageError(f"{what} {path!r} is not a safe relative path inside a package")
    return path


def parse_version(text: str, what: str = "version") -> int:
    """A version number from text: ASCII digits, no sign, no leading zero, at least 1."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        raise InvalidInput(f"{what} {text!r} is not a positive integer")
    return int(text)


def ensure_inside(root: Path, path: Path, what: str = "") -> Path:
    """``path`` resolved, after checking that it (and every link on the way) stays inside
    ``root`` (resolved too); :class:`PackageError` otherwise. ``path`` need not exist."""
    base = root.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise PackageError(f"{what or path}: cannot resolve: {exc}") from None
    if real != base and base not in real.parents:
        raise PackageError(
            f"{what or path}: resolves to {real}, outside {base} (a symbolic link leaving it)"
        )
    return real


def resolve_inside(root: Path, relative: str, what: str = "path") -> Path:
    """``root / relative`` for a validated ``relative`` path that stays inside ``root``."""
    validate_relative_path(relative, what)
    target = root / relative
    ensure_inside(root, target, f"{what} {relative!r}")
    return target


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers, sparse initializers and attribute
    tensors, in nested graphs too (if/loop/scan bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes: Iterable[Any]) -> Iterator[Any]:
    for attribute in attributes:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _tensors(graph)
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices


def external_data_locations(model_path: Path, content: bytes | None = None) -> list[str]:
    """The ``location`` of every tensor of an ONNX model (the file, or its ``content`` already
    read) whose data lives in another file (``data_location == EXTERNAL``), read without loading
    that data."""
    import onnx

    try:
        if content is None:
            model = onnx.load(str(model_path), load_external_data=False)
        else:
            model = onnx.load_model_from_string(content)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PackageError(f"{model_path}: not a readable ONNX model: {first}") from None
    locations: list[str] = []
    tensors = list(_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_attribute_tensors(node.attribute))
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {item.key: item.value for item in tensor.external_data}
        location = entries.get("location")
        if location is None:
            raise PackageError(
                f"{model_path}: tensor {tensor.name!r} is stored externally without a location"
            )
        locations.append(location)
    return locations


def check_external_data(
    model_path: Path,
    package_dir: Path,
    listed: Iterable[str] | None = None,
    content: bytes | None = None,
) -> list[str]:
    """Refuse ONNX external data that points outside the package: every location must be a
    safe relative path, resolve inside ``package_dir`` and, when ``listed`` (the manifest's
    files) is given, be one of them (so its sha256 was checked). Returns the locations."""
    locations = external_data_locations(model_path, content)
    allowed = None if listed is None else set(listed)
    for location in locations:
        # onnx writes locations with the platform's separator; only POSIX relative ones pass.
        normalised = location.replace(os.sep, "/") if os.sep != "/" else location
        what = f"{model_path.name}: external data location"
        validate_relative_path(normalised, what)
        ensure_inside(package_dir, package_dir / normalised, f"{what} {location!r}")
        if allowed is not None and normalised not in allowed:
            raise PackageError(
                f"{what} {location!r} is not a file listed in the manifest (its checksum "
                "would not be verified)"
            )
    return locations
