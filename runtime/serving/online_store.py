"""Feast's online store and registry, read without Feast.

``import feast`` costs seconds and hundreds of megabytes, far outside a serving node's budget, so
Feast defines, registers and materializes features and this module reads what it wrote, from its
documented layout (checked against Feast's own ``get_online_features`` in
``tests/runtime/features/``):

* The registry (``registry.db`` of a file registry) is a serialized ``feast.core.Registry``
  protobuf message. :func:`read_registry` decodes the few fields serving needs (entities and
  their join keys and value types, feature views with their features and TTL, feature services
  with their projections) with a plain protobuf wire reader.
* An entity key is serialized the way Feast's ``serialize_entity_key`` (version 3) does it:
  the number of join keys, then per join key (sorted by name) ``<I type STRING> <I length>
  name``, then per value ``<I value type> <I length> bytes`` (INT64 ``<q``, INT32 ``<i``,
  STRING utf-8); all little endian.
* The SQLite online store (the local provider) has one table per feature view,
  ``"{project}_{view}"``, one row per (entity key, feature): ``entity_key`` BLOB, ``feature_name``
  TEXT, ``value`` BLOB (a serialized ``feast.types.Value``), ``event_ts`` (Unix seconds).
* The Redis online store has one hash per entity, keyed by the serialized entity key followed by
  the project name; field ``mmh3("{view}:{feature}")`` (murmur3 32-bit, little endian) holds the
  serialized Value, field ``_ts:{view}`` a serialized ``google.protobuf.Timestamp``.

The readers raise :class:`StoreError` when the store cannot be read (down, locked, too slow for
the budget) and answer None for an entity the store does not have.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

__all__ = [
    "FeatureSpec",
    "FeatureViewSpec",
    "RedisOnlineStore",
    "Registry",
    "SqliteOnlineStore",
    "StoreError",
    "StoredRow",
    "Value",
    "decode_value",
    "entity_key",
    "murmur3_32",
    "parse_reply",
    "read_registry",
]

# feast.types.ValueType.Enum
BYTES: Final = 1
STRING: Final = 2
INT32: Final = 3
INT64: Final = 4
DOUBLE: Final = 5
FLOAT: Final = 6
BOOL: Final = 7
UNIX_TIMESTAMP: Final = 8
VALUE_TYPE_NAMES: Final = {
    BYTES: "BYTES",
    STRING: "STRING",
    INT32: "INT32",
    INT64: "INT64",
    DOUBLE: "DOUBLE",
    FLOAT: "FLOAT",
    BOOL: "BOOL",
    UNIX_TIMESTAMP: "UNIX_TIMESTAMP",
    11: "BYTES_LIST",
    12: "STRING_LIST",
    13: "INT32_LIST",
    14: "INT64_LIST",
    15: "DOUBLE_LIST",
    16: "FLOAT_LIST",
    17: "BOOL_LIST",
    18: "UNIX_TIMESTAMP_LIST",
}

Scalar = float | int | str | bytes | bool
Value = Scalar | list[Scalar] | None


class StoreError(Exception):
    """The online store could not be read (down, locked, or slower than the budget)."""


# ---- protobuf wire format -------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of a serialized message: an int for a
    varint, bytes for a length-delimited field or a fixed32/fixed64 (little endian)."""
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated field")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire == 5:
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_DOUBLE = struct.Struct("<d").unpack_from
_FLOAT = struct.Struct("<f").unpack_from


def decode_value(blob: bytes) -> Value:
    """A serialized ``feast.types.Value``: a scalar, a list (of a list type: ``*_list_val``,
    packed or not), or None (null, or a kind this reader does not serve: sets, maps, JSON,
    structs, decimals, UUIDs)."""
    # The common cases first, without the general reader: one double_val (tag 0x29) or
    # float_val (tag 0x35) field, the whole message.
    if len(blob) == 9 and blob[0] == 0x29:
        return float(_DOUBLE(blob, 1)[0])
    if len(blob) == 5 and blob[0] == 0x35:
        return float(_FLOAT(blob, 1)[0])
    result: Value = None
    for number, _, raw in _fields(blob):
        if number == 6 and isinstance(raw, bytes):  # float_val
            result = struct.unpack("<f", raw)[0]
        elif number == 5 and isinstance(raw, bytes):  # double_val
            result = struct.unpack("<d", raw)[0]
        elif number in (3, 4, 8) and isinstance(raw, int):  # int32, int64, unix_timestamp
            result = _signed64(raw)
            if number == 3:
                result = ((result + (1 << 31)) % (1 << 32)) - (1 << 31)
        elif number == 7 and isinstance(raw, int):  # bool_val
            result = bool(raw)
        elif number == 2 and isinstance(raw, bytes):  # string_val
            result = raw.decode("utf-8")
        elif number == 1 and isinstance(raw, bytes):  # bytes_val
            result = raw
        elif number in _LISTS and isinstance(raw, bytes):
            result = _decode_list(number, raw)
        else:  # null_val, anything newer: not a value this reader serves
            result = None
    return result


