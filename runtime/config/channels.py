"""The client side of edgewise's gRPC port: a channel with TLS (optionally mutual) and the
bearer token every call sends, and the retry hint of a RESOURCE_EXHAUSTED answer.

A leaf module (grpcio and the settings only): the CLI, the agent and the container health check
use it without importing the server; the server's token check reads tokens with the same rules
(:func:`parse_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import grpc

from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "CERT_PREFIX",
    "MIN_TOKEN_CHARS",
    "NO_LIMITS",
    "PUSHBACK_KEY",
    "RETRY_AFTER_KEY",
    "SCOPES",
    "CallLimits",
    "TokenEntry",
    "client_channel",
    "client_token",
    "parse_call_limits",
    "parse_token_entries",
    "parse_tokens",
    "read_pem",
    "retry_after_ms",
]

#: Trailing metadata of a retryable RESOURCE_EXHAUSTED: for any client, and for gRPC's own retry
#: policy (which waits that long before its next attempt).
RETRY_AFTER_KEY: Final = "retry-after-ms"
PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
MIN_TOKEN_CHARS: Final = 16
_TOKEN_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="
)


#: The scopes a credential can hold: ``infer`` (ModelInfer), ``read`` (metadata, readiness,
#: reports, indexes), ``admin`` (load, unload, resets, rollout changes).
SCOPES: Final = ("infer", "read", "admin")


#: A tokens-file line for a client certificate (mutual TLS) starts with this, then ``CN=name``
#: (the certificate's subject common name) or ``SAN=value`` (one of its subject alternative
#: names: a DNS name, URI, e-mail address or IP address); ``%XX`` escapes (``%20``: a space).
CERT_PREFIX: Final = "cert:"
_CERT_KINDS: Final = ("CN=", "SAN=")


@dataclass(frozen=True)
class CallLimits:
    """A credential's share of the server: ``rate`` inference calls a second with ``burst``
    more at once (a token bucket), and at most ``share`` of the in-flight limit. None: no limit
    of that kind (or, in a tokens-file line, the server's default)."""

    rate: float | None = None
    burst: int | None = None
    share: float | None = None

    def over(self, default: CallLimits) -> CallLimits:
        """These limits, each unset one taken from ``default``."""
        return CallLimits(
            self.rate if self.rate is not None else default.rate,
            self.burst if self.burst is not None else default.burst,
            self.share if self.share is not None else default.share,
        )

    @property
    def any(self) -> bool:
        return self.rate is not None or self.share is not None


#: No limits: what a credential without any gets.
NO_LIMITS: Final = CallLimits()


@dataclass(frozen=True)
class TokenEntry:
    """One accepted credential: a bearer token (the secret) or a client certificate's identity
    (``certificate``: ``CN=...`` or ``SAN=...``, the token then empty), the scopes it holds,
    the id that names it in logs, metrics and the audit log (None: a token is named after a
    digest prefix, a certificate after its identity) and its call limits."""

    token: str
    scopes: frozenset[str]
    id: str | None = None
    certificate: str | None = None
    limits: CallLimits = NO_LIMITS


_LIMIT_NAMES: Final = ("rate", "burst", "share")


def parse_call_limits(fields: Sequence[str], where: str) -> CallLimits:
    """``rate=50/s`` (or ``rate=50``: calls a second), ``burst=100`` (calls at once beyond the
    rate; default: one second's worth), ``share=0.5`` (of the in-flight limit, above 0 and at
    most 1), in any order; InvalidInput naming the field otherwise."""
    values: dict[str, float | int] = {}
    for field in fields:
        name, equals, text = field.partition("=")
        if not equals or name not in _LIMIT_NAMES:
            raise InvalidInput(
                f"{where}: {field!r} is not a limit (expected rate=N/s, burst=N or share=F)"
            )
        if name in values:
            raise InvalidInput(f"{where}: {name} is given twice")
        try:
            if name == "rate":
                number = text[: -len("/s")] if text.endswith("/s") else text
                rate = float(number)
                if not 0 < rate < float("inf"):
                    raise ValueError
                values[name] = rate
            elif name == "burst":
                burst = int(text)
                if burst < 1:
                    raise ValueError
                values[name] = burst
            else:
                share = float(text)
                if not 0 < share <= 1:
                    raise ValueError
                values[name] = share
        except ValueError:
            expected = {
                "rate": "a number of calls a second above 0, e.g. rate=50/s",
                "burst": "a whole number of calls of at least 1",
                "share": "a fraction above 0 and at most 1",
            }[name]
            raise InvalidInput(f"{where}: {field!r}: {name} must be {expected}") from None
    if "burst" in values and "rate" not in values:
        raise InvalidInput(f"{where}: burst needs a rate")
    if not values:
        return NO_LIMITS
    return CallLimits(
        rate=float(values["rate"]) if "rate" in values else None,
        burst=int(values["burst"]) if "burst" in values else None,
        share=float(values["share"]) if "share" in values else None,
    )


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS or not set(token) <= _TOKEN_CHARS:
        raise InvalidInput(
            f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters of letters, "
            "digits and -._~+/= (found one of "
            f"{len(token)} characters{' with other characters' if len(token) else ''})"
        )


def _scopes(field: str) -> frozenset[str] | None:
    """The scopes of a ``scope1,scope2`` field, or None when it is not a scope list."""
    names = field.split(",")
    if names and all(name in SCOPES for name in names):
        return frozenset(names)
    return None


def parse_token_entries(text: str, where: str) -> list[TokenEntry]:
    """Credentials from text, ``#`` comments and blank lines ignored. A line is either
    ``TOKEN SCOPES [ID] [LIMITS]`` (SCOPES: comma-separated names from :data:`SCOPES`; ID: any
    word without ``=``; LIMITS: see :func:`parse_call_limits`), ``cert:CN=name SCOPES [ID]
    [LIMITS]`` or ``cert:SAN=value ...`` (a client certificate, under mutual TLS) or, as before
    scopes existed, tokens separated by commas or spaces, each holding every scope. Each token
    must be at least 16 characters of the RFC 6750 token alphabet."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        scopes = _scopes(fields[1]) if len(fields) >= 2 else None
        certificate = (
            fields[0][len(CERT_PREFIX) :] if fields and fields[0].startswith(CERT_PREFIX) else None
        )
        if certificate is not None:  # spaces in a name are written %20 (any %XX escape)
            certificate = unquote(certificate)
        if certificate is not None and (
            scopes is None
            or not certificate.startswith(_CERT_KINDS)
            or not certificate.partition("=")[2]
        ):
            raise InvalidInput(
                f"{where}: line {number}: expected 'cert:CN=NAME SCOPES [ID]' or "
                "'cert:SAN=VALUE SCOPES [ID]' (a certificate holds the scopes listed)"
            )
        if scopes is not None:
            rest = fields[2:]
            names = [field for field in rest if "=" not in field]
            if len(names) > 1:
                raise InvalidInput(
                    f"{where}: line {number}: expected 'TOKEN SCOPES [ID] [LIMITS]', found "
                    f"{len(names)} words after the scopes"
                )
            limits = parse_call_limits(
                [field for field in rest if "=" in field], f"{where}: line {number}"
            )
            identity = names[0] if names else None
            if certificate is not None:
                entries.append(TokenEntry("", scopes, identity, certificate, limits))
                continue
            _check_token(fields[0], where)
            entries.append(TokenEntry(fields[0], scopes, identity, None, limits))
            continue
        if len(fields) >= 2 and len(fields[1]) < MIN_TOKEN_CHARS and fields[1].islower():
            unknown = sorted(set(fields[1].split(",")) - set(SCOPES))
            raise InvalidInput(
                f"{where}: line {number}: unknown scope {', '.join(unknown)!r} "
                f"(known: {', '.join(SCOPES)})"
            )
        for token in " ".join(fields).replace(",", " ").split():
            _check_token(token, where)
            entries.append(TokenEntry(token, frozenset(SCOPES)))
    return entries


def parse_tokens(text: str, where: str) -> list[str]:
    """The tokens of text, as :func:`parse_token_entries` reads it (scopes and ids left out)."""
    return [entry.token for entry in parse_token_entries(text, where) if entry.token]


def retry_after_ms(trailing_metadata: Any) -> int | None:
    """The retry hint of a call's trailing metadata (client side), or None."""
    for key, value in trailing_metadata or ():
        if key in (RETRY_AFTER_KEY, PUSHBACK_KEY):
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def client_channel(
    target: str, security: ClientSecurity, options: Sequence[tuple[str, Any]] = ()
) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """A channel to ``target`` as ``security`` says (TLS or plaintext), and the metadata every
    call sends (the bearer token, if any)."""
    channel_options = list(options)
    if security.uses_tls:
        if security.tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", security.tls_server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_optional(security.tls_ca, "TLS CA"),
            private_key=_read_optional(security.tls_key, "TLS client key"),
            certificate_chain=_read_optional(security.tls_cert, "TLS client certificate"),
        )
        channel = grpc.secure_channel(target, credentials, channel_options)
    else:
        channel = grpc.insecure_channel(target, options=channel_options)
    token = client_token(security.token, security.token_file)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return channel, metadata


def _read_optional(path: Path | None, what: str) -> bytes | None:
    return None if path is None else read_pem(path, what)


def client_token(token: str | None = None, file: Path | None = None) -> str | None:
    """The token a client sends: given directly, or the first token of a file."""
    if token:
        return token.strip()
    if file is None:
        return None
    try:
        tokens = parse_tokens(file.read_text(encoding="utf-8"), str(file))
    except OSError as exc:
        raise InvalidInput(f"token file {file}: {exc.strerror}") from None
    if not tokens:
        raise InvalidInput(f"token file {file}: no token in it")
    return tokens[0]


def read_pem(path: Path, what: str) -> bytes:
    """A PEM file's bytes (client and server TLS files alike); InvalidInput names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: cannot read: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise InvalidInput(f"{what} {path}: not a PEM file")
    return data
