"""TLS of the HTTP port, from the gRPC port's files, re-read when they change.

:func:`server_ssl_context` builds an :class:`ssl.SSLContext` from the certificate chain and key
and, for mutual TLS, the client CA bundle (a client without a certificate the CA signed fails
the handshake). As on the gRPC port, the files are looked at again for new connections: at each
TLS handshake (at most once a second) their size, time and inode are compared with the ones in
use; when they changed, they are loaded into a fresh context that serves that handshake and every
later one. A change that cannot be used is logged once and the previous files stay in use.
Handshakes are hooked through the context's ``sni_callback``, which OpenSSL calls for every
ClientHello, with or without a server name.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from pathlib import Path
from typing import Final

from edgewise.runtime.errors import InvalidInput

__all__ = ["server_ssl_context"]

log = logging.getLogger(__name__)

_CHECK_SECONDS: Final = 1.0

Stamp = tuple[tuple[int, int, int] | None, ...]


def _load(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"TLS certificate {cert} / key {key}: cannot be used: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"TLS client CA {client_ca}: cannot be used: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Reloading:
    """The context in use, replaced when the files change (see the module's docstring)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.files = (cert, key, client_ca)
        self.stamp = self._stamp()
        self.current = _load(cert, key, client_ca)  # errors in the files surface now
        self._next_check = time.monotonic() + _CHECK_SECONDS

    def _stamp(self) -> Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.files:
            try:
                info = os.stat(path) if path is not None else None
            except OSError:
                info = None
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino) if info else None)
        return tuple(stamps)

    def on_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + _CHECK_SECONDS
            stamp = self._stamp()
            if stamp != self.stamp:
                self.stamp = stamp  # a bad change is reported once, not at every handshake
                try:
                    self.current = _load(*self.files)
                    log.info("TLS certificate of the HTTP port reloaded from %s", self.files[0])
                except InvalidInput as exc:
                    log.error(
                        "TLS files changed but cannot be used (keeping the previous): %s", exc
                    )
        if context is not self.current:
            connection.context = self.current


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The HTTP port's TLS; with ``client_ca``, clients must present a certificate it signed
    (mutual TLS). A file that cannot be used now is one readable error (InvalidInput)."""
    reloading = _Reloading(cert, key, client_ca)
    listening = reloading.current  # the context every handshake starts in
    listening.sni_callback = reloading.on_hello
    return listening
