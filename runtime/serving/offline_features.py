"""Point-in-time feature joins from Feast's offline store (file sources), without Feast: the
batch side of the feature contract (``edgewise batch`` on entity-keyed input files, and any
offline consumer). Checked against Feast's own ``get_historical_features`` in
``tests/runtime/features/test_feast_serving.py``.

:func:`historical_features` joins, to each entity row, the values of every requested feature
as of that row's timestamp: the source row of the same entity with the latest event timestamp
at or before it (ties: the latest created timestamp), and no older than the feature view's TTL
(when it has one); none: the features are null (NaN). That is Feast's point-in-time join.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgewise.runtime.serving.online_store import read_registry

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["historical_features"]

ROW: str = "__edgewise_row"


def _read_source(path: Path) -> pd.DataFrame:
    """A view's batch source, read once per content (size and modification time) while a few
    are cached: a batch job joins chunk after chunk against the same file. (A folder of files
    is read each time: its own time does not change when a file in it is rewritten.)"""
    if not path.is_file():
        import pandas as pd

        return pd.read_parquet(path)
    stat = path.stat()
    return _cached_source(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_source(path: str, size: int, mtime_ns: int) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(path)  # callers copy before changing it (rename, select)


def historical_features(
    entity_rows: pd.DataFrame,
    registry: Path,
    project: str,
    *,
    feature_service: str | None = None,
    features: Sequence[str] = (),
    timestamp_column: str = "event_timestamp",
    repo: Path | None = None,
) -> pd.DataFrame:
    """``entity_rows`` (join key columns and ``timestamp_column``, any other columns kept) with
    the features of ``feature_service`` (or ``features``, "view:feature" references) of the
    Feast file registry ``registry``, joined point in time. A relative source path is taken
    from ``repo`` (default: the registry's folder's parent, Feast's ``data/registry.db``
    layout). ValueError naming what is missing (a service, view, column or join key)."""
    import pandas as pd

    from edgewise.runtime.serving.features import FeatureSettings, resolve_features

    settings = FeatureSettings(
        registry=registry,
        project=project,
        store={"type": "sqlite", "path": ""},
        feature_service=feature_service,
        features=tuple(features),
    )
    if (feature_service is None) == (not features):
        raise ValueError("give feature_service or features (view:feature), one")
    catalog = read_registry(registry, project)
    wanted = resolve_features(catalog, settings)
    if timestamp_column not in entity_rows.columns:
        raise ValueError(f"entity rows have no {timestamp_column!r} column")
    base = repo if repo is not None else registry.parent.parent
    result = entity_rows.copy()
    result[ROW] = range(len(result))
    result[timestamp_column] = pd.to_datetime(result[timestamp_column], utc=True)
    for view_name, names in wanted.items():
        view = catalog.views[view_name]
        keys = [c.name for c in view.entity_columns] or [
            catalog.entities[e].name for e in view.entities if e in catalog.entities
        ]
        missing = [k for k in keys if k not in result.columns]
        if missing:
            raise ValueError(f"entity rows have no join key column(s) {', '.join(missing)}")
        if not view.source_path or not view.source_timestamp:
            raise ValueError(f"feature view {view_name!r}: its batch source is not a file source")
        path = Path(view.source_path.removeprefix("file://"))
        if not path.is_absolute():
            path = base / path
        source = _read_source(path).rename(columns=dict(view.source_mapping))
        stamp, created = view.source_timestamp, view.source_created
        columns = [*keys, stamp, *([created] if created else []), *names]
        absent = [c for c in columns if c not in source.columns]
        if absent:
            raise ValueError(f"feature view {view_name!r}: {path} has no column(s) {absent}")
        source = source[columns].copy()
        source[stamp] = pd.to_datetime(source[stamp], utc=True)
        order = [stamp, created] if created else [stamp]
        source = source.sort_values(order, kind="stable").rename(columns={stamp: ROW + "_ts"})
        if created:
            source = source.drop(columns=[created])
        # merge_asof keeps the last row among equal timestamps: the latest created one.
        left = result.sort_values(timestamp_column, kind="stable")
        tolerance = pd.Timedelta(seconds=view.ttl_seconds) if view.ttl_seconds > 0 else None
        joined = pd.merge_asof(
            left,
            source,
            left_on=timestamp_column,
            right_on=ROW + "_ts",
            by=keys,
            direction="backward",
            allow_exact_matches=True,
            tolerance=tolerance,
        )
        result = joined.drop(columns=[ROW + "_ts"]).sort_values(ROW, kind="stable")
    return result.drop(columns=[ROW]).reset_index(drop=True)
