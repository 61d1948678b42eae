"""The native front end's fast path (issue 26): the common ModelInfer call without the GIL.

With the fast path on (``serve --native-fast-path on``, ``EDGEWISE_NATIVE_FAST_PATH=on``, the
default; see docs/native.md), C++ (``_front.cc``) answers a ModelInfer call on the thread that
read it: it decodes the request, runs the model through onnxruntime's C API and encodes the
answer, the GIL never taken. Python keeps control: :class:`FastPath` decides which model
versions may be served so, makes each one's C API session from the same bytes the Python side
loaded and validated (its digest checked against the manifest), and hands C++ a new table after
every change of the served set (the repository's ``on_swap``) and whenever what it depends on
changes (checked every :data:`TICK_SECONDS`). Sessions are reference counted: a call that found
a version keeps it until it is answered, so a swap under load loses no call.

A call is served on the fast path only when all of this holds; otherwise it takes the Python
path, unchanged, and is counted in ``edgewise_native_fallback_total{model,reason}``:

* the server: no tokens or client-certificate credentials (auth), no tracing,
  no traffic split, shadow or label (rollouts), a request small enough that memory admission
  would not look at it (``reason="limit"`` otherwise);
* the model version (:func:`ineligible`): no dynamic batching, no feature lookup, no
  performance estimate; FP32, FP64, INT32 or INT64 inputs with a batch dimension; numeric
  outputs;
* the call: the model version is in the table (``not_in_table``); the request has no
  parameters and carries exactly the model's inputs, all raw or all typed, one batch size
  (``inputs``; ``request_form`` for anything unusual in its encoding); its deadline has not
  passed (``deadline``); the calls in flight (its own and the HTTP front end's) are within
  ``--max-inflight`` (``limit``: Python then sheds); onnxruntime runs it (``run``: Python runs
  it again and answers the error); it has no request id (in its body or ``x-request-id``) where
  the model keeps predictions for labels to come (online quality: ``keyed``); its body is at
  most ``--inline-max-bytes`` (``large``: a larger one runs on the front end's worker threads,
  as before, so the thread that reads the calls never runs a long one).

Monitoring stays numba's: C++ copies each answered call's rows (inputs and the watched output)
into a ring per model version, bounded at :data:`RING_MAX_ROWS` rows (a call that would overflow
it is not kept, counted in ``edgewise_native_monitor_dropped_rows_total``; the call itself never
waits); a thread of this module, woken by C++ once calls were answered, drains every ring into
the monitor's kernels (one ``observe`` per drain) and publishes the counts, then rests
:data:`GAP_SECONDS`. The drift figures therefore lag the calls by a few milliseconds (plus the
kernels' time).

Data capture (``serve --capture-dir``) keeps the fast path: C++ samples each answered call by
the Python capture's rule (:func:`~edgewise.runtime.serving.capture.sampled`: CRC-32 of the
request id, else the caller's ``x-request-id``, else at random, against the version's rate from
:meth:`Capture.rate_for <edgewise.runtime.serving.capture.Capture.rate_for>`) and copies a sampled
call's id, time, inputs (the model's dtype, with their shapes) and answered outputs' raw bytes
into a buffer per model version, bounded by the capture's ``queue_records`` and
``queue_bytes`` (a call that would overflow it is answered and counted as a capture drop,
``queue_full``). The same thread drains the buffers and hands each version's records to
:meth:`Capture.offer_sampled <edgewise.runtime.serving.capture.Capture.offer_sampled>` in one
batch per choice of outputs: queued as the Python path's, written alike by the writer process.

The request counts and latency histogram are kept in native memory and added to
``edgewise_requests_total`` and ``edgewise_request_duration_seconds`` when the metrics are read
(so a scrape sees every call answered before it) and by that thread; the in-flight gauge counts
Python-path calls only (a fast call holds no Python state to count).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from prometheus_client import Counter

from edgewise.runtime.frontends.native.ort_capi import CapiSession, load_ort
from edgewise.runtime.package.datatypes import numpy_dtype
from edgewise.runtime.package.manifest import MODEL_FILE
from edgewise.runtime.serving.admission import (
    REQUEST_MEMORY_FACTOR,
    SMALL_REQUEST_BYTES,
    TYPED_ELEMENT_BYTES,
)
from edgewise.runtime.serving.metrics import OTHER_LABEL

if TYPE_CHECKING:
    from edgewise.runtime.frontends.security import AuthInterceptor
    from edgewise.runtime.serving.model import LoadedModel, SessionSettings
    from edgewise.runtime.serving.pipeline import InferenceCore
    from edgewise.runtime.serving.shedding import LoadShedder

__all__ = ["ENVIRONMENT", "REASONS", "FastPath", "ineligible"]

log = logging.getLogger(__name__)

#: The environment variable of the setting that turns the fast path on (serve
#: ``--native-fast-path``; config/settings.py ``native_fast_path``).
ENVIRONMENT: Final = "EDGEWISE_NATIVE_FAST_PATH"
#: The fallback reasons, in C++'s order (``_front.cc`` FallbackReason).
REASONS: Final = (
    "not_in_table", "request_form", "inputs", "limit", "deadline", "run", "keyed", "large",
)  # fmt: skip
#: How often the table is checked, and the longest the rings wait for a drain (seconds).
TICK_SECONDS: Final = 0.05
#: After calls were answered, the publisher wakes at once, drains the rings and publishes the
#: counts, then rests at least this long (seconds): at most 1 / GAP_SECONDS wake-ups a second.
GAP_SECONDS: Final = 0.005
#: The rows a model version's ring holds at most between two drains.
RING_MAX_ROWS: Final = 65536
#: The input datatypes C++ decodes.
INPUT_DATATYPES: Final = frozenset({"FP32", "FP64", "INT32", "INT64"})
#: The output datatypes C++ encodes.
OUTPUT_DATATYPES: Final = frozenset(
    {"FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
    | {"BOOL"}
)
#: The largest request body the fast path takes while memory admission is on: one whose
#: admission estimate cannot reach SMALL_REQUEST_BYTES (which admission never refuses).
ADMISSION_MAX_BYTES: Final = SMALL_REQUEST_BYTES // (
    8 * REQUEST_MEMORY_FACTOR + TYPED_ELEMENT_BYTES
)


def ineligible(model: LoadedModel) -> str | None:
    """Why ``model`` cannot be served on the fast path, or None when it can."""
    if model.batching is not None:
        return "batching"
    if model.features is not None:
        return "features"
    if model.performance is not None:
        return "performance"
    monitored = model.monitor is not None
    for spec in model.inputs:
        if spec.datatype not in INPUT_DATATYPES:
            return f"input {spec.name!r} is {spec.datatype}"
        if not spec.shape:
            return f"input {spec.name!r} has no batch dimension"
        if monitored and any(d < 0 for d in spec.shape[1:]):
            return f"input {spec.name!r}: rows of any size (the monitor's ring needs fixed rows)"
    for spec in model.outputs:
        if spec.datatype not in OUTPUT_DATATYPES:
            return f"output {spec.name!r} is {spec.datatype}"
    return None


class _Served:
    """One model version on the fast path: its C++ handle and the counts already published."""

    __slots__ = ("fast", "model", "published", "session")

    def __init__(self, model: LoadedModel, session: CapiSession, fast: Any) -> None:
        self.model = model
        self.session = session
        self.fast = fast
        # (ok buckets, seconds, fallbacks, dropped rows) as last added to the metrics
        self.published: tuple[tuple[int, ...], float, tuple[int, ...], int] = (
            (0,) * 14,
            0.0,
            (0,) * len(REASONS),
            0,
        )


class FastPath:
    """Python's control of the fast path of one native front end (see the module's docstring)."""

    def __init__(
        self,
        front: Any,
        module: ModuleType,
        core: InferenceCore,
        auth: AuthInterceptor | None,
        shedder: LoadShedder | None,
        settings: SessionSettings,
    ) -> None:
        self._front = front
        self._module = module
        self.core = core
        self.repository = core.dataplane.repository
        self.metrics = core.metrics
        self.auth = auth
        self.shedder = shedder
        self.settings = settings
        self._lock = threading.RLock()  # the table, the served versions and the published counts
        self._served: dict[int, _Served] = {}  # by id(LoadedModel), the model held in _Served
        self._refused: dict[int, str] = {}  # versions found ineligible, why (logged once)
        self._signature: object = None
        self._global_published: tuple[int, ...] = (0,) * len(REASONS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        registry = self.metrics.registry
        self.fallbacks = Counter(
            "edgewise_native_fallback",
            "ModelInfer calls the native front end's fast path sent on to the Python path, by "
            "reason (model _other: no version of the fast path's table was found).",
            ["model", "reason"],
            registry=registry,
        )
        self.fast_calls = Counter(
            "edgewise_native_fast_calls",
            "ModelInfer calls answered on the native front end's fast path (also counted in "
            "edgewise_requests_total).",
            ["model", "version"],
            registry=registry,
        )
        self.dropped = Counter(
            "edgewise_native_monitor_dropped_rows",
            "Rows answered on the fast path that the monitor did not see (its ring was full).",
            ["model", "version"],
            registry=registry,
        )
        for reason in REASONS:  # every series shown from the start (a counter never empty)
            self.fallbacks.labels(OTHER_LABEL, reason)

    # ---- control --------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on the fast path from now on: the first table, the drain thread, the hooks."""
        self.repository.on_swap.append(self._refresh_quietly)
        self.metrics.before_collect.append(self.publish)
        if self.shedder is not None:  # the HTTP front end's calls share the limit
            self.shedder.on_change = self._front.set_other_in_flight
            self._front.set_other_in_flight(self.shedder.calls_in_flight())
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="edgewise-fast-path", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No more fast calls; what the rings hold goes to the monitors, the counts to metrics."""
        with self._lock:
            self._front.set_fast({}, 0, 0)
        if self._refresh_quietly in self.repository.on_swap:
            self.repository.on_swap.remove(self._refresh_quietly)
        if self.shedder is not None:
            self.shedder.on_change = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.drain()
        self.publish()
        if self.publish in self.metrics.before_collect:
            self.metrics.before_collect.remove(self.publish)

    def _why_not(self) -> str | None:
        """Why no call may take the fast path now (None: calls may)."""
        if self.auth is not None:
            return "credentials are checked (auth)"
        core = self.core
        if core.tracing is not None:
            return "tracing is on"
        if core.rollouts is not None and core.rollouts.active:
            return "a traffic split, shadow or label is set"
        return None

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception:  # the swap stands; the calls take the Python path until a refresh
            log.exception("the native fast path's table could not be refreshed")
            with self._lock:
                self._front.set_fast({}, 0, 0)
                self._signature = None

    def refresh(self) -> None:
        """Hand C++ the table for what is served now (called after each change of the served
        set, and each tick: cheap when nothing changed)."""
        with self._lock:
            why_not = self._why_not()
            models = self.repository.served_models()
            defaults: dict[str, int] = {}
            for model in models:
                if model.name not in defaults:
                    try:
                        defaults[model.name] = id(self.repository.get(model.name))
                    except Exception:  # unloaded meanwhile: the next refresh sees it
                        continue
            signature = (why_not, tuple(id(m) for m in models), tuple(sorted(defaults.items())))
            if signature == self._signature:
                return
            table: dict[tuple[str, str], Any] = {}
            for model in models:  # every version's series, shown from its load on (0: none)
                self.fast_calls.labels(model.name, model.version_str)
                self.dropped.labels(model.name, model.version_str)
                for reason in REASONS:
                    self.fallbacks.labels(model.name, reason)
            if why_not is None:
                for model in models:
                    served = self._serve(model)
                    if served is None:
                        continue
                    table[(model.name, model.version_str)] = served.fast
                    if defaults.get(model.name) == id(model):
                        table[(model.name, "")] = served.fast
            admission = self.core.admission
            max_bytes = ADMISSION_MAX_BYTES if admission is not None and admission.enabled else 0
            limit = self.shedder.limit if self.shedder is not None else 0
            self._front.set_fast(table, limit, max_bytes)
            kept = {id(m) for m in models}
            for key in [k for k in self._served if k not in kept]:  # unloaded or replaced
                self._retire(self._served.pop(key))
            self._refused = {k: v for k, v in self._refused.items() if k in kept}
            self._signature = signature
            if why_not is not None:
                log.debug("native fast path off: %s", why_not)

    def _serve(self, model: LoadedModel) -> _Served | None:
        served = self._served.get(id(model))
        if served is not None or id(model) in self._refused:
            return served
        reason = ineligible(model)
        session: CapiSession | None = None
        if reason is None:
            try:
                session = self._session(model)
            except Exception as exc:
                reason = f"no C API session: {exc}"
        if reason is not None or session is None:
            self._refused[id(model)] = reason or "no session"
            log.info(
                "model %s version %s takes the Python path: %s",
                model.name,
                model.version_str,
                reason,
            )
            return None
        monitor = model.monitor
        watched = (monitor.prediction_output or "") if monitor is not None else ""
        capture = self.core.capture
        rate = capture.rate_for(model) if capture is not None else 0.0
        fast = self._module.FastModel(
            name=model.name,
            version=model.version_str,
            inputs=[(s.name, s.datatype, tuple(s.shape)) for s in model.inputs],
            outputs=list(model.output_names),
            watched=watched,
            monitored=monitor is not None,
            session=session.shared,
            ring_max_rows=RING_MAX_ROWS,
            keeps_keyed=model.quality is not None,
            capture_rate=rate,
            capture_max_records=capture.settings.queue_records if capture is not None else 0,
            capture_max_bytes=capture.settings.queue_bytes if capture is not None else 0,
        )
        served = _Served(model, session, fast)
        self._served[id(model)] = served
        return served

    def _session(self, model: LoadedModel) -> CapiSession:
        """The C API session, from the model's bytes (those the manifest's digest names: what
        the Python side loaded and validated)."""
        module, reason = load_ort()
        if module is None:
            raise RuntimeError(reason)
        content = (model.folder / MODEL_FILE).read_bytes()
        if hashlib.sha256(content).hexdigest() != model.sha256:
            raise RuntimeError("the model file changed since it was loaded")
        return CapiSession(content, self.settings, model.name)

    def _retire(self, served: _Served) -> None:
        """A version no longer served: its last rows to its monitor, its counts published."""
        self._drain_one(served)
        self._capture_one(served)
        self._publish_one(served)

    # ---- off the request path -------------------------------------------------------------------

    def _run(self) -> None:
        """Drain and publish soon after calls were answered (at most every GAP_SECONDS), and
        check the table every TICK_SECONDS: the drift figures and the counts of a process
        whose metrics another process serves (--processes) lag by milliseconds."""
        last_refresh = time.monotonic()
        while not self._stop.is_set():
            self._front.wait_fast(TICK_SECONDS)
            try:
                now = time.monotonic()
                if now - last_refresh >= TICK_SECONDS:
                    last_refresh = now
                    self.refresh()
                self.drain()
                self.publish()
            except Exception:
                log.exception("the native fast path's drain failed")
            self._stop.wait(GAP_SECONDS)

    def drain(self) -> None:
        """Every ring's rows into its monitor (one ``observe`` per model version)."""
        with self._lock:
            served = list(self._served.values())
        for entry in served:
            self._drain_one(entry)
            self._capture_one(entry)

    def _capture_one(self, served: _Served) -> None:
        """The calls C++ sampled for the data capture, handed to it in a batch per choice of
        outputs (queued as the Python path's are: the writer writes them alike)."""
        capture = self.core.capture
        if capture is None:
            return
        records, dropped = served.fast.drain_capture()
        if not records and not dropped:
            return
        model = served.model
        try:  # a failure is logged and the records lost; the answers already stand
            specs = [(spec.name, numpy_dtype(spec.datatype)) for spec in model.inputs]
            groups: dict[tuple[str, ...] | None, tuple[tuple[tuple[str, str], ...], list[Any]]] = {}
            for request_id, time_ns, rows, inputs, named, outputs, types in records:
                feeds = {}
                for index, data, shape in inputs:
                    name, dtype = specs[index]
                    feeds[name] = np.frombuffer(data, dtype).reshape(shape)
                group = groups.get(named)
                if group is None:
                    names = named if named is not None else model.output_names
                    group = groups[named] = (tuple(zip(names, types, strict=True)), [])
                group[1].append((time_ns, request_id, rows, feeds, list(outputs)))
            for outputs_named, (layout, batch) in groups.items():
                capture.offer_sampled(model, outputs_named, layout, batch, dropped)
                dropped = 0
            if dropped:
                capture.offer_sampled(model, None, (), [], dropped)
        except Exception:
            log.exception("data capture of fast-path requests failed")

    def _drain_one(self, served: _Served) -> None:
        taken = served.fast.drain()
        model = served.model
        monitor = model.monitor
        if taken is None or monitor is None:
            return
        rows, inputs, output, tail = taken
        total = int(sum(rows))
        try:  # a failure is logged and its rows lost; the answers already stand
            feeds = {
                spec.name: np.frombuffer(bytearray(data), dtype=numpy_dtype(spec.datatype)).reshape(
                    (total, *spec.shape[1:])
                )
                for spec, data in zip(model.inputs, inputs, strict=True)
            }
            outputs = None
            watched = monitor.prediction_output
            if watched and output:
                spec = next(s for s in model.outputs if s.name == watched)
                block = np.frombuffer(bytearray(output), dtype=numpy_dtype(spec.datatype))
                outputs = {watched: block.reshape((-1, *tail))}
            monitor.observe(feeds, outputs)
        except Exception:
            log.exception("monitoring statistics of fast-path requests failed")

    def publish(self) -> None:
        """Add what C++ counted since the last call to the server's metrics (run first at each
        scrape, so a scrape sees every call answered before it)."""
        with self._lock:
            for served in self._served.values():
                self._publish_one(served)
            calls, fallbacks = self._front.fast_counts()
            del calls
            for reason, now, before in zip(REASONS, fallbacks, self._global_published, strict=True):
                if now > before:
                    self.fallbacks.labels(OTHER_LABEL, reason).inc(now - before)
            self._global_published = tuple(fallbacks)

    def _publish_one(self, served: _Served) -> None:
        _ok, buckets, seconds, fallbacks, dropped = served.fast.counts()
        last_buckets, last_seconds, last_fallbacks, last_dropped = served.published
        model = served.model
        delta = [now - before for now, before in zip(buckets, last_buckets, strict=True)]
        if any(delta):
            self.metrics.add_answered(model.name, model.version_str, delta, seconds - last_seconds)
            self.fast_calls.labels(model.name, model.version_str).inc(sum(delta))
        for reason, now, before in zip(REASONS, fallbacks, last_fallbacks, strict=True):
            if now > before:
                self.fallbacks.labels(model.name, reason).inc(now - before)
        if dropped > last_dropped:
            self.dropped.labels(model.name, model.version_str).inc(dropped - last_dropped)
        served.published = (tuple(buckets), seconds, tuple(fallbacks), dropped)

    def counts(self) -> tuple[int, dict[str, int]]:
        """(calls answered on the fast path, calls sent on to Python by reason) since the start,
        every model version together."""
        with self._lock:
            calls, fallbacks = self._front.fast_counts()
            totals = dict(zip(REASONS, (int(n) for n in fallbacks), strict=True))
            for served in self._served.values():
                for reason, n in zip(REASONS, served.fast.counts()[3], strict=True):
                    totals[reason] += int(n)
        return int(calls), totals
