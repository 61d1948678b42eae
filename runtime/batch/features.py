"""Feature joins for batch jobs: a model whose ``config.json`` declares Feast feature lookups
(``features``, see docs/features.md) is scored on entity-keyed input files, its looked-up
features joined point in time from Feast's file offline store before scoring: the batch side of
the contract the server keeps with the online store.

An input row brings the feature views' join keys, an event timestamp (``--event-timestamp``,
default ``event_timestamp``) and the model's other columns (``features.request_inputs``); each
looked-up feature gets the value of the same entity as of that timestamp
(:func:`edgewise.runtime.serving.offline_features.historical_features`: the latest source row at
or before it, within the view's TTL; checked against Feast's ``get_historical_features``). A
row with no value for a feature follows ``features.on_missing``, as serving does: ``default``
fills the reference profile's mean of the column; ``not_found`` fails the job, naming the file,
the row and the entity (strict), or sets the row aside under ``--bad-records``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from edgewise.runtime.batch.reader import ColumnSpec
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import Manifest

__all__ = ["DEFAULT_TIMESTAMP", "FeatureJoin", "features_section", "plan_join"]

DEFAULT_TIMESTAMP: Final = "event_timestamp"


def features_section(model_dir: Path) -> dict[str, Any] | None:
    """The ``features`` section of ``MODEL/config.json``, or None."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read: {exc}") from None
    section = data.get("features") if isinstance(data, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict):
        raise InvalidInput(f"{path}: features must be an object")
    return section


@dataclass(frozen=True)
class FeatureJoin:
    """How a job joins a model's looked-up features (see the module docstring)."""

    registry: Path
    project: str
    feature_service: str | None
    references: tuple[str, ...]
    timestamp: str
    looked_up: dict[str, str]  # model column -> the joined column (the feature's name)
    keys: tuple[str, ...]  # the join keys the input brings
    on_missing: str
    defaults: dict[str, float]  # model column -> the reference profile's mean ("default")

    def read_columns(self, columns: ColumnSpec) -> ColumnSpec:
        """What the input files must hold: the model's columns that are not looked up, the join
        keys and the timestamp (beside the job's id columns)."""
        kept = tuple(f for f in columns.features if f.name not in self.looked_up)
        extra = [c for c in (*self.keys, self.timestamp) if c not in columns.id_columns]
        return ColumnSpec(kept, (*columns.id_columns, *extra))

    def to_json(self) -> dict[str, Any]:
        return {
            "registry": str(self.registry),
            "project": self.project,
            "feature_service": self.feature_service,
            "features": list(self.references),
            "event_timestamp": self.timestamp,
            "on_missing": self.on_missing,
        }

    def join(
        self, table: Any, columns: ColumnSpec, path: str, first_row: int
    ) -> tuple[Any, list[dict[str, Any]]]:
        """``table`` (a chunk as read) with the looked-up columns joined (columns in
        ``columns``' order: the model's features, then the id columns), and the rows set aside
        for missing values (``not_found``: the caller fails the job or writes them to
        --bad-records). ``first_row``: the chunk's first row in the file (0-based)."""
        from edgewise.runtime.serving.offline_features import historical_features

        frame = table.to_pandas()
        try:
            joined = historical_features(
                frame,
                self.registry,
                self.project,
                feature_service=self.feature_service,
                features=self.references,
                timestamp_column=self.timestamp,
            )
        except (ValueError, OSError) as exc:
            raise InvalidInput(f"{path}: cannot join features: {exc}") from None
        missing = np.zeros(len(joined), dtype=bool)
        reasons: dict[int, str] = {}
        for column, joined_name in self.looked_up.items():
            absent = joined[joined_name].isna().to_numpy()
            values = joined[joined_name].to_numpy(dtype=np.float64, na_value=np.nan)
            if not absent.any():
                continue
            if self.on_missing == "default":
                values = np.where(absent, self.defaults.get(column, np.nan), values)
            else:
                for at in np.flatnonzero(absent & ~missing).tolist():
                    reasons[int(at)] = column
                missing |= absent
            joined[joined_name] = values
        bad: list[dict[str, Any]] = []
        if reasons:
            original = frame.iloc[sorted(reasons)]
            for row in sorted(reasons):
                keys = ", ".join(f"{k}={frame[k].iloc[row]!r}" for k in self.keys)
                bad.append(
                    {
                        "input": path,
                        "row": first_row + row + 1,
                        "column": reasons[row],
                        "reason": (
                            f"no value of feature {reasons[row]!r} for {keys} at "
                            f"{frame[self.timestamp].iloc[row]} (features.on_missing is not_found)"
                        ),
                        "record": json.loads(
                            original.loc[[frame.index[row]]].to_json(
                                orient="records", date_format="iso"
                            )
                        )[0],
                    }
                )
            joined = joined[~missing]
        arrays = []
        names = []
        for feature in columns.features:
            source = self.looked_up.get(feature.name)
            if source is None:
                arrays.append(table.column(feature.name).filter(pa.array(~missing)))
            else:
                arrays.append(pa.array(joined[source].to_numpy(dtype=np.float64)))
            names.append(feature.name)
        for name in columns.id_columns:
            if name not in names:
                arrays.append(table.column(name).filter(pa.array(~missing)))
                names.append(name)
        return pa.table(arrays, names=names), bad


