"""The order of the checks on the grpcio front end, as on the native and HTTP ones: the caller's
credential (token or client certificate), then the server-wide shedder, then the credential's
own quota; a call refused at one step leaves the others as they were. On a real mutual-TLS
server whose one in-flight slot a costly call holds: a shed call spends none of its credential's
rate (token or certificate), and a call no credential identifies takes no slot and is never
counted as shed. Before, grpcio took the quota before the shedder decided, and with any
``cert:`` line in the tokens file let tokenless calls through the shedder before the
certificate check."""

from __future__ import annotations

import asyncio
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.serving.shedding import LoadShedder, shed_later
from tests.certs import Certificates, make_certificates
from tests.runtime.frontends.test_grpcio_overload import MODEL_INFER, forest_request
from tests.servers import RunningServer, start_server

OPS = "ordering-ops-0123456789abcdef"
APP = "ordering-app-0123456789abcdef"
# Two calls each, and (at one call in 1,000 s) no more while the test runs.
LIMITS = "rate=0.001/s burst=2"


def scrape(server: RunningServer, name: str) -> float:
    """A metric of the server's, from the metrics port (a thread of its own: it answers while
    the event loop is busy)."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture()
def server(model_repo: Path, certs: Certificates, tmp_path: Path) -> Iterator[RunningServer]:
    shutil.copytree(model_repo / "forest", tmp_path / "repo" / "forest")
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"{OPS} infer,read,admin ops\n"
        f"{APP} infer,read app {LIMITS}\n"
        f"cert:CN=edgewise-batch-job infer,read batch {LIMITS}\n"
    )  # the test client's certificate (CN "edgewise test client") is mapped by no line
    args = ["--front-end", "grpcio", "--max-inflight", "1", "--worker-threads", "1",
            "--inline-max-bytes", str(64 << 20), "--monitoring", "off",
            "--tokens-file", str(tokens), "--tls-cert", str(certs.server_cert),
            "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca)]  # fmt: skip
    security = ClientSecurity(
        tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key, token=OPS
    )
    running = start_server(tmp_path / "repo", tmp_path / "server", args, security=security)
    try:
        yield running
    finally:
        running.stop()


def channel(server: RunningServer, certs: Certificates, batch: bool) -> grpc.Channel:
    cert, key = (
        (certs.batch_client_cert, certs.batch_client_key)
        if batch
        else (certs.client_cert, certs.client_key)
    )
    credentials = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    return grpc.secure_channel(server.target, credentials, options)


def refusal(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    error = caught.value
    assert isinstance(error, grpc.Call)
    return error.code(), str(error.details())


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_credential_then_shedder_then_quota(server: RunningServer, certs: Certificates) -> None:
    costly, small = forest_request(400_000), forest_request(1)
    with channel(server, certs, batch=False) as plain, channel(server, certs, batch=True) as batch:
        infer = plain.unary_unary(MODEL_INFER)
        infer_batch = batch.unary_unary(MODEL_INFER)
        infer(costly, timeout=120, metadata=bearer(OPS))  # the server learns what it costs
        shed_before = scrape(server, "edgewise_shed_requests_total")
        unauthenticated_before = scrape(server, 'edgewise_auth_failures_total{reason="unmapped"}')
        first = threading.Thread(
            target=infer, args=(costly,), kwargs={"timeout": 120, "metadata": bearer(OPS)}
        )
        first.start()
        while scrape(server, "edgewise_inflight_requests") < 1:  # its model runs
            assert first.is_alive(), "the costly call ended before its model was seen running"
            first.join(0.01)
        while_full = [
            *(refusal(infer, small, timeout=60, metadata=bearer(APP)) for _ in range(3)),
            *(refusal(infer_batch, small, timeout=60) for _ in range(3)),  # mapped certificate
        ]
        # A certificate no line maps, without a token: refused for that, whatever the load.
        strangers = [refusal(infer, small, timeout=60) for _ in range(3)]
        still_running = first.is_alive()
        first.join()
        shed = scrape(server, "edgewise_shed_requests_total") - shed_before
        unmapped = (
            scrape(server, 'edgewise_auth_failures_total{reason="unmapped"}')
            - unauthenticated_before
        )
        # The shed calls spent nothing: each credential still has its two calls.
        for send, metadata in ((infer, bearer(APP)), (infer_batch, ())):
            for _ in range(2):
                assert send(small, timeout=60, metadata=metadata)
            code, message = refusal(send, small, timeout=60, metadata=metadata)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "over its rate" in message
        # Those quota refusals were not shed, and gave their in-flight slot back at once.
        shed_after_quota = scrape(server, "edgewise_shed_requests_total") - shed_before
        admitted = scrape(server, "edgewise_admitted_calls")
    assert still_running, "the costly call ended before the refusals: nothing was shed"
    for code, message in while_full:
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert "server overloaded" in message
    for code, message in strangers:
        assert code is grpc.StatusCode.UNAUTHENTICATED, message
        assert "unknown client certificate" in message
    assert shed == 6  # the token's and the mapped certificate's, never the strangers'
    assert unmapped == 3
    assert shed_after_quota == 6
    assert admitted == 0


def test_a_slot_given_back_early_is_given_back_once() -> None:
    """A call the shedder let in and its quota then refused (LoadShedder.leave_task) frees its
    slot at once, and its task's end frees nothing more; a call handed over under shed_later is
    not counted until enter_task."""
    shedder = LoadShedder(1, 50, frozenset({MODEL_INFER}))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    shedder.add_service("inference.GRPCInferenceService", {"ModelInfer": handler})
    details = Details(MODEL_INFER)
    seen: list[int] = []

    async def refused_by_its_quota() -> None:
        assert shedder.service(details) is handler
        seen.append(shedder.inflight)
        shedder.leave_task()
        shedder.leave_task()
        seen.append(shedder.inflight)

    async def deferred() -> None:
        with shed_later():
            assert shedder.service(details) is handler
        seen.append(shedder.inflight)
        assert shedder.enter_task()
        seen.append(shedder.inflight)

    async def both() -> None:
        for call in (refused_by_its_quota, deferred):
            await asyncio.create_task(call())
            await asyncio.sleep(0)  # the task's done callbacks have run
            seen.append(shedder.inflight)

    asyncio.run(both())
    assert seen == [1, 0, 0, 0, 1, 0]
    assert shedder.shed == 0


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()
