"""The record of a pipeline run and the run logs that keep it in the metadata store.

A run is written twice: when it starts (outcome ``running``) and when it ends (``succeeded``,
``failed``; a reproduction ``identical`` or ``differs``). Two logs, one per store kind:

- :class:`SqliteRunLog`: a table ``pipeline_runs`` in the embedded store's database file (its own
  connection; every write one ``BEGIN IMMEDIATE`` transaction, like the store's);
- :class:`MlflowRunLog`: an MLflow run per pipeline run in the experiment ``edgewise-pipeline``,
  with the arguments as params, the metrics and step timings as metrics, and tags (run id,
  model, outcome, code version, data fingerprint, and the whole record as JSON split over
  ``edgewise.record.N`` tags, since a tag holds at most 8000 characters).

Readers (``runs``, ``show``, ``reproduce``) never create a store, a table or an experiment.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Protocol

from edgewise.runtime.errors import EdgewiseError, InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.store.base import StoreUnavailable
from edgewise.runtime.store.mlflow_rest import MlflowHttp
from edgewise.runtime.store.uri import StoreURI

__all__ = [
    "EXPERIMENT",
    "MlflowRunLog",
    "RunLog",
    "RunRecord",
    "SqliteRunLog",
    "open_run_log",
]

EXPERIMENT: Final = "edgewise-pipeline"
RECORD_FORMAT: Final = "edgewise.pipeline-run/1"
_TAG_CHUNK: Final = 7000
_RUN_ID_RE: Final = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
_MLFLOW_METRIC_RE: Final = re.compile(r"[^A-Za-z0-9_\-. /:]")

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS pipeline_runs (
    run_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    started_at TEXT NOT NULL,
    record TEXT NOT NULL
)
"""


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise InvalidInput(f"run {run_id!r}: not a run id (like 20261207T201500Z-1a2b3c4d)")
    return run_id


@dataclass
class RunRecord:
    """Everything recorded about one run (JSON: :meth:`to_json`)."""

    run_id: str
    model: str
    pipeline: str  # the pipeline file
    kind: str = "run"  # run | reproduce
    outcome: str = "running"  # running | succeeded | failed | identical | differs
    started_at: str = ""
    finished_at: str = ""
    failed_step: str = ""
    reason: str = ""
    trigger: dict[str, Any] = field(default_factory=dict)  # what started it (cli, alert, ...)
    code: dict[str, Any] = field(default_factory=dict)  # pipeline.fingerprint.CodeVersion
    arguments: dict[str, Any] = field(default_factory=dict)  # command, data step, the file
    environment: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # path, fingerprint, rows, schema
    steps: list[dict[str, Any]] = field(default_factory=list)  # name, status, seconds, key
    metrics: dict[str, float] = field(default_factory=dict)  # overall evaluation metrics
    slices: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # model/onnx sha256, package
    gate: dict[str, Any] = field(default_factory=dict)
    registered: dict[str, Any] = field(default_factory=dict)  # version, alias, previous
    reproduces: str = ""
    comparison: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": RECORD_FORMAT}
        for item in fields(self):
            out[item.name] = getattr(self, item.name)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        if data.get("format") != RECORD_FORMAT:
            raise PackageError(f"not a pipeline run record ({RECORD_FORMAT})")
        known = {item.name for item in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise PackageError(f"malformed pipeline run record: {exc}") from None

    def step(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.steps if s.get("name") == name), None)

    @property
    def seconds(self) -> float:
        return float(sum(float(s.get("seconds", 0.0)) for s in self.steps))


class RunLog(Protocol):
    """Where runs are kept."""

    uri: str

    def begin(self, record: RunRecord) -> None:
        """Record a run that starts (creates what the log needs: a writer)."""
        ...

    def finish(self, record: RunRecord) -> None:
        """Record the run's end (its outcome, metrics and everything else)."""
        ...

    def list_runs(self, model: str | None = None, limit: int = 50) -> list[RunRecord]:
        """Runs, newest first."""
        ...

    def get_run(self, run_id: str) -> RunRecord:
        """One run; :class:`ModelNotFound` when there is none with that id."""
        ...

    def close(self) -> None: ...


def _dumps(record: RunRecord) -> str:
    return json.dumps(record.to_json(), sort_keys=True, default=str)


def _loads(text: str, where: str) -> RunRecord:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{where}: malformed run record: {exc}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{where}: malformed run record")
    return RunRecord.from_json(data)


# ---- SQLite --------------------------------------------------------------------------------


