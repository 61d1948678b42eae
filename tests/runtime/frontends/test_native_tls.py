"""What TLS on the native front end (gRPC's C++ server on the public port) adds to the suite
both front ends pass (tests/runtime/frontends/test_tls.py: mutual TLS, tritonclient, the CLI,
rotation, bad files): refused handshakes never reach the server; tokens still apply on top, on
ModelInfer (checked by the native front end) and on relayed calls (checked by the grpc.aio server
behind it) alike; ``auto`` serves TLS natively; the C++ module names a TLS file it cannot use.
The checked copies of the files it watches (tls_stage.py) are tested with the files every port
reads, in test_tls_files.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import EdgewiseError
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.certs import Certificates, make_certificates
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import RunningServer, native_front_or_unmet, start_server

TOKEN = "native-tls-token-0123456789abcdef"
TRITON_CALLS = Path(__file__).parents[2] / "interop" / "triton_secure_calls.py"
NATIVE = "front end: native"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("native-tls") / "repo"
    shutil.copytree(model_repo / "logreg", target / "logreg")
    return target


def tls_args(cert: Path, key: Path, client_ca: Path | None = None) -> list[str]:
    args = ["--monitoring", "off", "--tls-cert", str(cert), "--tls-key", str(key)]
    return args + (["--tls-client-ca", str(client_ca)] if client_ca is not None else [])


@pytest.fixture(scope="module")
def mtls_server(
    repo: Path, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The native front end with mutual TLS and a token, the strictest set-up."""
    native_front_or_unmet()
    server = start_server(
        repo,
        tmp_path_factory.mktemp("mtls"),
        ["--front-end", "native", *tls_args(certs.server_cert, certs.server_key, certs.ca)],
        env={"EDGEWISE_TOKENS": TOKEN},
        security=ClientSecurity(
            tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=TOKEN
        ),
    )
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


def handshake_failed(error: EdgewiseError) -> bool:
    return "UNAVAILABLE" in error.message or "cannot reach" in error.message


def auth_failures(server: RunningServer) -> float:
    return metric_value(metrics_text(server), "edgewise_auth_failures_total")


def test_refused_handshakes_never_reach_the_server(
    mtls_server: RunningServer, certs: Certificates, repo: Path
) -> None:
    log = mtls_server.log()
    assert NATIVE in log and "client certificates required (mutual TLS)" in log, log
    with mtls_server.client() as client:
        result = client.infer("logreg", inputs(repo))
        assert result.model_version == "1" and "probabilities" in result.outputs
    before = auth_failures(mtls_server)
    # No TLS at all, TLS without a client certificate, a certificate of another CA, the server
    # checked against the wrong CA: the handshake fails, no call reaches the server (none is
    # counted as refused for its token, though none of them would pass).
    for security in (
        ClientSecurity(token=TOKEN),
        ClientSecurity(tls_ca=certs.ca),
        ClientSecurity(tls_ca=certs.ca, token=TOKEN),
        ClientSecurity(
            tls_ca=certs.ca,
            tls_cert=certs.rogue_client_cert,
            tls_key=certs.rogue_client_key,
        ),
        ClientSecurity(tls_ca=certs.rogue_ca, tls_cert=certs.client_cert, tls_key=certs.client_key),
    ):
        error = refused(mtls_server, security)
        assert handshake_failed(error), (security, error.message)
    assert auth_failures(mtls_server) == before
    # The right certificate without the token: the call arrives and is UNAUTHENTICATED.
    error = refused(
        mtls_server,
        ClientSecurity(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key),
    )
    assert isinstance(error, ServerError) and error.status == grpc.StatusCode.UNAUTHENTICATED
    assert auth_failures(mtls_server) == before + 1
    assert mtls_server.process.poll() is None


def mtls_channel(server: RunningServer, certs: Certificates) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
    )
    return grpc.secure_channel(server.target, credentials)


