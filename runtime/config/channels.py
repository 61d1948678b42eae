"""The client side of edgewise's gRPC port: a channel with TLS (optionally mutual) and the
bearer token every call sends, and the retry hint of a RESOURCE_EXHAUSTED answer.

A leaf module (grpcio and the settings only): the CLI, the agent and the container health check
use it without importing the server; the server's token check reads tokens with the same rules
(:func:`parse_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc

from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "MIN_TOKEN_CHARS",
    "PUSHBACK_KEY",
    "RETRY_AFTER_KEY",
    "client_channel",
    "client_token",
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


def parse_tokens(text: str, where: str) -> list[str]:
    """Tokens from text: one per line (or separated by commas or spaces), ``#`` comments and
    blank lines ignored. Each must be at least 16 characters of the RFC 6750 token alphabet."""
    tokens = []
    for line in text.splitlines():
        content = line.split("#", 1)[0]
        for token in content.replace(",", " ").split():
            if len(token) < MIN_TOKEN_CHARS or not set(token) <= _TOKEN_CHARS:
                raise InvalidInput(
                    f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters of letters, "
                    "digits and -._~+/= (found one of "
                    f"{len(token)} characters{' with other characters' if len(token) else ''})"
                )
            tokens.append(token)
    return tokens


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
