"""The native front end: the Python handler it calls per ModelInfer, and a real server behind it.

The gRPC surface as a whole (health, reflection, metadata, errors, tokens, batching, the real
tritonclient) runs on both front ends in test_server.py, test_auth.py, test_batching.py and
tests/interop; this file covers what only the native front end does."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.runtime.app.server import InferenceServer
from edgewise.runtime.config.settings import ClientSecurity, ServerSettings
from edgewise.runtime.frontends.grpcio import InferenceServicer
from edgewise.runtime.frontends.native.binding import MODEL_INFER, PENDING, NativeFront
from edgewise.runtime.frontends.security import AuthInterceptor, TokenSet
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.serving.pipeline import InferenceCore
from edgewise.runtime.serving.request_context import RequestLabels, current
from edgewise.runtime.serving.shedding import LoadShedder
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import front_end_args, native_front_or_unmet, running_server, start_server

TOKEN = "native-front-token-0123456789abcdef"
CODES = {code.value[0] for code in grpc.StatusCode}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logreg and forest; forest with dynamic batching."""
    target = tmp_path_factory.mktemp("native") / "repo"
    for name in ("logreg", "forest"):
        shutil.copytree(model_repo / name, target / name)
    (target / "forest" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 8, "max_queue_delay_us": 1000}})
    )
    return target


@pytest.fixture(scope="module")
def core(repo: Path) -> Iterator[InferenceCore]:
    """The serving core, in process, without gRPC."""
    server = InferenceServer(ServerSettings.from_sources({"repo": repo, "metrics_port": -1}))
    server.repository.load_all()
    server.dataplane.set_ready(True)
    yield InferenceCore(
        server.dataplane,
        server.metrics,
        server.executor,
        server.settings.inline_max_bytes,
        server.admission,
    )
    server.executor.shutdown()


def request_bytes(model: str, rows: np.ndarray, request_id: str = "") -> bytes:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype(np.float32).tobytes())
    return request.SerializeToString()


def features(repo: Path, n: int, seed: int = 0, model: str = "logreg") -> np.ndarray:
    manifest = json.loads((repo / model / "1" / "manifest.json").read_text())
    width = int(manifest["inputs"][0]["shape"][1])
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def test_a_request_is_answered_as_the_model_answers(core: InferenceCore, repo: Path) -> None:
    front = NativeFront(core, None, None, 50)
    rows = features(repo, 5)
    monitor = core.dataplane.repository.get("logreg", "").monitor
    assert monitor is not None
    before = monitor.current.rows
    code, message, body, trailers, deferred = front.handle(
        request_bytes("logreg", rows, "r-1"), None, 10.0, 1
    )
    assert (code, message, trailers) == (0, "", ())
    # The monitor's statistics wait until C++ has sent the answer (it then calls after()).
    assert deferred and monitor.current.rows == before
    front.after()
    assert monitor.current.rows == before + 5
    assert body is not None
    response = pb.ModelInferResponse.FromString(body)
    assert (response.model_name, response.model_version, response.id) == ("logreg", "1", "r-1")
    expected = load_model("logreg", 1, repo / "logreg" / "1", SessionSettings()).run(
        {"features": rows}
    )
    index = [o.name for o in response.outputs].index("label")
    labels = np.frombuffer(response.raw_output_contents[index], dtype=expected["label"].dtype)
    np.testing.assert_array_equal(labels, expected["label"])


