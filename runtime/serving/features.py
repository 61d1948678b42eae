"""Feature lookups: a model whose ``config.json`` has a ``features`` section is sent entity keys
(and the request-time inputs), and the serving core fills the rest of its input from the Feast
online store before the model runs. See docs/features.md.

One :class:`FeatureLookup` per served model version, built when the version loads (a feature
service or feature the registry does not have, or a column nothing can fill, fails the load with
the reason); per request, :meth:`FeatureLookup.feeds` checks the request's tensors, serializes
the entity keys, reads each feature view's values through a bounded cache with a TTL and from
the store under the model's latency budget, applies the missing / stale / store-error policies
and packs the model's input tensors in the manifest's column order: numeric columns (FP32,
from INT32/INT64/FLOAT/DOUBLE/BOOL features, or ``NAME[i]``: item i of a list of those),
and categorical ones (their own BYTES [batch, 1] tensor, from STRING features, UTF-8).
Feast itself is never imported here (online_store.py reads its layout).

Policies (each counted in ``edgewise_feature_skew_total`` or
``edgewise_feature_lookup_errors_total``):

* ``on_missing`` (an entity the store does not have; a single missing value, or a list of
  another length than the model's ``NAME[i]`` columns, always takes the default):
  ``default`` (the column's mean in the package's reference profile, a categorical
  column's most frequent category there) or ``not_found`` (NOT_FOUND naming the entity).
* ``on_stale`` (a value older than its feature view's TTL): ``serve`` (as Feast's own reads do,
  which mark it OUTSIDE_MAX_AGE), ``default`` or ``not_found``.
* ``on_store_error`` (store down, locked or slower than ``budget_ms``): ``unavailable``
  (UNAVAILABLE, the client may retry) or ``default``.
"""

from __future__ import annotations

import array
import re
import struct
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Histogram

from edgewise.runtime.errors import EdgewiseError, ErrorCode, InvalidInput, PackageError
from edgewise.runtime.serving.online_store import (
    BOOL,
    DOUBLE,
    FLOAT,
    INT32,
    INT64,
    STRING,
    VALUE_TYPE_NAMES,
    FeatureSpec,
    OnlineStore,
    RedisOnlineStore,
    Registry,
    SqliteOnlineStore,
    StoredRow,
    StoreError,
    entity_key,
    read_registry,
)

if TYPE_CHECKING:
    from edgewise.runtime.serving.codecs import TensorPlan
    from edgewise.runtime.serving.model import LoadedModel

__all__ = [
    "FeatureLookup",
    "FeatureMetrics",
    "FeatureNotFound",
    "FeatureSettings",
    "FeatureUnavailable",
    "attach_features",
    "open_store",
    "resolve_features",
]

