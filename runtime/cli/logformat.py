"""How the ``edgewise`` command logs: ``--log-format text`` (the default, for people) or ``json``
(one object per line, for log pipelines).

A JSON line always has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``event`` (the
message) and ``logger``; ``model``, ``version``, ``request_id`` and ``trace_id`` where the record
knows them: passed as ``extra={"model": ...}``, else the labels of the inference call being
served where the line was logged (runtime/serving/request_context.py: the serving core sets them
for each call's work), else (``trace_id``) the current OpenTelemetry span's, where tracing is on;
and ``exception`` (the traceback) where there is one. Keys are stable: a consumer may rely on
them; none is added per message. A text line about a call ends with the same keys, compactly:
`` [model=churn version=2 request_id=9f2c... trace_id=4bf9...]``.

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
from edgewise.runtime.serving.request_context import current

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "configure_logging"]

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


def context_of(record: logging.LogRecord) -> dict[str, str]:
    """The context keys of ``record`` that have a value (see the module's docstring), in
    :data:`CONTEXT_KEYS`' order. Read where the record is formatted: on the thread that logged
    it (the handlers here are synchronous), so the current labels are the logging call's."""
    labels = current()
    found: dict[str, str] = {}
    for key in CONTEXT_KEYS:
        value = getattr(record, key, None)
        if (value is None or value == "") and labels is not None:
            value = getattr(labels, key)
        if value is not None and value != "":
            found[key] = str(value)
    if "trace_id" not in found:
        trace_id = _current_trace_id()
        if trace_id is not None:
            found["trace_id"] = trace_id
    return found


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
        entry.update(context_of(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, a line about a call ending with its keys in brackets (a value that
    is not printable is quoted, so a line stays one line)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        found = context_of(record)
        if not found:
            return line
        pairs = " ".join(
            f"{key}={value if value.isprintable() and ' ' not in value else repr(value)}"
            for key, value in found.items()
        )
        return f"{line} [{pairs}]"


def configure_logging(level: str, log_format: str | None) -> None:
    """Log at ``level`` to stderr in ``log_format`` (None: ``EDGEWISE_LOG_FORMAT``, else text);
    InvalidInput for an unknown format."""
    chosen = log_format or os.environ.get(ENV_LOG_FORMAT) or "text"
    if chosen not in LOG_FORMATS:
        raise InvalidInput(f"{ENV_LOG_FORMAT}={chosen!r}: not one of {', '.join(LOG_FORMATS)}")
    os.environ[ENV_LOG_FORMAT] = chosen  # the processes serve --processes starts log alike
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
