"""Shadow traffic: copies of answered requests run on a candidate version, off the request path.

On the request path (:meth:`Shadow.offer`, called by the rollout after an answer): an append to a
bounded queue, nothing else: nothing waits, decodes or runs there. A full queue drops the copy
and counts it (``edgewise_shadow_dropped_total{model}``); the client's answer and its latency
are never touched.

A worker thread runs each copy on the candidate the way a request runs (its drift monitor sees
the rows, its online quality keeps the prediction under the request's id, its performance
estimate is updated), then compares the candidate's answer with the one the client got: the
share of rows whose ``label`` is equal (``edgewise_shadow_agreement``), the mean absolute
difference of the scores (``probabilities``, or a regressor's output;
``edgewise_shadow_score_difference``), the candidate's latency
(``edgewise_shadow_duration_seconds``) and its outcome (``edgewise_shadow_requests_total``,
ok or error). The same figures are read by ``GetRollout`` (:meth:`Shadow.stats`); with several
server processes each keeps its own, and GetRollout answers them merged over every process
(:func:`merged_stats`; the siblings hand theirs over in :func:`encode_stats`'s form).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode_outputs
from edgewise.runtime.serving.dataplane import DataPlane, PreparedRequest
from edgewise.runtime.serving.metrics import LATENCY_BUCKETS

if TYPE_CHECKING:
    from edgewise.runtime.serving.repository import ModelRepository

__all__ = [
    "LABEL_OUTPUT",
    "Shadow",
    "ShadowStats",
    "compare",
    "decode_stats",
    "encode_stats",
    "merged_stats",
]

log = logging.getLogger(__name__)

LABEL_OUTPUT: Final = "label"
SCORE_OUTPUT: Final = "probabilities"
_LATENCIES: Final = 4096  # the most recent candidate latencies kept for the p99


@dataclass(frozen=True)
class ShadowStats:
    """A candidate's figures since its shadow started."""

    requests: int = 0
    errors: int = 0
    dropped: int = 0
    compared_rows: int = 0
    equal_labels: int = 0
    labelled_rows: int = 0
    score_difference_sum: float = 0.0
    score_values: int = 0
    latency_sum: float = 0.0
    latencies: tuple[float, ...] = field(default=(), repr=False)

    @property
    def agreement(self) -> float:
        return self.equal_labels / self.labelled_rows if self.labelled_rows else math.nan

    @property
    def mean_abs_difference(self) -> float:
        return self.score_difference_sum / self.score_values if self.score_values else math.nan

    @property
    def mean_latency(self) -> float:
        done = self.requests - self.errors
        return self.latency_sum / done if done else math.nan

    @property
    def p99_latency(self) -> float:
        if not self.latencies:
            return math.nan
        return float(np.quantile(np.asarray(self.latencies), 0.99))


_COUNTS: Final = ("requests", "errors", "dropped", "compared_rows", "equal_labels")
_COUNTS_MORE: Final = ("labelled_rows", "score_values")
_SUMS: Final = ("score_difference_sum", "latency_sum")


def merged_stats(shares: list[ShadowStats]) -> ShadowStats:
    """One candidate's figures over several processes' shares: counts and sums added, the
    latencies of every share kept for the p99. Pure."""
    merged: dict[str, Any] = {
        name: sum(getattr(share, name) for share in shares)
        for name in (*_COUNTS, *_COUNTS_MORE, *_SUMS)
    }
    merged["latencies"] = tuple(x for share in shares for x in share.latencies)
    return ShadowStats(**merged)


def encode_stats(stats: ShadowStats) -> bytes:
    """A process's figures as a sibling hands them over (JSON)."""
    document: dict[str, Any] = {
        name: getattr(stats, name) for name in (*_COUNTS, *_COUNTS_MORE, *_SUMS)
    }
    document["latencies"] = list(stats.latencies)
    return json.dumps(document).encode()


