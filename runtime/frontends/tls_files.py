"""The TLS files of every port: read, checked, and looked at again when they change.

Each front end serves TLS from the same three files (certificate chain, key and, for mutual
TLS, a client CA bundle) and rotates them without a restart: grpcio through gRPC's certificate
fetcher, HTTP/REST through its ``ssl`` context's handshake hook, the native front end through
checked copies that gRPC's C++ file watcher reads (tls_stage.py). What they share lives here,
once: :class:`TlsFiles` reads the files and checks that they can be used together with Python's
``ssl`` (PEM, a key that matches its certificate, a CA bundle that loads), which is the same
check at the start (an unusable file stops the server with one line naming it) and at every
change; and it says when they changed (a stat of each, at most every :data:`CHECK_SECONDS`).

A change is taken only when it can be used: the front end's ``use`` puts the new version in
place and ``TLS certificate reloaded`` is logged; a change that cannot be used, or cannot be
put in place, is logged once as refused and the version in use stays. Without this, a key
written before its certificate (or a certificate that does not parse) would fail every new
handshake until someone fixed the files, or be logged as reloaded while the port kept the old.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgewise.runtime.config.channels import read_pem
from edgewise.runtime.errors import InvalidInput

__all__ = ["CHECK_SECONDS", "TlsFiles", "TlsVersion"]

log = logging.getLogger(__name__)

#: How often, at the most, the files are looked at for a change (seconds).
CHECK_SECONDS: Final = 1

#: How often a read is tried again when the files change while they are read.
_READ_TRIES: Final = 3

Stamp = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class TlsVersion:
    """One version of the files that can be used together: the bytes read and a TLS server
    context loaded from them (mutual TLS when there is a client CA)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


class _Changing(Exception):
    """The files changed while they were read: what was checked may not be what was read."""


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc)


class TlsFiles:
    """The configured TLS files and the version of them in use (see the module's docstring).

    ``use`` puts a checked version in place (for the first one too); ``port`` names the port in
    the logs; ``check_seconds`` paces :meth:`refresh` (0 for a caller with a timer of its own).
    Files that cannot be used at the start raise :class:`InvalidInput`.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None,
        port: str,
        use: Callable[[TlsVersion], None] | None = None,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.port = port
        self._use = use
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.current = self._read_settled()  # errors in the files surface now, as one line
        if use is not None:
            use(self.current)
        self._next_check = time.monotonic() + check_seconds

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def _stat(self) -> Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            try:
                info = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)

    def read(self) -> TlsVersion:
        """The files as they are now, checked; InvalidInput names the file that cannot be used.

        ``ssl`` loads a certificate and key only from files, so they are read again after the
        check: a version that changed meanwhile raises :class:`_Changing`.
        """
        cert = read_pem(self.cert, "TLS certificate")
        key = read_pem(self.key, "TLS key")
        client_ca = read_pem(self.client_ca, "TLS client CA") if self.client_ca else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(
                f"TLS key {self.key} and certificate {self.cert} cannot be used together: "
                f"{_reason(exc)}"
            ) from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cadata=client_ca.decode("ascii"))
            except (UnicodeDecodeError, ValueError, ssl.SSLError) as exc:
                raise InvalidInput(f"TLS client CA {self.client_ca}: {_reason(exc)}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        try:
            settled = self.cert.read_bytes() == cert and self.key.read_bytes() == key
        except OSError:
            settled = False
        if not settled:
            raise _Changing
        return TlsVersion(cert, key, client_ca, context)

    def _read_settled(self) -> TlsVersion:
        for _ in range(_READ_TRIES - 1):
            try:
                return self.read()
            except _Changing:
                self._stamp = self._stat()
        try:
            return self.read()
        except _Changing:
            raise InvalidInput(
                f"TLS certificate {self.cert} and key {self.key} keep changing while read"
            ) from None

    def refresh(self, now: float | None = None) -> TlsVersion | None:
        """Take the files' new version when they changed (looked at once a ``check_seconds``) and
        it can be used: the new version, now :attr:`current`; None when nothing was taken.
        Safe from any thread (one looks; the others go on with the version in use)."""
        now = time.monotonic() if now is None else now
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return None
        try:
            if now < self._next_check:
                return None
            self._next_check = now + self._check_seconds
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp  # a change that cannot be used is reported once, not each look
            return self._take()
        finally:
            self._lock.release()

    def _take(self) -> TlsVersion | None:
        try:
            version = self.read()
            if self._use is not None:
                self._use(version)
        except _Changing:
            self._stamp = ()  # still being written: looked at again at the next check
            return None
        except (InvalidInput, OSError) as exc:
            message = exc.message if isinstance(exc, InvalidInput) else str(exc)
            log.error(
                "TLS files of the %s changed but cannot be used: refused (keeping the previous): "
                "%s",
                self.port,
                message,
            )
            return None
        self.current = version
        log.info("TLS certificate reloaded for the %s from %s", self.port, self.cert)
        return version
