"""The output folder of a batch job: part files, the job manifest, the chunk journal, the lock.

Layout of ``OUT/``::

    _job.json                    what the job is: model, version, sha256, inputs (size, mtime),
                                 chunk rows, id columns, output schema (written once, atomically)
    _chunks.jsonl                the journal: one line per finished chunk (appended, fsynced)
    _job.lock                    held (flock) by the process writing the folder
    part-FFFFF-CCCCCC.parquet    chunk CCCCCC of input file FFFFF
    _summary.json, _SUCCESS      written when every chunk is done
    _drift_report.json/.html     the batch drift report

Every name but the part files starts with ``_`` or ``.``, which Parquet dataset readers (pyarrow,
pandas, Spark) skip: ``OUT/`` reads as one table.

Exactly-once: a chunk's rows go to exactly one file name, fixed by (input file, chunk index). A
part file is written under a hidden temporary name, fsynced, renamed to its final name (atomic),
and only then recorded in the journal. A crash at any point leaves, for each chunk, either
nothing, a temporary file, a complete part file that is not journaled yet, or a journaled one.
:meth:`JobFolder.recover` keeps the journaled chunks whose part file is there with its recorded
size and deletes everything else (temporary files, unjournaled parts, torn journal lines), so a
resumed job redoes exactly the chunks that are not done: no row lost, none duplicated.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from edgewise.runtime._fs import TEMP_PREFIX as _TEMP_PREFIX  # removed by recover()
from edgewise.runtime._fs import replacing
from edgewise.runtime._fs import write_text_atomic as _atomic_write
from edgewise.runtime.batch.compact import GroupRecord, record_line
from edgewise.runtime.batch.storage import is_uri, local_path
from edgewise.runtime.errors import InvalidInput

if TYPE_CHECKING:
    from edgewise.runtime.batch.objectfolder import ObjectJobFolder

__all__ = [
    "JOB_FILE",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "REPORT_HTML",
    "REPORT_JSON",
    "SUCCESS_FILE",
    "SUMMARY_FILE",
    "ChunkRecord",
    "JobFolder",
    "encode_part",
    "open_job_folder",
    "part_name",
    "write_part",
]

JOB_FILE: Final = "_job.json"
JOURNAL_FILE: Final = "_chunks.jsonl"
LOCK_FILE: Final = "_job.lock"
SUMMARY_FILE: Final = "_summary.json"
SUCCESS_FILE: Final = "_SUCCESS"
REPORT_JSON: Final = "_drift_report.json"
REPORT_HTML: Final = "_drift_report.html"
_PART_RE: Final = re.compile(r"^part-(\d{5,})-(\d{6,})\.parquet$")


def part_name(file: int, chunk: int) -> str:
    """The part file of chunk ``chunk`` of input file ``file``."""
    return f"part-{file:05d}-{chunk:06d}.parquet"


@dataclass(frozen=True)
class ChunkRecord:
    """A finished chunk, as the journal records it."""

    file: int
    chunk: int
    rows: int
    size: int  # bytes of the part file (0 for a chunk of a group)
    last: bool  # the input file's last chunk
    group: str | None = None  # the group (:mod:`.compact`) the chunk was committed in

    @property
    def part(self) -> str:
        """The part file of a chunk written alone (a group's chunks are in the group's parts)."""
        return part_name(self.file, self.chunk)

    def to_json(self) -> dict[str, Any]:
        if self.group is not None:  # pragma: no cover - groups are journaled as GroupRecords
            raise ValueError("a chunk of a group is recorded with its group")
        return {
            "file": self.file,
            "chunk": self.chunk,
            "rows": self.rows,
            "size": self.size,
            "last": self.last,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChunkRecord:
        return cls(
            file=int(data["file"]),
            chunk=int(data["chunk"]),
            rows=int(data["rows"]),
            size=int(data["size"]),
            last=bool(data["last"]),
        )


def _dictionary_columns(table: Any) -> list[str]:
    # Dictionary encoding only for strings: scores and numeric ids rarely repeat, and trying a
    # dictionary on them costs more than the rest of the write (and makes larger files).
    return [
        f.name
        for f in table.schema
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]


def encode_part(table: Any) -> bytes:
    """A part file's bytes (what :func:`write_part` writes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=_dictionary_columns(table))
    return bytes(sink.getvalue())


def write_part(folder: Path | str, file: int, chunk: int, table: Any) -> int:
    """Write a chunk's table as its part file, atomically; returns the file's size in bytes.
    ``folder`` may be an object-storage URI (:mod:`.objectfolder`).

    Writing the same chunk twice (a retried task) replaces the file with an identical one.
    """
    if isinstance(folder, str) and is_uri(folder):
        from edgewise.runtime.batch.objectfolder import write_object_part

        return write_object_part(folder, file, chunk, table)
    final = Path(folder) / part_name(file, chunk)
    try:
        with replacing(final) as temporary:
            pq.write_table(table, temporary, use_dictionary=_dictionary_columns(table))
    except OSError as exc:
        raise InvalidInput(f"{final}: cannot write: {exc.strerror or exc}") from None
    return final.stat().st_size


