"""Server settings: the one place that reads environment variables.

Precedence: command-line flags, then ``EDGEWISE_*`` environment variables, then the defaults
here. Each field documents its environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.model import SessionSettings
from edgewise.runtime.repository import VersionPolicy

__all__ = ["ServerSettings"]

ENV_PREFIX = "EDGEWISE_"


@dataclass(frozen=True)
class ServerSettings:
    repo: Path = Path("model-repo")  # EDGEWISE_REPO
    host: str = "0.0.0.0"  # EDGEWISE_HOST
    port: int = 8001  # EDGEWISE_PORT (0 picks a free port)
    metrics_host: str = "0.0.0.0"  # EDGEWISE_METRICS_HOST
    metrics_port: int = 8002  # EDGEWISE_METRICS_PORT (0 picks a free port, -1 disables)
    max_message_bytes: int = 64 << 20  # EDGEWISE_MAX_MESSAGE_BYTES
    worker_threads: int = 4  # EDGEWISE_WORKER_THREADS: large requests and control work
    inline_max_bytes: int = 64 * 1024  # EDGEWISE_INLINE_MAX_BYTES: run on the event loop below
    intra_op_threads: int = 1  # EDGEWISE_INTRA_OP_THREADS
    inter_op_threads: int = 1  # EDGEWISE_INTER_OP_THREADS
    version_policy: str = "latest:1"  # EDGEWISE_VERSION_POLICY: latest:N | all | specific:1,2
    grace_seconds: float = 10.0  # EDGEWISE_GRACE_SECONDS: finish in-flight work on SIGTERM
    port_file: Path | None = None  # EDGEWISE_PORT_FILE: write "grpc_port metrics_port" when ready

    def session_settings(self) -> SessionSettings:
        return SessionSettings(
            intra_op_threads=self.intra_op_threads, inter_op_threads=self.inter_op_threads
        )

    def policy(self) -> VersionPolicy:
        return VersionPolicy.parse(self.version_policy)

    @classmethod
    def from_sources(
        cls, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> ServerSettings:
        """Defaults, then ``EDGEWISE_*`` variables, then the non-None ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _convert(field.name, field.type, raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port {self.port} is not a TCP port")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidInput(f"metrics port {self.metrics_port} is not a TCP port")
        for name in ("worker_threads", "intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name.replace('_', '-')} must be at least 1")
        if self.max_message_bytes < 1024:
            raise InvalidInput("max-message-bytes must be at least 1024")
        self.policy()


def _convert(name: str, type_name: object, raw: str) -> Any:
    text = str(type_name)
    try:
        if "Path" in text:
            return Path(raw)
        if text == "int":
            return int(raw)
        if text == "float":
            return float(raw)
    except ValueError:
        raise InvalidInput(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {text}") from None
    return raw
