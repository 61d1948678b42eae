"""Store URIs.

- ``sqlite:///relative/store.db`` or ``sqlite:////absolute/store.db`` (three slashes then a
  relative path, four for an absolute one, as SQLAlchemy and MLflow write them), or a bare path:
  the embedded store; its artifacts live in the folder ``<db file>-artifacts`` beside it.
- ``mlflow://host:port`` (plain HTTP), ``mlflow+https://host[:port][/prefix]``, or an
  ``http(s)://host:port[/prefix]`` URL: an MLflow tracking server with its Model Registry.
  Credentials for HTTP Basic authentication may be given as ``user:password@`` in the URI or,
  better, through :attr:`StoreURI.with_credentials` from the environment
  (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, as the mlflow client reads them).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

from edgewise.runtime.errors import InvalidInput

__all__ = ["DEFAULT_STORE_PATH", "StoreURI", "parse_store_uri"]

DEFAULT_STORE_PATH: Final = Path("~/.edgewise/store.db")

StoreKind = Literal["sqlite", "mlflow"]


@dataclass(frozen=True)
class StoreURI:
    kind: StoreKind
    path: Path | None = None  # sqlite: the database file
    base_url: str = ""  # mlflow: scheme://host:port[/prefix], no credentials, no trailing slash
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        """The URI without its password (safe to log)."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        return self.base_url

    def with_credentials(self, username: str | None, password: str | None) -> StoreURI:
        """Fill in credentials the URI itself does not carry."""
        if self.kind != "mlflow" or self.username is not None or not username:
            return self
        return replace(self, username=username, password=password or "")


def parse_store_uri(text: str | None, default: Path = DEFAULT_STORE_PATH) -> StoreURI:
    """Parse a ``--store`` value; None or "" is the embedded store at ``default``."""
    if not text:
        return StoreURI("sqlite", path=default.expanduser())
    if text.startswith("sqlite:"):
        rest = text[len("sqlite:") :]
        if not rest.startswith("///"):
            raise InvalidInput(f"store {text!r}: write sqlite:///relative/path or sqlite:////abs")
        path_text = rest[3:]
        if not path_text or path_text.endswith("/"):
            raise InvalidInput(f"store {text!r}: name a database file")
        return StoreURI("sqlite", path=Path(urllib.parse.unquote(path_text)).expanduser())
    scheme, sep, _ = text.partition("://")
    if not sep:
        return StoreURI("sqlite", path=Path(text).expanduser())
    scheme = scheme.lower()
    http_scheme = {"mlflow": "http", "mlflow+http": "http", "mlflow+https": "https"}.get(
        scheme, scheme
    )
    if http_scheme not in ("http", "https"):
        raise InvalidInput(
            f"store {text!r}: unknown scheme {scheme!r} (use sqlite:///, mlflow://, http(s)://)"
        )
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"store {text!r}: {exc}") from None
    if not parts.hostname:
        raise InvalidInput(f"store {text!r}: no host")
    if parts.query or parts.fragment:
        raise InvalidInput(f"store {text!r}: no query or fragment allowed")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    prefix = parts.path.rstrip("/")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return StoreURI(
        "mlflow",
        base_url=f"{http_scheme}://{netloc}{prefix}",
        username=username,
        password=password if username is not None else None,
    )