LOOKUP_BUCKETS: Final = (
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip
MISSING_POLICIES: Final = ("default", "not_found")
STALE_POLICIES: Final = ("serve", "default", "not_found")
STORE_ERROR_POLICIES: Final = ("unavailable", "default")
#: The feature value types a numeric column of the model is filled from.
NUMERIC_TYPES: Final = (INT32, INT64, DOUBLE, FLOAT, BOOL)
#: The list types whose items fill numeric columns ``NAME[0]`` .. ``NAME[k-1]`` (feast.types
#: ValueType: INT32_LIST 13, INT64_LIST 14, DOUBLE_LIST 15, FLOAT_LIST 16, BOOL_LIST 17).
NUMERIC_LIST_TYPES: Final = (13, 14, 15, 16, 17)
#: Every list type (BYTES_LIST 11 .. UNIX_TIMESTAMP_LIST 18).
LIST_TYPES: Final = range(11, 19)
#: A model column that takes one item of a list feature: ``NAME[i]``.
_ITEM: Final = re.compile(r"^(.+)\[(0|[1-9][0-9]{0,5})\]$")


class FeatureNotFound(EdgewiseError):
    """An entity the online store does not have (or only stale values of), under ``not_found``."""

    code = ErrorCode.NOT_FOUND


class FeatureUnavailable(EdgewiseError):
    """The online store could not be read within the budget, under ``unavailable``."""

    code = ErrorCode.UNAVAILABLE


class _StoreDefaults(Exception):
    """Inside a lookup: the store failed and on_store_error is "default"."""


# ---- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSettings:
    """The ``features`` section of a model's ``config.json`` (paths relative to the model's
    folder, ``REPO/NAME``)."""

    registry: Path
    project: str
    store: Mapping[
        str, Any
    ]  # {"type": "sqlite", "path": P} | {"type": "redis", "connection_string": S}
    feature_service: str | None = None
    features: tuple[str, ...] = ()  # "view:feature" references (instead of a service)
    request_inputs: tuple[str, ...] = ()  # model columns the request sends itself
    budget_ms: float = 10.0
    cache_entries: int = 10_000
    cache_ttl_seconds: float = 5.0
    on_missing: str = "default"
    on_stale: str = "serve"
    on_store_error: str = "unavailable"

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base: Path) -> FeatureSettings:
        """ValueError naming the field that is wrong."""
        known = {
            "registry", "project", "online_store", "feature_service", "features",
            "request_inputs", "budget_ms", "cache", "on_missing", "on_stale", "on_store_error",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"features: unknown field(s) {', '.join(unknown)}")
        for name in ("registry", "project", "online_store"):
            if name not in data:
                raise ValueError(f"features.{name} is required")
        store = data["online_store"]
        if not isinstance(store, Mapping) or store.get("type") not in ("sqlite", "redis"):
            raise ValueError('features.online_store: {"type": "sqlite", "path": ...} or '
                             '{"type": "redis", "connection_string": "host:port"}')  # fmt: skip
        store = dict(store)
        if store["type"] == "sqlite":
            if not isinstance(store.get("path"), str):
                raise ValueError("features.online_store.path (the SQLite file) is required")
            store["path"] = str(base / store["path"])
        elif not isinstance(store.get("connection_string"), str):
            raise ValueError("features.online_store.connection_string is required for redis")
        service = data.get("feature_service")
        features = data.get("features", [])
        if (service is None) == (not features):
            raise ValueError("features: give feature_service or features (view:feature), one")
        if service is not None and not isinstance(service, str):
            raise ValueError("features.feature_service must be a string")
        if not isinstance(features, list) or any(
            not isinstance(f, str) or f.count(":") != 1 for f in features
        ):
            raise ValueError('features.features must be a list of "view:feature" strings')
        request_inputs = data.get("request_inputs", [])
        if not isinstance(request_inputs, list) or not all(
            isinstance(n, str) for n in request_inputs
        ):
            raise ValueError("features.request_inputs must be a list of column names")
        cache = data.get("cache", {})
        if not isinstance(cache, Mapping):
            raise ValueError("features.cache must be an object")
        settings = cls(
            registry=base / str(data["registry"]),
            project=str(data["project"]),
            store=store,
            feature_service=service,
            features=tuple(features),
            request_inputs=tuple(request_inputs),
            budget_ms=float(data.get("budget_ms", 10.0)),
            cache_entries=int(cache.get("entries", 10_000)),
            cache_ttl_seconds=float(cache.get("ttl_seconds", 5.0)),
            on_missing=str(data.get("on_missing", "default")),
            on_stale=str(data.get("on_stale", "serve")),
            on_store_error=str(data.get("on_store_error", "unavailable")),
        )
        if not settings.budget_ms > 0:
            raise ValueError("features.budget_ms must be > 0")
        if settings.cache_entries < 0 or settings.cache_ttl_seconds < 0:
            raise ValueError("features.cache: entries and ttl_seconds must be >= 0")
        for name, value, allowed in (
            ("on_missing", settings.on_missing, MISSING_POLICIES),
            ("on_stale", settings.on_stale, STALE_POLICIES),
            ("on_store_error", settings.on_store_error, STORE_ERROR_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"features.{name}: {value!r} is not one of {', '.join(allowed)}")
        return settings


def open_store(settings: FeatureSettings) -> OnlineStore:
    """The reader of the settings' online store (nothing is connected yet)."""
    if settings.store["type"] == "sqlite":
        return SqliteOnlineStore(Path(settings.store["path"]), settings.project)
    return RedisOnlineStore.from_connection_string(
        settings.store["connection_string"], settings.project
    )


def resolve_features(registry: Registry, settings: FeatureSettings) -> dict[str, tuple[str, ...]]:
    """The features to read, by feature view, from the settings' feature service or
    references; ValueError naming what the registry does not have."""
    if settings.feature_service is not None:
        projections = registry.services.get(settings.feature_service)
        if projections is None:
            have = ", ".join(sorted(registry.services)) or "none"
            raise ValueError(
                f"feature service {settings.feature_service!r} is not in the registry "
                f"{settings.registry} (project {settings.project!r}; services: {have})"
            )
        wanted = list(projections)
    else:
        grouped: dict[str, list[str]] = {}
        for ref in settings.features:
            view_ref, _, feature = ref.partition(":")
            grouped.setdefault(view_ref, []).append(feature)
        wanted = [(view_ref, tuple(names)) for view_ref, names in grouped.items()]
    result: dict[str, tuple[str, ...]] = {}
    for view_name, names in wanted:
        view = registry.views.get(view_name)
        if view is None:
            have = ", ".join(sorted(registry.views)) or "none"
            raise ValueError(
                f"feature view {view_name!r} is not in the registry {settings.registry} "
                f"(project {settings.project!r}; views: {have})"
            )
        known = {f.name for f in view.features}
        for name in names:
            if name not in known:
                raise ValueError(f"feature view {view_name!r} has no feature {name!r}")
        result[view_name] = tuple(dict.fromkeys((*result.get(view_name, ()), *names)))
    return result


def _join_keys(registry: Registry, view_name: str) -> tuple[FeatureSpec, ...]:
    view = registry.views[view_name]
    if view.entity_columns:
        return view.entity_columns
    return tuple(registry.entities[name] for name in view.entities if name in registry.entities)


# ---- metrics --------------------------------------------------------------------------------


class FeatureMetrics:
    """The lookups' counters and latency, on the server's registry (one per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "edgewise_feature_lookups",
            "Entity rows looked up in the online store (one per entity and feature view).",
            ["model"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "edgewise_feature_cache_hits",
            "Entity lookups answered by the feature cache.",
            ["model"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "edgewise_feature_cache_misses",
            "Entity lookups that read the online store.",
            ["model"],
            registry=registry,
        )
        self.skew = Counter(
            "edgewise_feature_skew",
            "Feature values a request could not get as trained: missing (entity not in the "
            "store), stale (older than the feature view's TTL) or length (a list feature of "
            "another length than the model's columns take), by model and reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            "edgewise_feature_lookup_errors",
            "Requests whose feature lookup failed, by model and reason: store_error, slow "
            "(over the budget), not_found (policy not_found), bad_entity.",
            ["model", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "edgewise_feature_lookup_seconds",
            "Feature lookup time of a request (cache and store).",
            ["model"],
            buckets=LOOKUP_BUCKETS,
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, FeatureMetrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def metrics_for(registry: CollectorRegistry) -> FeatureMetrics:
    with _METRICS_LOCK:
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = _METRICS[registry] = FeatureMetrics(registry)
        return metrics


# ---- the lookup -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    view: str
    feature: str
    input: str
    column: int
    default: float


@dataclass(frozen=True)
class _ViewPlan:
    name: str
    features: tuple[str, ...]
    keys: tuple[str, ...]  # join keys
    types: tuple[int, ...]
    ttl: float
    # (feature index, input, column, default, the list's item: -1 for a scalar feature)
    columns: tuple[tuple[int, str, int, float, int], ...]
    # Categorical columns: (feature index, input (BYTES [batch, 1]), default: utf-8)
    texts: tuple[tuple[int, str, bytes], ...] = ()
    # The list features whose items fill columns: (feature index, the length the model takes)
    lengths: tuple[tuple[int, int], ...] = ()


#: struct's codes of the numeric datatypes the lookup reads from a request.
_STRUCT_CODES: Final = {"INT64": "q", "INT32": "i", "FP32": "f", "FP64": "d"}


#: One value of each of those, unpacked (a request's one row: no format string to build).
_ONE: Final = {code: struct.Struct(f"<{code}").unpack for code in _STRUCT_CODES.values()}


def _numbers(plan: TensorPlan) -> list[Any]:
    """A numeric tensor's values, flat: raw contents (little endian, their size checked by
    plan_inputs) unpacked by struct, typed ones decoded. No numpy: a request at low load finds
    the CPU's caches cold, and there numpy's calls cost several times struct's."""
    code = _STRUCT_CODES.get(plan.datatype)
    if plan.raw is not None and code is not None:
        if plan.count == 1:
            return list(_ONE[code](plan.raw))
        return list(struct.unpack(f"<{plan.count}{code}", plan.raw))
    return list(plan.decode().reshape(-1).tolist())


