"""``serve --processes 2``: a drift report covers every worker's traffic, a reset reaches every
worker, and the drift history holds every worker's closed windows."""

from __future__ import annotations

import io
import json
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from edgewise.runtime.cli.main import main
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.frontends.grpcio import FORWARDED_HEADER
from edgewise.runtime.frontends.peer_windows import SERVICE
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.reference_profile import read_profile
from edgewise.runtime.package.schema import frame_to_inputs
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.codecs import encode_inputs
from edgewise.runtime.serving.drift_history import DEFAULT_DIR, read_history
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.serving.monitor import ModelMonitor, MonitorConfig
from tests import models
from tests.servers import FRONT_ENDS, front_end_args, start_server

CONNECTIONS = 16
REQUESTS = 3  # per connection
ROWS = 4  # per request


def wait_for(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.serial  # timing-bound: two processes' traffic reaches one report within the wait
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_two_processes_answer_one_report_over_all_their_traffic(
    model_repo: Path, tmp_path: Path, front_end: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    config_path = repo / "logreg" / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    monitoring = {"window_rows": 40, "min_rows": 20}
    config["monitoring"] = monitoring
    config_path.write_text(json.dumps(config))
    folder = repo / "logreg" / "1"
    manifest = read_manifest(folder)
    inputs = frame_to_inputs(manifest, models.train_logreg()[1])
    server = start_server(
        repo,
        tmp_path,
        ["--processes", "2", *front_end_args(front_end), "--drift-interval-seconds", "0.2"],
    )
    # A local subchannel pool per channel: 16 real TCP connections, spread over the processes.
    channels = [
        grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    profile = read_profile(folder, manifest)
    assert profile is not None
    oracle = ModelMonitor("logreg", "1", profile, MonitorConfig.from_json(monitoring))
    model = load_model("logreg", 1, folder, SessionSettings())  # the outputs the server observes
    try:
        row = 0
        for _ in range(REQUESTS):
            for channel in channels:
                chunk = {k: np.ascontiguousarray(v[row : row + ROWS]) for k, v in inputs.items()}
                row += ROWS
                request = pb.ModelInferRequest(model_name="logreg")
                encode_inputs(request, chunk)
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
                oracle.observe(chunk, model.run(chunk))
        total = CONNECTIONS * REQUESTS * ROWS
        serving = {
            child.pid
            for child in psutil.Process(server.process.pid).children()
            for conn in child.net_connections(kind="tcp")
            if conn.laddr.port == server.port and conn.status == psutil.CONN_ESTABLISHED
        }
        assert len(serving) == 2  # the traffic reached both processes
        # The timer records each process's closed windows (40 rows each): both processes write.
        history = repo / DEFAULT_DIR
        wait_for(
            lambda: (
                {e.writer for e in read_history(history, "logreg").entries}
                == {str(pid) for pid in serving}
            )
        )
        with server.client() as client:
            for _ in range(4):  # whichever process answers, the report covers both
                merged = client.drift_report("logreg", window="lifetime")
                assert merged.rows == total
            alone = oracle.report("lifetime")
            for got, want in zip(merged.features, alone.features, strict=True):
                assert got.name == want.name
                for key, value in want.scores.items():
                    assert got.scores[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key
                assert got.drifting == want.drifting
                assert got.statistics.count == want.statistics["count"]
                assert got.statistics.mean == pytest.approx(want.statistics["mean"], rel=1e-9)
            stats = client.feature_statistics("logreg", window="lifetime")
            assert stats.rows == total
            client.reset_window("logreg")  # every process starts over
            for _ in range(4):
                current = client.drift_report("logreg")
                previous = client.drift_report("logreg", window="previous")
                assert current.rows == 0
                assert previous.rows == 0 and previous.reason == "no window has completed yet"
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["drift-history", "logreg", "--repo", str(repo)]) == 0
        lines = out.getvalue().splitlines()[1:]
        assert lines and {pid for pid in serving if any(str(pid) in line for line in lines)} == (
            serving
        )
    finally:
        for channel in channels:
            channel.close()
        assert server.stop() == 0, server.log()


def test_siblings_hand_over_windows_with_the_callers_token_and_to_siblings_only(
    model_repo: Path, tmp_path: Path
) -> None:
    token = "history-test-token-0123456789"
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    server = start_server(
        repo,
        tmp_path,
        ["--processes", "2", "--front-end", "grpcio"],
        env={"EDGEWISE_TOKENS": token, "EDGEWISE_DRIFT_HISTORY": "off"},
        security=ClientSecurity(token=token),
    )
    try:
        with server.client() as client:
            for _ in range(4):  # the token goes along to the sibling: its share is handed over
                assert client.drift_report("logreg").available
            client.reset_window("logreg")
        # The sibling call itself answers only calls forwarded by a sibling.
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(f"/{SERVICE}/WindowShare")
            request = json.dumps({"model": "logreg", "version": "1", "window": "current"})
            with pytest.raises(grpc.RpcError) as refused:
                call(request.encode(), timeout=10, metadata=(("authorization", f"Bearer {token}"),))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sibling" in str(refused.value.details())
            with pytest.raises(grpc.RpcError) as anonymous:
                call(request.encode(), timeout=10, metadata=((FORWARDED_HEADER, "1"),))
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not (repo / DEFAULT_DIR).exists()  # EDGEWISE_DRIFT_HISTORY=off
    finally:
        assert server.stop() == 0, server.log()
