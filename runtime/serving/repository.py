"""The model repository: versions on disk, a version policy per model, and the set being served.

Layout: ``<repo>/<model>/<version>/`` (integer versions), with an optional
``<repo>/<model>/config.json`` that sets the model's version policy::

    {"version_policy": {"latest": 2}}          # the two highest versions (default: latest 1)
    {"version_policy": {"all": true}}          # every version on disk
    {"version_policy": {"specific": [1, 3]}}   # exactly these

Loading is done before unloading: new versions are loaded and warmed up first, then the served set
is swapped in one assignment, then versions that left the set are dropped (requests already
running on them finish). A version that fails to load is recorded as FAILED with its reason and
leaves the served versions untouched. Requests read the served set without taking a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.runtime.errors import (
    EdgewiseError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    PackageError,
)
from edgewise.runtime.package.manifest import (
    MODEL_FILE,
    list_versions,
    read_manifest,
    validate_model_name,
)
from edgewise.runtime.package.model_config import (
    MODEL_CONFIG_FILE,
    ModelConfig,
    VersionPolicy,
    default_version,
    pick_default,
    read_model_config,
    write_model_config,
)
from edgewise.runtime.package.paths import ensure_inside, graph_class_labels
from edgewise.runtime.package.signing import SignatureError, TrustedKeys
from edgewise.runtime.serving.batching import BatchingConfig, batchable
from edgewise.runtime.serving.model import LoadedModel, SessionSettings, load_model
from edgewise.runtime.serving.monitor_config import MonitorConfig
from edgewise.runtime.serving.quality import OnlineQuality, QualityConfig, QualityPublisher

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edgewise.runtime.package.performance_estimation import (
        Calibration,
        PerformancePublisher,
    )
    from edgewise.runtime.serving.monitor import DriftPublisher

__all__ = [
    "ModelConfig",
    "ModelRepository",
    "ModelState",
    "VersionPolicy",
    "VersionStatus",
    "default_version",
    "pick_default",
    "read_model_config",
    "write_model_config",
]

log = logging.getLogger(__name__)


class ModelState(Enum):
    UNAVAILABLE = "UNAVAILABLE"  # on disk, not loaded
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: ModelState
    reason: str = ""
    sha256: str = ""
    is_default: bool = False


@dataclass(frozen=True)
class _ServedModel:
    """An immutable snapshot of one model's served versions."""

    versions: Mapping[int, LoadedModel]
    default: int
    pinned_default: int | None = None


@dataclass
class _Failures:
    reasons: dict[tuple[str, int], str] = field(default_factory=dict)


LoadListener = Callable[[str, int, str], None]


