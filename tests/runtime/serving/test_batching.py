from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from edgewise.runtime.serving.batching import BatchingConfig, DynamicBatcher, batchable
from edgewise.runtime.serving.dataplane import PreparedRequest
from edgewise.runtime.serving.model import LoadedModel, SessionSettings, load_model
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import FRONT_ENDS, front_end_args, running_server


@pytest.fixture(scope="module")
def logreg(model_repo: Path) -> LoadedModel:
    return load_model("logreg", 1, model_repo / "logreg" / "1", SessionSettings())


def prepared(model: LoadedModel, rows: np.ndarray, request_id: str = "") -> PreparedRequest:
    return PreparedRequest(model, {"features": rows}, None, True, request_id, rows.shape[0])


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(10, 5, size=(n, 30)).astype(np.float32)


def test_config_parsing() -> None:
    config = BatchingConfig.from_json({"max_batch_size": 16, "preferred_batch_sizes": [8, 4]})
    assert config.preferred_batch_sizes == (4, 8)
    assert config.idle_dispatch is True
    assert BatchingConfig.from_json({"idle_dispatch": False}).idle_dispatch is False
    bad_settings = (
        {"max_batch_size": 0},
        {"preferred_batch_sizes": [64]},
        {"delay": 1},
        {"idle_dispatch": "yes"},
        # JSON's own types only: these were read as 2, 8, 1, (4, 8) and -1 us
        {"max_batch_size": 2.7},
        {"max_batch_size": "8"},
        {"max_batch_size": True},
        {"preferred_batch_sizes": "48"},
        {"max_queue_delay_us": -1},
    )
    for bad in bad_settings:
        with pytest.raises(InvalidInput):
            BatchingConfig.from_json(bad)


def test_batched_answers_equal_single_runs(logreg: LoadedModel) -> None:
    assert batchable(logreg)
    # Without idle dispatch: each request here would find the model idle (the loop runs the
    # submissions one after another) and run alone.
    config = BatchingConfig(max_batch_size=32, max_queue_delay_us=20_000, idle_dispatch=False)
    inputs = [rows(1 + i % 3, i) for i in range(40)]

    async def scenario() -> tuple[list, DynamicBatcher]:
        with ThreadPoolExecutor(2) as executor:
            batcher = DynamicBatcher(logreg, config, executor)
            answers = await asyncio.gather(
                *(batcher.submit(prepared(logreg, x, f"r{i}"), None) for i, x in enumerate(inputs))
            )
            return answers, batcher

    answers, batcher = asyncio.run(scenario())
    assert batcher.batches_run >= 1
    assert batcher.batches_run < len(inputs)  # requests really were combined
    for index, (x, response) in enumerate(zip(inputs, answers, strict=True)):
        expected = logreg.run({"features": x})
        assert response.id == f"r{index}"
        label = np.frombuffer(response.raw_output_contents[0], dtype=np.int64)
        probabilities = np.frombuffer(response.raw_output_contents[1], np.float32).reshape(-1, 2)
        np.testing.assert_array_equal(label, expected["label"])
        np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-6)
        assert list(response.outputs[1].shape) == [x.shape[0], 2]


def test_a_lone_request_runs_at_once(logreg: LoadedModel) -> None:
    """Idle dispatch: with nothing else around, a request runs at once on the event loop: it
    waits neither for the 60 s delay nor for a worker thread (the only one is blocked here)."""
    config = BatchingConfig(max_batch_size=32, max_queue_delay_us=60_000_000)
    sizes: list[int] = []

    async def scenario() -> int:
        release = threading.Event()
        with ThreadPoolExecutor(1) as executor:
            executor.submit(release.wait)
            try:
                batcher = DynamicBatcher(logreg, config, executor, sizes.append)
                for index in range(3):  # one after the other: each finds the model idle
                    submitted = batcher.submit(prepared(logreg, rows(1, index)), None)
                    await asyncio.wait_for(submitted, 20)
                return batcher.queued
            finally:
                release.set()

    assert asyncio.run(scenario()) == 0
    assert sizes == [1, 1, 1]


def test_requests_with_company_gather_into_one_batch(logreg: LoadedModel) -> None:
    """With other calls in flight, requests wait for company (here until the size is reached;
    the 60 s delay would hold them past the test's 20 s) and run as one batch."""
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=60_000_000)
    sizes: list[int] = []

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(logreg, config, executor, sizes.append, lambda: 4)
            tasks = [
                asyncio.ensure_future(batcher.submit(prepared(logreg, rows(2, i)), None))
                for i in range(4)
            ]
            return await asyncio.wait_for(asyncio.gather(*tasks), 20)

    answers = asyncio.run(scenario())
    assert len(answers) == 4
    assert sizes == [8]


