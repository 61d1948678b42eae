"""Shared by the store and agent tests: real model packages (good ones and deliberately broken
ones), a real agent subprocess, a client that sends requests continuously, and waiting on a
condition with a deadline (never a fixed sleep)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.convert.converter import convert
from edgewise.runtime.package.golden import GOLDEN_FILE, add_golden
from edgewise.runtime.package.manifest import (
    MODEL_FILE,
    file_entry,
    list_versions,
    read_manifest,
    write_manifest,
)
from edgewise.runtime.package.schema import frame_to_inputs
from tests import models
from tests.servers import RunningServer


class Fatal(AssertionError):
    """Raised by a condition when waiting longer cannot help (a process died)."""


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline
    (at once if the condition raises :class:`Fatal`)."""
    deadline = time.monotonic() + timeout
    delay = interval
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Fatal:
            raise
        except Exception as exc:  # the condition may fail while the system settles
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


# ---- packages ------------------------------------------------------------------------------------


def _next_version(repo: Path, name: str) -> int:
    return max(list_versions(repo / name), default=0) + 1


def refresh_manifest(folder: Path, drop: frozenset[str] = frozenset(), **changes: Any) -> None:
    """Recompute the sha256 and size of every listed file (after a deliberate edit)."""
    manifest = read_manifest(folder)
    files = tuple(file_entry(folder, f.path) for f in manifest.files if f.path not in drop)
    write_manifest(folder, dataclasses.replace(manifest, files=files, **changes))


def copy_package(source: Path, repo: Path, name: str | None = None) -> Path:
    """A copy of a package under ``repo/name/<next version>``, renamed in its manifest."""
    manifest = read_manifest(source)
    name = name or manifest.name
    target = repo / name / str(_next_version(repo, name))
    shutil.copytree(source, target)
    if name != manifest.name:
        refresh_manifest(target, name=name)
    return target


def logreg_v1(repo: Path, name: str = "logreg") -> Path:
    result = models.convert_model("logreg", repo / "_src")
    return copy_package(result.path, repo, name)


def logreg_v2(repo: Path, name: str = "logreg") -> Path:
    """Same schema as v1, different coefficients (a stronger penalty): other outputs."""
    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    model = Pipeline(
        [("scale", StandardScaler()), ("clf", LogisticRegression(C=0.01, max_iter=1000))]
    ).fit(X, y)
    result = convert(model, X, name="logreg", repo=repo / "_src")
    return copy_package(result.path, repo, name)


def logreg_narrow(repo: Path, name: str = "logreg") -> Path:
    """An incompatible schema: trained on the first 10 columns only."""
    data = load_breast_cancer(as_frame=True)
    X, y = data.data.iloc[:, :10], data.target.to_numpy()
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    result = convert(model.fit(X, y), X, name="logreg", repo=repo / "_src")
    return copy_package(result.path, repo, name)


def diabetes_v1(repo: Path, name: str = "diabetes") -> Path:
    result = models.convert_model("regressor", repo / "_src")
    return copy_package(result.path, repo, name)


def diabetes_big(repo: Path, name: str = "diabetes", trees: int = 100) -> Path:
    """A large package (a random forest of deep trees, about 2 MB): downloads take many reads."""
    data = load_diabetes(as_frame=True)
    model = RandomForestRegressor(n_estimators=trees, random_state=1).fit(data.data, data.target)
    result = convert(model, data.data, name="regressor", repo=repo / "_src")
    return copy_package(result.path, repo, name)


def logreg_inputs(folder: Path, rows: int = 1, start: int = 0) -> dict[str, Any]:
    """Request inputs for a logreg package, from its training data."""
    X = load_breast_cancer(as_frame=True).data
    return frame_to_inputs(read_manifest(folder), X.iloc[start : start + rows])


def diabetes_inputs(folder: Path, rows: int = 1) -> dict[str, Any]:
    data = load_diabetes(as_frame=True)
    return frame_to_inputs(read_manifest(folder), data.data.iloc[:rows])


def with_custom_op(source: Path, repo: Path) -> Path:
    """A package whose model passes the ONNX checker but which onnxruntime cannot load (an
    operator of an unknown domain): the inputs and outputs the manifest names are kept."""
    target = copy_package(source, repo)
    add_golden(target)  # recorded while the model still loads: it cannot be recorded later
    original = onnx.load(str(target / MODEL_FILE))
    graph = original.graph
    node = helper.make_node(
        "Mystery",
        [i.name for i in graph.input],
        [o.name for o in graph.output],
        domain="com.example.unsupported",
    )
    new_graph = helper.make_graph([node], "mystery", list(graph.input), list(graph.output))
    opsets = [*original.opset_import, helper.make_opsetid("com.example.unsupported", 1)]
    model = helper.make_model(new_graph, opset_imports=opsets)
    model.ir_version = original.ir_version
    onnx.save(model, str(target / MODEL_FILE))
    refresh_manifest(target)
    return target


def with_wrong_golden(source: Path, repo: Path) -> Path:
    """A package whose golden outputs differ from what its model answers."""
    target = copy_package(source, repo)
    if not (target / GOLDEN_FILE).exists():
        add_golden(target)
    data = json.loads((target / GOLDEN_FILE).read_text())
    outputs = data["requests"][0]["outputs"]
    for tensor in outputs.values():
        if tensor["datatype"].startswith("FP"):
            tensor["data"] = [None if v is None else float(v) + 0.25 for v in tensor["data"]]
    (target / GOLDEN_FILE).write_text(json.dumps(data))
    refresh_manifest(target)
    return target


