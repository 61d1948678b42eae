"""The embedded metadata store: one SQLite database plus a content-addressed artifact folder.

Layout, for ``sqlite:///path/store.db``::

    path/store.db                    models, versions (files, lineage), aliases, node reports
    path/store.db-artifacts/ab/abcd…  every file, named by its sha256 (so identical files of two
                                      versions are stored once)

Safe under concurrent writers (processes or threads): the database runs in WAL mode with a busy
timeout, every write is one ``BEGIN IMMEDIATE`` transaction, and a version number is taken inside
the transaction that inserts it. Nothing is half-written after a crash: an artifact is copied to a
temporary name, checked against its sha256, fsynced and renamed into place before the transaction
that makes the version visible commits (``synchronous=FULL``); a crash in between leaves at most
an unreferenced artifact (or a temporary file, removed by a later open once an hour old), never a
version whose files are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import TEMP_PREFIX, fsync_dir, replacing
from edgewise.runtime.errors import EdgewiseError, ModelNotFound, PackageError
from edgewise.runtime.package.manifest import FileEntry, validate_model_name
from edgewise.runtime.store.base import (
    FileStream,
    Lineage,
    LocalFileStream,
    ModelSummary,
    NodeReport,
    StoreUnavailable,
    VersionRecord,
    safe_join,
    validate_alias,
    validate_artifact_path,
    validate_node_id,
)
from edgewise.runtime.store.lineage import utc_now

__all__ = ["SqliteStore"]

SCHEMA_VERSION: Final = 1
_SHA_CHARS: Final = frozenset("0123456789abcdef")

# Model tags (rollout policies and decisions): created by the first writer that sets one, so a
# store made before them needs no migration (a reader finds no table: no tags).
_TAGS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS model_tags (
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, key)
);
"""