class ModelRepository:
    """The served model set, backed by a repository folder."""

    def __init__(
        self,
        root: Path,
        session_settings: SessionSettings | None = None,
        default_policy: VersionPolicy | None = None,
        on_event: LoadListener | None = None,
        monitor_defaults: MonitorConfig | None = None,
        quality_enabled: bool = False,
        on_alert: Callable[[str, Mapping[str, Any]], object] | None = None,
        drift_publisher: DriftPublisher | None = None,
        quality_publisher: QualityPublisher | None = None,
        performance_publisher: PerformancePublisher | None = None,
        trusted_keys: TrustedKeys | None = None,
    ) -> None:
        self.root = root
        # Public keys a package's signature must verify against (None: signatures not required).
        self.trusted_keys = trusted_keys
        self.drift_publisher = drift_publisher  # where monitors publish their judged windows
        self.quality_publisher = quality_publisher  # where online quality publishes its totals
        self.performance_publisher = performance_publisher  # where CBPE estimates are shown
        self.quality_enabled = quality_enabled
        self.on_alert = on_alert
        self.monitor_defaults = monitor_defaults or MonitorConfig(enabled=False)
        self.session_settings = session_settings or SessionSettings()
        self.default_policy = default_policy or VersionPolicy()
        self._served: dict[str, _ServedModel] = {}
        self._loading: set[tuple[str, int]] = set()
        self._failures = _Failures()
        self._control = threading.Lock()
        self._on_event = on_event or (lambda name, version, event: None)
        # A version label's number (the rollout's labels, see rollout.py); None: no labels.
        self.labels: Callable[[str, str], int | None] | None = None
        # Where feature lookups count (set by the server; None: a registry of their own).
        self.metrics_registry: CollectorRegistry | None = None
        # Called after each change of the served set (the native front end's fast path
        # refreshes its table of model versions there); each must be quick and never raise.
        self.on_swap: list[Callable[[], None]] = []

    # ---- reading (the request path: no locks) -------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model version a request asks for; ``version`` "" means the default version."""
        served = self._served.get(name)
        if served is None:
            if any(key[0] == name for key in self._loading):
                raise ModelNotReady(f"model {name!r} is loading")
            raise ModelNotFound(f"model {name!r} is not served (unknown or unloaded)")
        if not version:
            return served.versions[served.default]
        try:
            number = int(version)
        except ValueError:
            label = self.labels(name, version) if self.labels is not None else None
            if label is None:
                raise ModelNotFound(f"model {name!r} has no version {version!r}") from None
            number = label
        model = served.versions.get(number)
        if model is not None:
            return model
        if (name, number) in self._loading:
            raise ModelNotReady(f"model {name!r} version {number} is loading")
        if (name, number) in self._failures.reasons:
            raise ModelNotReady(
                f"model {name!r} version {number} failed to load: "
                f"{self._failures.reasons[(name, number)]}"
            )
        if number in list_versions(self.root / name):
            raise ModelNotReady(f"model {name!r} version {number} is not loaded")
        raise ModelNotFound(f"model {name!r} has no version {number}")

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except EdgewiseError:
            return False
        return True

    def served_versions(self, name: str) -> list[int]:
        served = self._served.get(name)
        if served is None:
            raise ModelNotFound(f"model {name!r} is not served (unknown or unloaded)")
        return sorted(served.versions)

    def served_models(self) -> list[LoadedModel]:
        return [m for s in self._served.values() for m in s.versions.values()]

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        """Every model and version known on disk or in memory, with its state."""
        statuses: list[VersionStatus] = []
        names = set(self._served) | set(self._model_dirs())
        names |= {key[0] for key in self._loading} | {k[0] for k in self._failures.reasons}
        for name in sorted(names):
            served = self._served.get(name)
            versions = set(list_versions(self.root / name))
            if served:
                versions |= set(served.versions)
            versions |= {v for (n, v) in self._loading if n == name}
            versions |= {v for (n, v) in self._failures.reasons if n == name}
            for version in sorted(versions):
                status = self._status(name, version, served)
                if ready_only and status.state is not ModelState.READY:
                    continue
                statuses.append(status)
        return statuses

    def _status(self, name: str, version: int, served: _ServedModel | None) -> VersionStatus:
        if served and version in served.versions:
            model = served.versions[version]
            failed = self._failures.reasons.get((name, version))
            reason = f"serving the copy loaded earlier; a reload failed: {failed}" if failed else ""
            return VersionStatus(
                name, version, ModelState.READY, reason, model.sha256, served.default == version
            )
        if (name, version) in self._loading:
            return VersionStatus(name, version, ModelState.LOADING)
        if (name, version) in self._failures.reasons:
            reason = self._failures.reasons[(name, version)]
            return VersionStatus(name, version, ModelState.FAILED, reason)
        return VersionStatus(name, version, ModelState.UNAVAILABLE)

    # ---- control (serialised) -----------------------------------------------------------------

    def _swapped(self) -> None:
        for listener in self.on_swap:
            listener()

    def _model_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                names.append(validate_model_name(entry.name))
                if entry.is_symlink():
                    ensure_inside(self.root, entry)
            except InvalidInput:
                log.warning("ignoring %s: not a valid model name", entry)
            except PackageError as exc:
                names.pop()
                log.warning("ignoring %s: %s", entry, exc.message)
        return names

    def config_for(self, name: str) -> ModelConfig:
        return read_model_config(self.root / name, self.default_policy)

    def load_all(self) -> list[VersionStatus]:
        """Load every model found in the repository folder (at start-up)."""
        statuses: list[VersionStatus] = []
        for name in self._model_dirs():
            try:
                statuses.extend(self.load(name))
            except EdgewiseError as exc:
                log.error("model %s: %s", name, exc)
        return statuses

    def load(
        self,
        name: str,
        version: int | None = None,
        make_default: bool = False,
        *,
        persist: bool = True,
    ) -> list[VersionStatus]:
        """Load a model's versions (by policy, or one version), then swap them in.

        Already-served versions whose files are unchanged are kept as they are; a served version
        whose model file changed on disk is reloaded. ``make_default`` needs ``version``; it is
        kept in ``config.json`` too unless ``persist`` is false (then this server serves it by
        default until it stops; ``persist=False`` needs ``make_default``).
        """
        validate_model_name(name)
        if make_default and version is None:
            raise InvalidInput(
                "make_default needs a version: name the version to serve by default "
                "(repository load NAME --version V --make-default)"
            )
        if not persist and not make_default:
            raise InvalidInput("transient_default needs make_default (and a version)")
        writes_default = make_default and persist
        with self._control:
            model_dir = self.root / name
            available = list_versions(model_dir)
            config = self._config_to_load(name, version, writes_default)
            if version is not None:
                if version not in available:
                    raise ModelNotFound(f"model {name!r} has no version {version} on disk")
                targets = [version]
            else:
                if not available:
                    raise ModelNotFound(f"model {name!r} has no versions in {self.root}")
                targets = config.version_policy.select(available)
                if config.default_version in available and config.default_version not in targets:
                    targets = sorted([*targets, config.default_version])
                if not targets:
                    raise ModelNotFound(f"model {name!r}: its version policy selects no version")

            current = self._served.get(name)
            current_versions: dict[int, LoadedModel] = dict(current.versions) if current else {}
            loaded: dict[int, LoadedModel] = {}
            for number in targets:
                existing = current_versions.get(number)
                if existing is not None and not self._changed_on_disk(existing):
                    loaded[number] = existing
                    continue
                model = self._load_one(name, number, model_dir / str(number))
                if model is not None:
                    loaded[number] = model
                elif existing is not None:
                    loaded[number] = existing  # its reload failed: what was loaded serves on

            if not loaded:
                # Every target failed: what was served stays served.
                return [self._status(name, v, current) for v in targets]

            # One version loaded by name joins the others; a policy load replaces the set.
            new_versions = {**current_versions, **loaded} if version is not None else loaded
            pinned = current.pinned_default if current else None
            if version is None:
                pinned = config.default_version or pinned
            if make_default and version in loaded:
                pinned = version
                if writes_default:
                    # Persisted before the swap: a restarted server serves it by default too.
                    self._write_default(model_dir, config, version)
            if pinned not in new_versions:
                pinned = None
            default = pick_default(new_versions, replace(config, default_version=pinned))
            assert default is not None  # new_versions is not empty
            snapshot = _ServedModel(new_versions, default, pinned)
            served = dict(self._served)
            served[name] = snapshot
            self._served = served  # the swap: one assignment, seen atomically by readers
            self._swapped()
            _close_versions(current_versions, new_versions)
            for number in current_versions:
                if number not in new_versions:
                    self._on_event(name, number, "unload")
                    log.info("model %s version %d unloaded", name, number)
            return [
                self._status(name, v, snapshot) for v in sorted(set(targets) | set(new_versions))
            ]

    def _config_to_load(self, name: str, version: int | None, make_default: bool) -> ModelConfig:
        """The model's config; when it is invalid, a load by policy or one that would write it
        is refused here (before anything changes), a load of one named version goes on."""
        try:
            return self.config_for(name)
        except PackageError:
            if version is None or make_default:
                raise
            return ModelConfig(self.default_policy)

    def _write_default(self, model_dir: Path, config: ModelConfig, version: int | None) -> None:
        """Pin ``version`` in ``config.json``, or drop the pin (None), atomically; its other
        settings kept; :class:`PackageError` when it cannot be written."""
        if config.default_version == version:
            return
        try:
            write_model_config(model_dir, replace(config, default_version=version))
        except OSError as exc:
            path = model_dir / MODEL_CONFIG_FILE
            raise PackageError(f"{path}: cannot write: {exc.strerror or exc}") from None

    def unload(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Stop serving a model, or one version of it.

        The versions left answer by the one rule (:func:`pick_default`): the pinned default if
        it is still served, else the highest the version policy selects. Unloading the version
        ``config.json`` pins drops the pin there too (before anything else changes; when it
        cannot be written the unload is refused), so a restarted server does not serve it by
        default again. Unloading the whole model leaves ``config.json`` as it is.
        """
        validate_model_name(name)
        with self._control:
            current = self._served.get(name)
            if current is None:
                raise ModelNotFound(f"model {name!r} is not served")
            served = dict(self._served)
            if version is None:
                removed = list(current.versions)
                del served[name]
            else:
                if version not in current.versions:
                    raise ModelNotFound(f"model {name!r} version {version} is not served")
                removed = [version]
                left = self._unload_version(name, current, version)
                if left is not None:
                    served[name] = left
                else:
                    del served[name]
            self._served = served
            self._swapped()
            _close_versions(current.versions, served[name].versions if name in served else {})
            for number in removed:
                self._on_event(name, number, "unload")
            return [self._status(name, v, served.get(name)) for v in removed]

    def _unload_version(
        self, name: str, current: _ServedModel, version: int
    ) -> _ServedModel | None:
        """What is served once ``version`` is gone (None: nothing), after dropping its pin
        from ``config.json`` (a config that cannot be read is left alone: its policy is the
        server's default policy then, as for a load of one named version)."""
        config = self._config_to_load(name, version, make_default=False)
        if config.default_version == version:
            self._write_default(self.root / name, config, None)
        remaining = {v: m for v, m in current.versions.items() if v != version}
        pinned = current.pinned_default if current.pinned_default != version else None
        default = pick_default(remaining, replace(config, default_version=pinned))
        if default is None:
            return None
        return _ServedModel(remaining, default, pinned)

    def _changed_on_disk(self, model: LoadedModel) -> bool:
        try:
            return read_manifest(model.folder).model_sha256 != model.sha256
        except EdgewiseError:
            return False

    def _attach_extras(self, model: LoadedModel) -> None:
        """Batching and monitoring, as the model's config.json and the server defaults say."""
        model_config = self.config_for(model.name)
        if model_config.features is not None:  # imported only for a model that looks features up
            from edgewise.runtime.serving.features import attach_features

            attach_features(model, model_config.features, self.metrics_registry)
        if model_config.batching is not None:
            model.batching = BatchingConfig.from_json(model_config.batching)
            if not batchable(model):
                log.warning(
                    "model %s: batching stays off: not every input and output has a variable "
                    "first (batch) dimension",
                    model.name,
                )
                model.batching = None
        # The statistics kernels: compiled ahead of time, or numba's. Where neither can run here
        # (a node without the AOT build nor the jit extra) the model is served unmonitored and
        # without online quality, and its drift report says why (the server logs it at start).
        from edgewise.kernels import unavailable

        missing = unavailable()
        if missing is not None:
            model.monitor_reason = f"monitoring is unavailable: {missing}"
            return
        quality = QualityConfig.from_json(model_config.quality or {})
        if self.quality_enabled and quality.enabled and model.manifest.task != "other":
            classifier = model.manifest.task == "classification"
            output = "label" if classifier else model.output_names[0]
            if output in model.output_names:
                model_file = model.folder / MODEL_FILE
                model.quality = OnlineQuality(
                    model.name,
                    model.version_str,
                    classifier,
                    output,
                    quality,
                    self.on_alert,
                    classes=lambda: graph_class_labels(model_file),  # read with the first labels
                    publisher=self.quality_publisher,
                    calibration=_calibration(model) if classifier else None,
                )
        settings = MonitorConfig.from_json(model_config.monitoring or {}, self.monitor_defaults)
        if not settings.enabled:
            model.monitor_reason = "monitoring is off for this model"
            return
        self._attach_performance(model, settings)
        # Imported here: a server with monitoring off never loads the Numba kernels.
        from edgewise.runtime.package.reference_profile import read_profile
        from edgewise.runtime.serving.monitor import ModelMonitor

        profile = read_profile(model.folder, model.manifest)
        if profile is None:
            model.monitor_reason = "the model package has no reference profile"
            return
        model.monitor = ModelMonitor(
            model.name, model.version_str, profile, settings, self.drift_publisher, self.on_alert
        )
        model.monitor_reason = ""

    def _attach_performance(self, model: LoadedModel, settings: MonitorConfig) -> None:
        """CBPE for a monitored classifier whose package has a calibration (numpy only)."""
        from edgewise.runtime.package.performance_estimation import (
            DEFAULT_WINDOW_ROWS,
            PROBABILITIES_OUTPUT,
            PerformanceEstimator,
            read_calibration,
        )

        profile = model.manifest.profile or {}
        calibration = read_calibration(model.folder, profile.get("calibration"))
        if calibration is None or PROBABILITIES_OUTPUT not in model.output_names:
            return
        model.performance = PerformanceEstimator(
            model.name,
            model.version_str,
            calibration,
            settings.window_rows or DEFAULT_WINDOW_ROWS,
            self.performance_publisher,
        )

    def _load_one(self, name: str, version: int, folder: Path) -> LoadedModel | None:
        key = (name, version)
        self._loading.add(key)
        try:
            model = load_model(
                name, version, folder, self.session_settings, trusted=self.trusted_keys
            )
        except EdgewiseError as exc:
            self._failures.reasons[key] = exc.message
            self._on_event(name, version, "load_failed")
            if isinstance(exc, SignatureError):  # counted by why: signature_expired_key, ...
                self._on_event(name, version, f"signature_{exc.reason}")
            log.error("model %s version %d failed to load: %s", name, version, exc.message)
            return None
        finally:
            self._loading.discard(key)
        try:
            self._attach_extras(model)
        except EdgewiseError as exc:
            self._failures.reasons[key] = exc.message
            self._on_event(name, version, "load_failed")
            log.error("model %s version %d failed to load: %s", name, version, exc.message)
            return None
        self._failures.reasons.pop(key, None)
        self._on_event(name, version, "load")
        log.info(
            "model %s version %d loaded in %.3f s (sha256 %s)",
            name,
            version,
            model.load_seconds,
            model.sha256[:12],
        )
        return model


def _close_versions(before: Mapping[int, LoadedModel], after: Mapping[int, LoadedModel]) -> None:
    """Close the drift monitor and the online quality of the versions no longer served as they
    were (unloaded, or replaced by a reload): they publish nothing more, and their gauges are
    dropped there and then."""
    for number, model in before.items():
        if after.get(number) is model:
            continue
        if model.monitor is not None:
            model.monitor.close()
        if model.quality is not None:
            model.quality.close()
        if model.performance is not None:
            model.performance.close()
        if model.features is not None:
            model.features.close()


def _calibration(model: LoadedModel) -> Calibration | None:
    """A classifier's calibration (its package's, converted with ``--labels``), when the model
    answers the probabilities it maps; None otherwise. The online quality checks the CBPE
    estimate against the labels with it."""
    from edgewise.runtime.package.performance_estimation import (
        PROBABILITIES_OUTPUT,
        read_calibration,
    )

    if PROBABILITIES_OUTPUT not in model.output_names:
        return None
    return read_calibration(model.folder, (model.manifest.profile or {}).get("calibration"))