def test_a_batch_feeds_the_performance_estimate(logreg: LoadedModel) -> None:
    """Rows answered in a batch count in the classifier's CBPE window as rows answered alone
    do (the batch path used to observe drift but never update the estimate)."""
    from edgewise.runtime.package.performance_estimation import (
        Calibration,
        ClassMap,
        PerformanceEstimator,
    )

    calibration = Calibration((0, 1), (ClassMap.identity(),), 100, "sample", ("identity",))
    logreg.performance = PerformanceEstimator("logreg", "1", calibration, window_rows=1000)
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=60_000_000)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(logreg, config, executor, lambda rows: None, lambda: 4)
            tasks = [
                asyncio.ensure_future(batcher.submit(prepared(logreg, rows(2, i)), None))
                for i in range(4)
            ]
            await asyncio.wait_for(asyncio.gather(*tasks), 20)

    asyncio.run(scenario())
    assert logreg.performance.current.rows == 8


def test_a_request_behind_a_running_batch_is_not_alone(logreg: LoadedModel) -> None:
    """While a batch of its model runs, a request queues even if it is the server's only new
    call: it goes with the next batch, not around the running one."""
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=60_000_000)
    in_flight = [3]

    async def scenario() -> int:
        release = threading.Event()
        with ThreadPoolExecutor(1) as executor:
            executor.submit(release.wait)  # the batch below must wait for the worker
            try:
                batcher = DynamicBatcher(logreg, config, executor, None, lambda: in_flight[0])
                running = [
                    asyncio.ensure_future(batcher.submit(prepared(logreg, rows(4, i)), None))
                    for i in range(2)
                ]
                await asyncio.sleep(0)  # 8 rows: dispatched to the (busy) worker
                in_flight[0] = 1
                late = asyncio.ensure_future(batcher.submit(prepared(logreg, rows(1, 9)), None))
                await asyncio.sleep(0.05)
                queued = batcher.queued
                late.cancel()
                release.set()
                await asyncio.wait_for(asyncio.gather(*running), 20)
                return queued
            finally:
                release.set()

    assert asyncio.run(scenario()) == 1


def test_a_request_with_other_calls_in_flight_waits_to_gather(logreg: LoadedModel) -> None:
    """With other calls in flight on the server, a request is not alone: it waits for company."""
    config = BatchingConfig(max_batch_size=32, max_queue_delay_us=60_000_000)

    async def scenario() -> int:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(logreg, config, executor, calls_in_flight=lambda: 3)
            task = asyncio.ensure_future(batcher.submit(prepared(logreg, rows(1, 0)), None))
            await asyncio.sleep(0.05)
            queued = batcher.queued
            task.cancel()
            return queued

    assert asyncio.run(scenario()) == 1


def test_full_queue_and_expired_deadlines(logreg: LoadedModel) -> None:
    config = BatchingConfig(
        max_batch_size=1000, max_queue_delay_us=50_000, max_queue_size=3, idle_dispatch=False
    )

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(logreg, config, executor)
            expired = time.monotonic() - 1
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(prepared(logreg, rows(1, 0)), expired)
            soon = time.monotonic() + 0.01  # expires while waiting for the 50 ms batch
            tasks = [
                asyncio.ensure_future(batcher.submit(prepared(logreg, rows(1, i)), soon))
                for i in range(3)
            ]
            await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted, match="full"):
                await batcher.submit(prepared(logreg, rows(1, 9)), None)
            return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, DeadlineExceeded) for o in outcomes), outcomes


def test_a_failed_batch_fails_every_request(logreg: LoadedModel) -> None:
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=20_000, idle_dispatch=False)

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(logreg, config, executor)
            good = [prepared(logreg, rows(1, i)) for i in range(3)]
            bad = prepared(logreg, rows(1, 5).astype(np.float64))  # onnxruntime refuses FP64
            return await asyncio.gather(
                *(batcher.submit(p, None) for p in [*good, bad]), return_exceptions=True
            )

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == 4
    assert all(isinstance(o, InvalidInput) for o in outcomes), outcomes


def test_a_failed_lone_request_is_not_counted_as_a_batch(logreg: LoadedModel) -> None:
    """``edgewise_batch_rows`` counts the rows of batches that ran: a request that runs alone
    (at once, or as a one-request batch) and fails is not counted, as a failed batch is not."""
    sizes: list[int] = []
    bad = rows(2, 5).astype(np.float64)  # onnxruntime refuses FP64

    async def scenario(config: BatchingConfig) -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(logreg, config, executor, sizes.append)
            with pytest.raises(InvalidInput):
                await asyncio.wait_for(batcher.submit(prepared(logreg, bad), None), 20)
            await asyncio.wait_for(batcher.submit(prepared(logreg, rows(3, 1)), None), 20)

    asyncio.run(scenario(BatchingConfig(max_batch_size=8)))  # idle dispatch: runs at once
    assert sizes == [3]
    asyncio.run(
        scenario(BatchingConfig(max_batch_size=8, max_queue_delay_us=1_000, idle_dispatch=False))
    )
    assert sizes == [3, 3]


