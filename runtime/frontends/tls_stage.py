"""The native front end's TLS files: checked copies of the configured ones, so that a change
that cannot be used never reaches the port.

gRPC's C++ file watcher (``_front.cc``) reads the files it is given every second and serves
what it read last: a certificate half written, or a key that does not match its certificate,
would fail every new handshake until someone fixed the files. So the native front end watches
copies, in a folder of its own: :class:`TlsStage` has the configured files looked at every
second by :class:`~edgewise.runtime.frontends.tls_files.TlsFiles` (which reads and checks them
as on every port), and when a change can be used puts the new copies in place at once (a
symlinked folder renamed over the last); a change that cannot be used is refused, logged once,
and the previous copies stay in use. The folder is the front end's private one (mode 0700,
removed at stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Final

from edgewise.runtime.frontends.tls_files import CHECK_SECONDS, TlsFiles, TlsVersion

__all__ = ["CHECK_SECONDS", "TlsStage"]

log = logging.getLogger(__name__)

_CURRENT: Final = "current"
_NAMES: Final = ("cert.pem", "key.pem", "client-ca.pem")


class TlsStage:
    """Copies of the TLS files under ``folder``, replaced only by a version that can be used."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, folder: Path) -> None:
        self.folder = folder
        self._generation = 0
        self._stopped = False
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Errors in the files surface now, as one line.
        self.files = TlsFiles(
            cert, key, client_ca, "native gRPC port", use=self._stage, check_seconds=0
        )

    @property
    def cert(self) -> Path:
        return self.folder / _CURRENT / _NAMES[0]

    @property
    def key(self) -> Path:
        return self.folder / _CURRENT / _NAMES[1]

    @property
    def client_ca(self) -> Path | None:
        return self.folder / _CURRENT / _NAMES[2] if self.files.client_ca is not None else None

    def _stage(self, version: TlsVersion) -> None:
        """Write a checked version into a new generation's folder, then point ``current`` at it
        (an OSError changes nothing)."""
        data = [version.cert, version.key]
        if version.client_ca is not None:
            data.append(version.client_ca)
        generation = self.folder / f"v{self._generation + 1}"
        shutil.rmtree(generation, ignore_errors=True)
        generation.mkdir(mode=0o700)
        try:
            for name, content in zip(_NAMES, data, strict=False):
                descriptor = os.open(generation / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(content)
            link = self.folder / f"{_CURRENT}.new"
            link.unlink(missing_ok=True)
            link.symlink_to(generation.name)
        except BaseException:
            shutil.rmtree(generation, ignore_errors=True)
            raise
        os.replace(link, self.folder / _CURRENT)  # atomic: a reader sees one generation or the next
        self._generation += 1
        # The one before stays (gRPC may be reading it this instant); older ones go.
        shutil.rmtree(self.folder / f"v{self._generation - 2}", ignore_errors=True)

    def refresh(self) -> bool:
        """Take the configured files' new version if they changed and can be used; True when
        the copies were replaced. A change that cannot be used is logged once (per change)."""
        return self.files.refresh() is not None

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
