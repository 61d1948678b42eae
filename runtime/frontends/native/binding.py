"""The native front end: gRPC's C++ server on the public port, Python for the work.

With ``--front-end native`` the public port belongs to gRPC's C++ server (``_front.cc``, built
by :mod:`~edgewise.runtime.frontends.native.build`; public ``grpcpp/`` headers only: gRPC's
generic asynchronous service, its completion queue polled by threads of the front end's own).
C++ reads each ModelInfer call's request, counts the call in flight and hands it to
:meth:`NativeFront.handle` as bytes, on one of the front end's worker threads (as many as the
CPU budget computes with: one answers cheap calls back to back, the others requests over
``small_max_bytes`` and every request while the handler is slow; the pollers only queue the
call, so they never wait for the GIL and stay free for connections and every other call): the
token check, the in-flight limit, parsing, the same decode-run-encode path and accounting as
the grpcio server, then the serialised answer. C++ also reads the call's ``x-request-id`` and
``traceparent``: they make the call's labels (request_context.py), in its log lines and echoed
in its trailers as grpcio echoes them.
No Python gRPC machinery runs per call; on this machine that machinery alone costs more CPU per
call than the model (see benchmarks/RESULTS.md).

The request itself goes through the serving core's pipeline
(:meth:`~edgewise.runtime.serving.pipeline.InferenceCore.infer_on_thread`), the same one every
front end calls. A ModelInfer for a model with dynamic batching is decoded there too, then joins
the model's batch queue on the event loop; its answer goes back through ``Front.complete`` when
its batch has run. Every other call is relayed by C++ to the process's grpc.aio server on a
private Unix socket, with its metadata (the token included, checked there), deadline, messages,
status and trailers: the health, reflection, metadata, repository, monitoring and quality
services are the grpcio server's own code, unchanged.

The port serves TLS, or mutual TLS, when ``start`` is given a :class:`TlsStage`: gRPC's C++
TLS credentials read its checked copies of the files again every second, so certificates rotate
without a restart and a change that cannot be used keeps the previous one (see tls_stage.py).
The private socket stays plaintext.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import importlib
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import grpc

from edgewise.runtime.frontends.grpcio import status_of
from edgewise.runtime.frontends.native.fast_path import FastPath
from edgewise.runtime.frontends.security import AuthInterceptor, Credential
from edgewise.runtime.frontends.tls_stage import CHECK_SECONDS as TLS_CHECK_SECONDS
from edgewise.runtime.frontends.tls_stage import TlsStage
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.codecs import decode
from edgewise.runtime.serving.pipeline import InferenceCore
from edgewise.runtime.serving.request_context import RequestLabels
from edgewise.runtime.serving.shedding import LoadShedder, retry_trailers

__all__ = ["PENDING", "SOURCE", "NativeFront", "front_status", "load_front", "source_digest"]

log = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).with_name("_front.cc")
SHARED_HEADER: Final = Path(__file__).with_name("ort_shared.h")
MODULE: Final = "edgewise.runtime.frontends.native._front"
MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"

#: The answer code that says the answer will come through ``Front.complete(token, answer)``.
PENDING: Final = -2

#: (status code, message, response bytes or None, trailing metadata, work deferred)
Answer = tuple[int, str, bytes | None, tuple[tuple[str, str], ...], bool]

_OK: Final = 0
_RESOURCE_EXHAUSTED: Final = int(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
_PENDING_ANSWER: Final[Answer] = (PENDING, "", None, (), False)


def source_digest() -> str:
    """The digest of ``_front.cc`` (and ``ort_shared.h``, the fast path's contract with
    ``_ort.cc``) a built module must carry to be used."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(SHARED_HEADER.read_bytes())
    return digest.hexdigest()[:16]


