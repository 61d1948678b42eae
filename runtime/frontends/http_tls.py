"""TLS of the HTTP port, from the gRPC port's files, re-read when they change.

:func:`server_ssl_context` serves the certificate chain and key and, for mutual TLS, the client
CA bundle (a client without a certificate the CA signed fails the handshake), read and checked
by :class:`~edgewise.runtime.frontends.tls_files.TlsFiles` as on every port. The files are
looked at again at TLS handshakes (at most once a second); a change that can be used is loaded
into a fresh context that serves that handshake and every later one, and a change that cannot is
refused, logged once, and the previous files stay in use. Handshakes are hooked through the
listening context's ``sni_callback``, which OpenSSL calls for every ClientHello, with or without
a server name.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edgewise.runtime.frontends.tls_files import TlsFiles

__all__ = ["server_ssl_context"]


def server_ssl_context(
    cert: Path, key: Path, client_ca: Path | None = None, port: str = "HTTP port"
) -> ssl.SSLContext:
    """The TLS of an HTTP port (the REST port; the metrics port with ``--metrics-tls``, named
    by ``port`` in the logs); with ``client_ca``, clients must present a certificate it signed
    (mutual TLS). A file that cannot be used now is one readable error (InvalidInput)."""
    files = TlsFiles(cert, key, client_ca, port)
    listening = files.current.context  # the context every handshake starts in

    def on_hello(
        connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        files.refresh()
        if context is not files.current.context:
            connection.context = files.current.context

    listening.sni_callback = on_hello
    return listening
