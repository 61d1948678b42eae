"""The metrics port follows Prometheus's conventions, checked on a real server's scrape: 404 off
/metrics, process metrics, no ``_created`` series, ``_total`` on every counter, labels that no
request can grow (prometheus_client's own parser reads the page)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgewise.runtime.frontends.ports import start_metrics_http, stop_http
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.metrics import OTHER_LABEL
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, running_server

Series = frozenset[tuple[str, frozenset[tuple[str, str]]]]


def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def samples(text: str) -> list[tuple[str, Sample]]:
    """(family type, sample) of every sample on the page."""
    return [
        (family.type, sample)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def series(text: str) -> Series:
    return frozenset(
        (sample.name, frozenset(sample.labels.items())) for _kind, sample in samples(text)
    )


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server on each gRPC front end, with the HTTP/REST front end on too."""
    pytest.importorskip("aiohttp", reason="the HTTP/REST front end needs aiohttp (edgewise[http])")
    args = [*front_end_args(request.param), "--http-port", "0"]
    workdir = tmp_path_factory.mktemp("metrics-conventions")
    with running_server(model_repo, workdir, args) as running:
        yield running


def base_url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.metrics_port}"


def infer(server: RunningServer, model: str, version: str, request_id: str) -> grpc.StatusCode:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=[1, 30])
    request.raw_input_contents.append(np.zeros((1, 30), np.float32).tobytes())
    with grpc.insecure_channel(server.target) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def infer_http(server: RunningServer, model: str, version: str, request_id: str) -> int:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "id": request_id,
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def one_round(server: RunningServer, tag: str) -> None:
    """Requests whose ids, model names and versions are new each round: served ones, unknown
    models, unknown versions of a served model, and a malformed one."""
    for i in range(5):
        assert infer(server, "logreg", "", f"{tag}-ok-{i}") == grpc.StatusCode.OK
        assert infer(server, "logreg", "1", f"{tag}-v1-{i}") == grpc.StatusCode.OK
        missing = infer(server, f"nope-{tag}-{i}", "", f"{tag}-nf-{i}")
        assert missing == grpc.StatusCode.NOT_FOUND
        unknown_version = infer(server, "logreg", f"{900 + i}{tag}", f"{tag}-nv-{i}")
        assert unknown_version in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert infer(server, f"nope-{tag}-{i}", f"{i}", f"{tag}-nfv-{i}") != grpc.StatusCode.OK
        # The same over HTTP/REST, whose model and version come from the URL.
        assert infer_http(server, "logreg", "", f"{tag}-h-{i}") == 200
        assert infer_http(server, f"nope-{tag}-{i}", "", f"{tag}-hnf-{i}") == 404
        assert infer_http(server, "logreg", f"{800 + i}{tag}", f"{tag}-hnv-{i}") in (400, 404)


def test_only_metrics_and_healthz_answer(server: RunningServer) -> None:
    url = base_url(server)
    for path in ("/", "/foo", "/metrics/", "/metricsx", "/favicon.ico", "/healthz/x"):
        status, _body = fetch(url + path)
        assert status == 404, path
    assert fetch(url + "/metrics", "POST")[0] == 405
    assert fetch(url + "/healthz") == (200, b"ok\n")
    status, body = fetch(url + "/metrics")
    assert status == 200 and b"edgewise_requests_total" in body
    head_status, head_body = fetch(url + "/metrics", "HEAD")
    assert head_status == 200 and head_body == b""


def test_scrape_follows_the_conventions(server: RunningServer) -> None:
    one_round(server, "a")
    status, body = fetch(base_url(server) + "/metrics")
    assert status == 200
    text = body.decode()
    found = samples(text)
    names = {sample.name for _kind, sample in found}
    # No creation-time series, for counters, histograms or anything else.
    assert not [name for name in names if name.endswith("_created")]
    # The process's own metrics (prometheus_client's process, platform and GC collectors).
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert name in names, name
    families = list(text_string_to_metric_families(text))
    for family in families:
        if family.type == "counter":
            assert family.samples, family.name
            for sample in family.samples:
                assert sample.name.endswith("_total"), sample.name
        else:  # "_total" promises a counter
            assert not family.name.endswith("_total"), family.name
    # Our own metrics are all edgewise_-prefixed.
    ours = [f for f in families if not f.name.startswith(("process_", "python_"))]
    assert ours and all(f.name.startswith("edgewise_") for f in ours)


def test_no_label_grows_with_requests(server: RunningServer) -> None:
    one_round(server, "b")  # every kind of label value a round can make is there now
    before = series(fetch(base_url(server) + "/metrics")[1].decode())
    one_round(server, "c")
    one_round(server, "d")
    text = fetch(base_url(server) + "/metrics")[1].decode()
    after = series(text)
    assert after == before  # new ids, names and versions made no new series
    values = {value for _kind, sample in samples(text) for value in sample.labels.values()}
    assert not [v for v in values if "nope" in v or (v.endswith(("c", "d")) and v[:1].isdigit())]
    assert not [v for v in values if v.startswith(("c-", "d-"))]  # no request id
    requests = [s for _kind, s in samples(text) if s.name == "edgewise_requests_total"]
    assert {s.labels["model"] for s in requests} == {"logreg", OTHER_LABEL}
    assert {s.labels["version"] for s in requests} <= {"", "1", OTHER_LABEL}


def test_the_metrics_server_alone() -> None:
    """start_metrics_http on a bare registry: the same routing, process metrics beside the
    registry's own (which it leaves unchanged), and a counter without ``_created``."""
    registry = CollectorRegistry()
    Counter("demo_events", "Events.", registry=registry).inc(3)
    server = start_metrics_http(0, "127.0.0.1", registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert fetch(url + "/")[0] == 404
        text = fetch(url + "/metrics")[1].decode()
    finally:
        stop_http(server)
    found = {sample.name: sample.value for _kind, sample in samples(text)}
    assert found["demo_events_total"] == 3.0
    assert "demo_events_created" not in found and "process_cpu_seconds_total" in found
    own = {s.name for family in registry.collect() for s in family.samples}
    assert not [name for name in own if name.startswith("process_")]