def decode_stats(data: bytes) -> ShadowStats:
    """A sibling's :func:`encode_stats`; :class:`InvalidInput` naming the field for anything
    else."""
    try:
        document = json.loads(data)
    except ValueError:
        raise InvalidInput("a sibling's shadow figures are not JSON") from None
    if not isinstance(document, dict) or set(document) != {
        *_COUNTS,
        *_COUNTS_MORE,
        *_SUMS,
        "latencies",
    }:
        raise InvalidInput("a sibling's shadow figures do not have the expected fields")
    for name in (*_COUNTS, *_COUNTS_MORE):
        value = document[name]
        if type(value) is not int or value < 0:
            raise InvalidInput(f"a sibling's shadow figure {name!r} is not a count")
    for name in _SUMS:
        value = document[name]
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"a sibling's shadow figure {name!r} is not a finite sum")
        document[name] = float(value)
    latencies = document["latencies"]
    if not isinstance(latencies, list) or not all(
        type(x) in (int, float) and math.isfinite(x) and x >= 0 for x in latencies
    ):
        raise InvalidInput("a sibling's shadow latencies are not durations")
    document["latencies"] = tuple(float(x) for x in latencies)
    return ShadowStats(**document)


def compare(
    stable: dict[str, npt.NDArray[Any]], candidate: dict[str, npt.NDArray[Any]]
) -> tuple[int, int, float, int]:
    """(rows with a label, equal labels, sum of absolute score differences, score values) of
    two answers to the same request; a score pair that is not finite (a NaN input gives NaN
    scores) is left out of the sum and the count."""
    labelled = equal = values = 0
    difference = 0.0
    if LABEL_OUTPUT in stable and LABEL_OUTPUT in candidate:
        a, b = stable[LABEL_OUTPUT], candidate[LABEL_OUTPUT]
        if a.shape == b.shape:
            labelled = int(a.shape[0]) if a.ndim else 1
            equal = int(np.sum(np.asarray(a == b).reshape(labelled, -1).all(axis=1)))
    score = _score_output(stable, candidate)
    if score is not None:
        a = np.asarray(stable[score], dtype=np.float64)
        b = np.asarray(candidate[score], dtype=np.float64)
        if a.shape == b.shape:  # only finite pairs: one NaN answer must not poison the mean
            gaps = np.abs(a - b)
            finite = np.isfinite(gaps)
            difference = float(gaps[finite].sum())
            values = int(finite.sum())
    return labelled, equal, difference, values