# Value's list fields: bytes 11, string 12, int32 13, int64 14, double 15, float 16, bool 17,
# unix_timestamp 18; each a message {repeated T val = 1}.
_LISTS: Final = frozenset(range(11, 19))


def _decode_list(number: int, blob: bytes) -> list[Scalar]:
    items: list[Scalar] = []
    for n, _, raw in _fields(blob):
        if n != 1:
            continue
        if number == 11 and isinstance(raw, bytes):
            items.append(raw)
        elif number == 12 and isinstance(raw, bytes):
            items.append(raw.decode("utf-8"))
        elif number == 15 and isinstance(raw, bytes):  # packed (wire 2) or one (wire 1)
            items.extend(struct.unpack(f"<{len(raw) // 8}d", raw))
        elif number == 16 and isinstance(raw, bytes):  # packed (wire 2) or one (wire 5)
            items.extend(struct.unpack(f"<{len(raw) // 4}f", raw))
        else:  # varints: int32 13, int64 14, bool 17, unix_timestamp 18; packed or one
            numbers: list[int] = []
            if isinstance(raw, int):
                numbers.append(raw)
            else:
                pos = 0
                while pos < len(raw):
                    value, pos = _varint(raw, pos)
                    numbers.append(value)
            for value in numbers:
                if number == 17:
                    items.append(bool(value))
                elif number == 13:
                    items.append(((value + (1 << 31)) % (1 << 32)) - (1 << 31))
                else:
                    items.append(_signed64(value))
    return items


def _timestamp_seconds(blob: bytes) -> float:
    """A serialized ``google.protobuf.Timestamp`` as Unix seconds."""
    seconds = nanos = 0
    for number, _, raw in _fields(blob):
        if number == 1 and isinstance(raw, int):
            seconds = _signed64(raw)
        elif number == 2 and isinstance(raw, int):
            nanos = raw
    return seconds + nanos / 1e9


# ---- entity keys and hashes -----------------------------------------------------------------


def entity_key(
    join_keys: Sequence[str], types: Sequence[int], values: Sequence[int | str]
) -> bytes:
    """Feast's ``serialize_entity_key`` (version 3) of one entity: ``join_keys[i]`` of value
    type ``types[i]`` (INT64, INT32 or STRING) equal to ``values[i]``."""
    if len(join_keys) == 1 and types[0] == INT64:  # the common case, its header cached
        header = _HEADERS.get(join_keys[0])
        if header is None:
            name = join_keys[0].encode("utf-8")
            header = _HEADERS[join_keys[0]] = (
                struct.pack("<III", 1, STRING, len(name)) + name + struct.pack("<II", INT64, 8)
            )
        return header + struct.pack("<q", int(values[0]))
    order = sorted(range(len(join_keys)), key=lambda i: join_keys[i])
    parts = [struct.pack("<I", len(join_keys))]
    for i in order:
        name = join_keys[i].encode("utf-8")
        parts.append(struct.pack("<II", STRING, len(name)))
        parts.append(name)
    for i in order:
        kind, value = types[i], values[i]
        if kind == INT64:
            payload = struct.pack("<q", int(value))
        elif kind == INT32:
            payload = struct.pack("<i", int(value))
        elif kind == STRING:
            payload = str(value).encode("utf-8")
        else:
            raise ValueError(f"entity value type {VALUE_TYPE_NAMES.get(kind, kind)} is not served")
        parts.append(struct.pack("<II", kind, len(payload)))
        parts.append(payload)
    return b"".join(parts)