def _key_header(keys: tuple[str, ...], types: tuple[int, ...]) -> tuple[bytes, Any] | None:
    """For a view with one integer join key: the serialized entity key's constant head and the
    packer of its value (``head + pack(value)`` is :func:`entity_key`); None otherwise."""
    if len(keys) != 1 or types[0] not in (INT64, INT32):
        return None
    name = keys[0].encode("utf-8")
    size, code = (8, "<q") if types[0] == INT64 else (4, "<i")
    head = struct.pack("<III", 1, STRING, len(name)) + name + struct.pack("<II", types[0], size)
    return head, struct.Struct(code).pack


#: The Python types of the values a numeric column takes as they are (bool: 0 or 1).
_NUMBERS: Final = frozenset((float, int, bool))

#: (model input, its columns to fill, the view's feature index of each: None, in order).
_Target = tuple[str, tuple[int, ...], list[int] | None]


def _targets(view: _ViewPlan) -> tuple[_Target, ...]:
    """Where a view's values go, per model input, for the row-at-once fill."""
    by_input: dict[str, list[tuple[int, int]]] = {}
    for index, target, column, _, _ in view.columns:
        by_input.setdefault(target, []).append((index, column))
    targets: list[_Target] = []
    for target, pairs in by_input.items():
        take = [index for index, _ in pairs]
        columns = tuple(column for _, column in pairs)
        targets.append((target, columns, None if take == list(range(len(view.features))) else take))
    return tuple(targets)