def _profile_means(version_dir: Path, manifest: Manifest) -> dict[str, float]:
    from edgewise.runtime.errors import EdgewiseError
    from edgewise.runtime.package.reference_profile import read_profile

    try:
        profile = read_profile(version_dir, manifest)
    except EdgewiseError:
        return {}
    if profile is None or profile.numeric is None:
        return {}
    means = profile.numeric.moments[1]
    return {
        name: float(value)
        for name, value in zip(profile.numeric.names, means, strict=True)
        if np.isfinite(value)
    }


def plan_join(
    model_dir: Path, version_dir: Path, manifest: Manifest, timestamp: str | None
) -> FeatureJoin | None:
    """The job's feature join when the model declares lookups (None otherwise); InvalidInput
    naming what does not fit (the registry, the service, a column)."""
    section = features_section(model_dir)
    if section is None:
        if timestamp is not None:
            raise InvalidInput(
                f"--event-timestamp {timestamp!r}: the model declares no feature lookups "
                f"({model_dir / 'config.json'} has no features section)"
            )
        return None
    from edgewise.runtime.serving.features import FeatureSettings, resolve_features
    from edgewise.runtime.serving.online_store import read_registry

    try:
        settings = FeatureSettings.from_json(section, model_dir)
        registry = read_registry(settings.registry, settings.project)
        wanted = resolve_features(registry, settings)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInput(f"model features ({model_dir / 'config.json'}): {exc}") from None
    by_name: dict[str, str] = {}
    keys: list[str] = []
    for view, names in wanted.items():
        for name in names:
            by_name.setdefault(name, name)
            by_name[f"{view}__{name}"] = name
        spec = registry.views[view]
        view_keys = [c.name for c in spec.entity_columns] or [
            registry.entities[e].name for e in spec.entities if e in registry.entities
        ]
        keys.extend(k for k in view_keys if k not in keys)
    looked_up = {f.name: by_name[f.name] for f in manifest.features if f.name in by_name}
    if not looked_up:
        raise InvalidInput(
            f"model features ({model_dir / 'config.json'}): no column of the model is a "
            "looked-up feature"
        )
    for feature in manifest.features:
        if feature.name in looked_up and feature.kind != "numeric":
            raise InvalidInput(f"column {feature.name!r}: only numeric features are looked up")
    defaults = _profile_means(version_dir, manifest) if settings.on_missing == "default" else {}
    if settings.on_missing == "default":
        lacking = [c for c in looked_up if c not in defaults]
        if lacking:
            raise InvalidInput(
                f"column {lacking[0]!r}: features.on_missing 'default' needs its mean in the "
                "package's reference profile, which has none"
            )
    return FeatureJoin(
        registry=settings.registry,
        project=settings.project,
        feature_service=settings.feature_service,
        references=settings.features,
        timestamp=timestamp or DEFAULT_TIMESTAMP,
        looked_up=looked_up,
        keys=tuple(keys),
        on_missing=settings.on_missing,
        defaults=defaults,
    )
