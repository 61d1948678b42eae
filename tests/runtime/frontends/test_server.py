"""A real server on loopback, driven with raw grpcio stubs and edgewise's client."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.package.manifest import read_manifest, staging_dir
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests import models
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, running_server, start_server


def status_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(ServerError) as info:
        call()
    return info.value.status


def metrics_text(server: RunningServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- health, metadata, reflection --------------------------------------------------------------


def test_health_liveness_readiness(server: RunningServer) -> None:
    with server.client() as client:
        assert client.server_live()
        assert client.server_ready()
        assert client.model_ready("logreg")
        assert client.model_ready("logreg", "1")
        assert not client.model_ready("logreg", "99")
        assert not client.model_ready("no-such-model")
        assert client.health_status() == "SERVING"
        assert client.health_status("inference.GRPCInferenceService") == "SERVING"


def test_metadata_matches_the_manifest(server: RunningServer, served_repo: Path) -> None:
    with server.client() as client:
        meta = client.server_metadata()
        assert meta.name == "edgewise"
        assert meta.version
        for name in ("logreg", "forest", "mixed", "regressor"):
            manifest = read_manifest(served_repo / name / "1")
            model = client.model_metadata(name)
            assert model.name == name
            assert model.platform == "onnxruntime_onnx"
            assert list(model.versions) == ["1"]
            assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
                (t.name, t.datatype, list(t.shape)) for t in manifest.inputs
            ]
            assert [t.name for t in model.outputs] == [t.name for t in manifest.outputs]
        assert status_of(lambda: client.model_metadata("nope")) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "inference.GRPCInferenceService",
        "edgewise.v1.ModelRepositoryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


# ---- inference on real models --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("name", ["logreg", "forest", "mixed"])
def test_classifiers_match_scikit_learn(
    server: RunningServer, served_repo: Path, name: str, raw: bool
) -> None:
    estimator, frame, _ = models.TRAINERS[name]()
    rows = frame.iloc[:25]
    manifest = read_manifest(served_repo / name / "1")
    inputs = frame_to_inputs(manifest, rows)
    with server.client() as client:
        result = client.infer(name, inputs, raw=raw, request_id=f"req-{name}")
    assert result.id == f"req-{name}"
    assert result.model_name == name
    assert result.model_version == "1"
    np.testing.assert_allclose(
        result.outputs["probabilities"], estimator.predict_proba(rows), atol=1e-4
    )
    np.testing.assert_array_equal(result.outputs["label"], estimator.predict(rows))


def test_regressor_matches_scikit_learn(server: RunningServer, served_repo: Path) -> None:
    estimator, frame, _ = models.TRAINERS["regressor"]()
    rows = frame.iloc[:40]
    inputs = frame_to_inputs(read_manifest(served_repo / "regressor" / "1"), rows)
    with server.client() as client:
        result = client.infer("regressor", inputs)
    (output,) = result.outputs.values()
    np.testing.assert_allclose(output.ravel(), estimator.predict(rows), rtol=1e-4, atol=1e-3)


def test_requested_outputs_are_honoured(server: RunningServer, served_repo: Path) -> None:
    _, frame, _ = models.TRAINERS["logreg"]()
    inputs = frame_to_inputs(read_manifest(served_repo / "logreg" / "1"), frame.iloc[:3])
    with server.client() as client:
        only = client.infer("logreg", inputs, outputs=["probabilities"])
        assert list(only.outputs) == ["probabilities"]
        code = status_of(lambda: client.infer("logreg", inputs, outputs=["nope"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


# ---- every error code -------------------------------------------------------------------------


def infer_status(
    server: RunningServer, request: pb.ModelInferRequest
) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def logreg_request(rows: int = 2, **overrides: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="logreg")
    request.inputs.add(name="features", datatype="FP32", shape=[rows, 30])
    request.raw_input_contents.append(np.zeros((rows, 30), np.float32).tobytes())
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


def test_error_codes(server: RunningServer) -> None:
    cases: list[tuple[pb.ModelInferRequest, grpc.StatusCode, str]] = []
    cases.append((logreg_request(model_name="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"))
    cases.append((logreg_request(model_version="7"), grpc.StatusCode.NOT_FOUND, "version 7"))
    wrong_type = logreg_request()
    wrong_type.inputs[0].datatype = "FP64"
    wrong_type.raw_input_contents[0] = np.zeros((2, 30), np.float64).tobytes()
    cases.append((wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "'features'.*FP64.*FP32"))
    wrong_shape = logreg_request()
    del wrong_shape.inputs[0].shape[:]
    wrong_shape.inputs[0].shape.extend([4, 15])
    cases.append((wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, r"'features'.*shape \[4, 15\]"))
    wrong_size = logreg_request()
    wrong_size.raw_input_contents[0] = b"\0" * 100
    cases.append((wrong_size, grpc.StatusCode.INVALID_ARGUMENT, "'features'.*100 bytes"))
    mixed = logreg_request()
    mixed.inputs[0].contents.fp32_contents.append(1.0)
    cases.append((mixed, grpc.StatusCode.INVALID_ARGUMENT, "'features'.*mixed"))
    missing = pb.ModelInferRequest(model_name="logreg")
    cases.append((missing, grpc.StatusCode.INVALID_ARGUMENT, "missing input.*'features'"))
    unknown = logreg_request()
    unknown.inputs.add(name="extra", datatype="FP32", shape=[2])
    unknown.raw_input_contents.append(b"\0" * 8)
    cases.append((unknown, grpc.StatusCode.INVALID_ARGUMENT, "'extra' is not an input"))
    typed_count = pb.ModelInferRequest(model_name="logreg")
    tensor = typed_count.inputs.add(name="features", datatype="FP32", shape=[1, 30])
    tensor.contents.fp32_contents.extend([0.0] * 29)
    cases.append((typed_count, grpc.StatusCode.INVALID_ARGUMENT, "'features'.*29 values"))
    for request, expected, pattern in cases:
        code, details = infer_status(server, request)
        assert code == expected, (request, code, details)
        assert re.search(pattern, details), (pattern, details)
    with server.client() as client:
        assert client.server_live()


def test_version_on_disk_but_not_loaded_is_unavailable(
    server: RunningServer, served_repo: Path
) -> None:
    with server.client() as client:
        client.load_model("forest")  # policy latest:1 -> v1
        with staging_dir(served_repo, "forest", 5) as (folder, _):
            for item in (served_repo / "forest" / "1").iterdir():
                shutil.copy(item, folder / item.name)
        try:
            request = pb.ModelInferRequest(model_name="forest", model_version="5")
            code, details = infer_status(server, request)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "not loaded" in details
        finally:
            shutil.rmtree(served_repo / "forest" / "5")


def test_message_over_the_limit_is_resource_exhausted(model_repo: Path, tmp_path: Path) -> None:
    with running_server(model_repo, tmp_path, ["--max-message-bytes", "65536"]) as small:
        code, details = infer_status(small, logreg_request(rows=1000))  # 120 kB
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        with small.client() as client:
            assert client.server_live()


def test_expired_deadlines_are_not_run(server: RunningServer) -> None:
    """Requests whose deadline runs out while they are decoded are refused, not computed.

    Each request carries 20,000 rows as typed contents (decoding alone takes ~30 ms, longer than
    its 15 ms deadline), so the server's check before inference must refuse it: the OK counter of
    the model must not move, whatever the client saw."""
    rows = 20_000
    request = pb.ModelInferRequest(model_name="logreg")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[rows, 30])
    tensor.contents.fp32_contents.extend(np.zeros(rows * 30, np.float32).tolist())
    before = metric_value(
        metrics_text(server), "edgewise_requests_total", model="logreg", code="OK"
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(logreg_request(), timeout=10)  # connect first
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=0.015)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while metric_value(metrics_text(server), "edgewise_inflight_requests") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    after = metric_value(metrics_text(server), "edgewise_requests_total", model="logreg", code="OK")
    assert after == before + 1  # only the connecting request
    refused = metric_value(
        metrics_text(server), "edgewise_requests_total", model="logreg", code="DEADLINE_EXCEEDED"
    )
    assert refused >= 1


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_count_requests_latency_and_load_events(server: RunningServer) -> None:
    infer_status(server, logreg_request())
    infer_status(server, logreg_request(model_name="nope"))
    text = metrics_text(server)
    assert (
        metric_value(text, "edgewise_requests_total", model="logreg", version="1", code="OK") >= 1
    )
    assert metric_value(text, "edgewise_requests_total", model="_other", code="NOT_FOUND") >= 1
    assert 'model="nope"' not in text  # a requested name is no label value (bounded)
    assert metric_value(text, "edgewise_request_duration_seconds_count", model="logreg") >= 1
    assert "edgewise_inflight_requests" in text
    assert metric_value(text, "edgewise_model_events_total", model="logreg", event="load") >= 1


# ---- repository control, hot load and failures ------------------------------------------------


def copy_version(repo: Path, name: str, source: int, target: int) -> None:
    with staging_dir(repo, name, target) as (folder, _):
        for item in (repo / name / str(source)).iterdir():
            shutil.copy(item, folder / item.name)


def test_index_unload_and_load(server: RunningServer) -> None:
    with server.client() as client:
        index = {(m.name, m.version): m for m in client.repository_index()}
        assert index[("regressor", "1")].state == "READY"
        assert index[("regressor", "1")].is_default
        assert len(index[("regressor", "1")].sha256) == 64
        client.unload_model("regressor")
        assert not client.model_ready("regressor")
        assert status_of(lambda: client.model_metadata("regressor")) == grpc.StatusCode.NOT_FOUND
        states = client.load_model("regressor")
        assert [(s.version, s.state) for s in states] == [("1", "READY")]
        assert client.model_ready("regressor")
        assert status_of(lambda: client.load_model("nope")) == grpc.StatusCode.NOT_FOUND


def test_a_version_that_fails_to_load_leaves_the_served_one(
    server: RunningServer, served_repo: Path
) -> None:
    copy_version(served_repo, "forest", 1, 2)
    (served_repo / "forest" / "2" / "model.onnx").write_bytes(b"not an onnx model")
    try:
        with server.client() as client:
            code = status_of(lambda: client.load_model("forest", "2"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            index = {(m.name, m.version): m for m in client.repository_index()}
            assert index[("forest", "2")].state == "FAILED"
            assert "sha256" in index[("forest", "2")].reason or index[("forest", "2")].reason
            assert index[("forest", "1")].state == "READY"
            assert client.model_ready("forest")
            assert status_of(lambda: client.infer("forest", {}, version="2")) == (
                grpc.StatusCode.UNAVAILABLE
            )
    finally:
        shutil.rmtree(served_repo / "forest" / "2")


def test_new_version_loads_while_requests_flow_with_zero_failures(
    server: RunningServer, served_repo: Path
) -> None:
    _, frame, _ = models.TRAINERS["logreg"]()
    inputs = frame_to_inputs(read_manifest(served_repo / "logreg" / "1"), frame.iloc[:4])
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with EdgewiseClient(server.target) as client:
            while not stop.is_set():
                try:
                    versions.append(client.infer("logreg", inputs).model_version)
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        while len(versions) < 50:
            time.sleep(0.01)
        copy_version(served_repo, "logreg", 1, 2)
        with server.client() as client:
            states = client.load_model("logreg")
        seen = len(versions)
        while len(versions) < seen + 50:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert [(s.version, s.state) for s in states] == [("2", "READY")]
    assert versions[0] == "1"
    assert versions[-1] == "2"
    with server.client() as client:
        assert client.model_metadata("logreg").versions == ["2"]
        client.load_model("logreg", "1", make_default=True)
        assert client.infer("logreg", inputs).model_version == "1"
    shutil.rmtree(served_repo / "logreg" / "2")
    # --make-default is kept in config.json (a restart serves it too): put the repository back.
    (served_repo / "logreg" / "config.json").unlink()
    with server.client() as client:
        client.load_model("logreg")


def test_version_policy_from_model_config(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    copy_version(repo, "logreg", 1, 2)
    copy_version(repo, "logreg", 1, 3)
    (repo / "logreg" / "config.json").write_text('{"version_policy": {"latest": 2}}')
    with running_server(repo, tmp_path) as served, served.client() as client:
        assert list(client.model_metadata("logreg").versions) == ["2", "3"]
        assert (
            client.infer("logreg", {"features": np.zeros((1, 30), np.float32)}).model_version == "3"
        )
    with (
        running_server(repo, tmp_path, ["--version-policy", "all"]) as served,
        served.client() as client,
    ):
        assert list(client.model_metadata("logreg").versions) == ["2", "3"]  # config wins
    (repo / "logreg" / "config.json").unlink()
    with (
        running_server(repo, tmp_path, ["--version-policy", "specific:1,3"]) as served,
        served.client() as client,
    ):
        assert list(client.model_metadata("logreg").versions) == ["1", "3"]


def test_health_follows_readiness(model_repo: Path, tmp_path: Path) -> None:
    """An empty repository serves nothing: NOT_SERVING until a model is loaded."""
    repo = tmp_path / "repo"
    repo.mkdir()
    server = start_server(repo, tmp_path, wait_serving=False)
    try:
        with server.client() as client:
            assert client.server_live()
            assert not client.server_ready()
            assert client.health_status() == "NOT_SERVING"
            shutil.copytree(model_repo / "logreg", repo / "logreg")
            client.load_model("logreg")
            assert client.server_ready()
            assert client.health_status() == "SERVING"
            client.unload_model("logreg")
            assert client.health_status() == "NOT_SERVING"
    finally:
        assert server.stop() == 0


# ---- graceful shutdown -----------------------------------------------------------------------


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_sigterm_drains_in_flight_requests_and_exits_zero(
    model_repo: Path, tmp_path: Path, front_end: str
) -> None:
    served = running_server(
        model_repo, tmp_path, ["--grace-seconds", "30", *front_end_args(front_end)]
    )
    with served as running:
        big = {"features": np.random.default_rng(0).normal(size=(400_000, 13)).astype(np.float32)}
        outcome: dict[str, object] = {}

        def slow_request() -> None:
            with EdgewiseClient(running.target) as client:
                try:
                    outcome["rows"] = len(client.infer("forest", big).outputs["label"])
                except Exception as exc:
                    outcome["error"] = exc

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 30
        while metric_value(metrics_text(running), "edgewise_inflight_requests") < 1:
            assert time.monotonic() < deadline, "the request never arrived"
            assert thread.is_alive(), outcome
            time.sleep(0.005)
        code = running.stop()
        thread.join()
    assert code == 0, running.log()
    assert outcome == {"rows": 400_000}
    assert "stopped" in running.log()


# ---- fuzzing the live server -------------------------------------------------------------------

fuzz_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["features", "x", ""]),
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "FP16", "BOOL", "??"]),
        "shape": st.lists(st.integers(-2, 40), max_size=3),
        "values": st.lists(st.floats(width=32, allow_nan=True), max_size=40),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    model=st.sampled_from(["logreg", "mixed", "nope", ""]),
    version=st.sampled_from(["", "1", "x", "-1"]),
    tensors=st.lists(fuzz_tensor, max_size=3),
    raws=st.lists(st.binary(max_size=160), max_size=3),
)
def test_fuzz_server_answers_only_client_error_statuses(
    server: RunningServer, model: str, version: str, tensors: list[dict], raws: list[bytes]
) -> None:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for spec in tensors:
        tensor = request.inputs.add(
            name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
        )
        tensor.contents.fp32_contents.extend(spec["values"])
    request.raw_input_contents.extend(raws)
    code, details = infer_status(server, request)
    assert code in {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
    }, details
