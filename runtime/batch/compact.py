"""Compacted and partitioned output (``--part-rows``, ``--part-bytes``, ``--partition-by``): the
scored chunks of a job, in input order, written into part files of a target size, optionally one
folder per value of a column (hive style, ``COLUMN=VALUE/``).

Exactly-once with parts that hold several chunks: chunks are committed by *group*. A group is a
run of consecutive scored chunks (in input order, across input files); its rows go to one part
file per partition (one part without ``--partition-by``), every part of the group named after
the group's first chunk (``[COLUMN=VALUE/]part-FFFFF-CCCCCC.parquet``). A group is closed when
one of its parts reaches the target (``--part-rows`` rows or ``--part-bytes`` bytes written), at
the end of the job, or, with ``--partition-by`` and no target, after every chunk. Closing it:

- local folder: every part was written under a hidden temporary name; each is fsynced and
  renamed to its final name, then the group's record (its parts with their sizes, its chunks with
  their rows) is appended to ``_chunks.jsonl`` as one fsynced line;
- object storage: every part was streamed to its final key (a multipart upload: the object
  appears only when it is complete); then the group's record is uploaded as
  ``_chunks/g-FFFFF-CCCCCC.json``.

A group is done exactly when its record exists and every part it names has the recorded size;
:meth:`~edgewise.runtime.batch.writer.JobFolder.recover` deletes every other part file (a group
killed before its record). A resumed job's groups start at a chunk that is not done, so their
names never collide with a done group's. Each chunk's rows are in exactly one done group: no row
lost, none duplicated, whatever was killed when.

Bounds: at most :data:`MAX_OPEN_PARTS` parts are open at once (each holds a file handle, and on
object storage an upload buffer): a chunk that would open more closes the group first, and a
single chunk with more distinct values than that writes each of its partitions' parts in turn,
closing each, and closes its group at its end. A partition's rows are buffered until a chunk's
worth (``--chunk-rows``) is there, then written as one row group.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from edgewise.runtime._fs import TEMP_PREFIX, fsync_dir
from edgewise.runtime.batch.options import PartLayout
from edgewise.runtime.batch.storage import is_uri, join, open_uri
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "HIVE_NULL",
    "MAX_OPEN_PARTS",
    "GroupRecord",
    "GroupWriter",
    "check_partition_column",
    "file_schema",
    "group_name",
]

#: Parts open at once (see the module docstring).
MAX_OPEN_PARTS: Final = 32
#: The folder value of a null (pyarrow's and Hive's default).
HIVE_NULL: Final = "__HIVE_DEFAULT_PARTITION__"


def group_name(file: int, chunk: int) -> str:
    return f"{file:05d}-{chunk:06d}"


@dataclass(frozen=True)
class GroupRecord:
    """A closed group: its parts (path relative to the output, and size) and its chunks
    (file, chunk, rows, last)."""

    name: str
    parts: dict[str, int]
    chunks: tuple[tuple[int, int, int, bool], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "parts": dict(self.parts),
            "chunks": [list(c) for c in self.chunks],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupRecord:
        parts = data["parts"]
        if not isinstance(parts, dict):
            raise ValueError("parts is not an object")
        return cls(
            name=str(data["group"]),
            parts={str(k): int(v) for k, v in parts.items()},
            chunks=tuple((int(f), int(c), int(r), bool(last)) for f, c, r, last in data["chunks"]),
        )


_PARTITION_TYPES: Final = "an integer, string, boolean or date"


def _partitionable(dtype: Any) -> bool:
    if pa.types.is_dictionary(dtype):
        return _partitionable(dtype.value_type)
    return bool(
        pa.types.is_integer(dtype)
        or pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_date(dtype)
    )


def check_partition_column(schema: Any, column: str) -> None:
    """:class:`InvalidInput` naming ``--partition-by``'s column when the output (an Arrow schema)
    has no such column, or one whose values cannot name folders."""
    if column not in schema.names:
        raise InvalidInput(
            f"--partition-by {column!r}: the output has no such column (it has "
            f"{', '.join(repr(n) for n in schema.names)}); pass it with --id-columns or "
            "--carry-columns, or partition by a model output"
        )
    if column.startswith(("_", ".")):
        raise InvalidInput(
            f"--partition-by {column!r}: Parquet dataset readers skip folders whose name starts "
            "with '_' or '.'; rename the column"
        )
    dtype = schema.field(column).type
    if not _partitionable(dtype):
        raise InvalidInput(
            f"--partition-by {column!r}: the column holds {dtype}; a partition column must be "
            f"{_PARTITION_TYPES} column"
        )
    if len(schema.names) == 1:
        raise InvalidInput(f"--partition-by {column!r}: the output has no other column")


def file_schema(schema: Any, layout: PartLayout) -> Any:
    """The schema of the part files: the output's, less the partition column (it is in the
    folder names)."""
    if layout.partition_by is None:
        return schema
    return schema.remove(schema.get_field_index(layout.partition_by))


def _folder(column: str, value: str | None) -> str:
    text = HIVE_NULL if value is None else urllib.parse.quote(value, safe="")
    return f"{urllib.parse.quote(column, safe='')}={text}"


def _split(table: Any, column: str) -> list[tuple[str, Any]]:
    """``table`` cut by the values of ``column``: (folder, rows without the column), in the
    order each value first appears; rows keep their order."""
    values = table.column(column)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    keys = pc.cast(values, pa.string()).combine_chunks()
    encoded = keys.dictionary_encode()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    rest = table.drop_columns([column])
    if not len(codes):
        return []
    names = encoded.dictionary.to_pylist()
    uniques, first = np.unique(codes, return_index=True)
    seen = [int(code) for code in uniques[np.argsort(first)]]
    pieces = []
    for code in seen:
        rows = np.flatnonzero(codes == code)
        value = None if code < 0 else str(names[code])
        piece = rest if len(rows) == len(codes) else rest.take(pa.array(rows))
        pieces.append((_folder(column, value), piece))
    return pieces


def _dictionary_columns(schema: Any) -> list[str]:
    return [
        f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]


@dataclass
class _Part:
    """One part file of the open group."""

    relative: str  # below the output
    sink: Any  # a pyarrow output stream
    writer: Any  # pyarrow.parquet.ParquetWriter
    temporary: Path | None  # local: the hidden name written to
    pending: list[Any] = field(default_factory=list)
    pending_rows: int = 0
    rows: int = 0
    closed_size: int | None = None  # closed (file complete, not committed yet)

    def written(self) -> int:
        return self.closed_size if self.closed_size is not None else int(self.sink.tell())


class GroupWriter:
    """Writes scored chunks, in input order, into grouped parts (see the module docstring).

    ``commit`` is the job folder's ``commit_group``: it records a closed group durably."""

    def __init__(
        self,
        out: Path | str,
        schema: Any,
        layout: PartLayout,
        row_group_rows: int,
        commit: Any,
    ) -> None:
        self.out = out
        self.remote = isinstance(out, str) and is_uri(out)
        self.layout = layout
        self.schema = file_schema(schema, layout)
        self.dictionary = _dictionary_columns(self.schema)
        self.row_group_rows = max(1, row_group_rows)
        self.commit = commit
        self.parts: dict[str, _Part] = {}
        self.closed: list[_Part] = []
        self.chunks: list[tuple[int, int, int, bool]] = []
        self.name: str | None = None
        self.groups = 0

    # ---- parts -------------------------------------------------------------------------------

    def _open(self, folder: str) -> _Part:
        assert self.name is not None
        relative = f"{folder}/part-{self.name}.parquet" if folder else f"part-{self.name}.parquet"
        temporary = None
        try:
            if self.remote:
                filesystem, key = open_uri(join(str(self.out), relative))
                sink = filesystem.open_output_stream(key)
            else:
                final = Path(self.out) / relative
                final.parent.mkdir(parents=True, exist_ok=True)
                temporary = final.with_name(f"{TEMP_PREFIX}{final.name}")
                sink = pa.OSFile(str(temporary), "wb")
            writer = pq.ParquetWriter(sink, self.schema, use_dictionary=self.dictionary)
        except OSError as exc:
            raise InvalidInput(f"{join(str(self.out), relative)}: cannot write: {exc}") from None
        return _Part(relative, sink, writer, temporary)

    def _flush_rows(self, part: _Part) -> None:
        if part.pending_rows:
            table = pa.concat_tables(part.pending) if len(part.pending) > 1 else part.pending[0]
            part.writer.write_table(table, row_group_size=max(1, table.num_rows))
            part.pending = []
            part.pending_rows = 0

    def _close(self, part: _Part) -> None:
        """Finish a part's file (complete, not yet committed)."""
        try:
            self._flush_rows(part)
            part.writer.close()
            part.closed_size = int(part.sink.tell())
            part.sink.close()
        except OSError as exc:
            raise InvalidInput(
                f"{join(str(self.out), part.relative)}: cannot write: {exc}"
            ) from None

    # ---- chunks ------------------------------------------------------------------------------

    def add(self, file: int, chunk: int, rows: int, last: bool, table: Any) -> None:
        """Add a scored chunk (the next in input order, not done before)."""
        layout = self.layout
        if layout.partition_by is None:
            pieces = [("", table)]
        else:
            pieces = _split(table, layout.partition_by)
        new = [f for f, _ in pieces if f not in self.parts]
        if self.chunks and len(self.parts) + len(new) > MAX_OPEN_PARTS:
            self.close_group()
        if self.name is None:
            self.name = group_name(file, chunk)
        early = False
        for folder, piece in pieces:
            part = self.parts.get(folder)
            if part is None:
                part = self.parts[folder] = self._open(folder)
            part.pending.append(piece)
            part.pending_rows += piece.num_rows
            part.rows += piece.num_rows
            if part.pending_rows >= self.row_group_rows:
                self._flush_rows(part)
            if len(self.parts) > MAX_OPEN_PARTS:  # one chunk with very many values
                self._close(part)
                self.closed.append(self.parts.pop(folder))
                early = True
        self.chunks.append((file, chunk, rows, last))
        if early or self._full():
            self.close_group()

    def _full(self) -> bool:
        layout = self.layout
        if layout.part_rows is None and layout.part_bytes is None:
            return True  # --partition-by alone: a group per chunk
        for part in self.parts.values():
            if layout.part_rows is not None and part.rows >= layout.part_rows:
                return True
            if layout.part_bytes is not None and part.written() >= layout.part_bytes:
                return True
        return False

    def close_group(self) -> None:
        """Close every part of the open group and commit it (nothing when no chunk is open)."""
        if not self.chunks:
            return
        assert self.name is not None
        parts = [*self.closed, *self.parts.values()]
        for part in self.parts.values():
            self._close(part)
        if not self.remote:
            folders = set()
            for part in parts:
                assert part.temporary is not None
                final = Path(self.out) / part.relative
                _install(part.temporary, final)
                folders.add(final.parent)
            for folder in folders:
                fsync_dir(folder)
        record = GroupRecord(
            self.name,
            {p.relative: int(p.closed_size or 0) for p in parts},
            tuple(self.chunks),
        )
        self.commit(record)
        self.groups += 1
        self.parts = {}
        self.closed = []
        self.chunks = []
        self.name = None

    def abandon(self) -> None:
        """After an error: let go of the open parts without committing them (a resumed job's
        recovery deletes what they left)."""
        if not self.remote:  # an upload left unclosed never becomes an object
            for part in self.parts.values():
                with contextlib.suppress(Exception):
                    part.writer.close()
                    part.sink.close()
        self.parts = {}


def _install(temporary: Path, final: Path) -> None:
    """fsync a finished part and rename it to its final name."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)


def record_line(record: GroupRecord) -> str:
    return json.dumps(record.to_json()) + "\n"
