"""Multi-process serving: several processes on one port, one model set, aggregated metrics."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.package.manifest import staging_dir
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.codecs import encode_inputs
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

FEATURES = {"features": np.zeros((1, 30), np.float32)}


@pytest.fixture(params=FRONT_ENDS)
def multi(
    model_repo: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[RunningServer, Path]]:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = start_server(repo, tmp_path, ["--processes", "2", *front_end_args(request.param)])
    yield server, repo
    assert server.stop() == 0, server.log()


def workers(server: RunningServer) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


def wait_for(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_processes_share_the_port_and_the_metrics(multi: tuple[RunningServer, Path]) -> None:
    server, _ = multi
    assert len(workers(server)) == 2
    # A local subchannel pool per channel: 16 real TCP connections, not one shared.
    channels = [
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]
    try:
        for channel in channels:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelReady(pb.ModelReadyRequest(name="logreg"), timeout=10).ready
            request = pb.ModelInferRequest(model_name="logreg")
            encode_inputs(request, FEATURES)
            assert stub.ModelInfer(request, timeout=10).model_version == "1"
        serving = {
            child.pid
            for child in workers(server)
            for conn in child.net_connections(kind="tcp")
            if conn.laddr.port == server.port and conn.status == psutil.CONN_ESTABLISHED
        }
        assert len(serving) == 2  # 16 connections did not all land in one process
    finally:
        for channel in channels:
            channel.close()
    text = metrics_text(server)
    assert metric_value(text, "edgewise_requests_total", model="logreg", code="OK") == 16


def test_hot_swap_reaches_every_process_with_zero_failures(
    multi: tuple[RunningServer, Path],
) -> None:
    server, repo = multi
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            with EdgewiseClient(server.target) as client:  # a new connection each time
                try:
                    versions.append(client.infer("logreg", FEATURES).model_version)
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(versions) > 30)
        with staging_dir(repo, "logreg", 2) as (folder, _):
            for item in (repo / "logreg" / "1").iterdir():
                shutil.copy(item, folder / item.name)
        with server.client() as client:
            client.load_model("logreg")
        seen = len(versions)
        wait_for(lambda: len(versions) > seen + 30)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert versions[-20:] == ["2"] * 20
    for _ in range(10):
        with EdgewiseClient(server.target) as client:
            assert list(client.model_metadata("logreg").versions) == ["2"]


def test_a_dead_process_is_replaced(multi: tuple[RunningServer, Path]) -> None:
    server, _ = multi
    victim = workers(server)[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in {p.pid for p in workers(server)} and len(workers(server)) == 2)
    for _ in range(20):  # the replacement serves once it is up; retry connections until then
        with EdgewiseClient(server.target) as client:
            client.wait_until_serving(timeout=60)
            assert client.infer("logreg", FEATURES).model_version == "1"


def test_processes_get_shares_of_threads_and_memory_and_the_whole_in_flight_limit() -> None:
    from edgewise.runtime.app.supervisor import _child_environment
    from edgewise.runtime.config.limits import ResourceLimits
    from edgewise.runtime.config.settings import ENV_PREFIX, ServerSettings

    settings = ServerSettings.from_sources(
        {
            "worker_threads": 4,
            "intra_op_threads": 1,
            "max_inflight": 40,
            "memory_budget_bytes": 8 << 30,
            "max_message_bytes": 4 << 20,
        },
        environ={},
        limits=ResourceLimits.simulated(4, 16 << 30),
    )
    env = _child_environment(settings, 2, {})
    assert env[ENV_PREFIX + "WORKER_THREADS"] == "2"
    assert env[ENV_PREFIX + "MEMORY_BUDGET_BYTES"] == str(4 << 30)
    assert env[ENV_PREFIX + "MAX_INFLIGHT"] == "40"


@pytest.mark.parametrize("level", ["WARNING", "DEBUG"])
def test_log_level_reaches_every_process(model_repo: Path, tmp_path: Path, level: str) -> None:
    """``edgewise --log-level L serve --processes 2``: the serving processes log at L too."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = start_server(repo, tmp_path, ["--processes", "2"], global_args=["--log-level", level])
    pids = [child.pid for child in workers(server)]
    assert server.stop() == 0, server.log()
    lines = server.log().splitlines()
    child_info = [line for line in lines if " INFO " in line and "loaded" in line]
    child_debug = [line for line in lines if " DEBUG " in line]
    assert len(pids) == 2
    if level == "WARNING":
        assert child_info == [], server.log()
    else:
        assert child_info and child_debug, server.log()


def test_a_client_cannot_mark_its_call_as_forwarded(multi: tuple[RunningServer, Path]) -> None:
    """``edgewise-forwarded`` is believed only from a sibling on the private Unix socket: a
    client that sends it on the public port still changes every process."""
    server, _ = multi
    channel = grpc.insecure_channel(server.target)
    with channel:
        epb_grpc.ModelRepositoryServiceStub(channel).UnloadModel(
            epb.UnloadModelRequest(name="logreg"),
            metadata=(("edgewise-forwarded", "1"),),
            timeout=30,
        )
    for _ in range(16):  # separate connections, spread over the processes
        channel = grpc.insecure_channel(
            server.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        with channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_one_row(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def _one_row() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="logreg")
    encode_inputs(request, FEATURES)
    return request