def with_batch_one_only(source: Path, repo: Path, single_rows: Sequence[Mapping[str, Any]]) -> Path:
    """A model that answers one row at a time and fails on larger batches (a Reshape to
    ``[1, n]`` in front of it): it loads, passes its (single-row) golden requests, and then fails
    live traffic that sends batches -- what the error-rate watch exists for."""
    target = copy_package(source, repo)
    model = onnx.load(str(target / MODEL_FILE))
    graph = model.graph
    features = graph.input[0].name
    width = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    reshaped = f"{features}__one_row"
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == features:
                node.input[index] = reshaped
    shape = helper.make_tensor("one_row_shape", TensorProto.INT64, [2], [1, width])
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", [features, "one_row_shape"], [reshaped]))
    onnx.checker.check_model(model)
    onnx.save(model, str(target / MODEL_FILE))
    (target / GOLDEN_FILE).unlink(missing_ok=True)
    refresh_manifest(target, drop=frozenset({GOLDEN_FILE}))
    add_golden(target, [dict(r) for r in single_rows], replace=True)
    return target


# ---- an agent subprocess -------------------------------------------------------------------------


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    command: list[str] = field(default_factory=list)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of the agent's metrics, keyed ``name{label="value",...}``."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def start_agent(
    store: str,
    model: str,
    repo: Path,
    server: RunningServer,
    workdir: Path,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> AgentProcess:
    """``prefix`` goes before the command (e.g. nsenter into a mount namespace)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    port_file = workdir / f"agent-port-{stamp}"
    log_path = workdir / f"agent-{stamp}.log"
    command = [
        *prefix, sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "INFO", "agent",
        "--store", store, "--store-timeout", "2", "--model", model, "--repo", str(repo),
        "--server", server.target, "--server-metrics", server.metrics_url,
        "--node-id", "edge-test-1", "--interval", "0.25", "--jitter", "0.1",
        "--backoff-max", "1.5", "--watch-seconds", "1", "--min-requests", "5",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--port-file", str(port_file),
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=dict(env or os.environ)
        )

    def port() -> int | None:
        if process.poll() is not None:
            raise Fatal(f"agent exited with {process.returncode}:\n{log_path.read_text()}")
        if port_file.exists():
            return int(port_file.read_text())
        return None

    metrics_port = wait_for(port, 60, "the agent's port file")
    return AgentProcess(process, metrics_port, log_path, command)


# ---- continuous traffic --------------------------------------------------------------------------


@dataclass
class Answer:
    at: float
    version: str
    error: str = ""


class Traffic(threading.Thread):
    """Sends requests (no version: the server's default) back to back until stopped."""

    def __init__(self, target: str, model: str, inputs: Mapping[str, Any]) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.model = model
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.answers: list[Answer] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with EdgewiseClient(self.target, timeout=10) as client:
            while not self._stop_event.is_set():
                try:
                    result = client.infer(self.model, self.inputs)
                    self.answers.append(Answer(time.monotonic(), result.model_version))
                except Exception as exc:
                    self.answers.append(
                        Answer(time.monotonic(), "", f"{type(exc).__name__}: {exc}")
                    )

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    @property
    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.error]

    def versions(self) -> list[str]:
        return [a.version for a in self.answers if not a.error]

    def first(self, version: str, after: float = 0.0) -> float | None:
        for answer in self.answers:
            if answer.version == version and answer.at >= after:
                return answer.at
        return None


def served_version(server: RunningServer, model: str, inputs: Mapping[str, Any]) -> str:
    with server.client() as client:
        return client.infer(model, {k: np.asarray(v) for k, v in inputs.items()}).model_version


def start_empty_server(repo: Path, workdir: Path, timeout: float = 60.0) -> RunningServer:
    """A real server on an empty repository (what an edge node looks like before its agent
    deploys anything). It is live but not ready (no model), so it is waited on through
    ServerLive rather than the health service."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"ports-{time.monotonic_ns()}"
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    command = [
        sys.executable, "-m", "edgewise.runtime.cli", "serve",
        "--repo", str(repo), "--host", "127.0.0.1", "--port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--port-file", str(port_file),
    ]  # fmt: skip
    with log_path.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)

    def ports() -> tuple[int, int] | None:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited with {process.returncode}:\n{log_path.read_text()}"
            )
        if not port_file.exists():
            return None
        grpc_port, metrics_port = (int(x) for x in port_file.read_text().split())
        return grpc_port, metrics_port

    grpc_port, metrics_port = wait_for(ports, timeout, "the server's port file")
    server = RunningServer(process, grpc_port, metrics_port, log_path)

    def live() -> bool:
        with server.client() as client:
            return client.server_live()

    wait_for(live, timeout, "the server to be live")
    return server


def strip_golden(folder: Path) -> Path:
    """Make ``folder`` a package without golden requests (as made before convert recorded them)."""
    manifest = read_manifest(folder)
    (folder / "golden.json").unlink(missing_ok=True)
    files = tuple(f for f in manifest.files if f.path != "golden.json")
    write_manifest(folder, dataclasses.replace(manifest, files=files))
    return folder