_HEADERS: dict[str, bytes] = {}


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86 32-bit, unsigned (what ``mmh3.hash(key, signed=False)`` answers)."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    h = seed & mask
    tail = len(data) & ~3
    for (block,) in struct.iter_unpack("<I", data[:tail]):
        k = (block * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    rest = data[tail:]
    k = 0
    for i, byte in enumerate(rest):
        k |= byte << (8 * i)
    if rest:
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def redis_field(view: str, feature: str) -> bytes:
    """The hash field of ``view:feature`` in Feast's Redis layout."""
    return struct.pack("<I", murmur3_32(f"{view}:{feature}".encode()))


# ---- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    value_type: int


@dataclass(frozen=True)
class FeatureViewSpec:
    name: str
    entities: tuple[str, ...]  # entity names
    features: tuple[FeatureSpec, ...]
    ttl_seconds: float  # 0: values never go stale
    entity_columns: tuple[FeatureSpec, ...]  # join keys with their value types
    # The batch source (offline store), a file source: its path, event timestamp column, created
    # timestamp column ("" none) and field mapping (source column -> feature or join key name).
    source_path: str = ""
    source_timestamp: str = ""
    source_created: str = ""
    source_mapping: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Registry:
    """What serving needs of a Feast file registry, for one project."""

    project: str
    entities: dict[str, FeatureSpec] = field(default_factory=dict)  # name -> (join key, type)
    views: dict[str, FeatureViewSpec] = field(default_factory=dict)
    # service -> ((view, (feature, ...)), ...)
    services: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = field(default_factory=dict)
    service_updated: dict[str, float] = field(default_factory=dict)  # Unix seconds


def _str(raw: int | bytes) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else ""


def _feature(blob: bytes) -> FeatureSpec:
    name, kind = "", 0
    for number, _, raw in _fields(blob):
        if number == 1:
            name = _str(raw)
        elif number == 2 and isinstance(raw, int):
            kind = raw
    return FeatureSpec(name, kind)


def _spec_and_meta(blob: bytes) -> tuple[bytes, bytes]:
    spec = meta = b""
    for number, _, raw in _fields(blob):
        if number == 1 and isinstance(raw, bytes):
            spec = raw
        elif number == 2 and isinstance(raw, bytes):
            meta = raw
    return spec, meta


def _project_of(spec: bytes, number: int) -> str:
    for n, _, raw in _fields(spec):
        if n == number:
            return _str(raw)
    return ""


def read_registry(path: Path, project: str) -> Registry:
    """The entities, feature views and feature services of ``project`` in the Feast file
    registry at ``path``. ValueError when it cannot be read or decoded."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"feature registry {path}: {exc.strerror or exc}") from None
    registry = Registry(project)
    try:
        for number, _, raw in _fields(blob):
            if not isinstance(raw, bytes):
                continue
            if (
                number == 1
            ):  # Entity {spec: EntitySpecV2 {name 1, value_type 2, join_key 4, project 9}}
                spec, _ = _spec_and_meta(raw)
                if _project_of(spec, 9) != project:
                    continue
                name = join_key = ""
                kind = 0
                for n, _, value in _fields(spec):
                    if n == 1:
                        name = _str(value)
                    elif n == 4:
                        join_key = _str(value)
                    elif n == 2 and isinstance(value, int):
                        kind = value
                registry.entities[name] = FeatureSpec(join_key or name, kind)
            elif number == 6:  # FeatureView {spec: FeatureViewSpec}
                spec, _ = _spec_and_meta(raw)
                if _project_of(spec, 2) != project:
                    continue
                view = _read_view(spec)
                registry.views[view.name] = view
            elif number == 7:  # FeatureService {spec: FeatureServiceSpec, meta}
                spec, meta = _spec_and_meta(raw)
                if _project_of(spec, 2) != project:
                    continue
                name, projections = _read_service(spec)
                registry.services[name] = projections
                for n, _, value in _fields(meta):
                    if n == 2 and isinstance(value, bytes):  # last_updated_timestamp
                        registry.service_updated[name] = _timestamp_seconds(value)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"feature registry {path}: not a Feast registry ({exc})") from None
    return registry


def _read_view(spec: bytes) -> FeatureViewSpec:
    name = ""
    entities: list[str] = []
    features: list[FeatureSpec] = []
    columns: list[FeatureSpec] = []
    ttl = 0.0
    source: tuple[str, str, str, tuple[tuple[str, str], ...]] = ("", "", "", ())
    for n, _, value in _fields(spec):
        if n == 1:
            name = _str(value)
        elif n == 3:
            entities.append(_str(value))
        elif n == 4 and isinstance(value, bytes):
            features.append(_feature(value))
        elif n == 12 and isinstance(value, bytes):
            columns.append(_feature(value))
        elif n == 6 and isinstance(value, bytes):  # google.protobuf.Duration
            ttl = _timestamp_seconds(value)
        elif n == 7 and isinstance(value, bytes):  # batch_source: DataSource
            source = _read_source(value)
    return FeatureViewSpec(name, tuple(entities), tuple(features), ttl, tuple(columns), *source)


def _read_source(blob: bytes) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """DataSource {field_mapping 2, timestamp_field 3, created_timestamp_column 5,
    file_options 11 {uri 2}}."""
    path = timestamp = created = ""
    mapping: list[tuple[str, str]] = []
    for n, _, value in _fields(blob):
        if n == 3:
            timestamp = _str(value)
        elif n == 5:
            created = _str(value)
        elif n == 11 and isinstance(value, bytes):
            for m, _, item in _fields(value):
                if m == 2:
                    path = _str(item)
        elif n == 2 and isinstance(value, bytes):  # map entry {key 1, value 2}
            key = target = ""
            for m, _, item in _fields(value):
                if m == 1:
                    key = _str(item)
                elif m == 2:
                    target = _str(item)
            mapping.append((key, target))
    return path, timestamp, created, tuple(mapping)


def _read_service(spec: bytes) -> tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    name = ""
    projections: list[tuple[str, tuple[str, ...]]] = []
    for n, _, value in _fields(spec):
        if n == 1:
            name = _str(value)
        elif n == 3 and isinstance(value, bytes):  # FeatureViewProjection
            view = ""
            columns: list[str] = []
            for m, _, item in _fields(value):
                if m == 1:
                    view = _str(item)
                elif m == 2 and isinstance(item, bytes):
                    columns.append(_feature(item).name)
            projections.append((view, tuple(columns)))
    return name, tuple(projections)


# ---- the online stores ----------------------------------------------------------------------

#: (event time in Unix seconds, the values in the order of the features asked for, None where
#: the entity has no value of that feature), or None: the entity is not in the store.
StoredRow = tuple[float, list[Value]] | None


class OnlineStore(Protocol):
    def read(
        self, view: str, keys: Sequence[bytes], features: Sequence[str], budget: float
    ) -> list[StoredRow]: ...

    def close(self) -> None: ...


def _ts_seconds(text: object) -> float:
    """``event_ts`` as Unix seconds: Feast 0.67 writes whole Unix seconds (its sqlite3 adapter
    ``int(naive_utc.timestamp())``, exact where the writer's time zone is UTC); older ones wrote
    ISO text."""
    if isinstance(text, int | float):
        return float(text)
    if isinstance(text, bytes):
        text = text.decode()
    moment = datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class _SqliteConnection:
    """One thread's read-only connection and its cursor (kept: one object less per read), its
    progress handler installed once: a statement running past ``give_up``
    (``time.monotonic()``) is interrupted."""

    __slots__ = ("conn", "cursor", "give_up")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.cursor = conn.cursor()
        self.give_up = float("inf")
        conn.set_progress_handler(self._over, 1000)

    def _over(self) -> int:
        return int(time.monotonic() > self.give_up)


class SqliteOnlineStore:
    """Feast's SQLite online store (the local provider), read-only. One connection per thread;
    a read that takes longer than its budget (a query, or the wait for a writer's lock) is
    interrupted and raised as :class:`StoreError`.

    The reads are plain on purpose: at low load a request finds the CPU's caches cold, and
    there every extra piece of code costs (measured: one statement grouping an entity's rows
    into one with ``group_concat``, decoded by one ``struct`` call, was 1-2 us faster in a hot
    loop and ~15 us slower with idle gaps between reads, as a served request sees them)."""

    def __init__(self, path: Path, project: str) -> None:
        self.path = path
        self.project = project
        self._local = threading.local()
        self._sql: dict[tuple[str, int], str] = {}
        self._positions: dict[tuple[str, ...], dict[str, int]] = {}

    def _connection(self, budget: float) -> _SqliteConnection:
        held: _SqliteConnection | None = getattr(self._local, "conn", None)
        if held is None:
            if not self.path.is_file():
                raise StoreError(f"online store {self.path}: no such file")
            try:
                conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
                )
                # The wait for a writer's lock is bounded by the budget (set once: a statement
                # per read would cost as much as the read).
                conn.execute(f"PRAGMA busy_timeout = {max(1, int(budget * 1000))}")
            except sqlite3.Error as exc:
                raise StoreError(f"online store {self.path}: {exc}") from None
            held = self._local.conn = _SqliteConnection(conn)
        return held

    def _statement(self, view: str, count: int) -> str:
        sql = self._sql.get((view, count))
        if sql is None:
            table = f"{self.project}_{view}".replace('"', '""')
            if count == 1:  # a point read: no entity_key column, no IN list
                sql = f'SELECT feature_name, value, event_ts FROM "{table}" WHERE entity_key = ?'
            else:
                marks = ",".join("?" * count)
                sql = (
                    f'SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
                    f"WHERE entity_key IN ({marks})"
                )
            self._sql[(view, count)] = sql
        return sql

    def read(
        self, view: str, keys: Sequence[bytes], features: Sequence[str], budget: float
    ) -> list[StoredRow]:
        held = self._connection(budget)
        sql = self._statement(view, len(keys))
        positions = self._positions.get(tuple(features))
        if positions is None:
            positions = self._positions[tuple(features)] = {f: i for i, f in enumerate(features)}
        held.give_up = time.monotonic() + budget  # the query is interrupted past it
        try:
            rows = held.cursor.execute(sql, keys).fetchall()
        except sqlite3.OperationalError as exc:
            if time.monotonic() > held.give_up:
                raise StoreError(
                    f"online store {self.path}: read took over the {budget * 1000:.1f} ms budget"
                ) from None
            raise StoreError(f"online store {self.path}: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"online store {self.path}: {exc}") from None
        try:
            if len(keys) == 1:
                return [self._entity(rows, positions, len(features))]
            found: dict[bytes, list[Value]] = {}
            stamps: dict[bytes, object] = {}
            for key, name, blob, stamp in rows:
                stamps[key] = stamp  # the entity's last row's, as Feast's reads take it
                i = positions.get(name)
                if i is not None:
                    values = found.get(key)
                    if values is None:
                        values = found[key] = [None] * len(features)
                    values[i] = decode_value(blob)
            return [
                (_ts_seconds(stamps[key]), found[key]) if key in found else None for key in keys
            ]
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            raise StoreError(f"online store {self.path}: a value cannot be read ({exc})") from None

    @staticmethod
    def _entity(
        rows: Sequence[tuple[str, bytes, object]], positions: dict[str, int], count: int
    ) -> StoredRow:
        """One entity's row from its (feature, value, event time) rows: None when it has none
        of the features; its event time is its last row's, as Feast's reads take it."""
        values: list[Value] = [None] * count
        found = False
        for name, blob, _ in rows:
            i = positions.get(name)
            if i is not None:
                # A double (the common case) inline: no call per value.
                values[i] = (
                    _DOUBLE(blob, 1)[0]
                    if len(blob) == 9 and blob[0] == 0x29
                    else decode_value(blob)
                )
                found = True
        if not found:
            return None
        stamp = rows[-1][2]
        return (float(stamp) if type(stamp) is int else _ts_seconds(stamp)), values

    def close(self) -> None:
        held = getattr(self._local, "conn", None)
        if held is not None:
            held.conn.close()
            self._local.conn = None


class RedisOnlineStore:
    """Feast's Redis online store, read with a minimal RESP client (HMGET, pipelined): one
    connection per thread, opened on first use and dropped after an error; every read is bounded
    by its budget.

    The socket stays blocking, with the kernel's send and receive timeouts (SO_SNDTIMEO,
    SO_RCVTIMEO) as the bound: a read is then one ``send`` and, mostly, one ``recv`` (a Python
    socket timeout polls before every call and switches the socket's mode each time it is set).
    The timeouts are set again only when what is left of the budget is below them or over a
    quarter above them, so a read may be refused when up to a fifth of what was left remains."""

    def __init__(
        self,
        host: str,
        port: int,
        project: str,
        db: int = 0,
        password: str = "",
        unix_socket: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.project = project.encode()
        self.db = db
        self.password = password
        # A Unix socket path (Feast's ``unix_socket_path=`` parameter): read there instead of
        # over TCP (one kernel hop less each way on the same host).
        self.unix_socket = unix_socket
        self.where = f"redis {unix_socket}" if unix_socket else f"redis {host}:{port}"
        self._local = threading.local()
        # (view, features) -> (the HMGET fields, the command's part after the key)
        self._commands: dict[tuple[str, tuple[str, ...]], tuple[int, bytes]] = {}

    @classmethod
    def from_connection_string(cls, text: str, project: str) -> RedisOnlineStore:
        """Feast's ``connection_string``: ``host:port[,db=N][,password=P]
        [,unix_socket_path=PATH][,...]`` (``unix_socket_path``: Feast's Redis client, and this
        reader, connect to that Unix socket instead of ``host:port``)."""
        address, *options = [part.strip() for part in text.split(",")]
        host, _, port = address.rpartition(":")
        settings = dict(option.partition("=")[::2] for option in options if option)
        return cls(
            host or "127.0.0.1",
            int(port or 6379),
            project,
            db=int(settings.get("db", 0)),
            password=settings.get("password", ""),
            unix_socket=settings.get("unix_socket_path", ""),
        )

    def _connection(self, budget: float) -> _RedisConnection:
        held: _RedisConnection | None = getattr(self._local, "conn", None)
        if held is None:
            try:
                if self.unix_socket:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        sock.settimeout(budget)
                        sock.connect(self.unix_socket)
                    except OSError:
                        sock.close()
                        raise
                else:
                    sock = socket.create_connection((self.host, self.port), timeout=budget)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                raise StoreError(f"online store {self.where}: down ({_reason(exc)})") from None
            sock.settimeout(None)  # blocking; bounded by the kernel's timeouts
            held = self._local.conn = _RedisConnection(sock)
            setup: list[list[bytes]] = []
            if self.password:
                setup.append([b"AUTH", self.password.encode()])
            if self.db:
                setup.append([b"SELECT", str(self.db).encode()])
            if setup:
                held.bound(budget)
                sock.sendall(b"".join(_command(c) for c in setup))
                for _ in setup:
                    held.reply()
        return held

    def _command_of(self, view: str, names: tuple[str, ...]) -> tuple[int, bytes]:
        command = self._commands.get((view, names))
        if command is None:
            fields = [redis_field(view, name) for name in names] + [f"_ts:{view}".encode()]
            tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)
            command = self._commands[(view, names)] = (len(fields), tail)
        return command

    def read(
        self, view: str, keys: Sequence[bytes], features: Sequence[str], budget: float
    ) -> list[StoredRow]:
        names = tuple(features)
        count, tail = self._command_of(view, names)
        head = b"*%d\r\n$5\r\nHMGET\r\n" % (count + 2)
        size = len(self.project)
        try:
            held = self._connection(budget)
            held.bound(budget)
            held.sock.sendall(
                b"".join(
                    b"%s$%d\r\n%s%s%s" % (head, len(key) + size, key, self.project, tail)
                    for key in keys
                )
            )
            replies = [held.values(count) for _ in keys]
        except (OSError, StoreError, ValueError) as exc:
            self.close()
            if isinstance(exc, TimeoutError | socket.timeout | BlockingIOError):
                raise StoreError(
                    f"online store {self.where}: read took over the {budget * 1000:.1f} ms budget"
                ) from None
            why = _reason(exc) if isinstance(exc, OSError) else str(exc)
            raise StoreError(f"online store {self.where}: {why}") from None
        result: list[StoredRow] = []
        try:
            for reply in replies:
                if reply is None or reply[-1] is None:
                    result.append(None)
                    continue
                stamp = reply.pop()
                assert stamp is not None
                values: list[Value] = [
                    None
                    if blob is None
                    else _DOUBLE(blob, 1)[0]  # a double (the common case) inline
                    if len(blob) == 9 and blob[0] == 0x29
                    else decode_value(blob)
                    for blob in reply
                ]
                seconds = _STAMPS.get(stamp)
                if seconds is None:
                    if len(_STAMPS) >= 4096:  # bounded: Feast writes few distinct times
                        _STAMPS.clear()
                    seconds = _STAMPS[stamp] = _timestamp_seconds(stamp)
                result.append((seconds, values))
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            raise StoreError(f"online store {self.where}: a value cannot be read ({exc})") from None
        return result

    def close(self) -> None:
        held = getattr(self._local, "conn", None)
        if held is not None:
            self._local.conn = None
            held.sock.close()


#: Serialized Timestamps already read (many entities share a materialization's event time).
_STAMPS: dict[bytes, float] = {}


def _reason(exc: OSError) -> str:
    """A socket error's errno name (ECONNREFUSED): clients of the server read "connect" in an
    UNAVAILABLE message as the server itself being unreachable."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _command(parts: Sequence[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


RespValue = bytes | int | None | list["RespValue"]


class _RedisConnection:
    """A blocking socket to Redis with the kernel's timeouts, and RESP2 replies read from it."""

    __slots__ = ("buffer", "sock", "timeout")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.timeout = 0.0  # the send and receive timeouts set (0: none)

    def bound(self, budget: float) -> None:
        """Send and receive within ``budget`` seconds (see RedisOnlineStore)."""
        if self.timeout <= budget <= self.timeout * 1.25:
            return
        timeout = max(budget * 0.9, 1e-6)
        seconds = int(timeout)
        value = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        self.timeout = timeout

    def values(self, count: int) -> list[bytes | None] | None:
        """An ``HMGET`` reply of ``count`` fields: an array of bulk strings (None: nil), read
        without the general parser (no call per field); None for any other reply."""
        head = b"*%d\r\n" % count
        while True:
            buf = self.buffer
            if not head.startswith(buf[: len(head)]):
                return self._general(count)  # another reply (an error, ...)
            items: list[bytes | None] = []
            pos = len(head)
            size = len(buf)
            complete = size >= pos
            for _ in range(count if complete else 0):
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    complete = False
                    break
                if buf[pos] != 0x24:  # not a bulk string
                    return self._general(count)
                length = int(buf[pos + 1 : end])
                if length < 0:
                    items.append(None)
                    pos = end + 2
                    continue
                stop = end + 2 + length
                if size < stop + 2:
                    complete = False
                    break
                items.append(buf[end + 2 : stop])
                pos = stop + 2
            if complete:
                self.buffer = buf[pos:]
                return items
            data = self.sock.recv(65536)
            if not data:
                raise StoreError("the store closed the socket")
            self.buffer += data

    def _general(self, count: int) -> list[bytes | None] | None:
        reply = self.reply()
        if not isinstance(reply, list) or len(reply) != count:
            return None
        if not all(item is None or isinstance(item, bytes) for item in reply):
            return None
        return reply  # type: ignore[return-value]

    def reply(self) -> RespValue:
        while True:
            parsed = parse_reply(self.buffer, 0)
            if parsed is not None:
                value, end = parsed
                self.buffer = self.buffer[end:]
                return value
            data = self.sock.recv(65536)
            if not data:
                raise StoreError("the store closed the socket")
            self.buffer += data


def parse_reply(buf: bytes, pos: int) -> tuple[RespValue, int] | None:
    """(the RESP2 value at ``pos``, where it ends), or None: the buffer ends before it does."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    if kind == 0x24:  # $: a bulk string
        length = int(buf[pos + 1 : end])
        if length < 0:
            return None, end + 2
        stop = end + 2 + length
        if len(buf) < stop + 2:
            return None
        return buf[end + 2 : stop], stop + 2
    if kind == 0x2A:  # *: an array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[RespValue] = []
        pos = end + 2
        for _ in range(count):
            parsed = parse_reply(buf, pos)
            if parsed is None:
                return None
            item, pos = parsed
            items.append(item)
        return items, pos
    if kind == 0x2B:  # +: a simple string
        return buf[pos + 1 : end], end + 2
    if kind == 0x3A:  # :: an integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x2D:  # -: an error
        raise StoreError(buf[pos + 1 : end].decode(errors="replace"))
    raise StoreError(f"unexpected reply {buf[pos : pos + 20]!r}")
