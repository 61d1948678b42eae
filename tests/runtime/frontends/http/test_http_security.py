"""The HTTP port has the gRPC port's security: mutual TLS from the same files, the same bearer
tokens (and failure counter), health open to probes, certificates that rotate; and its message
size limit."""

from __future__ import annotations

import gzip
import os
import shutil
import ssl
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edgewise.runtime.config.settings import ClientSecurity
from tests.certs import Certificates, make_certificates
from tests.runtime.frontends.http.conftest import call, metric
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

TOKEN = "http-token-0123456789abcdef"
LIMIT = 64 * 1024  # --max-message-bytes


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    model_repo: Path,
    certs: Certificates,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("secure") / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    security = ClientSecurity(
        tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=TOKEN
    )
    running = start_server(
        repo,
        tmp_path_factory.mktemp("secure-server"),
        ["--monitoring", "off", "--http-port", "0", "--max-message-bytes", str(LIMIT),
         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
         "--tls-client-ca", str(certs.ca), *front_end_args(request.param)],
        env={"EDGEWISE_TOKENS": TOKEN},
        security=security,
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def context(certs: Certificates, client: bool = True, rogue: bool = False) -> ssl.SSLContext:
    tls = ssl.create_default_context(cafile=certs.ca)
    if client:
        cert, key = (
            (certs.rogue_client_cert, certs.rogue_client_key)
            if rogue
            else (certs.client_cert, certs.client_key)
        )
        tls.load_cert_chain(cert, key)
    return tls


def url(server: RunningServer, path: str) -> str:
    return f"https://127.0.0.1:{server.http_port}{path}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_mutual_tls_refuses_clients_without_a_certificate_the_ca_signed(
    server: RunningServer, certs: Certificates
) -> None:
    live = url(server, "/v2/health/live")
    assert call(live, context=context(certs)).status == 200
    for refused in (context(certs, client=False), context(certs, rogue=True)):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            call(live, context=refused)
    plain = f"http://127.0.0.1:{server.http_port}/v2/health/live"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        call(plain)


def test_tokens_as_on_the_grpc_port(server: RunningServer, certs: Certificates) -> None:
    tls = context(certs)
    # health is open to probes, as the gRPC health service is
    assert call(url(server, "/v2/health/ready"), context=tls).status == 200
    missing = metric(server, "edgewise_auth_failures_total", reason="missing")
    invalid = metric(server, "edgewise_auth_failures_total", reason="invalid")
    malformed = metric(server, "edgewise_auth_failures_total", reason="malformed")
    for path in ("/v2", "/v2/models/logreg", "/v2/models/logreg/ready"):
        answer = call(url(server, path), context=tls)
        assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "missing credentials" in answer.json()["error"]
    assert call(url(server, "/v2"), headers=bearer("wrong"), context=tls).status == 401
    basic = {"Authorization": "Basic eDp5"}
    assert call(url(server, "/v2"), headers=basic, context=tls).status == 401
    assert metric(server, "edgewise_auth_failures_total", reason="missing") == missing + 3
    assert metric(server, "edgewise_auth_failures_total", reason="invalid") == invalid + 1
    assert metric(server, "edgewise_auth_failures_total", reason="malformed") == malformed + 1
    answer = call(url(server, "/v2"), headers=bearer(TOKEN), context=tls)
    assert answer.status == 200 and answer.json()["name"] == "edgewise"


def test_tritonclient_over_mutual_tls_with_a_token(
    server: RunningServer, certs: Certificates
) -> None:
    client = triton.InferenceServerClient(
        f"127.0.0.1:{server.http_port}",
        ssl=True,
        ssl_options={"ca_certs": str(certs.ca), "certfile": str(certs.client_cert),
                     "keyfile": str(certs.client_key)},
    )  # fmt: skip
    features = triton.InferInput("features", [2, 30], "FP32")
    features.set_data_from_numpy(np.zeros((2, 30), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("logreg", [features])
    assert refused.value.status() == "401"
    result = client.infer("logreg", [features], headers=bearer(TOKEN))
    with server.client() as grpc_client:
        expected = grpc_client.infer("logreg", {"features": np.zeros((2, 30), np.float32)})
    np.testing.assert_array_equal(result.as_numpy("label"), expected.outputs["label"])


def test_a_body_over_the_message_limit_is_413(server: RunningServer, certs: Certificates) -> None:
    body = b'{"inputs": [' + b" " * LIMIT + b"]}"
    answer = call(
        url(server, "/v2/models/logreg/infer"), body, bearer(TOKEN), context=context(certs)
    )
    assert answer.status == 413
    assert f"{LIMIT}-byte limit" in answer.json()["error"]
    # a compressed body is held to the limit once decompressed: a small bomb is refused too
    bomb = gzip.compress(b'{"inputs": [' + b" " * (64 * LIMIT) + b"]}")
    assert len(bomb) < LIMIT
    headers = {"Content-Encoding": "gzip", **bearer(TOKEN)}
    answer = call(url(server, "/v2/models/logreg/infer"), bomb, headers, context=context(certs))
    assert answer.status == 413


def test_a_rotated_certificate_serves_new_connections(model_repo: Path, tmp_path: Path) -> None:
    """As on the gRPC port: new files are taken at the next handshakes; a change that cannot be
    used is logged and the certificate in use stays."""
    first, second = make_certificates(tmp_path / "first"), make_certificates(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"

    def install(certificate: bytes, private_key: bytes) -> None:
        for path, data in ((key, private_key), (cert, certificate)):
            staged = path.with_suffix(".new")
            staged.write_bytes(data)
            os.replace(staged, path)

    install(first.server_cert.read_bytes(), first.server_key.read_bytes())
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = start_server(
        repo,
        tmp_path / "server",
        ["--monitoring", "off", "--http-port", "0", "--front-end", "grpcio",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        security=ClientSecurity(tls_ca=first.ca),
    )  # fmt: skip
    live_url = url(server, "/v2/health/live")

    def answers(ca: Path) -> bool:
        try:
            return call(live_url, context=ssl.create_default_context(cafile=ca)).status == 200
        except (ssl.SSLError, urllib.error.URLError, ConnectionError):
            return False

    def eventually(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)

    try:
        assert answers(first.ca) and not answers(second.ca)
        install(second.server_cert.read_bytes(), second.server_key.read_bytes())
        eventually(lambda: answers(second.ca))
        assert not answers(first.ca)
        install(b"not a certificate", second.server_key.read_bytes())
        # the files are looked at during handshakes: each try is one
        eventually(lambda: answers(second.ca) and "keeping the previous" in server.log())
        assert answers(second.ca)
    finally:
        assert server.stop() == 0, server.log()
