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
    size: int  # bytes of the part file
    last: bool  # the input file's last chunk

    @property
    def part(self) -> str:
        return part_name(self.file, self.chunk)

    def to_json(self) -> dict[str, Any]:
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
        journal = self.path / JOURNAL_FILE
        if journal.exists():
            for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = ChunkRecord.from_json(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn line written as the process died
                part = self.path / record.part
                try:
                    if part.stat().st_size == record.size:
                        records[(record.file, record.chunk)] = record
                except FileNotFoundError:
                    pass
        for entry in self.path.iterdir():
            if entry.name.startswith(_TEMP_PREFIX):
                entry.unlink()
                continue
            match = _PART_RE.match(entry.name)
            if match and (int(match.group(1)), int(match.group(2))) not in records:
                entry.unlink()
        for name in (SUMMARY_FILE, SUCCESS_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        lines = "".join(json.dumps(r.to_json()) + "\n" for r in records.values())
        _atomic_write(journal, lines)
        return records

    def record(self, record: ChunkRecord) -> None:
        """Append a finished chunk to the journal (fsynced: it survives a crash once returned)."""
        if self._journal_fd is None:
            self._journal_fd = os.open(
                self.path / JOURNAL_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )
        line = (json.dumps(record.to_json()) + "\n").encode()
        written = os.write(self._journal_fd, line)
        if written != len(line):  # pragma: no cover - a regular file takes a short line whole
            raise InvalidInput(f"{self.path / JOURNAL_FILE}: short write")
        os.fsync(self._journal_fd)

    def parts(self) -> list[Path]:
        """Every part file, in chunk order."""
        return sorted(p for p in self.path.iterdir() if _PART_RE.match(p.name))


def open_job_folder(output: Path | str) -> JobFolder | ObjectJobFolder:
    """The job folder of ``--output``: a local :class:`JobFolder`, or an
    :class:`~edgewise.runtime.batch.objectfolder.ObjectJobFolder` for an object-storage URI."""
    if isinstance(output, str) and is_uri(output):
        from edgewise.runtime.batch.objectfolder import ObjectJobFolder

        return ObjectJobFolder(output)
    return JobFolder(Path(local_path(str(output))))
