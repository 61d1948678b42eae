"""The labels of one inference call: its model, version, request id and trace id, in every log
line emitted while the call is served and echoed in its answer.

A front end makes one :class:`RequestLabels` per call from what the call's metadata or headers
carry (``x-request-id``, the W3C ``traceparent``) and hands it to the serving core, which sets
it as the current labels (:data:`CURRENT`, a contextvar) for the call's work and takes it back
when the call ends; the log formatter (runtime/cli/logformat.py) reads them from there.

The request id: the request's own ``id``; else the ``x-request-id`` the caller sent (then taken
as the request's id, as if it were in the body); else one made here, 16 hex digits, echoed in
the answer's ``id`` and the logs but not a key of the request (its prediction is not kept for
feedback, the capture samples it at random, a sticky split does not hash it). The trace id: the
caller's ``traceparent``'s (when well formed), or that of the trace tracing started for the call.

Work done for several calls at once (a batch's model run) runs with the model's labels only.
"""

from __future__ import annotations

import contextvars
import random
import re
from typing import Final

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb

__all__ = [
    "CURRENT",
    "REQUEST_ID_KEY",
    "TRACEPARENT",
    "TRACE_ID_KEY",
    "RequestLabels",
    "current",
    "echoable",
    "model_context",
    "trace_id_of",
]

#: The header / metadata key of a caller's request id, echoed in the answer.
REQUEST_ID_KEY: Final = "x-request-id"
#: The header / metadata key of the answer's trace id (32 hex digits).
TRACE_ID_KEY: Final = "x-trace-id"
#: The W3C trace context header / gRPC metadata key a front end reads.
TRACEPARENT: Final = "traceparent"

#: The longest id echoed in a header or metadata (a longer one is answered in the body only).
ECHO_MAX_CHARS: Final = 256

#: version-trace_id-parent_id-flags, lowercase hex; a later version may add "-" fields.
_TRACEPARENT_FORM: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(?:-.*)?", re.DOTALL
)
_ZERO_TRACE: Final = "0" * 32
_ZERO_PARENT: Final = "0" * 16
_getrandbits = random.getrandbits  # reseeded in a forked child (random registers at_fork)


class RequestLabels:
    """The labels of one call (see the module's docstring)."""

    __slots__ = (
        "generated",
        "model",
        "request_id",
        "sent_id",
        "trace_id",
        "traceparent",
        "version",
    )

    def __init__(self, request_id: str = "", traceparent: str | None = None) -> None:
        """``request_id``: the caller's ``x-request-id`` ("" when none); ``traceparent``: its
        W3C trace context, where one came."""
        self.model = self.version = ""
        if request_id:  # the caller's x-request-id: the answer echoes it
            self.request_id, self.sent_id, self.generated = request_id, True, False
        else:
            self.request_id, self.sent_id, self.generated = f"{_getrandbits(64):016x}", False, True
        self.traceparent = traceparent
        self.trace_id = trace_id_of(traceparent) if traceparent else ""

    def take(self, request: pb.ModelInferRequest) -> None:
        """The labels of ``request`` (once parsed): its model and version asked for and its id;
        a request without an id takes the caller's ``x-request-id`` as its own."""
        self.model = request.model_name
        self.version = request.model_version
        if request.id:
            self.request_id = request.id
            self.generated = False
        elif not self.generated:
            request.id = self.request_id

    def answered(self, response: pb.ModelInferResponse) -> pb.ModelInferResponse:
        """``response``, with the id made here where the request had none."""
        if self.generated:
            response.id = self.request_id
        return response

    def echo(self, failed: bool = False) -> tuple[tuple[str, str], ...]:
        """The metadata a gRPC answer carries: the request id where the caller sent
        ``x-request-id`` or the call ``failed`` (the response's ``id`` holds it otherwise), and
        the trace id where the call has one. Ids that metadata cannot carry are left out."""
        pairs: tuple[tuple[str, str], ...] = ()
        if (failed or self.sent_id) and echoable(self.request_id):
            pairs = ((REQUEST_ID_KEY, self.request_id),)
        if self.trace_id:
            pairs += ((TRACE_ID_KEY, self.trace_id),)
        return pairs

    def headers(self) -> dict[str, str]:
        """The headers an HTTP answer carries: the request id (where a header can carry it)
        and the trace id (where the call has one)."""
        headers = {REQUEST_ID_KEY: self.request_id} if echoable(self.request_id) else {}
        if self.trace_id:
            headers[TRACE_ID_KEY] = self.trace_id
        return headers

    def extra(self) -> dict[str, str]:
        """The labels as a log record's ``extra`` (for a line logged after the call ended)."""
        return {
            "model": self.model,
            "version": self.version,
            "request_id": self.request_id,
            "trace_id": self.trace_id,
        }


#: The labels of the call being served in this context (None: no call).
CURRENT: contextvars.ContextVar[RequestLabels | None] = contextvars.ContextVar(
    "edgewise_request", default=None
)


def current() -> RequestLabels | None:
    """The labels of the call being served here, or None."""
    return CURRENT.get()


def model_context(model: str, version: str) -> contextvars.Context:
    """A context whose labels name only ``model`` and ``version``: for work done for several
    calls at once (a batch), so that no call's id labels it, nor leaks into the next."""
    labels = RequestLabels.__new__(RequestLabels)
    labels.model, labels.version = model, version
    labels.request_id = labels.trace_id = ""
    labels.traceparent = None
    labels.sent_id = labels.generated = False
    context = contextvars.Context()
    context.run(CURRENT.set, labels)
    return context


def echoable(value: str) -> bool:
    """Whether ``value`` can go in a header or metadata as is: printable ASCII, not too long."""
    return 0 < len(value) <= ECHO_MAX_CHARS and value.isascii() and value.isprintable()


def trace_id_of(traceparent: str) -> str:
    """The trace id of a well-formed W3C ``traceparent`` (version 00, or a later version's
    first four fields), else "" (the all-zero ids are invalid)."""
    match = _TRACEPARENT_FORM.fullmatch(traceparent)
    if match is None:
        return ""
    version, trace_id, parent_id = match.groups()
    if version == "ff" or (version == "00" and len(traceparent) != 55):
        return ""
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return ""
    return trace_id
