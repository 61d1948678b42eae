"""Client certificates mapped to scopes (mutual TLS), on a real server with certificates made for
the test, on every front end (grpcio, native; HTTP beside each): a mapped certificate without a
token is let through within its scopes, refused PERMISSION_DENIED (403) beyond them and counted
per scope; the audit log names the mapping's id; a token, when sent, decides; a client's own
relayed-identity header is never believed; an unmapped certificate is UNAUTHENTICATED."""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.channels import parse_token_entries
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.frontends.security import (
    PEER_HEADER,
    AuthInterceptor,
    TokenSet,
    auth_context_identities,
    certificate_identities,
)
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from tests.certs import Certificates, make_certificates
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

ADMIN = "identities-admin-0123456789abcdef"
_UNLOAD = "/edgewise.v1.ModelRepositoryService/UnloadModel"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    model_repo: Path,
    certs: Certificates,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("identities")
    shutil.copytree(model_repo / "logreg", root / "repo" / "logreg")
    tokens = root / "tokens"
    tokens.write_text(
        f"{ADMIN} admin,read,infer ops\n"
        "cert:CN=edgewise%20test%20client infer,read app-cert\n"
        "cert:SAN=spiffe://edge/batch read batch\n"
        "cert:CN=ghost admin ghost  # no certificate is named so: only a forger would claim it\n"
    )
    audit = root / "audit.jsonl"
    running = start_server(
        root / "repo",
        root / "server",
        ["--monitoring", "off", "--tokens-file", str(tokens), "--audit-log", str(audit),
         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
         "--tls-client-ca", str(certs.ca), "--http-port", "0", *front_end_args(request.param)],
        security=ClientSecurity(
            tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=ADMIN
        ),
    )  # fmt: skip
    yield running, audit
    assert running.stop() == 0, running.log()


def as_client(server: RunningServer, certs: Certificates, batch: bool = False) -> EdgewiseClient:
    cert, key = (
        (certs.batch_client_cert, certs.batch_client_key)
        if batch
        else (certs.client_cert, certs.client_key)
    )
    security = ClientSecurity(tls_ca=certs.ca, tls_cert=cert, tls_key=key)
    return EdgewiseClient(server.target, timeout=30, security=security)


def inputs(server: RunningServer) -> dict[str, np.ndarray]:
    repo = Path(server.log_path).parents[1] / "repo"
    return {k: np.asarray(v) for k, v in logreg_inputs(repo / "logreg" / "1").items()}


def test_a_mapped_certificate_is_let_through_within_its_scopes(
    server: tuple[RunningServer, Path], certs: Certificates
) -> None:
    running, audit = server
    before = metrics_text(running)
    with as_client(running, certs) as app:  # CN=edgewise test client: infer, read
        assert app.infer("logreg", inputs(running)).outputs
        with pytest.raises(ServerError) as caught:
            app.unload_model("logreg")
        assert caught.value.status == grpc.StatusCode.PERMISSION_DENIED
        assert "'admin' scope" in caught.value.details and "'app-cert'" in caught.value.details
    with as_client(running, certs, batch=True) as batch:  # SAN=spiffe://edge/batch: read
        assert batch.server_ready()
        with pytest.raises(ServerError) as caught:
            batch.infer("logreg", inputs(running))
        assert caught.value.status == grpc.StatusCode.PERMISSION_DENIED
        assert "'infer' scope" in caught.value.details and "'batch'" in caught.value.details
    after = metrics_text(running)
    name = "edgewise_auth_refusals_total"
    for scope in ("admin", "infer"):
        labels = {"scope": scope, "code": "PERMISSION_DENIED"}
        assert metric_value(after, name, **labels) - metric_value(before, name, **labels) == 1
    # The audit log names the certificate's mapping, as it names a token's id.
    unloads = [
        json.loads(line)
        for line in audit.read_text().splitlines()
        if json.loads(line).get("method") == "UnloadModel"
    ]
    assert unloads and unloads[-1]["outcome"] == "PERMISSION_DENIED"
    assert unloads[-1]["who"]["credential"] == "app-cert"
    assert "edgewise test client" in unloads[-1]["who"]["certificate"]


def test_a_token_decides_over_the_certificate(
    server: tuple[RunningServer, Path], certs: Certificates
) -> None:
    running, _ = server
    security = ClientSecurity(
        tls_ca=certs.ca,
        tls_cert=certs.batch_client_cert,
        tls_key=certs.batch_client_key,
        token=ADMIN,
    )
    with EdgewiseClient(running.target, timeout=30, security=security) as admin:
        assert admin.infer("logreg", inputs(running)).outputs  # batch's cert alone may not


def test_a_clients_own_identity_header_is_not_believed(
    server: tuple[RunningServer, Path], certs: Certificates
) -> None:
    running, _ = server
    credentials = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(),
        certs.batch_client_key.read_bytes(),
        certs.batch_client_cert.read_bytes(),
    )
    body = epb.UnloadModelRequest(name="logreg").SerializeToString()
    with grpc.secure_channel(running.target, credentials) as channel:
        send = channel.unary_unary(_UNLOAD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            send(body, timeout=30, metadata=((PEER_HEADER, "CN=ghost"),))
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert "'batch'" in str(error.details())


def https(server: RunningServer, certs: Certificates, batch: bool) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if batch:
        context.load_cert_chain(certs.batch_client_cert, certs.batch_client_key)
    else:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    datatypes = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}
    body = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatypes[str(array.dtype)],
                "data": array.ravel().tolist(),
            }
            for name, array in inputs(server).items()
        ]
    }
    request = urllib.request.Request(
        f"https://localhost:{server.http_port}/v2/models/logreg/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_maps_the_certificate_too(
    server: tuple[RunningServer, Path], certs: Certificates
) -> None:
    running, _ = server
    status, text = https(running, certs, batch=False)
    assert status == 200, text
    assert json.loads(text)["outputs"]
    status, text = https(running, certs, batch=True)
    assert status == 403 and "'infer' scope" in text and "'batch'" in text, text


def test_identities_are_read_alike_from_grpc_and_python_ssl() -> None:
    grpc_context = {
        "x509_common_name": [b"edgewise-batch-job"],
        "x509_subject_alternative_name": [b"spiffe://edge/batch", b"batch.example"],
    }
    python_certificate = {
        "subject": ((("organizationName", "edge"),), (("commonName", "edgewise-batch-job"),)),
        "subjectAltName": (("URI", "spiffe://edge/batch"), ("DNS", "batch.example")),
    }
    expected = ("CN=edgewise-batch-job", "SAN=spiffe://edge/batch", "SAN=batch.example")
    assert auth_context_identities(grpc_context) == expected
    assert certificate_identities(python_certificate) == expected
    assert certificate_identities(None) == auth_context_identities({}) == ()


def test_an_unmapped_certificate_is_unauthenticated(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("cert:CN=a%20b read reader\n")
    found = TokenSet(tokens).identify_peer(("CN=a b",))
    assert found is not None and found.id == "reader" and found.scopes == {"read"}
    auth = AuthInterceptor(TokenSet(tokens))
    method = "/inference.GRPCInferenceService/ServerReady"
    assert auth.authorize((), method, ("CN=a b",)) is None
    refusal = auth.authorize((), method, ("CN=other", "SAN=x"))
    assert refusal is not None and refusal.code == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown client certificate" in refusal.message
    assert auth.failures.labels("unmapped")._value.get() == 1
    entries = parse_token_entries("cert:SAN=spiffe://x read,infer", "t")
    assert entries[0].certificate == "SAN=spiffe://x" and entries[0].token == ""
