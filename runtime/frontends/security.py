"""Transport security of the gRPC port: TLS (optionally mutual) and bearer-token authentication.

**TLS.** :func:`server_credentials` builds the port's credentials from a PEM certificate chain
and key, and, for mutual TLS, a client CA bundle: a client without a certificate signed by it
fails the TLS handshake (it sees UNAVAILABLE; no RPC reaches the server). The files are read
and checked by :class:`~edgewise.runtime.frontends.tls_files.TlsFiles`, as on every port: looked
at again at new connections (at most once a second), a change that can be used is taken, so
certificates rotate without a restart; one that cannot is refused and the previous stays.

**Tokens.** :class:`AuthInterceptor` checks ``authorization: Bearer <token>`` on every call
against a :class:`TokenSet` (a file with one token per line, re-read when it changes, and/or the
``EDGEWISE_TOKENS`` variable). Tokens are compared as sha256 digests with
:func:`hmac.compare_digest`, against every accepted token, so the time taken says nothing about
which token came close. A call without a valid token is answered UNAUTHENTICATED by a handler
that aborts (no exception escapes the interceptor) and counted in
``edgewise_auth_failures_total{reason}`` (``missing``, ``malformed``, ``invalid``); a tokens file
that changed and cannot be used shows as ``edgewise_tokens_file_ok`` 0. The health
service and server reflection can be left open (health is by default: probes send no tokens).

**Certificates.** Under mutual TLS a call without a token is identified by its client
certificate: the tokens file's ``cert:CN=name`` and ``cert:SAN=value`` lines map a certificate's
subject common name, or one of its subject alternative names, to scopes (and limits), re-read
with the tokens. A token, when one is sent, decides; a certificate that no line maps is
UNAUTHENTICATED (reason ``unmapped``). The front ends read the identities where the handshake
left them (:func:`auth_context_identities`: gRPC's auth context, grpcio's and the native front
end's; :func:`certificate_identities`: Python's ``ssl``, the HTTP front end's). The native front
end relays calls to grpcio over its private Unix socket with the identities in
:data:`PEER_HEADER` (a client's own value of it is dropped there); grpcio believes that header
only from a Unix-socket peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from edgewise.runtime.config.channels import (
    NO_LIMITS,
    SCOPES,
    CallLimits,
    TokenEntry,
    parse_token_entries,
)
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.scopes import scope_of
from edgewise.runtime.frontends.tls_files import TlsFiles, TlsVersion
from edgewise.runtime.serving.admission import CallQuotas, QuotaRefusal
from edgewise.runtime.serving.shedding import LoadShedder, retry_trailers, shed_later

#: What an aio interceptor is handed: resolves a call's details to its method handler.
Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]

__all__ = [
    "HEALTH_PREFIX",
    "LIMITED_METHODS",
    "PEER_HEADER",
    "REFLECTION_PREFIXES",
    "AuthInterceptor",
    "Credential",
    "Refusal",
    "TokenSet",
    "auth_context_identities",
    "certificate_identities",
    "context_identities",
    "forwarded_identity",
    "server_credentials",
]

log = logging.getLogger(__name__)

HEALTH_PREFIX: Final = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES: Final = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_RELOAD_CHECK_SECONDS: Final = 2.0
#: The metadata the native front end relays a client certificate's identities in (one value
#: each, ``CN=...`` / ``SAN=...``) to grpcio on its private Unix socket.
PEER_HEADER: Final = "edgewise-peer-identity"
#: The calls per-credential limits count (those the in-flight limit sheds).
LIMITED_METHODS: Final = frozenset({"/inference.GRPCInferenceService/ModelInfer"})


# ---- tokens --------------------------------------------------------------------------------------


def _digest(token: str | bytes) -> bytes:
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


class TokenSet:
    """The accepted tokens, as sha256 digests; the file (if any) is re-read when it changes.

    A file that becomes unreadable or malformed keeps the tokens read before, logs once per
    change of the file and sets :attr:`file_ok` False (``edgewise_tokens_file_ok`` 0) until a
    change can be read again; a file emptied on purpose accepts no token at all.
    """

    def __init__(self, file: Path | None = None, inline: str = "") -> None:
        if file is None and not inline.strip():
            raise InvalidInput("authentication needs a tokens file or EDGEWISE_TOKENS")
        self.file = file
        self._inline, self._inline_certificates = _credentials(
            parse_token_entries(inline, "EDGEWISE_TOKENS")
        )
        self._from_file: list[tuple[bytes, Credential]] = []
        self._file_certificates: dict[str, Credential] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.file_ok = True  # the file's last version was read (False: the previous tokens stay)
        self._next_check = 0.0
        self._lock = threading.Lock()
        if file is not None:
            self._read_file(initial=True)

    def _stat(self) -> tuple[int, int, int]:
        assert self.file is not None
        info = os.stat(self.file)
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _read_file(self, initial: bool = False) -> None:
        assert self.file is not None
        stamp = None  # a file that cannot be stat'ed: looked at again once it can
        try:
            stamp = self._stat()
            tokens = parse_token_entries(self.file.read_text(encoding="utf-8"), str(self.file))
        except (OSError, UnicodeDecodeError, InvalidInput) as exc:
            message = exc.message if isinstance(exc, InvalidInput) else f"{self.file}: {exc}"
            if initial:
                raise InvalidInput(f"tokens file: {message}") from None
            log.error("tokens file not reloaded (the previous tokens stay in use): %s", message)
            self._stamp = stamp  # this version is not read again: one error per change
            self.file_ok = False
            return
        if not tokens and not self._inline:
            log.warning("tokens file %s holds no token: every call is refused", self.file)
        self._from_file, self._file_certificates = _credentials(tokens)
        if not initial:
            log.info("tokens file %s reloaded: %d token(s)", self.file, len(tokens))
        self._stamp = stamp
        self.file_ok = True

    def maybe_reload(self, now: float | None = None) -> None:
        """Re-read the file if it changed (checked at most every 2 s)."""
        if self.file is None:
            return
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + _RELOAD_CHECK_SECONDS
            try:
                stamp = self._stat()
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._read_file()

    def __len__(self) -> int:
        return (
            len(self._inline)
            + len(self._from_file)
            + len(self._inline_certificates)
            + len(self._file_certificates)
        )

    @property
    def maps_certificates(self) -> bool:
        """Whether any line maps a client certificate (``cert:...``)."""
        return bool(self._inline_certificates or self._file_certificates)

    def identify_peer(self, identities: Sequence[str]) -> Credential | None:
        """The credential a client certificate maps to: its identities (``CN=...`` first, then
        each ``SAN=...``) looked up in that order; None when no line maps any of them."""
        self.maybe_reload()
        for identity in identities:
            found = self._file_certificates.get(identity) or self._inline_certificates.get(identity)
            if found is not None:
                return found
        return None

    def accepts(self, token: str | bytes) -> bool:
        """Constant-time check against every accepted token."""
        return self.identify(token) is not None

    def identify(self, token: str | bytes) -> Credential | None:
        """The credential of ``token`` (None: not accepted); compared with every accepted
        token in constant time, whichever matches."""
        self.maybe_reload()
        candidate = _digest(token)
        found = None
        for digest, credential in (*self._inline, *self._from_file):
            if hmac.compare_digest(candidate, digest):
                found = credential
        return found


@dataclass(frozen=True)
class Credential:
    """Who a call is, as the server names it (never the secret), and the scopes it holds."""

    id: str
    scopes: frozenset[str]
    limits: CallLimits = NO_LIMITS


def _credentials(
    entries: Sequence[TokenEntry],
) -> tuple[list[tuple[bytes, Credential]], dict[str, Credential]]:
    """The tokens (as digests) and the certificate identities of ``entries``."""
    tokens = []
    certificates: dict[str, Credential] = {}
    for entry in entries:
        if entry.certificate is not None:
            name = entry.id if entry.id is not None else entry.certificate
            certificates.setdefault(entry.certificate, Credential(name, entry.scopes, entry.limits))
            continue
        digest = _digest(entry.token)
        name = entry.id if entry.id is not None else f"token-{digest.hex()[:8]}"
        tokens.append((digest, Credential(name, entry.scopes, entry.limits)))
    return tokens, certificates


# ---- client certificates -------------------------------------------------------------------------


def _printable(values: Iterable[str | bytes]) -> list[str]:
    texts = []
    for value in values:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if text and text.isprintable():
            texts.append(text)
    return texts


def auth_context_identities(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    """A client certificate's identities from gRPC's auth context: ``CN=`` its subject common
    name, then ``SAN=`` each subject alternative name; () without a client certificate."""
    common = _printable(auth_context.get("x509_common_name", ()))
    alternative = _printable(auth_context.get("x509_subject_alternative_name", ()))
    return tuple([f"CN={name}" for name in common[:1]] + [f"SAN={name}" for name in alternative])


def certificate_identities(certificate: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The same identities from a peer certificate as Python's ``ssl`` decodes it
    (``SSLObject.getpeercert()``); () without one."""
    if not certificate:
        return ()
    common = [
        value
        for relative in certificate.get("subject", ())
        for key, value in relative
        if key == "commonName"
    ]
    alternative = [value for _, value in certificate.get("subjectAltName", ())]
    return tuple(
        [f"CN={name}" for name in _printable(common)[:1]]
        + [f"SAN={name}" for name in _printable(alternative)]
    )


