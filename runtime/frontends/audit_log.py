"""The audit log's file: append-only JSON lines, rotated by size.

Each record is one line written with a single ``write`` to a file opened ``O_APPEND`` for that
line (control calls are rare), so processes that share the file (``--processes N``) interleave
whole lines and a file renamed away by rotation is never written again. Past ``max_bytes`` the
file becomes ``PATH.1`` (``PATH.1`` becomes ``PATH.2``, ... up to ``backups``; the oldest is
removed). A record that cannot be written is logged as an error and counted
(``edgewise_audit_write_errors_total``); the call it records is not held up by it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from edgewise.runtime.errors import InvalidInput

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(
        self,
        path: Path,
        max_bytes: int = 10 << 20,
        backups: int = 5,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_bytes < 1024:
            raise InvalidInput(f"audit-log-max-bytes must be at least 1024, not {max_bytes}")
        if backups < 1:
            raise InvalidInput(f"audit log backups must be at least 1, not {backups}")
        if not path.parent.is_dir():
            raise InvalidInput(f"audit-log: {path.parent} is not a folder")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        registry = registry if registry is not None else CollectorRegistry()
        self.written = Counter(
            "edgewise_audit_records", "Audit records written.", registry=registry
        )
        self.errors = Counter(
            "edgewise_audit_write_errors",
            "Audit records that could not be written (the error is logged).",
            registry=registry,
        )
        self.write({"event": "audit-log-opened", "pid": os.getpid()})

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                self._rotate_if_full(len(line))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.errors.inc()
                log.error("audit record not written to %s: %s: %s", self.path, exc, record)
                return
        self.written.inc()

    def _rotate_if_full(self, adding: int) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size == 0 or size + adding <= self.max_bytes:
            return
        for index in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{index}")
            if older.exists():
                os.replace(older, f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")
