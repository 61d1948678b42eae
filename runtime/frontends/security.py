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
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from edgewise.runtime.config.channels import SCOPES, TokenEntry, parse_token_entries
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.scopes import scope_of
from edgewise.runtime.frontends.tls_files import TlsFiles, TlsVersion

#: What an aio interceptor is handed: resolves a call's details to its method handler.
Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]

__all__ = [
    "HEALTH_PREFIX",
    "REFLECTION_PREFIXES",
    "AuthInterceptor",
    "Credential",
    "Refusal",
    "TokenSet",
    "server_credentials",
]

log = logging.getLogger(__name__)

HEALTH_PREFIX: Final = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES: Final = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_RELOAD_CHECK_SECONDS: Final = 2.0


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
        self._inline = _credentials(parse_token_entries(inline, "EDGEWISE_TOKENS"))
        self._from_file: list[tuple[bytes, Credential]] = []
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
        self._from_file = _credentials(tokens)
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
        return len(self._inline) + len(self._from_file)

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


def _credentials(entries: Sequence[TokenEntry]) -> list[tuple[bytes, Credential]]:
    made = []
    for entry in entries:
        digest = _digest(entry.token)
        name = entry.id if entry.id is not None else f"token-{digest.hex()[:8]}"
        made.append((digest, Credential(name, entry.scopes)))
    return made


# ---- the interceptor -----------------------------------------------------------------------------


#: The UNAUTHENTICATED message for each reason a token is refused.
DENY_MESSAGES: Final = {
    "missing": "missing credentials: send the metadata 'authorization: Bearer <token>'",
    "malformed": "malformed credentials: expected 'authorization: Bearer <token>'",
    "invalid": "invalid credentials: the bearer token is not accepted",
}


def _deny_handler(refusal: Refusal) -> grpc.RpcMethodHandler[Any, Any]:
    code, message = refusal

    async def deny(request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Aborts before reading anything, whatever the method's arity: the client gets the
        # status, never a half-open stream.
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(deny)


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
            "Calls refused UNAUTHENTICATED, by reason (missing, malformed, invalid).",
            ["reason"],
            registry=registry,
        )
        self._counters = {
            reason: self.failures.labels(reason) for reason in ("missing", "malformed", "invalid")
        }
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

    def credential(
        self, metadata: Iterable[tuple[str, Any]] | None
    ) -> tuple[Credential | None, str | None]:
        """The metadata's credential, or None and the refusal's reason."""
        value = None
        for key, item in metadata or ():
            if key == "authorization":
                value = item
                break
        if value is None:
            return None, "missing"
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

    def authorize(self, metadata: Iterable[tuple[str, Any]] | None, method: str) -> Refusal | None:
        """None when the metadata's credential holds the scope ``method`` needs; else the
        refusal, counted (for front ends that check tokens themselves, and the interceptor)."""
        scope = scope_of(method)
        try:
            credential, reason = self.credential(metadata)
        except Exception:  # a bug here must refuse, never crash or let the call through
            log.exception("authentication check failed")
            credential, reason = None, "invalid"
        if credential is None:
            reason = reason or "invalid"
            self._counters[reason].inc()
            self._refusal_counters[(scope, "UNAUTHENTICATED")].inc()
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGES[reason])
        if scope in credential.scopes:
            return None
        self._refusal_counters[(scope, "PERMISSION_DENIED")].inc()
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"permission denied: {method.rsplit('/', 1)[-1]} needs the '{scope}' scope; "
            f"credential '{credential.id}' holds {', '.join(sorted(credential.scopes))}",
        )

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
        refusal = self.authorize(handler_call_details.invocation_metadata, method)
        if refusal is None:
            return await continuation(handler_call_details)
        return self._deny_handler(refusal)


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
