"""The native front end's TLS files: checked copies of the configured ones, so that a change
that cannot be used never reaches the port.

gRPC's C++ file watcher (``_front.cc``) reads the files it is given every second and serves
what it read last: a certificate half written, or a key that does not match its certificate,
would fail every new handshake until someone fixed the files. grpcio's front end keeps the
previous certificate instead (:func:`~edgewise.runtime.frontends.security.server_credentials`).
So the native front end watches copies, in a folder of its own: :class:`TlsStage` looks at the
configured files every second (a stat of each), and when they changed and can be used together
(PEM, a key that matches the certificate, a CA bundle that loads; checked with Python's ``ssl``)
puts the new copies in place at once (a symlinked folder renamed over the last) and logs
``TLS certificate reloaded``; a change that cannot be used is logged once, and the previous
copies stay in use. The folder is the front end's private one (mode 0700, removed at stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
from pathlib import Path
from typing import Final

from edgewise.runtime.errors import InvalidInput

__all__ = ["CHECK_SECONDS", "TlsStage"]

log = logging.getLogger(__name__)

#: How often the configured files are looked at (and how often gRPC reads the copies).
CHECK_SECONDS: Final = 1

_CURRENT: Final = "current"
_NAMES: Final = ("cert.pem", "key.pem", "client-ca.pem")


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: cannot read: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise InvalidInput(f"{what} {path}: not a PEM file")
    return data


class TlsStage:
    """Copies of the TLS files under ``folder``, replaced only by a version that can be used."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, folder: Path) -> None:
        self.sources = (cert, key, client_ca)
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._generation = 0
        self._stamp = self._stat()
        self._stage()  # errors in the files surface now, as one line
        self._stopped = False

    @property
    def cert(self) -> Path:
        return self.folder / _CURRENT / _NAMES[0]

    @property
    def key(self) -> Path:
        return self.folder / _CURRENT / _NAMES[1]

    @property
    def client_ca(self) -> Path | None:
        return self.folder / _CURRENT / _NAMES[2] if self.sources[2] is not None else None

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.sources:
            try:
                info = os.stat(path) if path is not None else None
            except OSError:
                info = None
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino) if info else (-1, -1, -1))
        return tuple(stamps)

    def _stage(self) -> None:
        """Copy the files into a new generation's folder, check them there (the bytes that will
        be served), then point ``current`` at it; raises InvalidInput, changing nothing."""
        cert, key, client_ca = self.sources
        data = [_read(cert, "TLS certificate"), _read(key, "TLS key")]
        if client_ca is not None:
            data.append(_read(client_ca, "TLS client CA"))
        generation = self.folder / f"v{self._generation + 1}"
        shutil.rmtree(generation, ignore_errors=True)
        generation.mkdir(mode=0o700)
        try:
            for name, content in zip(_NAMES, data, strict=False):
                descriptor = os.open(generation / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(content)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(generation / _NAMES[0], generation / _NAMES[1])
            except ssl.SSLError as exc:
                raise InvalidInput(
                    f"TLS key {key} and certificate {cert} cannot be used together: {exc.reason}"
                ) from None
            if client_ca is not None:
                try:
                    context.load_verify_locations(cafile=generation / _NAMES[2])
                except ssl.SSLError as exc:
                    raise InvalidInput(f"TLS client CA {client_ca}: {exc.reason}") from None
        except BaseException:
            shutil.rmtree(generation, ignore_errors=True)
            raise
        link = self.folder / f"{_CURRENT}.new"
        link.unlink(missing_ok=True)
        link.symlink_to(generation.name)
        os.replace(link, self.folder / _CURRENT)  # atomic: a reader sees one generation or the next
        self._generation += 1
        # The one before stays (gRPC may be reading it this instant); older ones go.
        shutil.rmtree(self.folder / f"v{self._generation - 2}", ignore_errors=True)

    def refresh(self) -> bool:
        """Take the configured files' new version if they changed and can be used; True when
        the copies were replaced. A change that cannot be used is logged once (per change)."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self._stage()
        except InvalidInput as exc:
            log.error("TLS files changed but cannot be used (keeping the previous): %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", self.sources[0])
        return True

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Look at the files every :data:`CHECK_SECONDS` on ``loop`` until :meth:`stop`."""

        def tick() -> None:
            if self._stopped:
                return
            try:
                self.refresh()
            except Exception:  # a bug here must not stop the checks (nor the loop)
                log.exception("TLS files check failed")
            loop.call_later(CHECK_SECONDS, tick)

        loop.call_later(CHECK_SECONDS, tick)

    def stop(self) -> None:
        """No more checks (from any thread: the next tick sees it and ends)."""
        self._stopped = True