def _relayed(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, ...]:
    return tuple(_printable(value for key, value in metadata or () if key == PEER_HEADER))


def context_identities(
    context: grpc.aio.ServicerContext[Any, Any], metadata: Iterable[tuple[str, Any]] | None
) -> tuple[str, ...]:
    """The client certificate's identities of a grpc.aio call: from its auth context, or, for
    a call the native front end relayed on the private Unix socket, from :data:`PEER_HEADER`
    (believed from a Unix-socket peer only)."""
    try:
        if context.peer().startswith("unix:"):
            return _relayed(metadata)
        return auth_context_identities(context.auth_context())
    except Exception:  # no transport security: no certificate
        return ()


def forwarded_identity(
    context: grpc.aio.ServicerContext[Any, Any],
) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a call's caller to a sibling process (``serve --processes N``,
    on the sibling's private Unix socket, where grpcio believes :data:`PEER_HEADER`): its bearer
    token when it sent one (a token decides), else its client certificate's identities, one
    :data:`PEER_HEADER` value each (from the handshake, never from the client's own metadata:
    see :func:`context_identities`); () for neither."""
    metadata = tuple(context.invocation_metadata() or ())
    for key, value in metadata:
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return (("authorization", text),)
    return tuple((PEER_HEADER, identity) for identity in context_identities(context, metadata))


# ---- the interceptor -----------------------------------------------------------------------------


#: The UNAUTHENTICATED message for each reason a token is refused.
DENY_MESSAGES: Final = {
    "missing": "missing credentials: send the metadata 'authorization: Bearer <token>'",
    "malformed": "malformed credentials: expected 'authorization: Bearer <token>'",
    "invalid": "invalid credentials: the bearer token is not accepted",
    "unmapped": "unknown client certificate: no cert: line of the tokens file maps its subject "
    "CN or a subject alternative name, and no bearer token came",
}


def _deny_handler(refusal: Refusal) -> grpc.RpcMethodHandler[Any, Any]:
    code, message = refusal

    async def deny(request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Aborts before reading anything, whatever the method's arity: the client gets the
        # status, never a half-open stream.
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(deny)


def _quota_handler(refused: QuotaRefusal) -> grpc.RpcMethodHandler[Any, Any]:
    trailers = retry_trailers(refused.retry_ms)

    async def refuse(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, refused.message, trailing_metadata=trailers
        )

    return grpc.stream_stream_rpc_method_handler(refuse)


class Refusal(NamedTuple):
    """Why a call is not let through: UNAUTHENTICATED (no accepted credential) or
    PERMISSION_DENIED (an accepted one without the method's scope), and the message."""

    code: grpc.StatusCode
    message: str


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token authentication and scope checks for every method except the open ones."""

    def __init__(
        self,
        tokens: TokenSet,
        open_prefixes: Sequence[str] = (HEALTH_PREFIX,),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.tokens = tokens
        self.open_prefixes = tuple(open_prefixes)
        registry = registry if registry is not None else CollectorRegistry()
        self.failures = Counter(
            "edgewise_auth_failures",
            "Calls refused UNAUTHENTICATED, by reason (missing, malformed, invalid, unmapped: "
            "a client certificate no cert: line maps).",
            ["reason"],
            registry=registry,
        )
        self._counters = {reason: self.failures.labels(reason) for reason in DENY_MESSAGES}
        self.refusals = Counter(
            "edgewise_auth_refusals",
            "Calls refused, by the scope their method needs and the status (UNAUTHENTICATED: "
            "no accepted credential; PERMISSION_DENIED: a credential without that scope).",
            ["scope", "code"],
            registry=registry,
        )
        self._refusal_counters = {
            (scope, code): self.refusals.labels(scope, code)
            for scope in SCOPES
            for code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        }
        if tokens.file is not None:
            file_ok = Gauge(
                "edgewise_tokens_file_ok",
                "1 while the tokens file's last version is in use; 0 when it changed (seen at "
                "the next call) and cannot be read or parsed: the previous tokens stay in use.",
                registry=registry,
            )
            file_ok.set_function(lambda: 1.0 if tokens.file_ok else 0.0)
        self._deny: dict[Refusal, grpc.RpcMethodHandler[Any, Any]] = {}
        #: Per-credential limits of inference calls (None: none); see :meth:`take_quota`.
        self.quotas: CallQuotas | None = None
        #: The grpcio server's in-flight limit (None: none), which decides after the
        #: credential and before its quota (set by the server that has both).
        self.shedder: LoadShedder | None = None

    def credential(
        self, metadata: Iterable[tuple[str, Any]] | None, peer: Sequence[str] = ()
    ) -> tuple[Credential | None, str | None]:
        """The metadata's credential (its bearer token; without one, the client certificate
        whose identities are ``peer``), or None and the refusal's reason."""
        value = None
        for key, item in metadata or ():
            if key == "authorization":
                value = item
                break
        if value is None:
            if not peer or not self.tokens.maps_certificates:
                return None, "missing"  # no certificate, or none is mapped: a token is missing
            found = self.tokens.identify_peer(peer)
            return found, None if found is not None else "unmapped"
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return None, "malformed"
        found = self.tokens.identify(token)
        return found, None if found is not None else "invalid"

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the metadata carries an accepted token, else the refusal's reason."""
        return self.credential(metadata)[1]

    def authorize(
        self, metadata: Iterable[tuple[str, Any]] | None, method: str, peer: Sequence[str] = ()
    ) -> Refusal | None:
        """None when the call's credential (see :meth:`credential`) holds the scope ``method``
        needs; else the refusal, counted (for front ends that check tokens themselves, and the
        interceptor)."""
        return self.admit(metadata, method, peer)[1]

    def admit(
        self, metadata: Iterable[tuple[str, Any]] | None, method: str, peer: Sequence[str] = ()
    ) -> tuple[Credential | None, Refusal | None]:
        """:meth:`authorize`, with the credential let through (None when refused)."""
        scope = scope_of(method)
        try:
            credential, reason = self.credential(metadata, peer)
        except Exception:  # a bug here must refuse, never crash or let the call through
            log.exception("authentication check failed")
            credential, reason = None, "invalid"
        if credential is None:
            reason = reason or "invalid"
            self._counters[reason].inc()
            self._refusal_counters[(scope, "UNAUTHENTICATED")].inc()
            return None, Refusal(grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGES[reason])
        if scope in credential.scopes:
            return credential, None
        self._refusal_counters[(scope, "PERMISSION_DENIED")].inc()
        return None, Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"permission denied: {method.rsplit('/', 1)[-1]} needs the '{scope}' scope; "
            f"credential '{credential.id}' holds {', '.join(sorted(credential.scopes))}",
        )

    def take_quota(self, credential: Credential | None, method: str) -> QuotaRefusal | None:
        """The credential's own limits (serving.admission.CallQuotas) for one call of
        ``method``: None lets it through (pair it with :meth:`give_back_quota` at its end), a
        refusal is answered RESOURCE_EXHAUSTED (HTTP 429) with its retry hint. The one check
        every front end makes, after the scope check."""
        quotas = self.quotas
        if quotas is None or credential is None or method not in LIMITED_METHODS:
            return None
        return quotas.take(credential.id, credential.limits)

    def give_back_quota(self, credential: Credential | None, method: str) -> None:
        quotas = self.quotas
        if quotas is not None and credential is not None and method in LIMITED_METHODS:
            quotas.give_back(credential.id, credential.limits)

    def _hold_quota(
        self, credential: Credential | None, method: str
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """On grpcio, in the call's task, after the shedder let it in: take the credential's
        quota until the task ends, or the handler that refuses the call (its in-flight slot
        given back at once)."""
        refused = self.take_quota(credential, method)
        if refused is not None:
            if self.shedder is not None:
                self.shedder.leave_task()
            return _quota_handler(refused)
        if self.quotas is None or credential is None or method not in LIMITED_METHODS:
            return None
        task = asyncio.current_task()
        if task is None:  # not on a call's task: nothing would give it back
            self.give_back_quota(credential, method)
        else:
            task.add_done_callback(lambda _: self.give_back_quota(credential, method))
        return None

    def _deny_handler(self, refusal: Refusal) -> grpc.RpcMethodHandler[Any, Any]:
        handler = self._deny.get(refusal)
        if handler is None:
            handler = _deny_handler(refusal)
            if len(self._deny) < 1024:  # messages vary only with method, scope and credential
                self._deny[refusal] = handler
        return handler

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if self._by_certificate(metadata):
            # The certificate is on the call's context, which only the handler sees: the
            # shedder decides there too, once the caller is known (shed_later).
            if self.shedder is None:
                handler = await continuation(handler_call_details)
            else:
                with shed_later():
                    handler = await continuation(handler_call_details)
            return None if handler is None else self._checked_in_handler(handler, method)
        # As on every front end: the credential, then the server-wide shedder (in the
        # continuation), then the credential's quota; a refusal leaves the other steps as
        # they were.
        credential, refusal = self.admit(metadata, method)
        if refusal is not None:
            return self._deny_handler(refusal)
        handler = await continuation(handler_call_details)
        if self.quotas is None or handler is None:
            return handler
        if self.shedder is not None and self.shedder.refuses(handler):
            return handler
        refused = self._hold_quota(credential, method)
        return handler if refused is None else refused

    def _by_certificate(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """Whether a call may be identified by a client certificate: it sends no token and the
        tokens map certificates (or it carries relayed identities, to be judged by its peer)."""
        relayed = False
        for key, _ in metadata or ():
            if key == "authorization":
                return False
            relayed = relayed or key == PEER_HEADER
        return relayed or self.tokens.maps_certificates

    def _checked_in_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` behind the check of the call's client certificate: refused calls abort
        before the method runs."""
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        kind = next(name for name in kinds if getattr(handler, name) is not None)
        behavior = getattr(handler, kind)
        streaming_response = kind.endswith("_stream")

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata()
            peer = context_identities(context, metadata)
            credential, refusal = self.admit(metadata, method, peer)
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            shedder = self.shedder
            if shedder is not None and method in shedder.methods and not shedder.enter_task():
                message, trailers = shedder.refusal
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailers
                )
            refused = self.take_quota(credential, method)
            if refused is not None:
                if shedder is not None:
                    shedder.leave_task()
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    refused.message,
                    trailing_metadata=retry_trailers(refused.retry_ms),
                )
            try:
                return await self._run(behavior, request, context, streaming_response)
            finally:
                self.give_back_quota(credential, method)

        return self._rebuilt(handler, kind, checked)

    @staticmethod
    async def _run(
        behavior: Callable[..., Any],
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        streaming_response: bool,
    ) -> Any:
        result = behavior(request, context)
        if not streaming_response:
            return await result
        if inspect.isasyncgen(result):  # a generator handler: written through the context
            async for item in result:
                await context.write(item)
            return None
        return await result

    @staticmethod
    def _rebuilt(
        handler: grpc.RpcMethodHandler[Any, Any], kind: str, behavior: Callable[..., Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        make = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }[kind]
        return make(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# ---- TLS -----------------------------------------------------------------------------------------


def _configuration(version: TlsVersion) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(version.key, version.cert)], root_certificates=version.client_ca
    )


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for the gRPC port; with ``client_ca``, clients must present a
    certificate it signed (mutual TLS). Files that cannot be used are one InvalidInput naming
    them; a change is taken at a new connection once it can be used (see tls_files.py)."""
    files = TlsFiles(cert, key, client_ca, "gRPC port")

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        version = files.refresh()
        return None if version is None else _configuration(version)

    # The stubs type the fetcher as never returning None; gRPC reads None as "unchanged".
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
    return grpc.dynamic_ssl_server_credentials(
        _configuration(files.current), fetcher, require_client_authentication=client_ca is not None
    )
