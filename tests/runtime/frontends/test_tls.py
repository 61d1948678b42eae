"""TLS and mutual TLS on a real server, on each front end, with certificates made for the test:
plaintext and untrusted clients are refused, the right ones served (edgewise's client, the CLI
and tritonclient in its own process), certificates rotate without a restart (a change that
cannot be used is refused and keeps the previous), and the metrics port can stay on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import EdgewiseError
from tests.certs import Certificates, make_certificates
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

TOKEN = "tls-test-token-0123456789abcdef"
TRITON_CALLS = Path(__file__).parents[2] / "interop" / "triton_secure_calls.py"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def small_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("tls") / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    return repo


@pytest.fixture(scope="module", params=FRONT_ENDS)
def mtls_server(
    small_repo: Path,
    certs: Certificates,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[RunningServer]:
    """Mutual TLS and a token, the strictest set-up."""
    good = ClientSecurity(
        tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=TOKEN
    )
    server = start_server(
        small_repo,
        tmp_path_factory.mktemp("mtls"),
        ["--monitoring", "off", "--tls-cert", str(certs.server_cert),
         "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca),
         *front_end_args(request.param)],
        env={"EDGEWISE_TOKENS": TOKEN},
        security=good,
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()


def inputs(repo: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in logreg_inputs(repo / "logreg" / "1").items()}


def refused(server: RunningServer, security: ClientSecurity) -> EdgewiseError:
    with (
        EdgewiseClient(server.target, timeout=5, security=security) as client,
        pytest.raises(EdgewiseError) as info,
    ):
        client.server_live()
    return info.value


def test_mutual_tls_serves_only_clients_with_a_trusted_certificate(
    mtls_server: RunningServer, certs: Certificates, small_repo: Path
) -> None:
    with mtls_server.client() as client:
        result = client.infer("logreg", inputs(small_repo))
        assert result.model_version == "1" and "probabilities" in result.outputs
    # No TLS at all, TLS without a client certificate, a certificate of another CA, a server
    # certificate checked against the wrong CA: the handshake fails, no call reaches the server.
    for security in (
        ClientSecurity(token=TOKEN),
        ClientSecurity(tls_ca=certs.ca, token=TOKEN),
        ClientSecurity(
            tls_ca=certs.ca,
            tls_cert=certs.rogue_client_cert,
            tls_key=certs.rogue_client_key,
            token=TOKEN,
        ),
        ClientSecurity(tls_ca=certs.rogue_ca, tls_cert=certs.client_cert, tls_key=certs.client_key),
    ):
        error = refused(mtls_server, security)
        assert "UNAVAILABLE" in error.message or "cannot reach" in error.message, error.message
    # The right certificate without the token: the call arrives and is UNAUTHENTICATED.
    error = refused(
        mtls_server,
        ClientSecurity(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key),
    )
    assert isinstance(error, ServerError) and error.status == grpc.StatusCode.UNAUTHENTICATED
    assert mtls_server.process.poll() is None


def test_tritonclient_over_mutual_tls_with_a_token(
    mtls_server: RunningServer, certs: Certificates, small_repo: Path, tmp_path: Path
) -> None:
    data = tmp_path / "features.npy"
    features = inputs(small_repo)["features"]
    np.save(data, features)

    def run(**overrides: object) -> dict[str, object]:
        spec = {
            "ca": str(certs.ca),
            "cert": str(certs.client_cert),
            "key": str(certs.client_key),
            "token": TOKEN,
            "model": "logreg",
            "input": {"name": "features", "datatype": "FP32", "data": str(data)},
        } | overrides
        path = tmp_path / "spec.json"
        path.write_text(json.dumps(spec))
        done = subprocess.run(
            [sys.executable, str(TRITON_CALLS), mtls_server.target, str(path)],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    ok = run()
    assert ok["live"] is True and ok["model_ready"] is True, ok
    outputs = ok["outputs"]
    assert isinstance(outputs, dict)
    with mtls_server.client() as client:
        ours = client.infer("logreg", {"features": features}).outputs["probabilities"]
    np.testing.assert_allclose(np.asarray(outputs["probabilities"]), ours, rtol=1e-6)
    wrong_token = run(token="not-the-token-0123456789abcdef")
    assert "error" in wrong_token and "UNAUTHENTICATED" in str(wrong_token["error"]), wrong_token


def test_the_cli_over_mutual_tls(
    mtls_server: RunningServer, certs: Certificates, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_CLIENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "repository", "--server",
         mtls_server.target, "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert),
         "--tls-key", str(certs.client_key), "--token-file", str(token_file), "index"],
        check=False, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "logreg" in done.stdout and "READY" in done.stdout
    # The container health check reads the same settings from the environment.
    health = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "containers", "healthcheck",
         "--server", mtls_server.target],
        check=False, capture_output=True, text=True, timeout=60,
        env={**env, "EDGEWISE_CLIENT_TLS_CA": str(certs.ca),
             "EDGEWISE_CLIENT_TLS_CERT": str(certs.client_cert),
             "EDGEWISE_CLIENT_TLS_KEY": str(certs.client_key)},
    )  # fmt: skip
    assert health.returncode == 0, health.stderr


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_server_tls_certificate_rotates_without_a_restart(
    small_repo: Path, tmp_path: Path, front_end: str
) -> None:
    first = make_certificates(tmp_path / "first")
    second = make_certificates(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first.server_cert, live / "server.pem")
    shutil.copy(first.server_key, live / "server.key")
    server = start_server(
        small_repo,
        tmp_path / "server",
        ["--monitoring", "off", "--tls-cert", str(live / "server.pem"),
         "--tls-key", str(live / "server.key"), *front_end_args(front_end)],
        security=ClientSecurity(tls_ca=first.ca),
    )  # fmt: skip
    try:
        with EdgewiseClient(server.target, security=ClientSecurity(tls_ca=first.ca)) as client:
            assert client.server_live()
        # Plaintext to a TLS port fails.
        error = refused(server, ClientSecurity())
        assert "UNAVAILABLE" in error.message or "cannot reach" in error.message
        shutil.copy(second.server_cert, live / "server.pem.new")
        shutil.copy(second.server_key, live / "server.key.new")
        os.replace(live / "server.key.new", live / "server.key")
        os.replace(live / "server.pem.new", live / "server.pem")
        deadline = time.monotonic() + 20
        while True:  # new connections get the new certificate
            try:
                with EdgewiseClient(
                    server.target, timeout=3, security=ClientSecurity(tls_ca=second.ca)
                ) as client:
                    assert client.server_live()
                break
            except EdgewiseError:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.2)
        assert server.log().count("TLS certificate reloaded") == 1
        # A change that cannot be used (a certificate that is not the key's) is refused and
        # logged once (grpcio looks at a new connection, native every second), never logged as
        # reloaded, and every new connection still gets the certificate in use.
        seen = len(server.log())  # (the first change may have been seen half made: refused)
        shutil.copy(first.server_cert, live / "server.pem.new")
        os.replace(live / "server.pem.new", live / "server.pem")
        deadline = time.monotonic() + 20
        while True:
            with EdgewiseClient(
                server.target, timeout=3, security=ClientSecurity(tls_ca=second.ca)
            ) as client:
                assert client.server_live()
            if "cannot be used together" in server.log()[seen:]:
                break
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        assert "refused" in server.log()[seen:]
        assert server.log().count("TLS certificate reloaded") == 1, server.log()
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_bad_tls_files_stop_the_server_with_one_line(
    small_repo: Path, certs: Certificates, tmp_path: Path, front_end: str
) -> None:
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("not a certificate")
    for args, message in (
        (["--tls-cert", str(not_pem), "--tls-key", str(certs.server_key)], "not a PEM file"),
        (["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.client_key)],
         "cannot be used together"),
        (["--tls-cert", str(certs.server_cert)], "give both or neither"),
        (["--tls-client-ca", str(certs.ca)], "needs tls-cert"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certs.server_key)],
         "cannot read"),
    ):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "serve", "--repo", str(small_repo),
             "--port", "0", "--metrics-port", "-1", "--monitoring", "off",
             *front_end_args(front_end), *args],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("edgewise serve: error:") and message in last, last
        assert "Traceback" not in done.stderr


def test_the_metrics_port_can_listen_on_loopback_only(mtls_server: RunningServer) -> None:
    # tests/servers.py starts every server with --metrics-host 127.0.0.1.
    listening = [
        c
        for c in psutil.Process(mtls_server.process.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    metrics = [c for c in listening if c.laddr.port == mtls_server.metrics_port]
    assert metrics and all(c.laddr.ip == "127.0.0.1" for c in metrics), listening
