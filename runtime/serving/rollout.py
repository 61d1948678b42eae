"""Progressive delivery on one server: traffic splits, shadow copies and version labels.

Per model (docs/rollout.md):

* a **split**: requests that name no version are shared between served versions by weight (the
  weights sum to 100), at random or, with a sticky key, by a hash of that key (a request
  parameter's value, or the request id): a key always lands on the same version;
* a **shadow**: a sample of the answered requests is copied to a candidate version on a worker
  thread (:mod:`edgewise.runtime.serving.shadow`); the client's answer never changes;
* **labels**: names (``stable``, ``canary``, any ``[A-Za-z][A-Za-z0-9_.-]*``) for served versions,
  resolvable wherever a version is given (inference, metadata, readiness, monitoring, quality).

Control validates, then commits: a refused change (weights that do not sum to 100, a version or
label that is not loaded, a bad sticky key or rate) raises :class:`InvalidInput` naming the field
(:class:`ModelNotFound` for a model that is not served; a plain :class:`EdgewiseError`, INTERNAL,
when ``rollout.json`` cannot be written) and leaves everything as it was. A committed change is
written to ``<repo>/<model>/rollout.json`` (atomically, before the running state changes; a
reader never creates it), read back when the server starts, and published as metrics where it
happens.

The request path reads one immutable snapshot per model without a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Gauge

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.config.values import known_keys
from edgewise.runtime.errors import EdgewiseError, InvalidInput
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb

if TYPE_CHECKING:
    from edgewise.runtime.serving.dataplane import PreparedRequest
    from edgewise.runtime.serving.repository import ModelRepository
    from edgewise.runtime.serving.shadow import Shadow

__all__ = [
    "ROLLOUT_FILE",
    "STICKY_REQUEST_ID",
    "ModelRoutes",
    "Rollouts",
    "ShadowRoute",
    "Split",
    "bucket",
    "read_routes",
]

log = logging.getLogger(__name__)

ROLLOUT_FILE: Final = "rollout.json"
#: The sticky key that hashes the request id (any other key names a request parameter).
STICKY_REQUEST_ID: Final = "request_id"
_LABEL: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_NUMBER: Final = re.compile(r"[0-9]+")  # ASCII digits ("²".isdigit() is True; int() refuses it)
_FILE_KEYS: Final = frozenset({"split", "shadow", "labels"})
_SPLIT_KEYS: Final = frozenset({"weights", "sticky_key"})
_SHADOW_KEYS: Final = frozenset({"version", "rate"})


def bucket(key: str) -> float:
    """Where ``key`` falls in [0, 100): a hash, the same in every process and every time."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / float(1 << 64) * 100.0


@dataclass(frozen=True)
class Split:
    """Served versions and their weights (summing to 100), and the sticky key ("" random)."""

    weights: tuple[tuple[int, int], ...]
    sticky_key: str = ""

    def pick(self, request: pb.ModelInferRequest) -> int:
        point = self._point(request)
        total = 0
        for version, weight in self.weights:
            total += weight
            if point < total:
                return version
        return self.weights[-1][0]

    def _point(self, request: pb.ModelInferRequest) -> float:
        key = self.sticky_key
        if key:
            if key != STICKY_REQUEST_ID and key in request.parameters:
                parameter = request.parameters[key]
                which = parameter.WhichOneof("parameter_choice")
                if which is not None:
                    return bucket(str(getattr(parameter, which)))
            if request.id:
                return bucket(request.id)
        return random.random() * 100.0


@dataclass(frozen=True)
class ShadowRoute:
    """Copy a share ``rate`` of the answered requests to ``version``."""

    version: int
    rate: float = 1.0

    def takes(self, request_id: str) -> bool:
        if self.rate >= 1.0:
            return True
        if request_id:
            return bucket(request_id) < self.rate * 100.0
        return random.random() < self.rate