class SqliteRunLog:
    """Runs in the embedded store's database file (module docstring)."""

    def __init__(self, path: Path, *, create: bool, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.uri = f"sqlite:///{path}"
        self._create = create
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        if not self.path.exists():
            raise StoreUnavailable(
                f"store {self.uri}: {self.path} does not exist (a reader never creates it; "
                "a pipeline run creates it)"
            )
        # a reader opens read-write too, with writes refused (query_only): a read-only
        # connection to a WAL database leaves its -wal and -shm files behind when it closes,
        # which a read-write one removes (a reader never creates what it reads)
        target = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        try:
            db = sqlite3.connect(target, uri=True, timeout=self._busy_timeout, isolation_level=None)
            if not self._create:
                db.execute("PRAGMA query_only=ON")
            else:
                db.execute("PRAGMA synchronous=FULL")
                db.execute(_TABLE)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store {self.uri}: cannot open: {exc}") from None
        self._db = db
        return db

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store {self.uri}: {what}: {exc}") from None

    def _write(self, record: RunRecord) -> None:
        if not self._create:
            raise InvalidInput(f"store {self.uri}: opened for reading")
        db = self._connection()
        with self._errors("record the run"):
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO pipeline_runs (run_id, model, kind, outcome, started_at, record) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                    "outcome = excluded.outcome, record = excluded.record",
                    (
                        record.run_id,
                        record.model,
                        record.kind,
                        record.outcome,
                        record.started_at,
                        _dumps(record),
                    ),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def begin(self, record: RunRecord) -> None:
        self._write(record)

    def finish(self, record: RunRecord) -> None:
        self._write(record)

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[str, str]]:
        db = self._connection()
        try:
            return [(str(r[0]), str(r[1])) for r in db.execute(sql, args).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # no run was ever recorded in this store
            raise StoreUnavailable(f"store {self.uri}: read runs: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store {self.uri}: read runs: {exc}") from None

    def list_runs(self, model: str | None = None, limit: int = 50) -> list[RunRecord]:
        if model is None:
            rows = self._rows(
                "SELECT run_id, record FROM pipeline_runs ORDER BY started_at DESC, rowid DESC "
                "LIMIT ?",
                (limit,),
            )
        else:
            rows = self._rows(
                "SELECT run_id, record FROM pipeline_runs WHERE model = ? "
                "ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (model, limit),
            )
        return [_loads(text, f"run {run_id}") for run_id, text in rows]

    def get_run(self, run_id: str) -> RunRecord:
        validate_run_id(run_id)
        rows = self._rows("SELECT run_id, record FROM pipeline_runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise ModelNotFound(f"store {self.uri}: no pipeline run {run_id}")
        return _loads(rows[0][1], f"run {run_id}")

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None


# ---- MLflow --------------------------------------------------------------------------------


def _metric_key(key: str) -> str:
    return _MLFLOW_METRIC_RE.sub("_", key)[:250]


def _params(record: RunRecord) -> dict[str, str]:
    """The run's arguments as MLflow params (flat, strings)."""
    args = record.arguments
    params: dict[str, str] = {}
    for key, value in sorted(args.items()):
        if key == "pipeline_file":
            continue  # the whole document is in the record tags
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        params[key[:250]] = text[:6000]
    return params


class MlflowRunLog:
    """Runs as MLflow runs (module docstring)."""

    def __init__(self, http: MlflowHttp) -> None:
        self.http = http
        self.uri = http.base_url
        self._ids: dict[str, str] = {}  # edgewise run id -> MLflow run id

    def _experiment(self, *, create: bool) -> str | None:
        try:
            data = self.http.call(
                "GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT}
            )
            return str(data["experiment"]["experiment_id"])
        except ModelNotFound:
            if not create:
                return None
        try:
            return str(
                self.http.call("POST", "experiments/create", body={"name": EXPERIMENT})[
                    "experiment_id"
                ]
            )
        except EdgewiseError as exc:
            if "RESOURCE_ALREADY_EXISTS" in exc.message or "already exists" in exc.message:
                return self._experiment(create=False)
            raise

    def _record_tags(self, record: RunRecord) -> list[dict[str, str]]:
        text = _dumps(record)
        chunks = [text[i : i + _TAG_CHUNK] for i in range(0, len(text), _TAG_CHUNK)] or [""]
        tags = [{"key": f"edgewise.record.{i}", "value": c} for i, c in enumerate(chunks)]
        tags.append({"key": "edgewise.record.parts", "value": str(len(chunks))})
        tags += [
            {"key": "edgewise.run_id", "value": record.run_id},
            {"key": "edgewise.model", "value": record.model},
            {"key": "edgewise.kind", "value": record.kind},
            {"key": "edgewise.outcome", "value": record.outcome},
            {"key": "edgewise.data_fingerprint", "value": str(record.data.get("fingerprint", ""))},
            {"key": "edgewise.code_version", "value": str(record.code.get("commit", ""))},
            {"key": "edgewise.failed_step", "value": record.failed_step},
            {"key": "edgewise.reason", "value": record.reason[:5000]},
        ]
        commit = str(record.code.get("commit", "unknown"))
        if commit != "unknown":
            tags.append({"key": "mlflow.source.git.commit", "value": commit})
        return tags

    def begin(self, record: RunRecord) -> None:
        experiment = self._experiment(create=True)
        run = self.http.call(
            "POST",
            "runs/create",
            body={
                "experiment_id": experiment,
                "run_name": f"pipeline {record.model} {record.run_id}",
                "start_time": int(time.time() * 1000),
                "tags": [
                    {"key": "mlflow.source.name", "value": record.pipeline},
                    {"key": "mlflow.source.type", "value": "JOB"},
                    *self._record_tags(record),
                ],
            },
        )["run"]["info"]
        mlflow_id = str(run["run_id"])
        self._ids[record.run_id] = mlflow_id
        params = [{"key": k, "value": v} for k, v in _params(record).items()]
        for start in range(0, len(params), 100):
            self.http.call(
                "POST",
                "runs/log-batch",
                body={"run_id": mlflow_id, "params": params[start : start + 100]},
            )

    def finish(self, record: RunRecord) -> None:
        mlflow_id = self._ids.get(record.run_id)
        if mlflow_id is None:
            raise InvalidInput(f"run {record.run_id} was not begun in this log")
        now = int(time.time() * 1000)
        metrics = [
            {"key": _metric_key(k), "value": float(v), "timestamp": now, "step": 0}
            for k, v in record.metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        for step in record.steps:
            metrics.append(
                {
                    "key": _metric_key(f"step.{step['name']}.seconds"),
                    "value": float(step.get("seconds", 0.0)),
                    "timestamp": now,
                    "step": 0,
                }
            )
        tags = self._record_tags(record)
        for start in range(0, max(len(metrics), len(tags)), 100):
            body: dict[str, Any] = {"run_id": mlflow_id}
            if metrics[start : start + 100]:
                body["metrics"] = metrics[start : start + 100]
            if tags[start : start + 100]:
                body["tags"] = tags[start : start + 100]
            self.http.call("POST", "runs/log-batch", body=body)
        status = "FINISHED" if record.outcome in ("succeeded", "identical") else "FAILED"
        self.http.call(
            "POST", "runs/update", body={"run_id": mlflow_id, "status": status, "end_time": now}
        )

    def _search(self, filter_text: str, limit: int) -> list[RunRecord]:
        experiment = self._experiment(create=False)
        if experiment is None:
            return []
        records: list[RunRecord] = []
        token = ""
        while len(records) < limit:
            body: dict[str, Any] = {
                "experiment_ids": [experiment],
                "filter": filter_text,
                "order_by": ["attributes.start_time DESC"],
                "max_results": min(limit - len(records), 500),
            }
            if token:
                body["page_token"] = token
            page = self.http.call("POST", "runs/search", body=body)
            for run in page.get("runs", ()) or ():
                record = self._from_run(run)
                if record is not None:
                    records.append(record)
            token = str(page.get("next_page_token", ""))
            if not token:
                break
        return records

    def _from_run(self, run: Mapping[str, Any]) -> RunRecord | None:
        raw_tags = run.get("data", {}).get("tags", ()) or ()
        tags = {str(t.get("key")): str(t.get("value", "")) for t in raw_tags}
        try:
            parts = int(tags.get("edgewise.record.parts", "0"))
        except ValueError:
            return None
        if parts < 1:
            return None  # not an edgewise pipeline run
        text = "".join(tags.get(f"edgewise.record.{i}", "") for i in range(parts))
        record = _loads(text, f"MLflow run {run.get('info', {}).get('run_id', '?')}")
        self._ids.setdefault(record.run_id, str(run.get("info", {}).get("run_id", "")))
        return record

    def list_runs(self, model: str | None = None, limit: int = 50) -> list[RunRecord]:
        text = "" if model is None else f"tags.`edgewise.model` = '{model}'"
        return self._search(text, limit)

    def get_run(self, run_id: str) -> RunRecord:
        validate_run_id(run_id)
        found = self._search(f"tags.`edgewise.run_id` = '{run_id}'", 1)
        if not found:
            raise ModelNotFound(f"MLflow at {self.uri}: no pipeline run {run_id}")
        return found[0]

    def mlflow_run_id(self, run_id: str) -> str:
        """The MLflow run id of an edgewise run (after begin or a read)."""
        return self._ids[run_id]

    def close(self) -> None:
        self._ids.clear()


def open_run_log(uri: StoreURI, *, create: bool, timeout: float = 30.0) -> RunLog:
    """The run log of the store ``uri`` names. ``create``: a run's writer (the SQLite store's
    file must exist already: the pipeline opens the store with ``create=True`` first)."""
    if uri.kind == "sqlite":
        assert uri.path is not None
        return SqliteRunLog(uri.path, create=create)
    return MlflowRunLog(MlflowHttp(uri.base_url, uri.username, uri.password, timeout=timeout))