def load_front() -> tuple[ModuleType | None, str]:
    """The built front-end module, or None; and a line saying which (for logs and errors)."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        return None, (
            f"not built ({exc}; build it with `make native` or "
            "`python -m edgewise.runtime.frontends.native.build`, which need libgrpc++-dev)"
        )
    built = str(getattr(module, "SOURCE_DIGEST", ""))
    if SOURCE.exists() and built != source_digest():
        return None, "stale: built from another version of _front.cc; rebuild it (`make native`)"
    return module, "loaded"


def front_status() -> str:
    return load_front()[1]


class NativeFront:
    """The Python side of the C++ front end: answers ModelInfer calls handed over as bytes."""

    def __init__(
        self,
        core: InferenceCore,
        auth: AuthInterceptor | None,
        shedder: LoadShedder | None,
        retry_after_ms: int,
    ) -> None:
        self.core = core
        self.auth = auth
        self.shedder = shedder
        self.retry_after_ms = retry_after_ms
        self._front: Any = None
        self._tls: TlsStage | None = None
        #: The fast path's control (fast_path.py), when it is on.
        self.fast: FastPath | None = None
        # Work taken off the response's path (the monitor's statistics), run by :meth:`after`
        # once C++ has the answer on its way, in the context of the call that deferred it (its
        # labels, for the lines it logs). Appends and pops are atomic under the GIL.
        self._deferred: deque[
            tuple[contextvars.Context, Callable[..., object], tuple[Any, ...]]
        ] = deque()

    def start(
        self,
        module: ModuleType,
        address: str,
        upstream: str,
        max_message_bytes: int,
        reuse_port: bool,
        handlers: int,
        small_max_bytes: int = 64 * 1024,
        tls: TlsStage | None = None,
        fast_path: bool = False,
    ) -> int:
        """Bind ``address`` with ``module`` (from :func:`load_front`) and serve; calls that are
        not answered here go to ``upstream`` (the grpc.aio server's address). ``handlers``
        threads (at least 2) run :meth:`handle`: one answers cheap calls back to back, the others
        requests over ``small_max_bytes`` and every request while the handler has been taking
        over half a millisecond a call. Call it on the event loop that serves batch queues.
        With ``tls`` the port serves TLS, and with its client CA only to clients with a
        certificate that CA signed (mutual TLS); its files are watched from then on.
        ``fast_path``: serve the common call in C++ without the GIL (fast_path.py; serve
        ``--native-fast-path``).
        Returns the bound port."""
        loop = asyncio.get_running_loop()
        self.core.attach(loop)
        self._tls = tls
        self._front = module.Front(
            address=address,
            upstream=upstream,
            handler=self.handle,
            after=self.after,
            fast_method=MODEL_INFER,
            max_message_bytes=max_message_bytes,
            reuse_port=reuse_port,
            handlers=handlers,
            small_max_bytes=small_max_bytes,
            tls_cert_file=str(tls.cert) if tls is not None else "",
            tls_key_file=str(tls.key) if tls is not None else "",
            tls_client_ca_file=str(tls.client_ca or "") if tls is not None else "",
            tls_refresh_seconds=TLS_CHECK_SECONDS,
        )
        if tls is not None:
            tls.watch(loop)
        if fast_path and bool(getattr(module, "FAST_PATH", False)):
            self.fast = FastPath(
                self._front,
                module,
                self.core,
                self.auth,
                self.shedder,
                self.core.dataplane.repository.session_settings,
            )
            self.fast.start()
        elif fast_path:
            log.info(
                "native fast path: the front end was built without it (no onnxruntime C API "
                "headers): every call takes the Python path"
            )
        return int(self._front.port)

    def shutdown(self, grace: float) -> None:
        """Stop accepting calls; wait up to ``grace`` seconds for those in flight (blocking:
        run it off the event loop, which must go on serving the relayed calls meanwhile)."""
        if self._tls is not None:
            self._tls.stop()
        if self._front is not None:
            self._front.shutdown(grace)
        if self.fast is not None:  # after the last call: the rings to the monitors, counts out
            self.fast.stop()

    def in_flight(self) -> int:
        """ModelInfer calls the front end holds: being answered, or waiting in a batch queue."""
        return self.counts()[2]

    def counts(self) -> tuple[int, int, int]:
        """(calls, relayed calls, ModelInfer calls in flight) since the start."""
        if self._front is None:
            return 0, 0, 0
        calls, relayed, in_flight = self._front.counts()
        return int(calls), int(relayed), int(in_flight)

    def _defer(self, function: Callable[..., object], *args: Any) -> None:
        self._deferred.append((contextvars.copy_context(), function, args))

    def after(self) -> None:
        """Run the work deferred by the calls answered so far (called by C++ after sending)."""
        deferred = self._deferred
        while deferred:
            try:
                context, function, args = deferred.popleft()
            except IndexError:  # another thread took the last one
                return
            context.run(function, *args)

    def handle(
        self,
        body: bytes,
        authorization: str | None,
        remaining: float | None,
        in_flight: int,
        token: int = 0,
        peer: tuple[str, ...] = (),
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> Answer:
        """Answer one ModelInfer call (see :data:`Answer`), or leave it :data:`PENDING` on a
        batch queue (answered through ``complete(token, ...)``). ``peer``: the client
        certificate's identities (``CN=...``, ``SAN=...``), read by C++ for a call without a
        token; ``request_id`` and ``traceparent``: the call's ``x-request-id`` and W3C trace
        context metadata, where sent. An answered call's trailers carry its ids as on grpcio
        (request_context.py ``RequestLabels.echo``); refusals by the token check, shedding
        and the credential's quota carry none, as on grpcio (its interceptors refuse them).
        Runs on one of the front end's threads; never raises."""
        started = time.perf_counter()
        auth = self.auth
        credential = None
        if auth is not None:
            credential, refused = auth.admit(
                (("authorization", authorization),) if authorization is not None else (),
                MODEL_INFER,
                peer,
            )
            if refused is not None:
                return int(refused.code.value[0]), refused.message, None, (), False
        shedder = self.shedder
        # ``in_flight`` (this call included) is C++'s count; the HTTP front end's calls are the
        # shedder's, and share the one limit.
        if shedder is not None and in_flight + shedder.calls_in_flight() > shedder.limit:
            shedder.record_shed()
            message, trailers = shedder.refusal
            return _RESOURCE_EXHAUSTED, message, None, trailers, False
        if auth is not None and auth.quotas is not None:  # the credential's own limits
            over = auth.take_quota(credential, MODEL_INFER)
            if over is not None:
                return _RESOURCE_EXHAUSTED, over.message, None, retry_trailers(over.retry_ms), False
        labels = RequestLabels(request_id or "", traceparent)
        pending = False
        try:
            request = decode(pb.ModelInferRequest, body)  # INVALID_ARGUMENT, as on grpcio
            deadline = None if remaining is None else time.monotonic() + remaining
            answer = self.core.infer_on_thread(
                request, deadline, started, defer=self._defer, labels=labels
            )
            if isinstance(answer, concurrent.futures.Future):  # on a batch queue
                pending = True
                answer.add_done_callback(
                    lambda done: self._complete(token, done, credential, labels)
                )
                return _PENDING_ANSWER
            return _OK, "", answer.SerializeToString(), labels.echo(), bool(self._deferred)
        except Exception as exc:
            return self._failure(exc, labels)
        finally:
            if auth is not None and not pending:
                auth.give_back_quota(credential, MODEL_INFER)

    def _failure(self, exc: Exception, labels: RequestLabels | None = None) -> Answer:
        """The answer to ``exc``; a call's ``labels``: its ids in the trailers and the log."""
        code, message, trailers = status_of(exc, self.retry_after_ms, labels)
        return int(code.value[0]), message, None, trailers, False

    def _complete(
        self,
        token: int,
        done: concurrent.futures.Future[pb.ModelInferResponse],
        credential: Credential | None = None,
        labels: RequestLabels | None = None,
    ) -> None:
        """Answer a call that waited on a batch queue: exactly once, whatever happened (the call
        stays open until it is answered), with its ``labels``' ids; the credential's quota is
        given back."""
        if self.auth is not None:
            self.auth.give_back_quota(credential, MODEL_INFER)
        try:
            response = done.result().SerializeToString()
            answer: Answer = (_OK, "", response, () if labels is None else labels.echo(), False)
        except Exception as exc:
            answer = self._failure(exc, labels)
        except BaseException as exc:  # cancelled: the server is stopping
            answer = self._failure(RuntimeError(f"cancelled: {type(exc).__name__}"), labels)
        self._front.complete(token, answer)