def test_an_unloaded_batching_model_is_freed(model_repo: Path, tmp_path: Path) -> None:
    """The servicer's batcher of a model version does not keep the version alive after it is
    unloaded: its session, monitor and kept predictions are freed, and the batcher with them."""
    import gc
    import weakref
    from types import SimpleNamespace

    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.frontends.grpcio import InferenceServicer
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.pipeline import InferenceCore

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    (repo / "logreg" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 4, "max_queue_delay_us": 20_000}})
    )
    server = InferenceServer(ServerSettings.from_sources({"repo": repo, "monitoring": "off"}))
    server.repository.load_all()
    in_flight = [1]
    core = InferenceCore(
        server.dataplane, server.metrics, server.executor, calls_in_flight=lambda: in_flight[0]
    )
    servicer = InferenceServicer(core)
    context = SimpleNamespace(time_remaining=lambda: None, invocation_metadata=lambda: ())

    def request(seed: int) -> pb.ModelInferRequest:
        x = rows(1, seed)
        message = pb.ModelInferRequest(model_name="logreg", id=f"r{seed}")
        message.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
        message.raw_input_contents.append(x.tobytes())
        return message

    async def scenario() -> None:
        await servicer.ModelInfer(request(0), context)  # type: ignore[arg-type]  # alone
        in_flight[0] = 4
        calls = [servicer.ModelInfer(request(i), context) for i in range(1, 5)]  # type: ignore[arg-type]
        await asyncio.gather(*calls)  # one batch of 4

    try:
        asyncio.run(scenario())
        assert len(core.batch_queues()) == 1
        model = weakref.ref(server.repository.get("logreg"))
        server.repository.unload("logreg")
        gc.collect()
        assert model() is None, gc.get_referrers(model())
        assert len(core.batch_queues()) == 0
    finally:
        server.executor.shutdown()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_batching_in_a_real_server(model_repo: Path, tmp_path: Path, front_end: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    (repo / "logreg" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 16, "max_queue_delay_us": 2000}})
    )
    model = load_model("logreg", 1, repo / "logreg" / "1", SessionSettings())
    failures: list[str] = []
    checked = 0
    lock = threading.Lock()

    def client_thread(target: str, seed: int) -> None:
        nonlocal checked
        with EdgewiseClient(target) as client:
            for i in range(40):
                x = rows(1 + i % 2, seed * 100 + i)
                try:
                    result = client.infer("logreg", {"features": x})
                    expected = model.run({"features": x})
                    np.testing.assert_array_equal(result.outputs["label"], expected["label"])
                    with lock:
                        checked += 1
                except Exception as exc:
                    failures.append(repr(exc))

    with running_server(repo, tmp_path, front_end_args(front_end)) as server:
        threads = [
            threading.Thread(target=client_thread, args=(server.target, s)) for s in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with server.client() as client, pytest.raises(ServerError, match="FP64"):
            client.infer("logreg", {"features": rows(1, 0).astype(np.float64)})
        text = metrics_text(server)
    assert failures == []
    assert checked == 240
    calls = metric_value(text, "edgewise_batch_rows_count", model="logreg")
    batched_rows = metric_value(text, "edgewise_batch_rows_sum", model="logreg")
    assert batched_rows == 6 * (20 * 1 + 20 * 2)  # every row went through the batcher
    assert calls < 240  # and requests shared onnxruntime calls


def test_a_busy_loop_still_batches_requests_for_a_batching_model(
    model_repo: Path, tmp_path: Path
) -> None:
    """When the event loop is saturated, requests for models without batching move to worker
    threads; requests for a model with batching still join its batch queue."""
    from types import SimpleNamespace

    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings
    from edgewise.runtime.frontends.grpcio import InferenceServicer
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
    from edgewise.runtime.serving.pipeline import InferenceCore

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    shutil.copytree(model_repo / "regressor", repo / "regressor")  # no batching
    (repo / "logreg" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 8, "max_queue_delay_us": 20_000}})
    )
    server = InferenceServer(ServerSettings.from_sources({"repo": repo, "monitoring": "off"}))
    server.repository.load_all()
    busy = SimpleNamespace(busy=True, inline_seconds=0.0)  # what the servicer reads of LoopLoad
    core = InferenceCore(
        server.dataplane,
        server.metrics,
        server.executor,
        loop_load=busy,  # type: ignore[arg-type]
        calls_in_flight=lambda: 8,
    )
    servicer = InferenceServicer(core)
    context = SimpleNamespace(time_remaining=lambda: None, invocation_metadata=lambda: ())

    def request(model: str, seed: int) -> pb.ModelInferRequest:
        x = rows(1, seed)[:, : 30 if model == "logreg" else 10]
        message = pb.ModelInferRequest(model_name=model)
        message.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
        message.raw_input_contents.append(x.tobytes())
        return message

    async def scenario() -> list[pb.ModelInferResponse]:
        calls = [
            servicer.ModelInfer(request(m, i), context)
            for i in range(8)
            for m in ("logreg", "regressor")
        ]
        return await asyncio.gather(*calls)  # type: ignore[arg-type]

    try:
        responses = asyncio.run(scenario())
    finally:
        server.executor.shutdown()
    assert [r.model_name for r in responses] == ["logreg", "regressor"] * 8
    batchers = {name: queue for (name, _), queue in core.batch_queues().items()}
    assert list(batchers) == ["logreg"]  # the regressor has no batching: worker threads ran it
    assert batchers["logreg"].rows_run == 8 and batchers["logreg"].batches_run == 1
