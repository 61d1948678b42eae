"""Control calls identified by a client certificate alone (mutual TLS, no token) with
``serve --processes N``, on every front end: the process a call reaches forwards it to its
siblings with the caller's identities, on their private Unix sockets, so the call takes effect in
every process (and merged reads get every sibling's share). Before, a fan-out forwarded only the
``authorization`` header over plaintext TCP: the siblings refused the caller ("missing
credentials") after the first process had made the change."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.settings import ClientSecurity
from tests.certs import Certificates, make_certificates
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

ADMIN = "multi-identities-admin-0123456789abcdef"
PROCESSES = 2


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(params=FRONT_ENDS)
def server(
    model_repo: Path, certs: Certificates, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[RunningServer]:
    shutil.copytree(model_repo / "logreg", tmp_path / "repo" / "logreg")
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"{ADMIN} admin,read,infer ops\n"
        "cert:CN=edgewise%20test%20client admin,read,infer app-cert\n"
    )
    args = [*front_end_args(request.param), "--processes", str(PROCESSES),
            "--monitoring", "on", "--tokens-file", str(tokens),
            "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
            "--tls-client-ca", str(certs.ca)]  # fmt: skip
    running = start_server(
        tmp_path / "repo", tmp_path / "server", args, security=security(certs, ADMIN)
    )
    try:
        yield running
    finally:
        running.stop()


def security(certs: Certificates, token: str | None = None) -> ClientSecurity:
    return ClientSecurity(
        tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=token
    )


def peer_sockets(server: RunningServer) -> list[str]:
    """The private addresses the worker processes published (supervisor.peer_addresses)."""
    workers = psutil.Process(server.process.pid).children()
    folders = {Path(p.environ()["EDGEWISE_PEERS_DIR"]) for p in workers}
    assert len(folders) == 1, folders
    folder = folders.pop()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    return sorted(path.read_text().strip() for path in folder.glob("*.peer"))


def test_a_certificate_alone_reaches_every_process(
    server: RunningServer, certs: Certificates, model_repo: Path
) -> None:
    inputs = {k: np.asarray(v) for k, v in logreg_inputs(model_repo / "logreg" / "1").items()}
    with EdgewiseClient(server.target, timeout=30, security=security(certs)) as client:
        assert client.infer("logreg", inputs).outputs
        client.reset_window("logreg")  # forwarded to the sibling: a ResetWindow
        client.drift_report("logreg")  # merged: the sibling hands over its window
        client.unload_model("logreg")  # forwarded to the sibling: an UnloadModel
    # Every process unloaded it: fresh connections, spread over the processes by the kernel,
    # all find it gone.
    answers = []
    for _ in range(8):
        with EdgewiseClient(server.target, timeout=30, security=security(certs)) as fresh:
            with pytest.raises(ServerError) as refused:
                fresh.infer("logreg", inputs)
            answers.append(refused.value.status.name)
    assert set(answers) == {"NOT_FOUND"}, answers
    # Where the identities travel: Unix sockets in a folder only this user can enter, the
    # only peers whose relayed identities grpcio believes.
    addresses = peer_sockets(server)
    assert len(addresses) == PROCESSES and all(a.startswith("unix:") for a in addresses)