class _ModelMetrics:
    __slots__ = (
        "cache_hits", "cache_misses", "errors", "latency", "length", "lookups", "missing", "stale",
    )  # fmt: skip

    def __init__(self, metrics: FeatureMetrics, model: str) -> None:
        self.lookups = metrics.lookups.labels(model)
        self.cache_hits = metrics.cache_hits.labels(model)
        self.cache_misses = metrics.cache_misses.labels(model)
        self.missing = metrics.skew.labels(model, "missing")
        self.stale = metrics.skew.labels(model, "stale")
        self.length = metrics.skew.labels(model, "length")
        self.latency = metrics.latency.labels(model)
        self.errors = metrics.errors


class FeatureLookup:
    """The feature lookup of one served model version (see the module's docstring)."""

    def __init__(
        self,
        model_name: str,
        settings: FeatureSettings,
        store: OnlineStore,
        views: Sequence[_ViewPlan],
        entities: Mapping[str, int],
        request_inputs: Mapping[str, tuple[str, int]],
        filled: Mapping[str, int],
        passthrough: Sequence[str],
        metrics: FeatureMetrics,
        service_version: str = "",
        categorical: Sequence[str] = (),
    ) -> None:
        self.model_name = model_name
        self.settings = settings
        self.store = store
        self.views = tuple(views)
        self.entities = dict(entities)  # join key -> value type
        self.request_inputs = dict(request_inputs)  # column name -> (input, column)
        self.filled = dict(filled)  # model input -> its width (columns), filled here
        self.passthrough = tuple(passthrough)  # model inputs the request sends as they are
        self.categorical = tuple(categorical)  # BYTES [batch, 1] inputs filled here
        self.metrics = metrics
        self._m = _ModelMetrics(metrics, model_name)
        self.budget = settings.budget_ms / 1000
        self.service_version = service_version
        self._cache: dict[tuple[str, bytes], tuple[float, StoredRow]] = {}
        self._cache_lock = threading.Lock()
        self.accepted = frozenset((*self.entities, *self.request_inputs, *self.passthrough))
        self._plans = [
            (view, _targets(view), _key_header(view.keys, view.types), dict(view.lengths))
            for view in self.views
        ]
        # The per-request loops' items, made once.
        self._entity_items = tuple(self.entities.items())
        self._request_items = tuple(self.request_inputs.items())
        self._widths = tuple(self.filled.items())
        self._cached = bool(settings.cache_ttl_seconds and settings.cache_entries)

    def close(self) -> None:
        self.store.close()

    # ---- per request ---------------------------------------------------------------------------

    def feeds(
        self, model: LoadedModel, plans: Sequence[TensorPlan]
    ) -> tuple[dict[str, npt.NDArray[Any]], int]:
        """The model's feeds for a request's ``plans``, and its batch size."""
        given: dict[str, TensorPlan] = {}
        for plan in plans:
            if plan.name not in self.accepted:
                raise InvalidInput(
                    f"input {plan.name!r} is not an input of model {model.name!r}, which looks "
                    f"its features up (send: {', '.join(sorted(self.accepted))})"
                )
            given[plan.name] = plan
        if len(given) != len(self.accepted):
            missing = [name for name in sorted(self.accepted) if name not in given]
            raise InvalidInput(
                f"missing input(s) {', '.join(map(repr, missing))} for model {model.name!r}"
            )
        rows = -1
        columns: dict[str, list[Any]] = {}
        for name, kind in self._entity_items:
            values = self._column(given[name], kind)
            rows = self._rows(name, len(values), rows)
            columns[name] = values
        feeds: dict[str, npt.NDArray[Any]] = {}
        for name in self.passthrough:
            plan = given[name]
            model.check_input(name, plan.datatype, plan.shape)
            decoded = plan.decode()
            if decoded.ndim:
                rows = self._rows(name, decoded.shape[0], rows)
            feeds[name] = decoded
        rows = max(rows, 0)
        # The filled inputs are assembled as Python lists, row by row, and made arrays once:
        # cheaper than numpy's item and fancy assignments for the few values of a request.
        if rows == 1:
            matrices = {name: [[0.0] * width] for name, width in self._widths}
        else:
            matrices = {name: [[0.0] * width for _ in range(rows)] for name, width in self._widths}
        texts: dict[str, list[bytes]] = {name: [b""] * rows for name in self.categorical}
        for name, (target, column) in self._request_items:
            plan = given[name]
            shape = plan.shape
            if (
                plan.datatype not in _STRUCT_CODES
                or len(shape) not in (1, 2)
                or (len(shape) == 2 and shape[1] != 1)
            ):
                raise InvalidInput(
                    f"input {name!r}: a request-time feature is a numeric [batch] or [batch, 1] "
                    f"tensor (got {plan.datatype} {list(shape)})"
                )
            if shape[0] != rows:
                self._rows(name, shape[0], rows)
            matrix = matrices[target]
            if rows == 1:
                matrix[0][column] = _numbers(plan)[0]
            else:
                for r, value in enumerate(_numbers(plan)):
                    matrix[r][column] = value
        began = time.perf_counter()
        try:
            self._fill(matrices, texts, columns, rows, began)
        finally:
            self._m.latency.observe(time.perf_counter() - began)
        for name, width in self._widths:
            lines = matrices[name]
            flat = lines[0] if rows == 1 else [v for line in lines for v in line]
            feeds[name] = np.frombuffer(array.array("f", flat), dtype=np.float32).reshape(
                rows, width
            )
        for name, words in texts.items():
            feeds[name] = np.array(words, dtype=object).reshape(rows, 1)
        return feeds, rows

    def _rows(self, name: str, count: int, rows: int) -> int:
        if rows >= 0 and count != rows:
            raise InvalidInput(f"input {name!r}: batch size {count} differs from {rows}")
        return count

    def _column(self, plan: TensorPlan, kind: int) -> list[Any]:
        shape = plan.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(
                f"entity key {plan.name!r}: shape {list(shape)}, expected [batch] or [batch, 1]"
            )
        wanted = ("BYTES",) if kind == STRING else ("INT64", "INT32")
        if plan.datatype not in wanted:
            raise InvalidInput(
                f"entity key {plan.name!r}: datatype {plan.datatype}, expected "
                f"{' or '.join(wanted)} (the entity's type is {VALUE_TYPE_NAMES.get(kind, kind)})"
            )
        if kind == STRING:
            values = plan.decode().reshape(-1).tolist()
            try:
                return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
            except UnicodeDecodeError:
                raise InvalidInput(f"entity key {plan.name!r}: not UTF-8") from None
        return _numbers(plan)

    def _fill(
        self,
        matrices: dict[str, list[list[Any]]],
        texts: dict[str, list[bytes]],
        entities: Mapping[str, list[Any]],
        rows: int,
        began: float,
    ) -> None:
        m = self._m
        settings = self.settings
        now = time.time()
        for view, targets, header, lengths in self._plans:
            key_values = [entities[k] for k in view.keys]
            try:
                if header is not None:  # one integer join key: its constant head and the value
                    head, pack = header
                    keys = [head + pack(value) for value in key_values[0]]
                elif len(view.keys) == 1:
                    keys = [entity_key(view.keys, view.types, (value,)) for value in key_values[0]]
                else:
                    keys = [
                        entity_key(view.keys, view.types, [values[r] for values in key_values])
                        for r in range(rows)
                    ]
            except struct.error:  # an INT64 value sent for an INT32 entity, out of its range
                m.errors.labels(self.model_name, "bad_entity").inc()
                names = " or ".join(map(repr, view.keys))
                raise InvalidInput(
                    f"entity key {names}: a value out of the entity's range "
                    f"({', '.join(VALUE_TYPE_NAMES[t] for t in view.types)})"
                ) from None
            try:
                stored = self._read(view.name, keys, view.features, began)
            except _StoreDefaults:  # the store failed, on_store_error "default": the means
                for _, target, column, default, _ in view.columns:
                    for line in matrices[target]:
                        line[column] = default
                for _, target, word in view.texts:
                    texts[target][:] = [word] * rows
                continue
            m.lookups.inc(rows)
            for r, row in enumerate(stored):
                if row is None:
                    m.missing.inc(len(view.columns))
                    if settings.on_missing == "not_found":
                        self._refuse(view, key_values, r, "is not in the online store")
                    for _, target, column, default, _ in view.columns:
                        matrices[target][r][column] = default
                    for _, target, word in view.texts:
                        texts[target][r] = word
                    continue
                stamp, values = row
                stale = view.ttl > 0 and now - stamp > view.ttl
                if not (stale or view.texts or lengths) and _NUMBERS.issuperset(map(type, values)):
                    # Every value there and a number: the row's columns in one pass.
                    for target, columns, take in targets:
                        line = matrices[target][r]
                        for column, value in zip(
                            columns,
                            values if take is None else [values[i] for i in take],
                            strict=True,
                        ):
                            line[column] = value
                    continue
                if stale:
                    m.stale.inc(len(view.columns))
                    if settings.on_stale == "not_found":
                        self._refuse(view, key_values, r, "has only stale values")
                use_default = stale and settings.on_stale == "default"
                for index, target, column, default, item in view.columns:
                    value = values[index]
                    if item >= 0 and value is not None:  # an item of a list feature
                        if type(value) is list and len(value) == lengths[index]:
                            value = value[item]
                        else:  # a list of another length than the model takes: the default
                            m.length.inc()
                            value = default
                    if value is None or use_default or type(value) not in _NUMBERS:
                        if value is None:
                            m.missing.inc()
                        value = default
                    matrices[target][r][column] = value
                for index, target, word in view.texts:
                    value = values[index]
                    if value is None or use_default or not isinstance(value, str):
                        if value is None:
                            m.missing.inc()
                        texts[target][r] = word
                    else:
                        texts[target][r] = value.encode("utf-8")

    def _refuse(self, view: _ViewPlan, key_values: list[list[Any]], row: int, why: str) -> None:
        self._m.errors.labels(self.model_name, "not_found").inc()
        entity = ", ".join(f"{k}={v[row]!r}" for k, v in zip(view.keys, key_values, strict=True))
        raise FeatureNotFound(f"entity {entity} {why} (feature view {view.name!r})")

    def _read(
        self, view: str, keys: list[bytes], features: tuple[str, ...], began: float
    ) -> list[StoredRow]:
        m = self._m
        if not self._cached:
            m.cache_misses.inc(len(keys))
            return self._from_store(view, keys, features, began)
        ttl = self.settings.cache_ttl_seconds
        now = time.monotonic()
        cache = self._cache
        result: list[StoredRow] = [None] * len(keys)
        wanted: list[int] = []
        for i, key in enumerate(keys):
            entry = cache.get((view, key))
            if entry is not None and entry[0] > now:
                result[i] = entry[1]
            else:
                wanted.append(i)
        hits = len(keys) - len(wanted)
        if hits:
            m.cache_hits.inc(hits)
        if not wanted:
            return result
        m.cache_misses.inc(len(wanted))
        fetched = self._from_store(view, [keys[i] for i in wanted], features, began)
        expires = time.monotonic() + ttl
        with self._cache_lock:
            for i, row in zip(wanted, fetched, strict=True):
                result[i] = row
                cache.pop((view, keys[i]), None)
                cache[(view, keys[i])] = (expires, row)
            while len(cache) > self.settings.cache_entries:  # the oldest entries go first
                del cache[next(iter(cache))]
        return result

    def _from_store(
        self, view: str, keys: list[bytes], features: tuple[str, ...], began: float
    ) -> list[StoredRow]:
        left = self.budget - (time.perf_counter() - began)
        try:
            if left <= 0:
                raise StoreError(f"no time left of the {self.settings.budget_ms:g} ms budget")
            return self.store.read(view, keys, features, left)
        except StoreError as exc:
            slow = "budget" in str(exc)
            self._m.errors.labels(self.model_name, "slow" if slow else "store_error").inc()
            if self.settings.on_store_error == "default":
                raise _StoreDefaults from None
            raise FeatureUnavailable(
                f"model {self.model_name!r}: feature lookup failed: {exc}"
            ) from None