def test_tokens_apply_on_top_of_tls_to_inference_and_relayed_calls(
    mtls_server: RunningServer, certs: Certificates, repo: Path
) -> None:
    request = pb.ModelInferRequest(model_name="logreg")
    features = inputs(repo)["features"].astype(np.float32)
    request.inputs.add(name="features", datatype="FP32", shape=list(features.shape))
    request.raw_input_contents.append(features.tobytes())
    metadata_request = pb.ModelMetadataRequest(name="logreg")
    with mtls_channel(mtls_server, certs) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = (  # ModelInfer: checked by the native front end; ModelMetadata: relayed
            lambda metadata: stub.ModelInfer(request, metadata=metadata, timeout=10),
            lambda metadata: stub.ModelMetadata(metadata_request, metadata=metadata, timeout=10),
        )
        for reason, metadata in (
            ("missing", ()),
            ("invalid", (("authorization", "Bearer not-the-token-0123456789"),)),
            ("malformed", (("authorization", TOKEN),)),
        ):
            text = metrics_text(mtls_server)
            before = metric_value(text, "edgewise_auth_failures_total", reason=reason)
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (reason, info.value)
            after = metric_value(
                metrics_text(mtls_server), "edgewise_auth_failures_total", reason=reason
            )
            assert after == before + 2, (reason, before, after)
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert calls[0](good).model_name == "logreg"
        assert calls[1](good).name == "logreg"
        # Health stays open without a token (probes send none), over the same TLS.
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def triton_calls(target: str, spec: Mapping[str, object], folder: Path) -> dict[str, object]:
    """tritonclient over TLS, in a process of its own (see tests/interop/triton_secure_calls.py)."""
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(TRITON_CALLS), target, str(path)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_auto_serves_tls_natively_to_tritonclient(
    repo: Path, certs: Certificates, tmp_path: Path
) -> None:
    """TLS without client certificates or tokens: ``auto`` picks the native front end."""
    native_front_or_unmet()
    server = start_server(
        repo,
        tmp_path / "server",
        ["--front-end", "auto", *tls_args(certs.server_cert, certs.server_key)],
        security=ClientSecurity(tls_ca=certs.ca),
    )
    try:
        assert NATIVE in server.log(), server.log()
        data = tmp_path / "features.npy"
        np.save(data, inputs(repo)["features"])
        spec = {
            "ca": str(certs.ca),
            "cert": None,
            "key": None,
            "token": None,
            "model": "logreg",
            "input": {"name": "features", "datatype": "FP32", "data": str(data)},
        }
        ok = triton_calls(server.target, spec, tmp_path)
        outputs = ok.get("outputs")
        assert ok["live"] is True and isinstance(outputs, dict) and "probabilities" in outputs, ok
        # Plaintext to the TLS port, and TLS checked against another CA: no handshake.
        for security in (ClientSecurity(), ClientSecurity(tls_ca=certs.rogue_ca)):
            assert handshake_failed(refused(server, security)), security
    finally:
        assert server.stop() == 0, server.log()


def test_the_module_checks_its_tls_files(certs: Certificates, tmp_path: Path) -> None:
    """The C++ front end names a file it cannot use at once (gRPC itself would only log it and
    fail every handshake)."""
    module = native_front_or_unmet()
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("not a certificate")
    base = {
        "address": "127.0.0.1:0",
        "upstream": f"unix:{tmp_path / 'none.sock'}",
        "handler": lambda *args: (0, "", b"", (), False),
        "after": lambda: None,
        "fast_method": "/inference.GRPCInferenceService/ModelInfer",
        "max_message_bytes": 1 << 20,
        "reuse_port": False,
        "handlers": 2,
    }
    key = str(certs.server_key)
    for tls, error, message in (
        ({"tls_cert_file": str(tmp_path / "missing.pem"), "tls_key_file": key},
         OSError, "missing.pem: cannot read"),
        ({"tls_cert_file": str(not_pem), "tls_key_file": key}, ValueError, "not a PEM file"),
        ({"tls_cert_file": str(certs.server_cert)}, ValueError, "give both or neither"),
        ({"tls_client_ca_file": str(certs.ca)}, ValueError, "needs tls_cert_file"),
        ({"tls_cert_file": str(certs.server_cert), "tls_key_file": key,
          "tls_client_ca_file": str(not_pem)}, ValueError, "TLS client CA"),
        ({"tls_cert_file": str(certs.server_cert), "tls_key_file": key,
          "tls_refresh_seconds": 0}, ValueError, "at least 1"),
    ):  # fmt: skip
        with pytest.raises(error, match=message):
            module.Front(**base, **tls)