def test_a_call_carries_its_ids_into_its_trailers_and_its_deferred_work(
    core: InferenceCore, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``x-request-id`` and ``traceparent`` C++ hands over are the call's labels: echoed in
    its trailers (grpcio's) and current for the monitor's work run after the answer is sent."""
    monitor = core.dataplane.repository.get("logreg", "").monitor
    assert monitor is not None
    seen: list[RequestLabels | None] = []
    monkeypatch.setattr(monitor, "observe", lambda feeds, outputs: seen.append(current()))
    front = NativeFront(core, None, None, 50)
    body = request_bytes("logreg", features(repo, 2))
    code, _, answer, trailers, deferred = front.handle(
        body, None, None, 1, 0, (), "meta-9", f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    )
    assert code == 0 and answer is not None and deferred
    assert pb.ModelInferResponse.FromString(answer).id == "meta-9"
    assert trailers == (("x-request-id", "meta-9"), ("x-trace-id", TRACE_ID))
    assert current() is None and not seen  # the call is over; its monitor work waits
    front.after()
    (labels,) = seen
    assert labels is not None and (labels.request_id, labels.trace_id) == ("meta-9", TRACE_ID)
    # A plain call echoes nothing (its made id is the response's); a failed one its made id.
    assert front.handle(body, None, None, 1)[3] == ()
    code, _, _, trailers, _ = front.handle(request_bytes("nope", features(repo, 1)), None, None, 1)
    assert code == grpc.StatusCode.NOT_FOUND.value[0]
    ((key, made),) = trailers
    assert key == "x-request-id" and len(made) == 16


def test_only_the_grpcio_path_keeps_the_model_run_average(core: InferenceCore, repo: Path) -> None:
    """The core's moving average of a model run is what the event-loop path (grpcio, HTTP) reads
    to choose where a call runs; the native front end keeps its own in C++, so its calls leave
    it be."""
    body = request_bytes("logreg", features(repo, 3))
    before = core.run_seconds
    code, message, _, _, _ = NativeFront(core, None, None, 50).handle(body, None, 10.0, 1)
    assert (code, message) == (0, "")
    assert core.run_seconds == before
    context: Any = SimpleNamespace(time_remaining=lambda: None, invocation_metadata=lambda: ())
    response = asyncio.run(InferenceServicer(core).infer_bytes(body, context))
    assert response.model_name == "logreg"
    assert core.run_seconds != before


def test_errors_carry_their_status_and_a_message_naming_the_field(
    core: InferenceCore, repo: Path
) -> None:
    front = NativeFront(core, None, None, 50)
    rows = features(repo, 2)
    code, message, body, _, _ = front.handle(b"\xff\xff not protobuf", None, None, 1)
    assert (code, body) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], None)
    assert "ModelInferRequest" in message
    code, message, _, _, _ = front.handle(request_bytes("nope", rows), None, None, 1)
    assert code == grpc.StatusCode.NOT_FOUND.value[0] and "'nope'" in message
    code, message, _, _, _ = front.handle(request_bytes("logreg", rows[:, :3]), None, None, 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "'features'" in message
    code, message, _, _, _ = front.handle(request_bytes("logreg", rows), None, 0.0, 1)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "deadline" in message


def test_a_model_with_batching_joins_its_batch_queue_and_is_completed_later(
    core: InferenceCore, repo: Path
) -> None:
    rows = features(repo, 3, model="forest")

    async def scenario() -> list[tuple[int, Any]]:
        front = NativeFront(core, None, None, 50)
        core.attach(asyncio.get_running_loop())
        completed: list[tuple[int, Any]] = []
        front._front = SimpleNamespace(
            complete=lambda token, answer: completed.append((token, answer))
        )
        answer = front.handle(request_bytes("forest", rows), None, 10.0, 1, 4242)
        assert answer[0] == PENDING  # decoded now; answered once its batch has run
        failed = front.handle(request_bytes("forest", rows), None, 0.0, 1, 4343)
        assert failed[0] == PENDING
        while len(completed) < 2:
            await asyncio.sleep(0.001)
        return completed

    completed = dict(asyncio.run(scenario()))
    code, _, body, _, _ = completed[4242]
    assert code == 0 and body is not None
    response = pb.ModelInferResponse.FromString(body)
    assert response.model_name == "forest" and response.outputs[0].shape[0] == 3
    code, message, body, _, _ = completed[4343]  # its deadline passed before it joined
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and body is None and message


def test_tokens_are_checked_before_the_in_flight_limit(core: InferenceCore, repo: Path) -> None:
    auth = AuthInterceptor(TokenSet(inline=TOKEN))
    shedder = LoadShedder(2, 75, frozenset())
    front = NativeFront(core, auth, shedder, 75)
    body = request_bytes("logreg", features(repo, 1))
    # Over the limit without a token: refused for the token, and no shed is counted.
    code, message, _, _, _ = front.handle(body, None, None, 3)
    assert code == grpc.StatusCode.UNAUTHENTICATED.value[0] and "missing credentials" in message
    code, _, _, _, _ = front.handle(body, "Bearer wrong-token-0123456789abcdef", None, 3)
    assert code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert shedder.shed == 0
    # With the token, over the limit: shed with the retry hint; at the limit: answered.
    code, message, body_out, trailers, _ = front.handle(body, f"Bearer {TOKEN}", None, 3)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and body_out is None
    assert "overloaded" in message
    assert dict(trailers) == {"retry-after-ms": "75", "grpc-retry-pushback-ms": "75"}
    assert shedder.shed == 1
    assert front.handle(body, f"Bearer {TOKEN}", None, 2)[0] == 0


def test_the_in_flight_limit_counts_the_http_calls_too(core: InferenceCore, repo: Path) -> None:
    """One limit for every front end: C++ counts the native calls, the shedder the HTTP ones
    (through enter/leave); a native call is admitted only while their sum is within it, and
    edgewise_admitted_calls shows the sum."""
    native_in_flight = [0]
    shedder = LoadShedder(2, 50, frozenset(), elsewhere=lambda: native_in_flight[0])
    front = NativeFront(core, None, shedder, 50)
    body = request_bytes("logreg", features(repo, 1))
    assert shedder.enter()  # an HTTP call is running
    assert front.handle(body, None, None, 1)[0] == 0  # 1 native (this one) + 1 HTTP: the limit
    code, message, _, _, _ = front.handle(body, None, None, 2)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "overloaded" in message
    assert shedder.shed == 1
    native_in_flight[0] = 1  # a native call holds a slot: HTTP gets the other, then no more
    assert shedder.admitted_calls() == 2 and not shedder.enter()
    shedder.leave()
    assert shedder.admitted_calls() == 1 and shedder.enter()
    assert shedder.admitted.collect()[0].samples[0].value == 2


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_any_bytes_get_an_answer_never_an_exception(core: InferenceCore, data: bytes) -> None:
    code, message, body, trailers, _ = NativeFront(core, None, None, 50).handle(data, None, None, 1)
    assert code in CODES and isinstance(message, str) and isinstance(trailers, tuple)
    assert (body is not None) == (code == 0)


def test_a_real_native_server_sheds_batches_and_takes_large_messages(
    repo: Path, tmp_path: Path
) -> None:
    args = [*front_end_args("native"), "--max-inflight", "2", "--monitoring", "off"]
    with running_server(repo, tmp_path, args) as server:
        channel = grpc.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        outcomes: list[str] = []
        lock = threading.Lock()

        def caller(seed: int) -> None:
            for i in range(6):
                rows = features(repo, 2000, seed * 10 + i)
                request = pb.ModelInferRequest.FromString(request_bytes("logreg", rows))
                try:
                    stub.ModelInfer(request, timeout=30)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    trailing = dict(exc.trailing_metadata() or ())
                    outcome = f"{exc.code().name}:{trailing.get('retry-after-ms')}"
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED:50"}, outcomes
        assert "OK" in outcomes
        assert "RESOURCE_EXHAUSTED:50" in outcomes  # 12 callers, a limit of 2

        # A model with batching: its requests join the model's batch queue, a message larger
        # than gRPC's default 4 MiB included.
        big = features(repo, 100_000, model="forest")
        request = pb.ModelInferRequest.FromString(request_bytes("forest", big))
        assert len(request.raw_input_contents[0]) > 4 << 20
        response = stub.ModelInfer(request, timeout=60)
        assert response.model_name == "forest"
        assert response.outputs[0].shape[0] == 100_000
        small = pb.ModelInferRequest.FromString(
            request_bytes("forest", features(repo, 4, model="forest"))
        )
        assert stub.ModelInfer(small, timeout=30).outputs[0].shape[0] == 4
        # Both went through the model's batch queue (the large one in a batch of its own, on a
        # worker thread like every batch).
        text = metrics_text(server)
        assert metric_value(text, "edgewise_batch_rows_sum", model="forest") == 100_004
        assert metric_value(text, "edgewise_batch_rows_count", model="forest") == 2
        assert metric_value(text, "edgewise_shed_requests_total") == outcomes.count(
            "RESOURCE_EXHAUSTED:50"
        )
        channel.close()


def test_cancelled_expired_and_abandoned_calls_leave_the_server_serving(
    repo: Path, tmp_path: Path
) -> None:
    """Every way a call can end early, on both paths (answered in C++/Python, relayed), many at
    once: the server keeps answering and stops cleanly."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with running_server(repo, tmp_path, front_end_args("native")) as server:
        big = pb.ModelInferRequest.FromString(
            request_bytes("forest", features(repo, 200_000, model="forest"))
        )
        small = pb.ModelInferRequest.FromString(request_bytes("logreg", features(repo, 3)))
        batched = pb.ModelInferRequest.FromString(
            request_bytes("forest", features(repo, 2, model="forest"))
        )
        failures: list[str] = []

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            channel = grpc.insecure_channel(
                server.target, options=[("grpc.max_send_message_length", 64 << 20)]
            )
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(25):
                kind = int(rng.integers(6))
                try:
                    if kind == 0:  # answered
                        stub.ModelInfer(small, timeout=30)
                    elif kind == 1:  # expires while the model runs (relayed: big, unbatched)
                        stub.ModelInfer(big, timeout=0.005)
                    elif kind == 2:  # cancelled by the client mid-call
                        future = stub.ModelInfer.future(big, timeout=30)
                        future.cancel()
                    elif kind == 3:  # a server stream, abandoned after its first message
                        stream = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
                        next(stream)
                        stream.cancel()
                    elif kind == 4:  # relayed to the batch queue, tiny deadline
                        stub.ModelInfer(batched, timeout=0.0005)
                    else:  # a relayed unary call
                        stub.ModelMetadata(pb.ModelMetadataRequest(name="logreg"), timeout=30)
                except grpc.RpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED,
                    ):
                        failures.append(f"{kind}: {exc.code()} {exc.details()}")
            channel.close()

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        with grpc.insecure_channel(server.target) as channel:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(small, timeout=30)
        assert answer.model_name == "logreg"
        assert server.process.poll() is None
        code = server.stop()
    assert code == 0, server.log()


def test_a_refused_stream_ends_while_the_client_still_holds_it_open(
    repo: Path, tmp_path: Path
) -> None:
    """The relayed call's status ends the client's call even though the client has neither sent
    a message nor half-closed: the front end does not wait on a stream nobody reads."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    args = [*front_end_args("native"), "--monitoring", "off"]
    env = {"EDGEWISE_TOKENS": TOKEN}
    server = start_server(repo, tmp_path, args, env=env, security=ClientSecurity(token=TOKEN))
    try:
        release = threading.Event()

        def held_open() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            release.wait(30)  # sends nothing and keeps the stream open until the end
            return
            yield  # a generator

        with grpc.insecure_channel(server.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.ServerReflectionInfo(held_open(), timeout=20):
                    pass
            release.set()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        release.set()
        assert server.stop() == 0, server.log()


def test_cheap_calls_are_answered_one_at_a_time_and_costly_ones_side_by_side() -> None:
    """Cheap calls go to one thread (no GIL passed between threads for them); requests over
    small_max_bytes, and every request once the handler has been taking more than half a
    millisecond a call, go to the other handler threads, which overlap (here: while the handler
    sleeps, as onnxruntime runs without the GIL).

    No timing decides the outcome: a cheap handler does next to nothing (far under the half
    millisecond, whatever else runs on the machine), a costly one sleeps 50 ms (at least that,
    however loaded the machine) after meeting a second costly call at a barrier, which only
    handlers running side by side can pass."""
    module = native_front_or_unmet()
    lock = threading.Lock()
    running: dict[str, int] = {}
    most: dict[str, int] = {}
    handler_threads: dict[str, set[int]] = {}
    side_by_side = threading.Barrier(2, timeout=20)  # broken (an error answer): one at a time
    ids: dict[int, tuple[str | None, str | None]] = {}  # a cheap call's, by its 5th byte

    def handler(  # NativeFront.handle's parameters, as C++ passes them (checked below)
        body: bytes,
        authorization: str | None,
        remaining: float | None,
        in_flight: int,
        token: int,
        peer: tuple[str, ...],
        request_id: str | None,
        traceparent: str | None,
    ) -> tuple[int, str, bytes, tuple[()], bool]:
        kind = "large" if len(body) > 1024 else body[:4].decode()
        with lock:
            if kind == "fast":
                ids[body[4]] = (request_id, traceparent)
            running[kind] = running.get(kind, 0) + 1
            most[kind] = max(most.get(kind, 0), running[kind])
            handler_threads.setdefault(kind, set()).add(threading.get_ident())
        if kind != "fast":
            side_by_side.wait()
            time.sleep(0.05)
        with lock:
            running[kind] -= 1
        return 0, "", body[:16], (), False

    real = list(inspect.signature(NativeFront.handle).parameters)[1:]  # less self
    assert list(inspect.signature(handler).parameters) == real

    def start(handlers: int) -> Any:
        return module.Front(
            address="127.0.0.1:0",
            upstream="unix:/nonexistent/edgewise-test.sock",
            handler=handler,
            after=lambda: None,
            fast_method=MODEL_INFER,
            max_message_bytes=1 << 20,
            reuse_port=False,
            handlers=handlers,
            small_max_bytes=1024,
        )

    front = start(handlers=3)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            call = channel.unary_unary(MODEL_INFER)

            def send_all(bodies: list[bytes]) -> None:
                answers: dict[int, bytes] = {}

                def send(i: int) -> None:
                    metadata = (
                        (("x-request-id", f"r{i}"), ("traceparent", f"t{i}")) if i % 2 else ()
                    )
                    answers[i] = call(bodies[i], timeout=30, metadata=metadata)

                threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert answers == {i: body[:16] for i, body in enumerate(bodies)}

            send_all([b"fast" + bytes([i]) * 100 for i in range(40)])
            assert most == {"fast": 1}  # cheap: one thread, one at a time
            assert len(handler_threads["fast"]) == 1
            # The call's x-request-id and traceparent, where it sent them; None otherwise.
            assert ids == {i: (f"r{i}", f"t{i}") if i % 2 else (None, None) for i in range(40)}
            send_all([bytes([i]) * 5000 for i in range(6)])
            assert most["large"] == 2  # over small_max_bytes: the other two threads
            assert len(handler_threads["large"]) == 2  # and none of them the cheap calls' one
            assert handler_threads["large"].isdisjoint(handler_threads["fast"])
            send_all([b"slow" + bytes([i]) * 100 for i in range(6)])
            assert most["slow"] == 2  # small, but the handler has been slow: side by side
        assert front.counts() == (52, 0, 0)
    finally:
        front.shutdown(5.0)
    with pytest.raises(ValueError, match="handlers"):
        start(handlers=1)


def test_the_front_end_uses_public_grpc_headers_only() -> None:
    """gRPC's internals (grpcpp/impl/codegen, grpc::internal) change between releases without
    notice; the front end is built against whatever libgrpc++-dev a system has."""
    from edgewise.runtime.frontends.native.binding import SOURCE

    source = SOURCE.read_text()
    includes = [line for line in source.splitlines() if line.startswith("#include <grpc")]
    assert includes, "no gRPC header included: the check would prove nothing"
    assert all(line.startswith("#include <grpcpp/") for line in includes), includes
    assert "grpcpp/impl/" not in source
    assert "grpc::internal" not in source and "grpc_impl" not in source
