"""Object storage for batch inputs and outputs: ``s3://``, ``gs://``, ``abfs://`` (and any URI
:func:`pyarrow.fs.FileSystem.from_uri` knows), with credentials from the standard environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``/``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for S3-compatible servers, ``GOOGLE_APPLICATION_CREDENTIALS``, Azure's
``AZURE_*``), as pyarrow reads them.

A plain path (no ``scheme://``) stays on the local filesystem and its code paths; ``file://``
URIs are taken as local paths.
"""

from __future__ import annotations

import re
from typing import Any, Final

from edgewise.runtime.errors import InvalidInput

__all__ = ["is_uri", "join", "local_path", "open_uri", "uri_name"]

_URI_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(text: str) -> bool:
    """True for an object-storage URI (``scheme://...``, not ``file://``)."""
    match = _URI_RE.match(text)
    return match is not None and match.group(1).lower() != "file"


def local_path(text: str) -> str:
    """A local path: ``file://`` removed."""
    return text[len("file://") :] if text.lower().startswith("file://") else text


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_uri(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and the path within it of ``uri``; :class:`InvalidInput` naming the
    URI. (Made afresh each time: it costs well under a millisecond, and the environment's
    credentials and endpoint are read each time.)"""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInput(f"{uri}: cannot open: {_one_line(exc)}") from None
    return filesystem, str(path)


def join(base: str, name: str) -> str:
    """``base/name`` for a URI or a local path."""
    return f"{base.rstrip('/')}/{name}"


def uri_name(uri: str) -> str:
    """The last component of a URI's path."""
    return uri.rstrip("/").rsplit("/", 1)[-1]
