"""Dynamic batching: requests for one model version are gathered for up to ``max_queue_delay_us``
(or until ``max_batch_size`` rows are waiting), their rows concatenated into one onnxruntime call,
and the outputs split back, one response per request.

Configured per model in ``<repo>/<model>/config.json``::

    {"batching": {"max_batch_size": 32, "max_queue_delay_us": 500,
                  "preferred_batch_sizes": [8, 16, 32], "max_queue_size": 1024,
                  "idle_dispatch": true}}

Idle dispatch (on by default): a request that arrives when it is the server's only call in flight
(nothing else queued, running or on its way) runs at once, on the event loop like an unbatched
request: nothing could join it, so waiting (or a hand-off to a worker thread) would only add
latency. Batching therefore costs a lone client nothing; under concurrent load requests gather as
before. With ``"idle_dispatch": false`` every batch waits for the delay or the size, as in
Triton's dynamic batcher.

Off unless configured, and refused for a model whose inputs' first dimension is not a variable
batch dimension (-1). The queue is bounded: a full queue answers RESOURCE_EXHAUSTED. A request
whose deadline has passed is refused before it joins a batch, and again before its batch runs. A
failed batch fails every request in it with the same error. Batches run on the worker threads
while the event loop gathers the next one, in a context labelled with the model version only (no
request's id: a batch serves several; see request_context.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgewise.runtime.config.values import count, flag
from edgewise.runtime.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.dataplane import PROBABILITIES, DataPlane, PreparedRequest
from edgewise.runtime.serving.model import LoadedModel
from edgewise.runtime.serving.request_context import model_context

__all__ = ["BatchingConfig", "DynamicBatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32  # rows per onnxruntime call
    max_queue_delay_us: int = 500  # how long the first request of a batch may wait
    preferred_batch_sizes: tuple[int, ...] = ()  # cut batches at these sizes when possible
    max_queue_size: int = 1024  # requests waiting; beyond: RESOURCE_EXHAUSTED
    idle_dispatch: bool = True  # the server's only call in flight starts its batch at once

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchingConfig:
        known = {
            "max_batch_size",
            "max_queue_delay_us",
            "preferred_batch_sizes",
            "max_queue_size",
            "idle_dispatch",
        }
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"unknown batching setting(s) {sorted(unknown)}")
        sizes = data.get("preferred_batch_sizes", [])
        if not isinstance(sizes, list):
            raise InvalidInput(f"batching.preferred_batch_sizes must be a list, not {sizes!r}")
        config = cls(
            max_batch_size=count("batching.max_batch_size", data.get("max_batch_size", 32), 1),
            max_queue_delay_us=count(
                "batching.max_queue_delay_us", data.get("max_queue_delay_us", 500)
            ),
            preferred_batch_sizes=tuple(
                sorted(count("batching.preferred_batch_sizes[]", v, 1) for v in sizes)
            ),
            max_queue_size=count("batching.max_queue_size", data.get("max_queue_size", 1024), 1),
            idle_dispatch=flag("batching.idle_dispatch", data.get("idle_dispatch", True)),
        )
        if any(v < 1 or v > config.max_batch_size for v in config.preferred_batch_sizes):
            raise InvalidInput("batching: preferred sizes must lie in 1..max_batch_size")
        return config


def batchable(model: LoadedModel) -> bool:
    """Whether every input's and output's first dimension is a variable batch dimension."""
    return all(spec.shape and spec.shape[0] == -1 for spec in (*model.inputs, *model.outputs))


@dataclass(slots=True)
class _Waiting:
    prepared: PreparedRequest
    future: asyncio.Future[pb.ModelInferResponse]
    deadline: float | None


class DynamicBatcher:
    """The batch queue of one model version."""

    def __init__(
        self,
        model: LoadedModel,
        config: BatchingConfig,
        executor: ThreadPoolExecutor,
        on_batch: Callable[[int], None] | None = None,
        calls_in_flight: Callable[[], int] | None = None,
    ) -> None:
        """``calls_in_flight`` counts the server's inference calls in flight, this one included
        (the load shedder's count); without it, idle means no batch of this model running."""
        if not batchable(model):
            raise InvalidInput(
                f"model {model.name!r}: batching needs -1 as the first dimension of every "
                "input and output"
            )
        # No reference to the model: the servicer maps model -> batcher in a WeakKeyDictionary,
        # whose entry (and the unloaded model with its session, monitor and kept predictions)
        # one would keep alive for ever. A batch takes its model from its requests.
        self.name = model.name
        # The dispatch, its batches and their answers run here: the model's labels, no call's.
        self._context = model_context(model.name, model.version_str)
        self.config = config
        self.executor = executor
        self._waiting: deque[_Waiting] = deque()
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running = 0  # batches handed to worker threads and not finished yet
        self.batches_run = 0
        self.rows_run = 0
        self._on_batch = on_batch or (lambda rows: None)
        self._calls_in_flight = calls_in_flight

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def submit(
        self, prepared: PreparedRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before it joined a batch")
        if len(self._waiting) >= self.config.max_queue_size:
            raise ResourceExhausted(
                f"the batch queue of model {self.name!r} is full "
                f"({self.config.max_queue_size} requests); retry later"
            )
        if self._alone():
            return self._run_one(prepared, on_loop=True)  # here and now: nothing could join it
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.ModelInferResponse] = loop.create_future()
        self._waiting.append(_Waiting(prepared, future, deadline))
        self._rows += prepared.rows
        if self._rows >= self.config.max_batch_size:
            self._context.run(self._dispatch)
        elif self._timer is None:
            self._timer = loop.call_later(
                self.config.max_queue_delay_us / 1e6, self._dispatch, context=self._context
            )
        return await future

    def _alone(self) -> bool:
        """Whether a request arriving now is the only work around (see idle dispatch)."""
        if not self.config.idle_dispatch or self._running or self._waiting:
            return False
        return self._calls_in_flight is None or self._calls_in_flight() <= 1

    def _take(self) -> list[_Waiting]:
        """Requests for the next batch: up to max_batch_size rows, cut at the largest preferred
        size the waiting rows reach; always at least one request."""
        limit = self.config.max_batch_size
        reachable = [size for size in self.config.preferred_batch_sizes if size <= self._rows]
        if reachable:
            limit = min(limit, reachable[-1])
        taken: list[_Waiting] = []
        rows = 0
        now = time.monotonic()
        while self._waiting:
            item = self._waiting[0]
            if taken and rows + item.prepared.rows > limit:
                break
            self._waiting.popleft()
            self._rows -= item.prepared.rows
            if item.future.done():  # the caller went away
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it waited for a batch")
                )
                continue
            taken.append(item)
            rows += item.prepared.rows
        return taken

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = self._take()
            if batch:
                self._running += 1
                on_worker = self._context.copy()  # one per thread that runs a batch
                work = loop.run_in_executor(self.executor, on_worker.run, self._run, batch)
                work.add_done_callback(
                    functools.partial(self._settle, batch), context=self._context
                )
            if self._rows < self.config.max_batch_size:
                break
        if self._waiting and self._timer is None:
            self._timer = loop.call_later(
                self.config.max_queue_delay_us / 1e6, self._dispatch, context=self._context
            )

    def _run(self, batch: list[_Waiting]) -> list[pb.ModelInferResponse]:
        """On a worker thread: one onnxruntime call for the whole batch."""
        model = batch[0].prepared.model
        if len(batch) == 1:
            return [self._run_one(batch[0].prepared)]
        feeds: dict[str, npt.NDArray[Any]] = {
            name: np.concatenate([item.prepared.feeds[name] for item in batch])
            for name in model.input_specs
        }
        results = model.run(feeds)
        if model.monitor is not None:  # inputs, and outputs for prediction drift
            model.monitor.observe(feeds, results)
        if model.performance is not None:  # the classifier's estimate before labels (CBPE)
            model.performance.update(results[PROBABILITIES])
        rows = sum(item.prepared.rows for item in batch)
        self.batches_run += 1
        self.rows_run += rows
        self._on_batch(rows)
        responses = []
        start = 0
        for item in batch:
            stop = start + item.prepared.rows
            own = {name: value[start:stop] for name, value in results.items()}
            if model.quality is not None and item.prepared.request_id:
                model.quality.remember(item.prepared.request_id, item.prepared.feeds, own)
            responses.append(item.prepared.respond(own))
            start = stop
        return responses

    def _run_one(self, prepared: PreparedRequest, on_loop: bool = False) -> pb.ModelInferResponse:
        """One request alone, on whichever thread calls it (``on_loop``: see DataPlane.execute);
        counted as a batch once it has run, as :meth:`_run` counts."""
        response = DataPlane.execute(prepared, on_loop=on_loop)
        self._on_batch(prepared.rows)
        return response

    def _settle(
        self, batch: list[_Waiting], done: asyncio.Future[list[pb.ModelInferResponse]]
    ) -> None:
        """On the event loop, when a batch finishes: answer its requests."""
        self._running -= 1
        error = done.exception()
        if error is not None:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            for item, response in zip(batch, done.result(), strict=True):
                if not item.future.done():
                    item.future.set_result(response)
