"""Traffic splits, shadows and version labels on real servers (grpcio and native front ends, and
HTTP): shares within binomial bounds, sticky keys, answers a shadow never changes, agreement
against onnxruntime, labels across a restart, refusals that change nothing."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from scipy.stats import binom

from edgewise.runtime.client.client import ServerError
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as eg
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.codecs import encode_inputs
from edgewise.runtime.serving.rollout import ROLLOUT_FILE
from tests.runtime.rollout.helpers import NAME, direct, rows, two_version_repo
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server


@pytest.fixture
def inverted_repo(model_repo: Path, tmp_path: Path) -> Path:
    return two_version_repo(model_repo, tmp_path / "repo", "inverted")


@pytest.fixture(params=FRONT_ENDS)
def server(
    request: pytest.FixtureRequest, inverted_repo: Path, tmp_path: Path
) -> Iterator[RunningServer]:
    running = start_server(
        inverted_repo, tmp_path / "server", [*front_end_args(request.param), "--http-port", "0"]
    )
    try:
        with running.client() as client:
            client.load_model(NAME, "1", make_default=True)
            client.load_model(NAME, "2")
        yield running
    finally:
        running.stop()


def _metrics(server: RunningServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def _answered_by(server: RunningServer, count: int, ids: list[str] | None = None) -> list[str]:
    inputs = rows(server_repo(server), 1)
    with server.client() as client:
        return [
            client.infer(NAME, inputs, request_id=ids[i] if ids else "").model_version
            for i in range(count)
        ]


def server_repo(server: RunningServer) -> Path:
    # the repository folder is the one the server was started on (its --repo argument)
    args = server.process.args
    assert isinstance(args, list)
    return Path(args[args.index("--repo") + 1]) / NAME / "1"


def test_split_shares_fall_within_binomial_bounds(server: RunningServer) -> None:
    n, share = 600, 0.2
    with server.client() as client:
        rollout = client.set_traffic_split(NAME, [("1", 80), ("2", 20)])
    assert [(w.version, w.weight) for w in rollout.weights] == [("1", 80), ("2", 20)]
    answered = Counter(_answered_by(server, n))
    low, high = binom.interval(0.9999, n, share)
    assert set(answered) == {"1", "2"}
    assert low <= answered["2"] <= high, answered
    metrics = _metrics(server)
    assert 'edgewise_traffic_weight{model="logreg",version="2"} 20.0' in metrics
    # A pinned version and a label are not split.
    with server.client() as client:
        inputs = rows(server_repo(server), 1)
        assert {client.infer(NAME, inputs, version="1").model_version for _ in range(30)} == {"1"}
        client.set_version_label(NAME, "canary", "2")
        assert {client.infer(NAME, inputs, version="canary").model_version for _ in range(30)} == {
            "2"
        }
        client.set_traffic_split(NAME, [])
    assert set(_answered_by(server, 40)) == {"1"}  # no split: the default version


def test_sticky_keys_always_land_on_the_same_version(server: RunningServer) -> None:
    with server.client() as client:
        client.set_traffic_split(NAME, [("1", 50), ("2", 50)], sticky_key="request_id")
    ids = [f"user-{i}" for i in range(40)]
    first = _answered_by(server, 40, ids)
    again = _answered_by(server, 40, ids)
    assert first == again
    assert set(first) == {"1", "2"}  # 40 keys at 50/50 land on both (chance of not: 2**-39)
    # By a request parameter: the same key lands on the same version whatever the request id.
    with server.client() as client:
        client.set_traffic_split(NAME, [("1", 50), ("2", 50)], sticky_key="user")
    stub_inputs = rows(server_repo(server), 1)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        seen: dict[str, set[str]] = {}
        for i in range(120):
            user = f"u{i % 12}"
            request = pb.ModelInferRequest(model_name=NAME, id=f"call-{i}")
            request.parameters["user"].string_param = user
            encode_inputs(request, stub_inputs, raw=True)
            seen.setdefault(user, set()).add(stub.ModelInfer(request, timeout=10).model_version)
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {v for versions in seen.values() for v in versions} == {"1", "2"}


def test_labels_resolve_everywhere_and_persist_across_a_restart(
    inverted_repo: Path, tmp_path: Path
) -> None:
    first = start_server(inverted_repo, tmp_path / "a", ["--http-port", "0"])
    try:
        with first.client() as client:
            client.load_model(NAME, "1", make_default=True)
            client.load_model(NAME, "2")
            client.set_version_label(NAME, "stable", "1")
            client.set_version_label(NAME, "canary", "2")
            client.set_version_label(NAME, "next", "canary")  # a label may name a label
        assert 'edgewise_version_label{label="canary",model="logreg"} 2.0' in _metrics(first)
    finally:
        first.stop()
    saved = json.loads((inverted_repo / NAME / ROLLOUT_FILE).read_text())
    assert saved["labels"] == {"canary": 2, "next": 2, "stable": 1}
    # The restarted server serves both versions (version policy all) and reads its labels.
    (inverted_repo / NAME / "config.json").write_text(
        json.dumps({"version_policy": {"all": True}, "default_version": 1})
    )
    again = start_server(inverted_repo, tmp_path / "b", ["--http-port", "0"])
    try:
        inputs = rows(inverted_repo / NAME / "1", 3)
        with again.client() as client:
            assert client.infer(NAME, inputs, version="canary").model_version == "2"
            assert client.infer(NAME, inputs, version="stable").model_version == "1"
            assert client.model_ready(NAME, "canary")
            assert not client.model_ready(NAME, "nosuch")
            assert client.model_metadata(NAME, "next").name == NAME
            assert dict(client.get_rollout(NAME).labels) == {
                "canary": "2",
                "next": "2",
                "stable": "1",
            }
        url = f"http://127.0.0.1:{again.http_port}/v2/models/{NAME}/versions/canary/ready"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
    finally:
        again.stop()


def test_bad_input_is_refused_and_changes_nothing(server: RunningServer) -> None:
    repo_file = server_repo(server).parent / ROLLOUT_FILE
    with server.client() as client:
        client.set_traffic_split(NAME, [("1", 90), ("2", 10)])
        client.set_version_label(NAME, "stable", "1")
        before = client.get_rollout(NAME)
        saved = repo_file.read_bytes()
        cases: list[tuple[Any, str]] = [
            (lambda: client.set_traffic_split(NAME, [("1", 90), ("2", 20)]), "sum to 100"),
            (lambda: client.set_traffic_split(NAME, [("1", 90), ("3", 10)]), "weights[3]"),
            (lambda: client.set_traffic_split(NAME, [("1", 50), ("1", 50)]), "named twice"),
            (lambda: client.set_traffic_split(NAME, [("1", 100)], "bad key!"), "sticky_key"),
            (lambda: client.set_version_label(NAME, "canary", "3"), "not loaded"),
            (lambda: client.set_version_label(NAME, "7up", "1"), "label '7up'"),
            (lambda: client.set_version_label(NAME, "canary", "nosuch"), "not a version"),
            (lambda: client.set_shadow(NAME, "2", rate=1.5), "rate"),
            (lambda: client.set_shadow(NAME, "2", rate=0.0), "rate"),  # not "every request"
            (lambda: client.set_shadow("nosuch", "2"), "not served"),
            (lambda: client.get_rollout("nosuch"), "not served"),
        ]
        for call, field in cases:
            with pytest.raises(ServerError) as caught:
                call()
            unknown = "not served" in field  # an unknown model is NOT_FOUND, not a bad argument
            expected = grpc.StatusCode.NOT_FOUND if unknown else grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.status == expected, caught.value
            assert field in caught.value.details, caught.value.details
            assert client.get_rollout(NAME) == before
            assert repo_file.read_bytes() == saved


def test_shadow_never_changes_answers_and_measures_agreement(server: RunningServer) -> None:
    folder = server_repo(server)
    candidate = folder.parent / "2"
    n = 120
    with server.client() as client:
        client.set_shadow(NAME, "2")
        answers = [
            client.infer(NAME, rows(folder, 1, start=i), request_id=f"r{i}") for i in range(n)
        ]
        for i, answer in enumerate(answers):
            expected = direct(folder, rows(folder, 1, start=i))
            assert answer.model_version == "1"
            np.testing.assert_array_equal(answer.outputs["label"], expected["label"])
        figures = _wait_for_copies(client, n)
    stable = [direct(folder, rows(folder, 1, start=i)) for i in range(n)]
    shadow = [direct(candidate, rows(folder, 1, start=i)) for i in range(n)]
    equal = sum(int(a["label"][0] == b["label"][0]) for a, b in zip(stable, shadow, strict=True))
    difference = np.mean(
        [
            np.abs(a["probabilities"] - b["probabilities"]).mean()
            for a, b in zip(stable, shadow, strict=True)
        ]
    )
    assert figures.errors == 0 and figures.dropped == 0
    assert figures.labelled_rows == n
    assert figures.agreement == pytest.approx(equal / n)
    assert figures.mean_abs_difference == pytest.approx(difference, rel=1e-5)
    assert figures.agreement < 0.2  # the candidate was trained on inverted labels
    metrics = _metrics(server)
    assert (
        f'edgewise_shadow_requests_total{{model="logreg",outcome="ok",version="2"}} {n}.0'
        in metrics
    )
    # The candidate's monitor saw the shadow traffic (its own request counter did not).
    assert 'edgewise_requests_total{code="OK",model="logreg",version="2"}' not in metrics
    with server.client() as client:
        assert client.drift_report(NAME, "2").rows == n
        client.set_version_label(NAME, "canary", "2")
        assert client.drift_report(NAME, "canary").rows == n  # a label names it there too


def _wait_for_copies(client: Any, n: int) -> Any:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        figures = client.get_rollout(NAME).shadow
        if figures.requests + figures.dropped >= n:
            return figures
        time.sleep(0.05)
    raise AssertionError(f"the shadow ran {figures.requests} of {n} copies")


def test_the_cli_verbs(
    inverted_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgewise.runtime.cli.main import main

    running = start_server(inverted_repo, tmp_path / "cli")
    try:
        with running.client() as client:
            client.load_model(NAME, "1", make_default=True)
            client.load_model(NAME, "2")
        base = ["repository", "--server", running.target]
        assert main([*base, "split", NAME, "1=70", "2=30", "--sticky-key", "user"]) == 0
        assert "1: 70%, 2: 30% (sticky by user)" in capsys.readouterr().out
        assert main([*base, "label", NAME, "canary", "2"]) == 0
        assert main([*base, "shadow", NAME, "--version", "canary", "--rate", "0.5"]) == 0
        capsys.readouterr()
        assert main([*base, "rollout", NAME]) == 0
        shown = capsys.readouterr().out
        assert "shadow   version 2 at rate 0.5" in shown and "canary -> 2" in shown
        for bad, field in (
            (["split", NAME, "1=70", "2=20"], "sum to 100"),
            (["split", NAME, "1:70"], "VERSION=WEIGHT"),
            (["label", NAME, "canary", "9"], "version '9'"),
            (["shadow", NAME], "--version VERSION, or --stop"),
            (["shadow", NAME, "--version", "2", "--rate", "0"], "--rate"),
        ):
            assert main([*base, *bad]) != 0
            err = capsys.readouterr().err
            assert field in err and len(err.strip().splitlines()) == 1, err
        assert main([*base, "split", NAME]) == 0  # no pairs: no split
        assert "split    none" in capsys.readouterr().out
    finally:
        running.stop()


def test_every_process_of_a_multi_process_server_takes_the_change(
    inverted_repo: Path, tmp_path: Path
) -> None:
    running = start_server(inverted_repo, tmp_path / "multi", ["--processes", "2"])
    try:
        with running.client() as client:
            client.load_model(NAME, "1", make_default=True)
            client.load_model(NAME, "2")
            client.set_traffic_split(NAME, [("1", 60), ("2", 40)])
            client.set_version_label(NAME, "canary", "2")
            with pytest.raises(ServerError):  # refused in the process it reached: nothing forwarded
                client.set_version_label(NAME, "canary", "7")
        # A local subchannel pool per channel: separate connections, spread over the processes.
        seen = set()
        for _ in range(16):
            channel = grpc.insecure_channel(
                running.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            with channel:
                rollout = eg.RolloutServiceStub(channel).GetRollout(
                    epb.GetRolloutRequest(model=NAME), timeout=10
                )
                seen.add(
                    (
                        tuple((w.version, w.weight) for w in rollout.weights),
                        rollout.labels["canary"],
                    )
                )
        assert seen == {((("1", 60), ("2", 40)), "2")}
    finally:
        assert running.stop() == 0, running.log()


def test_a_multi_process_server_reports_the_shadow_over_every_process(
    inverted_repo: Path, tmp_path: Path
) -> None:
    """GetRollout's shadow figures count the copies every process ran, not one process's."""
    folder = inverted_repo / NAME / "1"
    running = start_server(inverted_repo, tmp_path / "multi", ["--processes", "2"])
    n = 64
    try:
        with running.client() as client:
            client.load_model(NAME, "1", make_default=True)
            client.load_model(NAME, "2")
            client.set_shadow(NAME, "2")
        # A local subchannel pool per channel: separate connections, spread over the processes.
        for i in range(n):
            channel = grpc.insecure_channel(
                running.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            with channel:
                request = pb.ModelInferRequest(model_name=NAME, id=f"r{i}")
                encode_inputs(request, rows(folder, 1, start=i))
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        with running.client() as client:
            figures = _wait_for_copies(client, n)
        stable = [direct(folder, rows(folder, 1, start=i)) for i in range(n)]
        shadow = [direct(folder.parent / "2", rows(folder, 1, start=i)) for i in range(n)]
        equal = sum(
            int(a["label"][0] == b["label"][0]) for a, b in zip(stable, shadow, strict=True)
        )
        assert (figures.requests, figures.dropped, figures.errors) == (n, 0, 0)
        assert figures.labelled_rows == n
        assert figures.agreement == pytest.approx(equal / n)
        answered = {
            int(line.split()[-1].split(".")[0])
            for line in _metrics(running).splitlines()
            if line.startswith("edgewise_requests_total{") and 'version="1"' in line
        }
        assert answered == {n}
    finally:
        assert running.stop() == 0, running.log()