# ---- building one at load -------------------------------------------------------------------


def _profile_defaults(model: LoadedModel) -> tuple[dict[str, float], dict[str, str]]:
    """The defaults of the package's reference profile: each numeric column's mean, each
    categorical column's most frequent category (by column name)."""
    from edgewise.runtime.package.reference_profile import read_profile

    try:
        profile = read_profile(model.folder, model.manifest)
    except EdgewiseError:
        return {}, {}
    if profile is None:
        return {}, {}
    means: dict[str, float] = {}
    if profile.numeric is not None:
        means = {
            name: float(value)
            for name, value in zip(profile.numeric.names, profile.numeric.moments[1], strict=True)
            if np.isfinite(value)
        }
    modes = {
        c.name: c.categories[int(np.argmax(c.counts[:-1]))]
        for c in profile.categorical
        if c.categories and c.counts[:-1].sum() > 0
    }
    return means, modes


def _check_list_column(
    column: str, column_kind: str, view: str, name: str, kind: int, item: int, datatype: str
) -> None:
    """A model column ``column`` filled from item ``item`` (-1: the column is named like the
    feature itself) of the feature ``view:name`` of value type ``kind``, a list or ``item``
    >= 0: ValueError, one line naming the feature, unless it is a numeric (FP32) column
    ``NAME[i]`` of a list of numbers."""
    type_name = VALUE_TYPE_NAMES.get(kind, str(kind))
    if kind not in LIST_TYPES:
        raise ValueError(
            f"column {column!r}: feature {view}:{name} is {type_name}, not a list whose items "
            f"fill columns {name}[0] .. {name}[k-1]"
        )
    what = f"feature {view}:{name} is a list ({type_name})"
    if kind not in NUMERIC_LIST_TYPES:
        raise ValueError(
            f"column {column!r}: {what}; only lists of numbers "
            f"({', '.join(VALUE_TYPE_NAMES[k] for k in NUMERIC_LIST_TYPES)}) fill a model's "
            "columns"
        )
    if item < 0:
        raise ValueError(
            f"column {column!r}: {what}, whose items fill numeric columns named {name}[0] .. "
            f"{name}[k-1] (k its length), not a column named {name!r}"
        )
    if column_kind == "categorical" or datatype != "FP32":
        raise ValueError(f"column {column!r}: {what}; its items fill numeric (FP32) columns")


