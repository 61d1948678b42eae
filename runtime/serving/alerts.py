"""The retraining hook: quality and drift alerts handed to a command or a webhook as JSON.

``edgewise serve --alert-command CMD`` runs ``CMD`` (split like a shell line, no shell) with the
alert as JSON on its standard input; ``--alert-webhook URL`` POSTs the same JSON. Both run on a
background thread with a timeout, so an alert never holds up a request; a failure is logged and
counted, never raised. Alerts fire once per transition (a detector firing, a model starting to
drift), not per request.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["AlertHook"]

log = logging.getLogger(__name__)


class AlertHook:
    def __init__(
        self, command: str | None = None, webhook: str | None = None, timeout: float = 30.0
    ) -> None:
        self.command = shlex.split(command) if command else None
        self.webhook = webhook
        self.timeout = timeout
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.webhook)

    def fire(self, kind: str, details: Mapping[str, Any]) -> threading.Thread | None:
        """Send one alert in the background; returns the thread (tests join it)."""
        if not self.enabled:
            return None
        payload = json.dumps(
            {"kind": kind, "time": time.time(), **details}, default=str, sort_keys=True
        ).encode()
        thread = threading.Thread(target=self._send, args=(payload,), daemon=True)
        thread.start()
        return thread

    def _send(self, payload: bytes) -> None:
        try:
            if self.command:
                done = subprocess.run(
                    self.command,
                    input=payload,
                    capture_output=True,
                    timeout=self.timeout,
                    check=False,
                )
                if done.returncode != 0:
                    stderr = done.stderr.decode(errors="replace")[:200]
                    raise RuntimeError(f"exited with {done.returncode}: {stderr}")
            if self.webhook:
                request = urllib.request.Request(
                    self.webhook,
                    data=payload,
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
            self.sent += 1
        except Exception as exc:
            self.failed += 1
            log.error("alert hook failed: %s: %s", type(exc).__name__, exc)
