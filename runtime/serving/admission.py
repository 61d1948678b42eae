"""Memory admission: refuse a request (RESOURCE_EXHAUSTED) rather than be OOM-killed running it.

When a request reaches the servicer, gRPC has already received and parsed it: that memory is
already held. What admission guards is what comes next, decoding the tensors and
running the model, whose cost grows with the decoded size. Before anything is decoded,
:meth:`MemoryAdmission.admit` estimates that cost from the request's tensors::

    estimate = REQUEST_MEMORY_FACTOR * fixed-size bytes      (raw or typed numbers, decoded)
             + TYPED_ELEMENT_BYTES   * typed numeric elements (a Python number each, in decoding)
             + OBJECT_ELEMENT_BYTES  * BYTES elements         (bytes, then str, objects each)

and refuses it when ``held + reserved + estimate > memory budget``, where ``held`` is the
process's anonymous resident memory now and ``reserved`` the estimates of requests admitted and
still running. An admitted request reserves its estimate until :meth:`MemoryAdmission.release`.

Anonymous memory, not the resident set size, is what a memory cgroup cannot take back (there is
no swap): the pages of shared libraries count in RSS but are page cache, charged to whichever
group first read them and reclaimable. Measured under the edge-tiny profile: RSS 225 MiB, of which
96 MiB anonymous, while the cgroup was charged 98 MiB.

The factors were measured on this project's reference models (logistic regression, random forest,
a pipeline with string columns): after receipt, a raw FP32 request grew the resident set by about
3.6 times its size, a typed one by about 45 bytes per element, and a BYTES element by about
225 bytes (a ``bytes`` object, a ``str`` for onnxruntime, a ``std::string`` inside it and the
object arrays). Requests estimated under :data:`SMALL_REQUEST_BYTES` are admitted without reading
the process's memory: at the in-flight limit they cannot add up to a risk.

What gRPC holds before a handler runs is bounded elsewhere: by the message size limit and the
in-flight limit of the runtime budget (:mod:`edgewise.runtime.config.limits`).

Per-credential limits (:class:`CallQuotas`) share that in-flight limit out: each credential
may hold a share of it and send at a rate, so one client cannot take the whole server.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgewise.runtime.config.channels import NO_LIMITS, CallLimits
from edgewise.runtime.config.limits import format_bytes
from edgewise.runtime.errors import InvalidInput, ResourceExhausted
from edgewise.runtime.package.datatypes import BYTES, DATATYPE_TO_NUMPY
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import element_count

__all__ = [
    "OBJECT_ELEMENT_BYTES",
    "REQUEST_MEMORY_FACTOR",
    "SMALL_REQUEST_BYTES",
    "TYPED_ELEMENT_BYTES",
    "CallQuotas",
    "MemoryAdmission",
    "QuotaRefusal",
    "anonymous_bytes",
    "estimate_request_bytes",
]

#: Memory a request needs per byte of decoded fixed-size tensor data (decoded copy, onnxruntime's
#: copy and intermediates, outputs and their encoding).
REQUEST_MEMORY_FACTOR: Final = 4
#: Memory per typed (non-raw) numeric element: decoding makes a Python number of each.
TYPED_ELEMENT_BYTES: Final = 48
#: Memory per BYTES element: a ``bytes``, a ``str`` for onnxruntime, its ``std::string`` copy.
OBJECT_ELEMENT_BYTES: Final = 256
#: Requests estimated below this are admitted without reading the process's memory.
SMALL_REQUEST_BYTES: Final = 256 * 1024

_TYPED_FIELDS: Final = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
)
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


def anonymous_bytes() -> int:
    """This process's anonymous resident memory (resident minus file-backed and shared pages),
    from ``/proc/self/statm`` in a few microseconds."""
    with open("/proc/self/statm", "rb") as handle:
        fields = handle.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE_SIZE


def estimate_request_bytes(request: pb.ModelInferRequest) -> int:
    """Memory that decoding and running ``request`` is expected to take (see the module doc).

    Counts come from the payload actually carried, never from the declared shape alone, so a
    request cannot claim a huge shape to get refused instead of being reported as malformed."""
    fixed = 0
    typed = 0
    objects = 0
    raw = request.raw_input_contents
    for index, tensor in enumerate(request.inputs):
        datatype = tensor.datatype
        if datatype not in DATATYPE_TO_NUMPY:
            continue  # the decoder rejects it
        if raw:
            if index >= len(raw):
                continue
            size = len(raw[index])
            fixed += size
            if datatype == BYTES:
                # The objects decoding will make: the declared count, which the decoder refuses
                # beyond what the payload can carry (each element has at least its 4-byte
                # length). The decoder's own rule reads no more than MAX_RANK dimensions (a
                # product over a million declared ones took seconds of big-integer arithmetic).
                try:
                    declared = element_count(tensor.name, tensor.shape)
                except InvalidInput:
                    continue  # the decoder refuses it
                objects += min(declared, size // 4)
            continue
        contents = tensor.contents
        if datatype == BYTES:
            count = len(contents.bytes_contents)
            objects += count
            fixed += sum(len(item) for item in contents.bytes_contents)
            continue
        count = sum(len(getattr(contents, name)) for name in _TYPED_FIELDS)
        typed += count
        fixed += count * DATATYPE_TO_NUMPY[datatype].itemsize
    return (
        REQUEST_MEMORY_FACTOR * fixed + TYPED_ELEMENT_BYTES * typed + OBJECT_ELEMENT_BYTES * objects
    )


class MemoryAdmission:
    """Admits or refuses requests against a memory budget; safe to call from any thread."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        enabled: bool = True,
        registry: CollectorRegistry | None = None,
        held: Callable[[], int] = anonymous_bytes,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.enabled = enabled and budget_bytes > 0
        self._held = held
        self._reserved = 0
        self._lock = threading.Lock()
        self.refusals = 0
        self.last_refusal_held = 0
        registry = registry if registry is not None else CollectorRegistry()
        self._refused = Counter(
            "edgewise_admission_refused",
            "Inference requests refused by memory admission (RESOURCE_EXHAUSTED).",
            registry=registry,
        )
        Gauge(
            "edgewise_memory_budget_bytes",
            "Memory the process may fill before admission refuses requests (0: admission off).",
            registry=registry,
        ).set(budget_bytes if self.enabled else 0)
        reserved = Gauge(
            "edgewise_admission_reserved_bytes",
            "Estimated memory of admitted requests still running.",
            registry=registry,
        )
        reserved.set_function(lambda: self._reserved)
        anonymous = Gauge(
            "edgewise_anonymous_memory_bytes",
            "Anonymous resident memory of the server process (what admission compares).",
            registry=registry,
        )
        anonymous.set_function(held)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def admit(self, request: pb.ModelInferRequest) -> int:
        """Reserve memory for ``request`` and return the reservation, or raise
        :class:`ResourceExhausted`. Pass the result to :meth:`release` when the request ends."""
        if not self.enabled:
            return 0
        estimate = estimate_request_bytes(request)
        if estimate < SMALL_REQUEST_BYTES:
            return 0
        with self._lock:
            held = self._held()
            if held + self._reserved + estimate > self.budget_bytes:
                self.refusals += 1
                self.last_refusal_held = held
                reserved = self._reserved
            else:
                self._reserved += estimate
                return estimate
        self._refused.inc()
        raise ResourceExhausted(
            f"memory admission: this request needs about {format_bytes(estimate)} to decode and "
            f"run; the server holds {format_bytes(held)} plus {format_bytes(reserved)} for "
            f"requests in flight, and its budget is {format_bytes(self.budget_bytes)}: retry "
            f"later or send smaller batches"
        )

    def release(self, reservation: int) -> None:
        if reservation:
            with self._lock:
                self._reserved -= reservation


