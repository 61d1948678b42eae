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

import grpc

from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "MIN_TOKEN_CHARS",
    "PUSHBACK_KEY",
    "RETRY_AFTER_KEY",
    "SCOPES",
    "TokenEntry",
    "client_channel",
    "client_token",
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


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token: the secret, the scopes it holds and the id that names it in logs,
    metrics and the audit log (None: named after a digest prefix of the token)."""

    token: str
    scopes: frozenset[str]
    id: str | None = None


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
    """Tokens from text, ``#`` comments and blank lines ignored. A line is either
    ``TOKEN SCOPES [ID]`` (SCOPES: comma-separated names from :data:`SCOPES`; ID: any word) or,
    as before scopes existed, tokens separated by commas or spaces, each holding every scope.
    Each token must be at least 16 characters of the RFC 6750 token alphabet."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        scopes = _scopes(fields[1]) if len(fields) >= 2 else None
        if scopes is not None:
            if len(fields) > 3:
                raise InvalidInput(
                    f"{where}: line {number}: expected 'TOKEN SCOPES [ID]', found {len(fields)} "
                    "fields"
                )
            _check_token(fields[0], where)
            entries.append(TokenEntry(fields[0], scopes, fields[2] if len(fields) == 3 else None))
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
    return [entry.token for entry in parse_token_entries(text, where)]


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