@dataclass(frozen=True)
class ModelRoutes:
    split: Split | None = None
    shadow: ShadowRoute | None = None
    labels: Mapping[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.split is None and self.shadow is None and not self.labels

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"labels": dict(sorted(self.labels.items()))}
        if self.split is not None:
            document["split"] = {
                "weights": {str(v): w for v, w in self.split.weights},
                "sticky_key": self.split.sticky_key,
            }
        if self.shadow is not None:
            document["shadow"] = {"version": self.shadow.version, "rate": self.shadow.rate}
        return document


# ---- validation (pure) --------------------------------------------------------------------------


def check_label(label: str, field_name: str = "label") -> str:
    if not _LABEL.fullmatch(label):
        raise InvalidInput(
            f"{field_name} {label!r}: a label starts with a letter and has at most 64 letters, "
            "digits, '_', '.' or '-' (a number is a version, not a label)"
        )
    return label


def check_rate(rate: float, field_name: str = "rate") -> float:
    if not (isinstance(rate, int | float) and 0.0 < float(rate) <= 1.0):
        raise InvalidInput(f"{field_name} must be in (0, 1], not {rate!r}")
    return float(rate)


def check_sticky_key(key: str) -> str:
    if key and not _KEY.fullmatch(key):
        raise InvalidInput(
            f"sticky_key {key!r}: {STICKY_REQUEST_ID!r} or a request parameter's name "
            "(letters, digits, '_', '.', '-')"
        )
    return key


def check_weights(weights: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    if not weights:
        raise InvalidInput("weights: name at least one version")
    for version, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise InvalidInput(f"weights[{version}]: a whole number in [0, 100], not {weight!r}")
    total = sum(weights.values())
    if total != 100:
        raise InvalidInput(f"weights: must sum to 100, not {total}")
    return tuple(sorted(weights.items()))


def routes_from_json(document: object, where: str) -> ModelRoutes:
    """A model's routes from ``rollout.json``'s document; InvalidInput naming the field."""
    if not isinstance(document, dict):
        raise InvalidInput(f"{where}: a JSON object")
    known_keys(where, document, _FILE_KEYS)
    labels_doc = document.get("labels", {})
    if not isinstance(labels_doc, dict):
        raise InvalidInput(f"{where}: labels must be an object")
    labels = {
        check_label(k, f"{where}: labels"): _version_number(v, f"{where}: labels.{k}")
        for k, v in labels_doc.items()
    }
    split = None
    if document.get("split") is not None:
        section = document["split"]
        if not isinstance(section, dict):
            raise InvalidInput(f"{where}: split must be an object")
        known_keys(f"{where}: split", section, _SPLIT_KEYS)
        raw = section.get("weights")
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where}: split.weights must be an object")
        weights = {_version_number(k, f"{where}: split.weights"): w for k, w in raw.items()}
        key = section.get("sticky_key", "")
        if not isinstance(key, str):
            raise InvalidInput(f"{where}: split.sticky_key must be a string")
        split = Split(check_weights(weights), check_sticky_key(key))
    shadow = None
    if document.get("shadow") is not None:
        section = document["shadow"]
        if not isinstance(section, dict):
            raise InvalidInput(f"{where}: shadow must be an object")
        known_keys(f"{where}: shadow", section, _SHADOW_KEYS)
        version = _version_number(section.get("version"), f"{where}: shadow.version")
        shadow = ShadowRoute(version, check_rate(section.get("rate", 1.0), "shadow.rate"))
    return ModelRoutes(split, shadow, labels)


def _version_number(value: object, field_name: str) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"{field_name}: a version number, not {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value) and int(value) > 0:
        return int(value)
    raise InvalidInput(f"{field_name}: a version number, not {value!r}")


def read_routes(model_dir: Path) -> ModelRoutes | None:
    """``rollout.json`` of a model folder (None: there is none); InvalidInput when invalid."""
    path = model_dir / ROLLOUT_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{path}: not JSON: {exc}") from None
    return routes_from_json(document, str(path))


