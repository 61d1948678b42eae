"""Prometheus metrics of one server: requests, latency, in-flight requests, model load events.

Each server owns its own registry (several servers can live in one process, as in tests). Label
children are cached so the request path pays a dict lookup, not a label resolution.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from edgewise.runtime.serving.monitor import DriftReport

__all__ = ["LATENCY_BUCKETS", "OTHER_LABEL", "SKEW_KINDS", "ServerMetrics"]

# Seconds: fine resolution below a millisecond, where a healthy request lives.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

#: The ``model`` / ``version`` label of a request for a model or version this server never
#: loaded: the names come from the request, so showing them would let callers grow the series
#: without bound. No model name or version can start with "_".
OTHER_LABEL: Final = "_other"

#: The schema-skew counts of a feature's statistics shown as ``edgewise_schema_skew{kind}``.
SKEW_KINDS: Final = ("missing", "infinite", "out_of_range", "unseen")


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Run first at every scrape (registered before the metrics below): the native front end's
        # fast path adds there the calls it counted in native memory (see add_answered).
        self.before_collect: list[Callable[[], None]] = []
        self.registry.register(_BeforeCollect(self.before_collect))
        self.requests = Counter(
            "edgewise_requests",
            "Inference requests by model, version and status code.",
            ["model", "version", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgewise_request_duration_seconds",
            "Server-side inference latency, decode to encode.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "edgewise_inflight_requests",
            "Inference requests being processed now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.model_events = Counter(
            "edgewise_model_events",
            "Model version lifecycle events (load, load_failed, unload).",
            ["model", "version", "event"],
            registry=self.registry,
        )
        self.models_ready = Gauge(
            "edgewise_model_versions_ready",
            "Model versions being served.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.drift_score = Gauge(
            "edgewise_drift_score",
            "Drift statistic of a feature in the judged window against the reference profile.",
            ["model", "version", "feature", "statistic"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.feature_drifting = Gauge(
            "edgewise_feature_drifting",
            "1 when a feature's drift statistics cross their thresholds.",
            ["model", "version", "feature"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.model_drifting = Gauge(
            "edgewise_model_drifting",
            "1 when any feature of the model version is drifting.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.schema_skew = Gauge(
            "edgewise_schema_skew",
            "Schema violations in the judged window (missing, infinite, out_of_range, unseen).",
            ["model", "version", "feature", "kind"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.monitored_rows = Gauge(
            "edgewise_monitored_rows",
            "Rows in the judged monitoring window.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.drift_windows_dropped = Gauge(
            "edgewise_drift_windows_dropped",
            "Closed monitoring windows dropped unjudged (and unrecorded in the drift history) "
            "since the version was loaded: more closed between two drift ticks than "
            "monitoring.closed_windows.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.quality_error = Gauge(
            "edgewise_quality_error",
            "Online error from delayed labels (error rate or mean absolute error); "
            "window=all or recent (ADWIN's window).",
            ["model", "version", "window"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.quality_labelled = Gauge(
            "edgewise_quality_labelled",
            "Predictions joined with a ground-truth label.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.quality_drifts = Gauge(
            "edgewise_quality_drifts",
            "Change-detector firings on the online error since the version was loaded.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.labelled_accuracy = Gauge(
            "edgewise_labelled_accuracy",
            "A calibrated classifier's accuracy on the rows whose labels joined: CBPE's estimate "
            "(source=estimated, the mean calibrated confidence) and the labels' (realized).",
            ["model", "version", "source"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.estimated_performance = Gauge(
            "edgewise_estimated_performance",
            "Confidence-based (CBPE) estimate of a classifier's accuracy or ROC-AUC over the last "
            "closed estimate window, from its calibrated probabilities (no labels needed).",
            ["model", "version", "metric"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.batch_rows = Histogram(
            "edgewise_batch_rows",
            "Rows per onnxruntime call made by the dynamic batcher.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, str], Counter] = {}
        # The model versions this server has loaded (ever): the request labels it shows as they
        # are; any other name or version shows as OTHER_LABEL. Grown by model_event only.
        self._loaded_models: set[str] = set()
        self._loaded_versions: set[tuple[str, str]] = set()
        self._latency_children: dict[tuple[str, str], Histogram] = {}
        # The drift and quality series this object shows, per model version and gauge: what
        # a publish replaces and a forget clears (prometheus_client's children are private).
        self._shown: dict[tuple[str, str], dict[Gauge, set[tuple[str, ...]]]] = {}
        self._shown_lock = threading.Lock()
        # prometheus_client picks its multiprocess value files once, at import: read the same
        # environment once here, not at each publish.
        self._multiprocess = _multiprocess()

    def observe_request(self, model: str, version: str, code: str, seconds: float) -> None:
        key = (model, version, code)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_child(key)
        counter.inc()
        if code == "OK":
            hkey = (model, version)
            histogram = self._latency_children.get(hkey)
            if histogram is None:
                histogram = self.latency.labels(model, version)
                self._latency_children[hkey] = histogram
            histogram.observe(seconds)

    def _request_child(self, key: tuple[str, str, str]) -> Counter:
        """The requests counter's child for ``key`` with its labels bounded (see
        :data:`OTHER_LABEL`); cached only under a key that names a loaded version or the
        default one, so the cache stays as bounded as the series."""
        model, version, code = key
        if model not in self._loaded_models:
            model, version = OTHER_LABEL, OTHER_LABEL
        elif version and (model, version) not in self._loaded_versions:
            version = OTHER_LABEL
        bounded = (model, version, code)
        counter = self._request_children.get(bounded)
        if counter is None:
            counter = self.requests.labels(*bounded)
            self._request_children[bounded] = counter
        return counter

    def add_answered(
        self, model: str, version: str, buckets: Sequence[int], seconds: float
    ) -> None:
        """Count calls answered OK elsewhere (the native fast path, which keeps its counts in
        native memory): ``buckets[i]`` calls in latency bucket i (LATENCY_BUCKETS, then +Inf;
        not cumulative), ``seconds`` their total, as that many :meth:`observe_request` would."""
        calls = sum(buckets)
        if calls == 0:
            return
        self._request_child((model, version, "OK")).inc(calls)
        hkey = (model, version)
        histogram = self._latency_children.get(hkey)
        if histogram is None:
            histogram = self.latency.labels(model, version)
            self._latency_children[hkey] = histogram
        # prometheus_client has no bulk observe: its child's per-bucket values and sum (the
        # ones observe() increments) take the counts at once.
        for value, count in zip(histogram._buckets, buckets, strict=True):
            if count:
                value.inc(count)
        histogram._sum.inc(seconds)

    def model_event(self, model: str, version: int, event: str) -> None:
        """Count a lifecycle event of a version found in the repository (``load`` also makes
        its name and version labels that requests for it show)."""
        if event == "load":
            self._loaded_versions.add((model, str(version)))
            self._loaded_models.add(model)
        self.model_events.labels(model, str(version), event).inc()

    def publish_drift(self, report: DriftReport) -> None:
        """Show ``report`` as the model version's drift state. Every drift series of the version
        that the report does not carry (a statistic the window has no value for, e.g. after a
        reset) is dropped, so no series outlives the window it described."""
        model, version = report.model, report.version
        wanted: dict[Gauge, dict[tuple[str, ...], float]] = {
            self.monitored_rows: {(model, version): float(report.rows)},
            self.model_drifting: {(model, version): 1.0 if report.drifting else 0.0},
            self.drift_windows_dropped: {(model, version): float(report.windows_dropped)},
            self.drift_score: {},
            self.feature_drifting: {},
            self.schema_skew: {},
        }
        for feature in report.features:
            for statistic, value in feature.scores.items():
                wanted[self.drift_score][(model, version, feature.name, statistic)] = value
            wanted[self.feature_drifting][(model, version, feature.name)] = (
                1.0 if feature.drifting else 0.0
            )
            for kind in SKEW_KINDS:
                if kind in feature.statistics:
                    key = (model, version, feature.name, kind)
                    wanted[self.schema_skew][key] = feature.statistics[kind]
        self._replace_series(model, version, wanted)

    def forget_drift(self, model: str, version: str) -> None:
        """Drop the drift series of a model version (it is unloaded)."""
        self._replace_series(model, version, {gauge: {} for gauge in self._drift_gauges()})

    def _drift_gauges(self) -> tuple[Gauge, ...]:
        return (
            self.drift_score,
            self.feature_drifting,
            self.model_drifting,
            self.schema_skew,
            self.monitored_rows,
            self.drift_windows_dropped,
        )

    def publish_quality(self, snapshot: Mapping[str, Any]) -> None:
        """Show a model version's online quality totals (after a batch that joined labels)."""
        model, version = snapshot["model"], snapshot["version"]
        wanted: dict[Gauge, dict[tuple[str, ...], float]] = {
            self.quality_error: {
                (model, version, "all"): snapshot["error"],
                (model, version, "recent"): snapshot["recent_error"],
            },
            self.quality_labelled: {(model, version): snapshot["labelled"]},
            self.quality_drifts: {(model, version): snapshot["drifts"]},
            self.labelled_accuracy: {},
        }
        check = snapshot.get("label_check")
        if check is not None and check["labelled"]:
            wanted[self.labelled_accuracy] = {
                (model, version, "estimated"): check["estimated_accuracy"],
                (model, version, "realized"): check["realized_accuracy"],
            }
        self._replace_series(model, version, wanted)

    def forget_quality(self, model: str, version: str) -> None:
        """Drop the online quality series of a model version (it is unloaded)."""
        gauges = (
            self.quality_error,
            self.quality_labelled,
            self.quality_drifts,
            self.labelled_accuracy,
        )
        self._replace_series(model, version, {gauge: {} for gauge in gauges})

    def publish_performance(self, model: str, version: str, estimates: Mapping[str, float]) -> None:
        """Show a version's CBPE estimates (at the roll of its estimate window)."""
        wanted: dict[tuple[str, ...], float] = {
            (model, version, metric): value for metric, value in estimates.items()
        }
        self._replace_series(model, version, {self.estimated_performance: wanted})

    def forget_performance(self, model: str, version: str) -> None:
        """Drop the estimate series of a model version (it is unloaded)."""
        self._replace_series(model, version, {self.estimated_performance: {}})

    def _replace_series(
        self, model: str, version: str, wanted: Mapping[Gauge, Mapping[tuple[str, ...], float]]
    ) -> None:
        """Make ``wanted[gauge]`` the series of each gauge for one model version: set them, and
        clear the version's other series this object showed. In prometheus_client's
        multiprocess mode a removed child would keep its last value in the process's file (the
        supervisor would go on showing it), so there a cleared series is set to NaN instead;
        otherwise it is removed."""
        key = (model, version)
        with self._shown_lock:
            shown = self._shown.setdefault(key, {})
            for gauge, values in wanted.items():
                for labels in shown.get(gauge, set()) - values.keys():
                    self._clear(gauge, labels)
                for labels, value in values.items():
                    gauge.labels(*labels).set(value)
                if values:
                    shown[gauge] = set(values)
                else:
                    shown.pop(gauge, None)
            if not shown:
                del self._shown[key]  # an unloaded version leaves nothing behind

    def _clear(self, gauge: Gauge, labels: tuple[str, ...]) -> None:
        if self._multiprocess:
            gauge.labels(*labels).set(math.nan)
        else:
            gauge.remove(*labels)


def _multiprocess() -> bool:
    names = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    return any(name in os.environ for name in names)


class _BeforeCollect:
    """A collector with no metrics of its own that runs ``hooks`` when the registry is read."""

    def __init__(self, hooks: list[Callable[[], None]]) -> None:
        self._hooks = hooks

    def describe(self) -> Iterable[Any]:
        return ()

    def collect(self) -> Iterable[Any]:
        for hook in self._hooks:
            hook()
        return ()