_SCHEMA: Final = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    model_sha256 TEXT NOT NULL,
    files TEXT NOT NULL,
    lineage TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT NOT NULL,
    node TEXT NOT NULL,
    report TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, node)
);
"""
    + _TAGS_TABLE
)


def _check_sha(sha: str) -> str:
    if len(sha) != 64 or not set(sha) <= _SHA_CHARS:
        raise PackageError(f"{sha!r} is not a sha256 hex digest")
    return sha


class SqliteStore:
    """The embedded store (see the module docstring)."""

    def __init__(self, path: Path, busy_timeout: float = 30.0, *, create: bool = True) -> None:
        """``create``: a writer's store (``register``) is created when missing, at once. A reader
        (``create=False``: the agent, ``models``) never creates it: it connects at its first
        call, answers :class:`StoreUnavailable` while the database file is missing, and
        reconnects when the file comes back or another one replaces it."""
        self.path = path
        self.artifacts = path.with_name(path.name + "-artifacts")
        self.uri = f"sqlite:///{path}"
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        if create:
            self._create()

    def _create(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.artifacts.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"store {self.uri}: cannot open: {exc}") from None
        db, identity = self._connect("rwc")
        with self._closing_unless_adopted(db, identity), self._errors("open"):
            db.execute("PRAGMA journal_mode=WAL")
            with self._write(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                else:
                    self._check_schema(row[0])
            self._remove_stale_temporaries()

    def _connect(self, mode: str) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """Open the database file (``mode`` ``rw``: it must exist; ``rwc``: create it) and say
        which file it is; the store keeps it only once its schema is checked (see
        :meth:`_closing_unless_adopted`)."""
        self._drop()
        target = f"file:{urllib.parse.quote(str(self.path))}?mode={mode}"
        try:
            db = sqlite3.connect(
                target,
                uri=True,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store {self.uri}: cannot open: {exc}") from None
        with self._closing_unless_adopted(db, None), self._errors("open"):
            info = os.stat(self.path)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
        return db, (info.st_dev, info.st_ino)

    @contextlib.contextmanager
    def _closing_unless_adopted(
        self, db: sqlite3.Connection, identity: tuple[int, int] | None
    ) -> Iterator[None]:
        """Run the block that checks a new connection: when it raises the connection is closed
        (a refused store is refused again at the next call, never read); when it returns and
        ``identity`` is given, the store keeps the connection as the one to that file."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            raise
        if identity is not None:
            self._db, self._identity = db, identity

    def _check_schema(self, value: object) -> None:
        if str(value) != str(SCHEMA_VERSION):
            raise PackageError(
                f"store {self.uri}: schema version {value}, this edgewise reads {SCHEMA_VERSION}"
            )

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db, self._identity = None, None

    def _connection(self) -> sqlite3.Connection:
        """The connection to the database file at :attr:`path` now (the lock is held): opened
        again when the file was replaced; :class:`StoreUnavailable` while it is missing."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._drop()
            raise StoreUnavailable(
                f"store {self.uri}: {self.path} does not exist (a reader never creates it; "
                "register a model to create a store)"
            ) from None
        except OSError as exc:
            self._drop()
            raise StoreUnavailable(f"store {self.uri}: {exc}") from None
        if self._db is not None and self._identity == (info.st_dev, info.st_ino):
            return self._db
        db, identity = self._connect("rw")
        with self._closing_unless_adopted(db, identity), self._errors("open"):
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError:
                row = None
            if row is None:
                raise PackageError(f"store {self.uri}: {self.path} is not an edgewise store")
            self._check_schema(row[0])
        return db

    def _remove_stale_temporaries(self, older_than: float = 3600.0) -> None:
        """Temporary artifact files a crashed writer left behind (never ones being written)."""
        cutoff = time.time() - older_than
        for folder in self.artifacts.iterdir():
            if not folder.is_dir() or folder.is_symlink():
                continue
            for entry in folder.glob(f"{TEMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        entry.unlink()

    # ---- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except EdgewiseError:
            raise
        except sqlite3.OperationalError as exc:
            self._drop()  # the next call opens the file again
            raise StoreUnavailable(f"store {self.uri}: {what}: {exc}") from None
        except sqlite3.Error as exc:
            self._drop()
            raise StoreUnavailable(
                f"store {self.uri}: {what}: {type(exc).__name__}: {exc}"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"store {self.uri}: {what}: {exc}") from None

    @staticmethod
    @contextlib.contextmanager
    def _write(db: sqlite3.Connection) -> Iterator[None]:
        """One write transaction, taken immediately (writers queue on the busy timeout)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def artifact_path(self, sha256: str) -> Path:
        _check_sha(sha256)
        return self.artifacts / sha256[:2] / sha256

    # ---- artifacts -----------------------------------------------------------------------------

    def _put_artifact(self, source: Path, entry: FileEntry) -> None:
        target = self.artifact_path(entry.sha256)
        if target.is_file() and target.stat().st_size == entry.size:
            return  # content-addressed: the same bytes are already there
        if source.is_symlink():
            raise PackageError(f"{source}: is a symbolic link; refusing to publish it")
        target.parent.mkdir(exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with replacing(target) as temporary:
            with source.open("rb") as src, temporary.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != entry.sha256 or size != entry.size:
                raise PackageError(
                    f"{source}: changed while publishing (sha256 or size differs from the "
                    "manifest's)"
                )

    # ---- versions ------------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        folder: Path,
        files: tuple[FileEntry, ...],
        lineage: Lineage,
        description: str = "",
    ) -> VersionRecord:
        validate_model_name(name)
        model_sha = None
        for entry in files:
            validate_artifact_path(entry.path)
            _check_sha(entry.sha256)
            if entry.path == "model.onnx":
                model_sha = entry.sha256
        if model_sha is None:
            raise PackageError(f"{folder}: the package has no model.onnx")
        with self._lock, self._errors("publish"):
            db = self._connection()
            for entry in files:
                self._put_artifact(safe_join(folder, entry.path), entry)
            fsync_dir(self.artifacts)
            now = utc_now()
            with self._write(db):
                db.execute(
                    "INSERT OR IGNORE INTO models (name, description, created_at) "
                    "VALUES (?, '', ?)",
                    (name, now),
                )
                row = db.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name = ?", (name,)
                ).fetchone()
                version = int(row[0])
                db.execute(
                    "INSERT INTO versions (name, version, model_sha256, files, lineage, "
                    "description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        version,
                        model_sha,
                        json.dumps([f.to_json() for f in files]),
                        json.dumps(lineage.to_json()),
                        description,
                        now,
                    ),
                )
        return VersionRecord(
            name=name,
            version=version,
            model_sha256=model_sha,
            files=files,
            lineage=lineage,
            description=description,
            location=str(self.artifacts),
        )

    @staticmethod
    def _aliases_of(db: sqlite3.Connection, name: str) -> dict[int, list[str]]:
        result: dict[int, list[str]] = {}
        for alias, version in db.execute(
            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)
        ):
            result.setdefault(int(version), []).append(str(alias))
        return result

    def _record(self, row: Any, aliases: dict[int, list[str]]) -> VersionRecord:
        name, version, model_sha, files, lineage, description = row
        try:
            entries = tuple(FileEntry.from_json(f) for f in json.loads(files))
            for entry in entries:
                validate_artifact_path(entry.path)
                _check_sha(entry.sha256)
            lineage_obj = Lineage.from_json(json.loads(lineage))
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise PackageError(f"store {self.uri}: {name} version {version}: {exc}") from None
        return VersionRecord(
            name=str(name),
            version=int(version),
            model_sha256=str(model_sha),
            files=entries,
            lineage=lineage_obj,
            aliases=tuple(aliases.get(int(version), ())),
            description=str(description),
            location=str(self.artifacts),
        )

    def _require_model(self, db: sqlite3.Connection, name: str) -> None:
        row = db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ModelNotFound(f"store {self.uri} has no model {name!r}")

    _COLUMNS: Final = "name, version, model_sha256, files, lineage, description"

    def list_models(self) -> list[ModelSummary]:
        with self._lock, self._errors("list models"):
            db = self._connection()
            rows = db.execute(
                "SELECT m.name, m.description, MAX(v.version) FROM models m "
                "LEFT JOIN versions v ON v.name = m.name GROUP BY m.name ORDER BY m.name"
            ).fetchall()
            summaries = []
            for name, description, latest in rows:
                aliases = {
                    str(a): int(v)
                    for a, v in db.execute(
                        "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)
                    )
                }
                summaries.append(
                    ModelSummary(
                        str(name), None if latest is None else int(latest), aliases, description
                    )
                )
            return summaries

    def list_versions(self, name: str) -> list[VersionRecord]:
        validate_model_name(name)
        with self._lock, self._errors("list versions"):
            db = self._connection()
            self._require_model(db, name)
            aliases = self._aliases_of(db, name)
            rows = db.execute(
                f"SELECT {self._COLUMNS} FROM versions WHERE name = ? ORDER BY version DESC",
                (name,),
            ).fetchall()
            return [self._record(row, aliases) for row in rows]

    def get_version(self, name: str, version: int) -> VersionRecord:
        validate_model_name(name)
        with self._lock, self._errors("get version"):
            db = self._connection()
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
            if row is None:
                self._require_model(db, name)
                raise ModelNotFound(f"store {self.uri}: model {name!r} has no version {version}")
            return self._record(row, self._aliases_of(db, name))

    def resolve_alias(self, name: str, alias: str) -> VersionRecord:
        validate_model_name(name)
        validate_alias(alias)
        with self._lock, self._errors("resolve alias"):
            db = self._connection()
            row = db.execute(
                f"SELECT {', '.join('v.' + c.strip() for c in self._COLUMNS.split(','))} "
                "FROM aliases a JOIN versions v ON v.name = a.name AND v.version = a.version "
                "WHERE a.name = ? AND a.alias = ?",
                (name, alias),
            ).fetchone()
            if row is None:
                self._require_model(db, name)
                raise ModelNotFound(f"store {self.uri}: model {name!r} has no alias {alias!r}")
            return self._record(row, self._aliases_of(db, name))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        validate_model_name(name)
        validate_alias(alias)
        with self._lock, self._errors("set alias"):
            db = self._connection()
            with self._write(db):
                self._set_alias(db, name, alias, version)

    def _set_alias(self, db: sqlite3.Connection, name: str, alias: str, version: int) -> None:
        row = db.execute(
            "SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            self._require_model(db, name)
            raise ModelNotFound(f"store {self.uri}: model {name!r} has no version {version}")
        db.execute(
            "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, "
            "updated_at = excluded.updated_at",
            (name, alias, version, utc_now()),
        )

    def delete_alias(self, name: str, alias: str) -> None:
        validate_model_name(name)
        validate_alias(alias)
        with self._lock, self._errors("delete alias"):
            db = self._connection()
            with self._write(db):
                deleted = db.execute(
                    "DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias)
                ).rowcount
                if not deleted:
                    self._require_model(db, name)
                    raise ModelNotFound(f"store {self.uri}: model {name!r} has no alias {alias!r}")

    def open_file(self, record: VersionRecord, entry: FileEntry, offset: int = 0) -> FileStream:
        validate_artifact_path(entry.path)
        path = self.artifact_path(entry.sha256)
        with self._lock, self._errors("open file"):
            self._connection()  # a missing store is unavailable, not a missing artifact
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise ModelNotFound(
                f"store {self.uri}: artifact {entry.path} of {record.name} version "
                f"{record.version} is missing ({path})"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"store {self.uri}: {path}: {exc.strerror}") from None
        size = os.fstat(handle.fileno()).st_size
        start = offset if 0 <= offset <= size else 0
        handle.seek(start)
        return LocalFileStream(handle, start)

    # ---- nodes ---------------------------------------------------------------------------------

    def report_node(self, report: NodeReport) -> None:
        validate_model_name(report.model)
        validate_node_id(report.node)
        with self._lock, self._errors("report node"):
            db = self._connection()
            with self._write(db):
                db.execute(
                    "INSERT INTO nodes (name, node, report, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name, node) DO UPDATE SET report = excluded.report, "
                    "updated_at = excluded.updated_at",
                    (report.model, report.node, json.dumps(report.to_json()), report.updated_at),
                )

    def set_model_tag(self, name: str, key: str, value: str | None) -> None:
        validate_model_name(name)
        with self._lock, self._errors("set model tag"):
            db = self._connection()
            with self._write(db):
                self._require_model(db, name)
                db.execute(_TAGS_TABLE)
                if value is None:
                    db.execute("DELETE FROM model_tags WHERE name = ? AND key = ?", (name, key))
                else:
                    db.execute(
                        "INSERT INTO model_tags (name, key, value, updated_at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (name, key) DO UPDATE SET "
                        "value = excluded.value, updated_at = excluded.updated_at",
                        (name, key, value, utc_now()),
                    )

    def model_tags(self, name: str, prefix: str = "") -> dict[str, str]:
        validate_model_name(name)
        with self._lock, self._errors("model tags"):
            db = self._connection()
            self._require_model(db, name)
            try:
                rows = db.execute(
                    "SELECT key, value FROM model_tags WHERE name = ? AND substr(key, 1, ?) = ? "
                    "ORDER BY key",
                    (name, len(prefix), prefix),
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return {}
                raise
        return {str(k): str(v) for k, v in rows}

    def node_reports(self, name: str) -> list[NodeReport]:
        validate_model_name(name)
        with self._lock, self._errors("node reports"):
            rows = (
                self._connection()
                .execute("SELECT report FROM nodes WHERE name = ? ORDER BY node", (name,))
                .fetchall()
            )
        reports = []
        for (text,) in rows:
            try:
                reports.append(NodeReport.from_json(json.loads(text)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise PackageError(f"store {self.uri}: malformed node report: {exc}") from None
        return reports