def build_lookup(
    model: LoadedModel, settings: FeatureSettings, metrics: FeatureMetrics
) -> FeatureLookup:
    """The lookup of ``model`` (ValueError naming what does not fit)."""
    registry = read_registry(settings.registry, settings.project)
    wanted = resolve_features(registry, settings)
    by_name: dict[str, tuple[str, str]] = {}
    for view, names in wanted.items():
        for name in names:
            by_name.setdefault(name, (view, name))
            by_name[f"{view}__{name}"] = (view, name)
    defaults, modes = _profile_defaults(model)
    needs_default = "default" in (settings.on_missing, settings.on_stale, settings.on_store_error)
    placed: dict[str, list[tuple[int, str, int, float, int]]] = {view: [] for view in wanted}
    texts: dict[str, list[tuple[int, str, bytes]]] = {view: [] for view in wanted}
    items: dict[tuple[str, str], list[int]] = {}  # list feature -> the items columns take
    looked_up: set[str] = set()  # the model's columns filled from the store
    request_inputs: dict[str, tuple[str, int]] = {}
    filled: dict[str, int] = {}
    for feature in model.manifest.features:
        source = by_name.get(feature.name)
        item = -1
        if source is None:
            match = _ITEM.match(feature.name)
            if match is None or match.group(1) not in by_name:
                continue
            source, item = by_name[match.group(1)], int(match.group(2))
        view, name = source
        kind = next(f.value_type for f in registry.views[view].features if f.name == name)
        spec = model.input_specs[feature.input]
        looked_up.add(feature.name)
        if item >= 0 or kind in LIST_TYPES:
            # A list feature: each item fills a numeric column NAME[i] (0 <= i < its length).
            _check_list_column(feature.name, feature.kind, view, name, kind, item, spec.datatype)
            items.setdefault((view, name), []).append(item)
        if feature.kind == "categorical":
            # A categorical column: its own BYTES [batch, 1] tensor, from a STRING feature.
            if kind != STRING:
                raise ValueError(
                    f"column {feature.name!r} is categorical: feature {view}:{name} is "
                    f"{VALUE_TYPE_NAMES.get(kind, kind)}, not STRING"
                )
            if spec.datatype != "BYTES":
                raise ValueError(f"input {feature.input!r}: a categorical column is BYTES")
            mode = modes.get(feature.name)
            if mode is None and needs_default:
                raise ValueError(
                    f"column {feature.name!r}: the 'default' policy needs its most frequent "
                    "category in the package's reference profile, which has none "
                    "(use not_found/unavailable)"
                )
            texts[view].append((wanted[view].index(name), feature.input, (mode or "").encode()))
            continue
        if spec.datatype != "FP32":
            raise ValueError(f"input {feature.input!r}: looked-up features fill FP32 tensors")
        if item < 0 and kind not in NUMERIC_TYPES:
            raise ValueError(
                f"column {feature.name!r}: feature {view}:{name} is "
                f"{VALUE_TYPE_NAMES.get(kind, kind)}, not a number this numeric column takes "
                f"({', '.join(VALUE_TYPE_NAMES[k] for k in NUMERIC_TYPES)})"
            )
        filled[feature.input] = sum(1 for f in model.manifest.features if f.input == feature.input)
        default = defaults.get(feature.name)
        if default is None:
            if needs_default:
                raise ValueError(
                    f"column {feature.name!r}: the 'default' policy needs its mean in the "
                    "package's reference profile, which has none (use not_found/unavailable)"
                )
            default = float("nan")
        placed[view].append(
            (wanted[view].index(name), feature.input, feature.column, default, item)
        )
    lengths: dict[str, list[tuple[int, int]]] = {view: [] for view in wanted}
    for (view, name), taken in items.items():
        if sorted(taken) != list(range(len(taken))):
            have = ", ".join(f"{name}[{i}]" for i in sorted(taken))
            raise ValueError(
                f"list feature {view}:{name}: the model's columns {have} do not number its "
                f"items 0 to {len(taken) - 1}, each once"
            )
        lengths[view].append((wanted[view].index(name), len(taken)))
    categorical = [target for entries in texts.values() for _, target, _ in entries]
    if not filled and not categorical:
        raise ValueError("no column of the model's inputs is a looked-up feature")
    for feature in model.manifest.features:
        if feature.input in filled and feature.name not in looked_up:
            if feature.name not in settings.request_inputs:
                raise ValueError(
                    f"column {feature.name!r} of input {feature.input!r} is neither a "
                    "looked-up feature nor in features.request_inputs"
                )
            request_inputs[feature.name] = (feature.input, feature.column)
    unknown = sorted(set(settings.request_inputs) - set(request_inputs))
    if unknown:
        raise ValueError(f"request_inputs {', '.join(unknown)}: not a column of a filled input")
    entities: dict[str, int] = {}
    views: list[_ViewPlan] = []
    for view_name, names in wanted.items():
        keys = _join_keys(registry, view_name)
        if not keys:
            raise ValueError(f"feature view {view_name!r} has no entity (join key) to look up")
        for key in keys:
            if key.value_type not in (INT64, INT32, STRING):
                raise ValueError(f"join key {key.name!r}: entity type not served")
            if key.name in model.input_specs:
                raise ValueError(f"join key {key.name!r} is also an input of the model")
            entities[key.name] = key.value_type
        views.append(
            _ViewPlan(
                view_name,
                names,
                tuple(k.name for k in keys),
                tuple(k.value_type for k in keys),
                registry.views[view_name].ttl_seconds,
                tuple(placed[view_name]),
                tuple(texts[view_name]),
                tuple(lengths[view_name]),
            )
        )
    passthrough = [
        name for name in model.input_specs if name not in filled and name not in categorical
    ]
    version = ""
    if settings.feature_service is not None:
        updated = registry.service_updated.get(settings.feature_service)
        version = "" if updated is None else f"{updated:.6f}"
    return FeatureLookup(
        model.name,
        settings,
        open_store(settings),
        views,
        entities,
        request_inputs,
        filled,
        passthrough,
        metrics,
        version,
        categorical,
    )


def attach_features(
    model: LoadedModel, section: Mapping[str, Any], registry: CollectorRegistry | None
) -> None:
    """Build ``model.features`` from its ``config.json`` ``features`` section; PackageError
    (the version fails to load, with the reason) when it does not fit."""
    try:
        settings = FeatureSettings.from_json(section, model.folder.parent)
        metrics = metrics_for(registry if registry is not None else CollectorRegistry())
        model.features = build_lookup(model, settings, metrics)
    except (ValueError, TypeError, KeyError) as exc:
        raise PackageError(f"model {model.name!r}: features: {exc}") from None
