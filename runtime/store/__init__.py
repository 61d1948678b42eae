"""Metadata stores: where model versions, their lineage, aliases and node reports live.

``open_store(uri)`` gives a :class:`~edgewise.runtime.store.base.Store` for a ``--store`` URI:
the embedded SQLite store (default) or the MLflow Model Registry over REST (see
:mod:`edgewise.runtime.store.uri`).
"""

from __future__ import annotations

from edgewise.runtime.store.base import (
    FileStream,
    Lineage,
    ModelSummary,
    NodeReport,
    Store,
    StoreAuthError,
    StoreUnavailable,
    VersionRecord,
    validate_alias,
    validate_artifact_path,
    validate_node_id,
)
from edgewise.runtime.store.uri import StoreURI, parse_store_uri

__all__ = [
    "FileStream",
    "Lineage",
    "ModelSummary",
    "NodeReport",
    "Store",
    "StoreAuthError",
    "StoreURI",
    "StoreUnavailable",
    "VersionRecord",
    "open_store",
    "parse_store_uri",
    "validate_alias",
    "validate_artifact_path",
    "validate_node_id",
]


def open_store(uri: StoreURI | str | None, timeout: float = 30.0, *, create: bool = False) -> Store:
    """The store a URI names (``None``: the embedded default). Only a publisher passes
    ``create=True``: a reader (the agent, ``models``) never creates the store it reads; it
    answers :class:`StoreUnavailable` while the store is missing and sees it when it comes
    back. (An MLflow store is never created: its tracking server owns it.)"""
    parsed = uri if isinstance(uri, StoreURI) else parse_store_uri(uri)
    if parsed.kind == "sqlite":
        from edgewise.runtime.store.sqlite import SqliteStore

        assert parsed.path is not None
        return SqliteStore(parsed.path, create=create)
    from edgewise.runtime.store.mlflow_rest import MlflowStore

    return MlflowStore(parsed.base_url, parsed.username, parsed.password, timeout=timeout)
