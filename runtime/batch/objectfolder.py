"""The output of a batch job on object storage (``--output s3://bucket/prefix``): the same files
as a local job folder (:mod:`.writer`), committed without renames.

Object stores have no rename and no append, but an object appears only once its upload is
complete (a PUT, or a multipart upload's completion: a process killed mid-upload leaves no
object, only an incomplete upload that the bucket's ``AbortIncompleteMultipartUpload`` lifecycle
rule removes). So a chunk is committed in two steps, each one atomic:

1. its part file is uploaded under its final name, ``PREFIX/part-FFFFF-CCCCCC.parquet``;
2. then its record is uploaded as ``PREFIX/_chunks/FFFFF-CCCCCC.json`` (rows, size, last).

A chunk is done exactly when its record exists and its part file has the recorded size. On
``--resume``, :meth:`ObjectJobFolder.recover` keeps those, deletes part files without a record
(killed between the two steps) and records without a part, and the job redoes the rest: each
chunk's rows end in one object, whatever was killed when. ``_job.json`` is written once before
the first chunk; ``_summary.json`` and ``_SUCCESS`` last.

There is no lock on object storage: two processes writing the same prefix are not detected.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from edgewise.runtime.batch.compact import GroupRecord, record_line
from edgewise.runtime.batch.storage import join, open_uri
from edgewise.runtime.batch.writer import (
    JOB_FILE,
    SUCCESS_FILE,
    SUMMARY_FILE,
    ChunkRecord,
    encode_part,
)
from edgewise.runtime.errors import InvalidInput

__all__ = ["RECORDS", "ObjectJobFolder", "write_object_part"]

#: The prefix of the chunk records, below the job's prefix.
RECORDS: Final = "_chunks"
_PART_RE: Final = re.compile(r"^part-(\d{5,})-(\d{6,})\.parquet$")
_RECORD_RE: Final = re.compile(r"^(\d{5,})-(\d{6,})\.json$")
_GROUP_RE: Final = re.compile(r"^g-(\d{5,})-(\d{6,})\.json$")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _put(filesystem: Any, key: str, data: bytes, uri: str) -> None:
    try:
        with filesystem.open_output_stream(key) as handle:
            handle.write(data)
    except OSError as exc:
        raise InvalidInput(f"{uri}: cannot write: {_one_line(exc)}") from None


def write_object_part(out: str, file: int, chunk: int, table: Any) -> int:
    """Upload a chunk's part file under its final name (complete or not at all); its size."""
    from edgewise.runtime.batch.writer import part_name

    uri = join(out, part_name(file, chunk))
    filesystem, key = open_uri(uri)
    data = encode_part(table)
    _put(filesystem, key, data, uri)
    return len(data)