# ---- per-credential limits -----------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaRefusal:
    """Why one credential's call is refused: ``reason`` (``rate``: its token bucket is empty;
    ``share``: it holds its share of the in-flight limit), the message and the retry hint."""

    reason: str
    message: str
    retry_ms: int


class _Account:
    """One credential's state: its token bucket and the calls it holds."""

    __slots__ = ("inflight", "last", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.last = now
        self.inflight = 0


class CallQuotas:
    """Per-credential limits on inference calls, so that one client cannot take the server: a
    token bucket (``rate`` calls a second, ``burst`` at once; default burst: one second's worth)
    and a share of the in-flight limit (at most ``share * max_inflight`` calls at once, at least
    one; no share without an in-flight limit). A credential's limits are its own (the tokens
    file's ``rate=``/``burst=``/``share=``), each unset one the server's ``default``.

    :meth:`take` checks both and then commits both (a refused call takes no slot and no token);
    each call it lets through is paired with :meth:`give_back`. Safe from any thread (the native
    front end's handlers); a credential without limits costs one attribute test and no lock.
    Refusals are counted in ``edgewise_credential_refusals_total{credential, reason}``: the
    credential's id (the tokens file's id, a token's digest prefix or a certificate's mapping;
    never a secret), so the labels are bounded by the tokens file.
    """

    def __init__(
        self,
        default: CallLimits,
        max_inflight: int,
        retry_ms: int,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self._default_any = default.any
        self.max_inflight = max_inflight
        self.retry_ms = retry_ms
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()
        registry = registry if registry is not None else CollectorRegistry()
        self._refused = Counter(
            "edgewise_credential_refusals",
            "Inference calls refused RESOURCE_EXHAUSTED (HTTP 429) by their credential's own "
            "limit: reason rate (token bucket empty) or share (its share of the in-flight limit "
            "held).",
            ["credential", "reason"],
            registry=registry,
        )
        held = Gauge(
            "edgewise_credential_calls_limited",
            "Inference calls in flight that count against a credential's share.",
            registry=registry,
        )
        held.set_function(lambda: sum(a.inflight for a in list(self._accounts.values())))

    def limits_of(self, limits: CallLimits) -> CallLimits:
        return limits.over(self.default)

    def _share_calls(self, share: float | None) -> int | None:
        if share is None or self.max_inflight <= 0:
            return None
        return max(1, int(share * self.max_inflight))

    def take(self, credential: str, limits: CallLimits) -> QuotaRefusal | None:
        """Let one call of ``credential`` through (None; then :meth:`give_back` at its end) or
        refuse it, counted, without changing anything."""
        if not self._default_any:
            if limits is NO_LIMITS:  # the common case: no limits anywhere, no state
                return None
        else:
            limits = limits.over(self.default)
        if limits.rate is None and limits.share is None:
            return None
        rate = limits.rate
        burst = float(limits.burst if limits.burst is not None else max(1, math.ceil(rate or 1)))
        calls = self._share_calls(limits.share)
        with self._lock:
            now = self._clock()
            account = self._accounts.get(credential)
            if account is None:
                account = self._accounts[credential] = _Account(burst, now)
            tokens = account.tokens
            if rate is not None:
                tokens = min(burst, tokens + (now - account.last) * rate)
                account.tokens, account.last = tokens, now
            if calls is not None and account.inflight >= calls:
                refusal = QuotaRefusal(
                    "share",
                    f"credential '{credential}' holds {account.inflight} inference calls, its "
                    f"share ({limits.share:g}) of the server's {self.max_inflight}: retry after "
                    f"{self.retry_ms} ms",
                    self.retry_ms,
                )
            elif rate is not None and tokens < 1.0:
                wait = math.ceil((1.0 - tokens) / rate * 1000)
                refusal = QuotaRefusal(
                    "rate",
                    f"credential '{credential}' is over its rate of {rate:g} calls/s "
                    f"(burst {burst:g}): retry after {wait} ms",
                    wait,
                )
            else:
                if rate is not None:
                    account.tokens = tokens - 1.0
                account.inflight += 1
                return None
        self._refused.labels(credential, refusal.reason).inc()
        return refusal

    def give_back(self, credential: str, limits: CallLimits) -> None:
        """The end of a call :meth:`take` let through."""
        if not self._default_any and (limits.rate is None and limits.share is None):
            return
        with self._lock:
            account = self._accounts.get(credential)
            if account is not None and account.inflight > 0:
                account.inflight -= 1