def _score_output(
    stable: dict[str, npt.NDArray[Any]], candidate: dict[str, npt.NDArray[Any]]
) -> str | None:
    if SCORE_OUTPUT in stable and SCORE_OUTPUT in candidate:
        return SCORE_OUTPUT
    for name, values in stable.items():
        if name != LABEL_OUTPUT and name in candidate and values.dtype.kind == "f":
            return name
    return None


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "edgewise_shadow_requests",
            "Shadow copies run on a candidate version, by outcome (ok, error).",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self.dropped = Counter(
            "edgewise_shadow_dropped",
            "Shadow copies dropped because the queue was full (the client was answered).",
            ["model"],
            registry=registry,
        )
        self.agreement = Gauge(
            "edgewise_shadow_agreement",
            "Share of shadow rows whose label equals the one the client got, since the shadow "
            "started.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.difference = Gauge(
            "edgewise_shadow_score_difference",
            "Mean absolute difference of the candidate's scores from the answered ones.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.duration = Histogram(
            "edgewise_shadow_duration_seconds",
            "A shadow copy's run on the candidate version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class _Copy:
    __slots__ = ("prepared", "response", "version")

    def __init__(
        self, version: int, prepared: PreparedRequest, response: pb.ModelInferResponse
    ) -> None:
        self.version = version
        self.prepared = prepared
        self.response = response


class Shadow:
    """The bounded queue and the worker of one server process (see the module's docstring)."""

    def __init__(
        self, repository: ModelRepository, registry: CollectorRegistry, queue_size: int = 1000
    ) -> None:
        self.repository = repository
        self.metrics = ShadowMetrics(registry)
        self.queue_size = queue_size
        self._queue: deque[_Copy] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._stats: dict[tuple[str, int], ShadowStats] = {}
        self._latencies: dict[tuple[str, int], deque[float]] = {}
        self._lock = threading.Lock()  # the figures (read by GetRollout)
        self._idle = threading.Condition()
        self._busy = False
        self._failed: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._run, name="edgewise-shadow", daemon=True)
        self._thread.start()

    # ---- the request path ----------------------------------------------------------------------

    def offer(
        self, version: int, prepared: PreparedRequest, response: pb.ModelInferResponse
    ) -> None:
        """Queue a copy for ``version``, or drop it (counted) when the queue is full."""
        if len(self._queue) >= self.queue_size:
            self.metrics.dropped.labels(prepared.model.name).inc()
            key = (prepared.model.name, version)
            with self._lock:
                stats = self._stats.get(key, ShadowStats())
                self._stats[key] = replace(stats, dropped=stats.dropped + 1)
            return
        queue = self._queue
        queue.append(_Copy(version, prepared, response))
        if len(queue) == 1:  # the worker may be asleep (else it is draining, or wakes in 0.5 s)
            self._wake.set()

    # ---- reading and control -------------------------------------------------------------------

    def stats(self, name: str, version: int) -> ShadowStats:
        key = (name, version)
        with self._lock:
            stats = self._stats.get(key, ShadowStats())
            return replace(stats, latencies=tuple(self._latencies.get(key, ())))

    def reset(self, name: str, version: int) -> None:
        """Start ``version``'s figures over (a shadow (re)started)."""
        key = (name, version)
        with self._lock:
            self._stats.pop(key, None)
            self._latencies.pop(key, None)
        for outcome in ("ok", "error"):  # every counter shows a sample from the start
            self.metrics.requests.labels(name, str(version), outcome)
        self.metrics.dropped.labels(name)
        self.metrics.agreement.labels(name, str(version)).set(math.nan)
        self.metrics.difference.labels(name, str(version)).set(math.nan)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued copy has run (tests, a stop); False if ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._busy:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._queue and not self._stopping:
                with self._idle:
                    self._busy = True
                    copy = self._queue.popleft()
                try:
                    self._shadow(copy)
                except Exception:  # never reaches a request; counted as an error
                    log.exception("a shadow copy failed")
                finally:
                    with self._idle:
                        self._busy = False
                        self._idle.notify_all()
            with self._idle:
                self._idle.notify_all()

    def _shadow(self, copy: _Copy) -> None:
        prepared = copy.prepared
        name = prepared.model.name
        key = (name, copy.version)
        version = str(copy.version)
        began = time.perf_counter()
        try:
            candidate = self.repository.get(name, version)
            answer = DataPlane.execute(
                PreparedRequest(
                    candidate, prepared.feeds, None, False, prepared.request_id, prepared.rows
                )
            )
            seconds = time.perf_counter() - began
            ours = decode_outputs(answer)
            theirs = decode_outputs(copy.response)
        except Exception as exc:
            self.metrics.requests.labels(name, version, "error").inc()
            with self._lock:
                stats = self._stats.get(key, ShadowStats())
                self._stats[key] = replace(
                    stats, requests=stats.requests + 1, errors=stats.errors + 1
                )
            if key not in self._failed:
                self._failed.add(key)
                log.warning("shadow of model %s version %s failed: %s", name, version, exc)
            return
        labelled, equal, difference, values = compare(theirs, ours)
        self.metrics.requests.labels(name, version, "ok").inc()
        self.metrics.duration.labels(name, version).observe(seconds)
        with self._lock:
            stats = self._stats.get(key, ShadowStats())
            stats = replace(
                stats,
                requests=stats.requests + 1,
                compared_rows=stats.compared_rows + prepared.rows,
                labelled_rows=stats.labelled_rows + labelled,
                equal_labels=stats.equal_labels + equal,
                score_difference_sum=stats.score_difference_sum + difference,
                score_values=stats.score_values + values,
                latency_sum=stats.latency_sum + seconds,
            )
            self._stats[key] = stats
            self._latencies.setdefault(key, deque(maxlen=_LATENCIES)).append(seconds)
        self.metrics.agreement.labels(name, version).set(stats.agreement)
        self.metrics.difference.labels(name, version).set(stats.mean_abs_difference)