class JobFolder:
    """The output folder of one job (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None

    # ---- ownership ---------------------------------------------------------------------------

    def check_path(self) -> None:
        """:class:`InvalidInput` if the output exists and is not a folder (reads only)."""
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInput(f"output {self.path} is not a folder")

    def create(self) -> None:
        """Make the folder if needed; :class:`InvalidInput` if it is not a folder."""
        self.check_path()
        self.path.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Hold the folder's lock until :meth:`close` (or the process ends, even by SIGKILL)."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InvalidInput(
                f"output {self.path} is in use by another edgewise batch process"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> JobFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def foreign_entries(self) -> list[str]:
        """Entries that a job folder does not hold (a fresh job needs an empty folder)."""
        if not self.path.is_dir():
            return []  # a folder not made yet holds nothing
        return sorted(p.name for p in self.path.iterdir() if p.name not in (LOCK_FILE,))

    # ---- the job manifest --------------------------------------------------------------------

    def has_job(self) -> bool:
        return (self.path / JOB_FILE).is_file()

    def read_job(self) -> dict[str, Any]:
        path = self.path / JOB_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read the job manifest: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"{path}: the job manifest is not a JSON object")
        return data

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def location(self, name: str) -> str:
        return str(self.path / name)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read: {exc}") from None

    def write_job(self, job: dict[str, Any]) -> None:
        _atomic_write(self.path / JOB_FILE, json.dumps(job, indent=2) + "\n")

    def write_json(self, name: str, data: Any) -> Path:
        path = self.path / name
        _atomic_write(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        _atomic_write(path, text)
        return path

    def is_complete(self) -> bool:
        return (self.path / SUCCESS_FILE).is_file()

    def mark_complete(self) -> None:
        _atomic_write(self.path / SUCCESS_FILE, "")

    # ---- chunks ------------------------------------------------------------------------------

    def recover(self) -> dict[tuple[int, int], ChunkRecord]:
        """The finished chunks, after cleaning up what a crash left (see the module docstring).

        The journal is rewritten with only the valid records, so a torn last line is gone
        before anything is appended.
        """
        records: dict[tuple[int, int], ChunkRecord] = {}
        kept: list[str] = []
        referenced: set[str] = set()
        journal = self.path / JOURNAL_FILE
        if journal.exists():
            for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    data = json.loads(line)
                    if "group" in data:
                        group = GroupRecord.from_json(data)
                        if not all(self._has_part(p, n) for p, n in group.parts.items()):
                            continue
                        for file, chunk, rows, last in group.chunks:
                            records[(file, chunk)] = ChunkRecord(
                                file, chunk, rows, 0, last, group.name
                            )
                        referenced.update(group.parts)
                    else:
                        record = ChunkRecord.from_json(data)
                        if not self._has_part(record.part, record.size):
                            continue
                        records[(record.file, record.chunk)] = record
                        referenced.add(record.part)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    continue  # a torn line written as the process died
                kept.append(line + "\n")
        for root, dirs, files in os.walk(self.path, topdown=True):
            dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
            here = Path(root)
            for name in files:
                entry = here / name
                relative = entry.relative_to(self.path).as_posix()
                if name.startswith(_TEMP_PREFIX) or (
                    _PART_RE.match(name) and relative not in referenced
                ):
                    entry.unlink()
        for root, dirs, files in os.walk(self.path, topdown=False):
            here = Path(root)
            if here != self.path and not files and not dirs and not here.name.startswith("_"):
                with contextlib.suppress(OSError):
                    here.rmdir()
        for name in (SUMMARY_FILE, SUCCESS_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        _atomic_write(journal, "".join(kept))
        return records

    def _has_part(self, relative: str, size: int) -> bool:
        try:
            return (self.path / relative).stat().st_size == size
        except (FileNotFoundError, NotADirectoryError):
            return False

    def commit_group(self, group: GroupRecord) -> None:
        """Record a closed group whose parts are renamed to their final names."""
        self._append(record_line(group))

    def record(self, record: ChunkRecord) -> None:
        """Append a finished chunk to the journal (fsynced: it survives a crash once returned)."""
        self._append(json.dumps(record.to_json()) + "\n")

    def _append(self, text: str) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(
                self.path / JOURNAL_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )
        line = text.encode()
        written = os.write(self._journal_fd, line)
        if written != len(line):  # pragma: no cover - a regular file takes a short line whole
            raise InvalidInput(f"{self.path / JOURNAL_FILE}: short write")
        os.fsync(self._journal_fd)

    def parts(self) -> list[Path]:
        """Every part file (partition folders included), in chunk order within a folder."""
        found: list[Path] = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
            found.extend(Path(root) / n for n in sorted(files) if _PART_RE.match(n))
        return found


def open_job_folder(output: Path | str) -> JobFolder | ObjectJobFolder:
    """The job folder of ``--output``: a local :class:`JobFolder`, or an
    :class:`~edgewise.runtime.batch.objectfolder.ObjectJobFolder` for an object-storage URI."""
    if isinstance(output, str) and is_uri(output):
        from edgewise.runtime.batch.objectfolder import ObjectJobFolder

        return ObjectJobFolder(output)
    return JobFolder(Path(local_path(str(output))))