# ---- the running state --------------------------------------------------------------------


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.weight = Gauge(
            "edgewise_traffic_weight",
            "Share (percent) of the requests naming no version that a version of a model gets "
            "under its traffic split.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.label = Gauge(
            "edgewise_version_label",
            "The version a label of a model points at.",
            ["model", "label"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.shadow_rate = Gauge(
            "edgewise_shadow_rate",
            "Share of a model's answered requests copied to its shadow version.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )


class Rollouts:
    """Splits, shadows and labels of every model of one server (see the module's docstring)."""

    def __init__(
        self,
        repository: ModelRepository,
        registry: CollectorRegistry,
        make_shadow: Callable[[], Shadow] | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = RolloutMetrics(registry)
        # The shadow's queue, worker and metrics: made when a first shadow starts (a server that
        # never shadows has none); None without ``make_shadow``: shadows are refused.
        self.make_shadow = make_shadow
        self.shadow: Shadow | None = None
        self._routes: dict[str, ModelRoutes] = {}
        # Whether any model has a split, a shadow or a label: the serving core checks this one
        # attribute before calling pick or offer (a server with no rollout pays nothing more).
        self.active = False
        self._control = threading.Lock()

    # ---- the request path (no locks) -----------------------------------------------------------

    def label(self, name: str, label: str) -> int | None:
        routes = self._routes.get(name)
        return None if routes is None else routes.labels.get(label)

    def pick(self, request: pb.ModelInferRequest) -> str:
        """The version a request that names none goes to under its model's split ("" when the
        model has none, or the picked version is not served: the default version answers)."""
        routes = self._routes.get(request.model_name)
        if routes is None or routes.split is None:
            return ""
        version = routes.split.pick(request)
        try:  # membership, not is_ready: its failure path lists the model's folder
            served = self.repository.served_versions(request.model_name)
        except EdgewiseError:
            return ""
        return str(version) if version in served else ""

    def offer(self, prepared: PreparedRequest, response: pb.ModelInferResponse) -> None:
        """After an answer: a copy for the model's shadow version, when it has one."""
        model = prepared.model
        routes = self._routes.get(model.name)
        if routes is None or self.shadow is None:
            return
        route = routes.shadow
        if route is None or route.version == model.version or not route.takes(prepared.request_id):
            return
        self.shadow.offer(route.version, prepared, response)

    # ---- reading -------------------------------------------------------------------------------

    def routes(self, name: str) -> ModelRoutes:
        return self._routes.get(name, ModelRoutes())

    def resolve(self, name: str, version: str, field_name: str = "version") -> int:
        """A version number from a number or a label of ``name``, which must be served."""
        number = int(version) if _NUMBER.fullmatch(version) else self.label(name, version)
        if number is None:
            raise InvalidInput(f"{field_name} {version!r}: not a version or label of {name!r}")
        if number not in self._served(name):
            raise InvalidInput(
                f"{field_name} {version!r}: version {number} of {name!r} is not loaded"
            )
        return number

    def served_routes(self, name: str) -> ModelRoutes:
        """``name``'s routes (GetRollout); ModelNotFound when the model is not served."""
        self._served(name)
        return self.routes(name)

    def _served(self, name: str) -> list[int]:
        return self.repository.served_versions(name)  # ModelNotFound: not served

    # ---- control (validate, then commit) ------------------------------------------------------

    def set_split(
        self, name: str, weights: Iterable[tuple[str, int]], sticky_key: str = ""
    ) -> ModelRoutes:
        """Share ``name``'s requests by ``weights`` ((version or label, percent) pairs); none
        clears the split."""
        weights = list(weights)
        with self._control:
            current = self.routes(name)
            self._served(name)
            if not weights:
                return self._commit(name, replace(current, split=None))
            numbers: dict[int, int] = {}
            for version, weight in weights:
                number = self.resolve(name, version, f"weights[{version}]")
                if number in numbers:
                    raise InvalidInput(f"weights[{version}]: version {number} is named twice")
                numbers[number] = weight
            split = Split(check_weights(numbers), check_sticky_key(sticky_key))
            return self._commit(name, replace(current, split=split))

    def set_shadow(self, name: str, version: str, rate: float = 1.0) -> ModelRoutes:
        """Copy a share ``rate`` of ``name``'s answered requests to ``version``; "" stops."""
        with self._control:
            current = self.routes(name)
            self._served(name)
            if not version:
                return self._commit(name, replace(current, shadow=None))
            number = self.resolve(name, version)
            route = ShadowRoute(number, check_rate(rate))
            if self.shadow is None and self.make_shadow is None:
                raise InvalidInput("version: this server runs no shadows")
            # Written first: a refused write leaves the figures and the worker as they were.
            return self._commit(
                name, replace(current, shadow=route), lambda: self._shadow().reset(name, number)
            )

    def set_label(self, name: str, label: str, version: str) -> ModelRoutes:
        """Point ``label`` at ``version`` (a number or another label); "" removes it."""
        with self._control:
            check_label(label)
            self._served(name)
            current = self.routes(name)
            labels = dict(current.labels)
            if not version:
                labels.pop(label, None)
            else:
                labels[label] = self.resolve(name, version)
            return self._commit(name, replace(current, labels=labels))

    def restore(self) -> None:
        """Read every model's ``rollout.json`` (at start-up, once models are loaded); one that
        is invalid is logged and left out."""
        root = self.repository.root
        if not root.is_dir():
            return
        for folder in sorted(root.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                routes = read_routes(folder)
            except InvalidInput as exc:
                log.error("rollout of model %s not restored: %s", folder.name, exc.message)
                continue
            if routes is not None and not routes.empty:
                if routes.shadow is not None and self.make_shadow is not None:
                    self._shadow()
                with self._control:
                    self._apply(folder.name, routes)
                log.info("model %s: rollout restored: %s", folder.name, routes.to_json())

    def _shadow(self) -> Shadow:
        if self.shadow is None:
            if self.make_shadow is None:
                raise InvalidInput("version: this server runs no shadows")
            self.shadow = self.make_shadow()
        return self.shadow

    def _commit(
        self, name: str, routes: ModelRoutes, then: Callable[[], None] | None = None
    ) -> ModelRoutes:
        """Write ``routes`` to ``rollout.json``, then (once written) run ``then`` and apply."""
        path = self.repository.root / name / ROLLOUT_FILE
        try:
            write_text_atomic(path, json.dumps(routes.to_json(), indent=2) + "\n")
        except OSError as exc:  # the server's disk, not the caller's input: INTERNAL
            raise EdgewiseError(f"{path}: cannot write: {exc.strerror or exc}") from None
        if then is not None:
            then()
        self._apply(name, routes)
        return routes

    def _apply(self, name: str, routes: ModelRoutes) -> None:
        """Swap ``routes`` in (one assignment) and publish them."""
        before = self._routes.get(name, ModelRoutes())
        table = dict(self._routes)
        if routes.empty:
            table.pop(name, None)
        else:
            table[name] = routes
        self._routes = table
        self.active = bool(table)
        metrics = self.metrics
        for version, _ in before.split.weights if before.split else ():
            metrics.weight.remove(name, str(version))
        for version, weight in routes.split.weights if routes.split else ():
            metrics.weight.labels(name, str(version)).set(weight)
        for label in before.labels:
            metrics.label.remove(name, label)
        for label, version in routes.labels.items():
            metrics.label.labels(name, label).set(version)
        if before.shadow is not None:
            metrics.shadow_rate.remove(name, str(before.shadow.version))
        if routes.shadow is not None:
            metrics.shadow_rate.labels(name, str(routes.shadow.version)).set(routes.shadow.rate)
