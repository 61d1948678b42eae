"""The metrics port closed on a real server: bound to loopback by default, ``--metrics-auth``
(a bearer token with the read scope, from the gRPC port's tokens file) and ``--metrics-tls`` (the
port's certificate, re-read like every port's); allowed and refused scrapes over HTTPS."""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgewise.runtime.config.settings import ClientSecurity, ServerSettings
from edgewise.runtime.errors import InvalidInput
from tests.certs import Certificates, make_certificates
from tests.servers import RunningServer, start_server

READ = "metrics-read-0123456789abcdef"
INFER = "metrics-infer-0123456789abcdef"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def server(
    model_repo: Path, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("metrics-security")
    shutil.copytree(model_repo / "logreg", root / "repo" / "logreg")
    tokens = root / "tokens"
    tokens.write_text(f"{READ} read prometheus\n{INFER} infer app\n")
    running = start_server(
        root / "repo",
        root / "server",
        ["--monitoring", "off", "--tokens-file", str(tokens),
         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
         "--metrics-auth", "on", "--metrics-tls", "on", "--front-end", "grpcio"],
        security=ClientSecurity(tls_ca=certs.ca, token=READ),
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def fetch(
    server: RunningServer, path: str, context: ssl.SSLContext, token: str | None = None
) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(f"https://127.0.0.1:{server.metrics_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def trusting(certs: Certificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def test_a_read_token_scrapes_over_tls(server: RunningServer, certs: Certificates) -> None:
    status, _, body = fetch(server, "/metrics", trusting(certs), READ)
    assert status == 200
    names = {family.name for family in text_string_to_metric_families(body)}
    assert "edgewise_auth_refusals" in names


def test_no_token_is_401_and_a_token_without_read_is_403(
    server: RunningServer, certs: Certificates
) -> None:
    status, headers, body = fetch(server, "/metrics", trusting(certs))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), body
    assert "missing credentials" in body
    status, _, body = fetch(server, "/metrics", trusting(certs), "not-a-token-0123456789abcdef")
    assert status == 401 and "invalid credentials" in body
    status, _, body = fetch(server, "/metrics", trusting(certs), INFER)
    assert status == 403 and "'read' scope" in body and "'app'" in body
    # Counted where the gRPC port's refusals are, under the scope the scrape needs.
    _, _, body = fetch(server, "/metrics", trusting(certs), READ)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    denied = ("edgewise_auth_refusals_total", (("code", "PERMISSION_DENIED"), ("scope", "read")))
    unauthenticated = (
        "edgewise_auth_refusals_total",
        (("code", "UNAUTHENTICATED"), ("scope", "read")),
    )
    assert samples[denied] >= 1 and samples[unauthenticated] >= 2


def test_healthz_stays_open_and_other_paths_are_404(
    server: RunningServer, certs: Certificates
) -> None:
    assert fetch(server, "/healthz", trusting(certs))[:3:2] == (200, "ok\n")
    assert fetch(server, "/nothing", trusting(certs), READ)[0] == 404


def test_plaintext_and_untrusting_clients_are_refused(
    server: RunningServer, certs: Certificates
) -> None:
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(server, "/healthz", ssl.create_default_context())  # the system CAs only
    plain = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}/healthz")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(plain, timeout=10).read()
    # The port still serves after both (a failed handshake ends only its own connection).
    assert fetch(server, "/healthz", trusting(certs))[0] == 200
    # ... and says nothing about them: no traceback per failed handshake in the server's log.
    assert "Traceback" not in server.log() and "SSLError" not in server.log(), server.log()


def test_the_metrics_port_binds_loopback_by_default() -> None:
    assert ServerSettings.from_sources({}, environ={}).metrics_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"metrics_auth": True}, "metrics-auth needs tokens"),
        ({"metrics_tls": True}, "metrics-tls needs tls-cert"),
    ],
)
def test_the_switches_need_what_they_use(overrides: dict[str, bool], says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        ServerSettings.from_sources(overrides, environ={})


def test_the_supervisors_metrics_port_checks_tokens_too(model_repo: Path, tmp_path: Path) -> None:
    shutil.copytree(model_repo / "logreg", tmp_path / "repo" / "logreg")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READ} read prometheus\n{INFER} infer app\n")
    running = start_server(
        tmp_path / "repo",
        tmp_path / "server",
        ["--monitoring", "off", "--tokens-file", str(tokens), "--metrics-auth", "on",
         "--processes", "2", "--front-end", "grpcio"],
        security=ClientSecurity(token=READ),
    )  # fmt: skip
    try:

        def scrape(token: str | None) -> int:
            request = urllib.request.Request(running.metrics_url)
            if token is not None:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return int(answer.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert (scrape(None), scrape(INFER), scrape(READ)) == (401, 403, 200)
    finally:
        assert running.stop() == 0, running.log()
