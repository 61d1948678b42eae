"""How the ``edgewise`` command logs: ``--log-format text`` (the default, for people) or ``json``
(one object per line, for log pipelines).

A JSON line always has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``event`` (the
message) and ``logger``; ``model``, ``version``, ``request_id`` and ``trace_id`` where the record
knows them (passed as ``extra={"model": ...}``; ``trace_id`` also from the current OpenTelemetry
span, where tracing is on), and ``exception`` (the traceback) where there is one. Keys are
stable: a consumer may rely on them; none is added per message.

The format is also ``EDGEWISE_LOG_FORMAT``; the one chosen is written back there, so the server
processes ``serve --processes N`` starts log the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from edgewise.runtime.errors import InvalidInput

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
ENV_LOG_FORMAT = "EDGEWISE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The optional keys, taken from the record's attributes of the same name.
CONTEXT_KEYS = ("model", "version", "request_id", "trace_id")


def _current_trace_id() -> str | None:
    """The trace id of the current OpenTelemetry span, where tracing is on (opentelemetry was
    imported by the server's tracing): never imports it."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None and value != "":
                entry[key] = str(value)
        if "trace_id" not in entry:
            trace_id = _current_trace_id()
            if trace_id is not None:
                entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str | None) -> None:
    """Log at ``level`` to stderr in ``log_format`` (None: ``EDGEWISE_LOG_FORMAT``, else text);
    InvalidInput for an unknown format."""
    chosen = log_format or os.environ.get(ENV_LOG_FORMAT) or "text"
    if chosen not in LOG_FORMATS:
        raise InvalidInput(f"{ENV_LOG_FORMAT}={chosen!r}: not one of {', '.join(LOG_FORMATS)}")
    os.environ[ENV_LOG_FORMAT] = chosen  # the processes serve --processes starts log alike
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