class ObjectJobFolder:
    """A job's output prefix on object storage (see the module docstring); the same methods as
    :class:`~edgewise.runtime.batch.writer.JobFolder`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.key = open_uri(self.uri)

    def location(self, name: str) -> str:
        return join(self.uri, name)

    def _key(self, name: str) -> str:
        return f"{self.key.rstrip('/')}/{name}"

    def _info(self, name: str) -> Any:
        try:
            return self.fs.get_file_info(self._key(name))
        except OSError as exc:
            raise InvalidInput(f"{self.location(name)}: cannot read: {_one_line(exc)}") from None

    def exists(self, name: str) -> bool:
        from pyarrow import fs

        return bool(self._info(name).type == fs.FileType.File)

    def _list(self, prefix: str = "", recursive: bool = False) -> list[Any]:
        from pyarrow import fs

        base = self._key(prefix) if prefix else self.key
        selector = fs.FileSelector(base, recursive=recursive, allow_not_found=True)
        try:
            return [i for i in self.fs.get_file_info(selector) if i.type == fs.FileType.File]
        except OSError as exc:
            raise InvalidInput(f"{self.uri}: cannot list: {_one_line(exc)}") from None

    # ---- ownership ---------------------------------------------------------------------------

    def check_path(self) -> None:
        """:class:`InvalidInput` if the prefix names an object rather than a folder."""
        from pyarrow import fs

        try:
            info = self.fs.get_file_info(self.key)
        except OSError as exc:
            raise InvalidInput(f"output {self.uri}: cannot read: {_one_line(exc)}") from None
        if info.type == fs.FileType.File:
            raise InvalidInput(f"output {self.uri} is an object, not a prefix")

    def create(self) -> None:
        self.check_path()

    def lock(self) -> None:
        """Object storage has no lock (see the module docstring)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> ObjectJobFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def foreign_entries(self) -> list[str]:
        return sorted(i.base_name for i in self._list())

    # ---- the job manifest --------------------------------------------------------------------

    def has_job(self) -> bool:
        return self.exists(JOB_FILE)

    def read_json(self, name: str) -> Any:
        try:
            with self.fs.open_input_stream(self._key(name)) as handle:
                return json.loads(handle.read().decode("utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{self.location(name)}: cannot read: {_one_line(exc)}") from None

    def read_job(self) -> dict[str, Any]:
        data = self.read_json(JOB_FILE)
        if not isinstance(data, dict):
            raise InvalidInput(f"{self.location(JOB_FILE)}: the job manifest is not an object")
        return data

    def write_job(self, job: dict[str, Any]) -> None:
        self.write_json(JOB_FILE, job)

    def write_json(self, name: str, data: Any) -> str:
        return self.write_text(name, json.dumps(data, indent=2, allow_nan=False) + "\n")

    def write_text(self, name: str, text: str) -> str:
        _put(self.fs, self._key(name), text.encode("utf-8"), self.location(name))
        return self.location(name)

    def is_complete(self) -> bool:
        return self.exists(SUCCESS_FILE)

    def mark_complete(self) -> None:
        self.write_text(SUCCESS_FILE, "")

    # ---- chunks ------------------------------------------------------------------------------

    def recover(self) -> dict[tuple[int, int], ChunkRecord]:
        """The finished chunks; deletes parts without a record and records without their part
        (see the module docstring)."""
        sizes: dict[str, int] = {}  # every part object, by its name below the prefix
        base = self.key.rstrip("/") + "/"
        for info in self._list(recursive=True):
            relative = info.path[len(base) :]
            if relative.startswith(("_", ".")) or "/_" in relative or "/." in relative:
                continue
            if _PART_RE.match(info.base_name):
                sizes[relative] = int(info.size)
        records: dict[tuple[int, int], ChunkRecord] = {}
        referenced: set[str] = set()
        for info in self._list(RECORDS):
            name = f"{RECORDS}/{info.base_name}"
            if _GROUP_RE.match(info.base_name) is not None:
                try:
                    group = GroupRecord.from_json(self.read_json(name))
                except (InvalidInput, KeyError, TypeError, ValueError, AttributeError):
                    group = None
                if group is None or any(sizes.get(p) != n for p, n in group.parts.items()):
                    self._delete(name)
                    continue
                for file, chunk, rows, last in group.chunks:
                    records[(file, chunk)] = ChunkRecord(file, chunk, rows, 0, last, group.name)
                referenced.update(group.parts)
                continue
            if _RECORD_RE.match(info.base_name) is None:
                continue
            try:
                record = ChunkRecord.from_json(self.read_json(name))
            except (InvalidInput, KeyError, TypeError, ValueError):
                record = None
            if record is None or sizes.get(record.part) != record.size:
                self._delete(name)
                continue
            records[(record.file, record.chunk)] = record
            referenced.add(record.part)
        for relative in sizes:
            if relative not in referenced:
                self._delete(relative)
        for name in (SUMMARY_FILE, SUCCESS_FILE):
            if self.exists(name):
                self._delete(name)
        return records

    def _delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise InvalidInput(f"{self.location(name)}: cannot delete: {_one_line(exc)}") from None

    def record(self, record: ChunkRecord) -> None:
        """Commit a chunk whose part file is uploaded: upload its record."""
        name = f"{RECORDS}/{record.file:05d}-{record.chunk:06d}.json"
        self.write_text(name, json.dumps(record.to_json()) + "\n")

    def commit_group(self, group: GroupRecord) -> None:
        """Commit a closed group whose parts are uploaded: upload its record."""
        self.write_text(f"{RECORDS}/g-{group.name}.json", record_line(group))

    def parts(self) -> list[str]:
        """Every part object (partition prefixes included)."""
        base = self.key.rstrip("/") + "/"
        found = []
        for info in self._list(recursive=True):
            relative = info.path[len(base) :]
            if _PART_RE.match(info.base_name) and not relative.startswith(("_", ".")):
                found.append(self.location(relative))
        return sorted(found)
