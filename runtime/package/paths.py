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

The ONNX facts needed here and when labels are checked (external data locations, a classifier's
class labels: :func:`graph_class_labels`) are read from the protobuf wire format, without
importing ``onnx``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from edgewise.runtime.errors import InvalidInput, PackageError

__all__ = [
    "check_external_data",
    "ensure_inside",
    "external_data_locations",
    "graph_class_labels",
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


# ---- ONNX external data, read from the protobuf wire format --------------------------------
#
# A model load must not import ``onnx`` (and its ml_dtypes): ~1 s in a fresh process. The few
# fields that lead to a tensor are read straight from the wire format (field numbers of
# onnx/onnx.proto); everything else is skipped by its length.

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS: Final = (1, 2)  # TrainingInfoProto.initialization, .algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTRIBUTE_NAME, _ATTRIBUTE_INTS, _ATTRIBUTE_STRINGS = 1, 8, 9
_FUNCTION_NODE = 7
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL: Final = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_NESTING: Final = 64
_T = TypeVar("_T")


class _Malformed(Exception):
    """The bytes are not a protobuf message."""


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise _Malformed("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of a message: an int, or a memoryview for a
    length-delimited field (fixed-width fields are skipped and given as 0)."""
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, position = _varint(data, position)
            yield number, wire, value
        elif wire == _LENGTH:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise _Malformed("a field runs past the end of its message")
            yield number, wire, data[position : position + length]
            position += length
        elif wire in (_FIXED64, _FIXED32):
            position += 8 if wire == _FIXED64 else 4
            if position > len(data):
                raise _Malformed("a fixed-width field runs past the end of its message")
            yield number, wire, 0
        else:
            raise _Malformed(f"wire type {wire} (groups are not used by ONNX)")


def _messages(data: memoryview, *numbers: int) -> Iterator[memoryview]:
    for number, wire, value in _fields(data):
        if number in numbers and wire == _LENGTH:
            yield value


def _graph_tensors(graph: memoryview, depth: int) -> Iterator[memoryview]:
    """Every TensorProto of a GraphProto: initializers, sparse initializers and attribute
    tensors, in nested graphs too (if/loop/scan bodies)."""
    if depth > _MAX_NESTING:
        raise _Malformed("graphs nested too deep")
    for number, wire, value in _fields(graph):
        if wire != _LENGTH:
            continue
        if number == _GRAPH_INITIALIZER:
            yield value
        elif number == _GRAPH_SPARSE_INITIALIZER:
            yield from _messages(value, _SPARSE_VALUES, _SPARSE_INDICES)
        elif number == _GRAPH_NODE:
            yield from _node_tensors(value, depth)


def _node_tensors(node: memoryview, depth: int) -> Iterator[memoryview]:
    for attribute in _messages(node, _NODE_ATTRIBUTE):
        for number, wire, value in _fields(attribute):
            if wire != _LENGTH:
                continue
            if number in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
                yield value
            elif number in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
                yield from _graph_tensors(value, depth + 1)
            elif number in (_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS):
                yield from _messages(value, _SPARSE_VALUES, _SPARSE_INDICES)


def _model_tensors(model: memoryview) -> Iterator[memoryview]:
    for number, wire, value in _fields(model):
        if wire != _LENGTH:
            continue
        if number == _MODEL_GRAPH:
            yield from _graph_tensors(value, 0)
        elif number == _MODEL_TRAINING_INFO:
            for graph in _messages(value, *_TRAINING_GRAPHS):
                yield from _graph_tensors(graph, 0)
        elif number == _MODEL_FUNCTIONS:
            for node in _messages(value, _FUNCTION_NODE):
                yield from _node_tensors(node, 0)


def _text(value: memoryview) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a string field is not UTF-8") from None


def _external_location(tensor: memoryview, model_path: Path) -> str | None:
    """A TensorProto's external data location, None when its data is inside the model."""
    name = ""
    external = False
    location = None
    for number, wire, value in _fields(tensor):
        if number == _TENSOR_NAME and wire == _LENGTH:
            name = _text(value)
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = value == _EXTERNAL  # the last one read counts, as in protobuf
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LENGTH:
            entry = {k: _text(v) for k, w, v in _fields(value) if w == _LENGTH}
            if entry.get(_ENTRY_KEY) == "location":
                location = entry.get(_ENTRY_VALUE, "")
    if not external:
        return None
    if location is None:
        raise PackageError(f"{model_path}: tensor {name!r} is stored externally without a location")
    return location


def _parse_model(
    model_path: Path, content: bytes | None, marker: bytes, parse: Callable[[memoryview], _T]
) -> _T | None:
    """``parse`` over an ONNX model (the file, or its ``content`` already read); None, unparsed,
    when ``marker`` (a field name, stored verbatim) is nowhere in it. :class:`PackageError` for a
    file that cannot be read or is no protobuf message."""
    if content is None:
        try:
            content = model_path.read_bytes()
        except OSError as exc:
            raise PackageError(f"{model_path}: cannot read: {exc.strerror}") from None
    if marker not in content:
        return None
    try:
        return parse(memoryview(content))
    except _Malformed as exc:
        raise PackageError(f"{model_path}: not a readable ONNX model: {exc}") from None


def external_data_locations(model_path: Path, content: bytes | None = None) -> list[str]:
    """The ``location`` of every tensor of an ONNX model (the file, or its ``content`` already
    read) whose data lives in another file (``data_location == EXTERNAL``), read without loading
    that data and without importing ``onnx``."""

    def locations(model: memoryview) -> list[str]:
        return [
            location
            for tensor in _model_tensors(model)
            if (location := _external_location(tensor, model_path)) is not None
        ]

    # Without the key "location" no tensor can name an external file. (A tensor marked
    # EXTERNAL without a location is refused by onnxruntime.)
    return _parse_model(model_path, content, b"location", locations) or []


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


# ---- a classifier's class labels, read from the protobuf wire format --------------------------

_INT_CLASS_LABELS: Final = (b"classlabels_int64s", b"classlabels_ints")
_STRING_CLASS_LABELS: Final = b"classlabels_strings"


def _int64(value: int) -> int:
    """A varint as the int64 it encodes (negative numbers take ten bytes, two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_varints(data: memoryview) -> Iterator[int]:
    position = 0
    while position < len(data):
        value, position = _varint(data, position)
        yield value


def _attribute_class_labels(attribute: memoryview) -> tuple[int, ...] | tuple[str, ...] | None:
    """The labels of a ``classlabels_*`` AttributeProto, None for any other attribute. Stops
    at another attribute's name (serialisers write the name, field 1, first), so the long lists
    of a tree ensemble's attributes are not walked."""
    name: bytes | None = None
    ints: list[int] = []
    strings: list[bytes] = []
    for number, wire, value in _fields(attribute):
        if number == _ATTRIBUTE_NAME and wire == _LENGTH:
            name = bytes(value)
            if name not in _INT_CLASS_LABELS and name != _STRING_CLASS_LABELS:
                return None
        elif number == _ATTRIBUTE_INTS and wire == _VARINT:
            ints.append(_int64(value))
        elif number == _ATTRIBUTE_INTS and wire == _LENGTH:  # packed
            ints.extend(_int64(v) for v in _packed_varints(value))
        elif number == _ATTRIBUTE_STRINGS and wire == _LENGTH:
            strings.append(bytes(value))
    if name in _INT_CLASS_LABELS:
        return tuple(ints)
    if name == _STRING_CLASS_LABELS:
        return tuple(_text(memoryview(s)) for s in strings)
    return None


def _graph_class_labels(model: memoryview) -> set[tuple[int, ...] | tuple[str, ...]]:
    """Every distinct ``classlabels_*`` list on the nodes of the model's main graph."""
    found: set[tuple[int, ...] | tuple[str, ...]] = set()
    for graph in _messages(model, _MODEL_GRAPH):
        for node in _messages(graph, _GRAPH_NODE):
            for attribute in _messages(node, _NODE_ATTRIBUTE):
                labels = _attribute_class_labels(attribute)
                if labels is not None:
                    found.add(labels)
    return found


def graph_class_labels(
    model_path: Path, content: bytes | None = None
) -> tuple[int, ...] | tuple[str, ...] | None:
    """The class labels of a classifier (the file, or its ``content`` already read), in the
    order of its probability columns: the ``classlabels_ints``/``classlabels_int64s`` or
    ``classlabels_strings`` attribute that the classifier node and its ZipMap carry. None when
    the main graph has none, or several that differ (a regressor, a stack of classifiers). Read
    without importing ``onnx``; :class:`PackageError` for a file that cannot be read."""
    found = _parse_model(model_path, content, b"classlabels_", _graph_class_labels)
    return found.pop() if found is not None and len(found) == 1 else None
