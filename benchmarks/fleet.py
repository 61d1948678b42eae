"""A fleet of agents against one store: polling load, time to converge on a new version (at once
and in waves), and what a store that is slow or down does to it.

    .venv/bin/python benchmarks/fleet.py [--agents 100] [--real 3] [--interval 5]
        [--stores sqlite,mlflow]

Each simulated agent is a thread with a store connection of its own (as an agent process has)
doing the store side of the real agent's poll, with the real wave rule
(:func:`edgewise.runtime.agent.waves.wave_wait`): resolve the alias every ``--interval`` s
(jittered by +-20 %, as the agent's; after a failed call the agent's backoff: 1 s doubling, equal
jitter); when it names another version, read the alias's rollout
policy and, with waves, every node's report; once its wave has begun, "deploy" (a fixed
``--deploy-seconds``: the download, validation and switch on an edge server are not what is
measured here) and report its version and health to the store. Stores: the embedded SQLite one
and a real MLflow server (tests/mlflow_server.py, basic auth on, one worker) on this machine.

``--real N`` of the agents are real edge nodes instead: an ``edgewise serve`` process on
loopback over a repository of its own, and the real agent (:class:`edgewise.runtime.agent.sync.
Agent`, its loop in a thread with a store connection of its own) that downloads each version
from the store, validates it, loads it on its server and switches; they take part in the waves
like any node (their reports). Their store calls are counted with the simulated ones; a real
node has converged when its agent made the version the server's default (checked on the
server at the end of each case: ``real_serving``).

Prints one JSON line per case:
- ``steady``: every agent converged; store calls per second and their latency (p50, p99) while
  the fleet only polls.
- ``converge``: the alias flips; seconds until every agent serves the new version (p50 and max
  over agents; ``real_p50_seconds``, ``real_max_seconds``: over the real nodes alone;
  ``real_deploy_seconds``: each real node's time from the poll that saw the version to its
  switch, the waves' wait included), at once (the baseline) and in waves (1 node, 25 %, all);
  ``ratio`` = waves / at once.
- ``store_down``: the alias flips and the store is unreachable for ``--down-seconds`` right
  after (MLflow: connections refused by a proxy; SQLite: the database file moved away); failed
  calls and the time to converge, ``ratio`` against the baseline converge.
- ``store_slow`` (MLflow): every store call delayed ``--slow-seconds`` by a proxy; time to
  converge and call latency, ``ratio`` against the baseline converge.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.mlflow_server, tests.runtime.store.faultproxy

from edgewise.runtime.agent.policy import parse_policy, read_policy, write_policy  # noqa: E402
from edgewise.runtime.agent.waves import wave_wait  # noqa: E402
from edgewise.runtime.errors import EdgewiseError  # noqa: E402
from edgewise.runtime.store.base import NodeReport, Store  # noqa: E402
from edgewise.runtime.store.lineage import utc_now  # noqa: E402

MODEL = "fleet"
BACKOFF_INITIAL = 1.0  # AgentSettings' defaults
BACKOFF_MAX = 300.0
ALIAS = "production"
WAVES = {"waves": [{"nodes": 1}, {"share": 0.25}, {"share": 1.0}]}


@dataclass
class Calls:
    """Store calls of the whole fleet: latencies by kind, failures."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    failed: int = 0

    def timed(self, kind: str, call: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            return call()
        except EdgewiseError:
            with self.lock:
                self.failed += 1
            raise
        finally:
            spent = time.perf_counter() - began
            with self.lock:
                self.seconds.setdefault(kind, []).append(spent)

    def reset(self) -> None:
        with self.lock:
            self.seconds, self.failed = {}, 0

    def summary(self, seconds: float) -> dict[str, Any]:
        with self.lock:
            every = [s for values in self.seconds.values() for s in values]
            kinds = {k: len(v) for k, v in self.seconds.items()}
            failed = self.failed
        every.sort()
        return {
            "calls_per_second": round(len(every) / seconds, 2),
            "calls": kinds,
            "failed_calls": failed,
            "p50_ms": round(every[len(every) // 2] * 1000, 2) if every else None,
            "p99_ms": round(every[int(len(every) * 0.99)] * 1000, 2) if every else None,
        }


class CountedStore:
    """A store whose every call is timed and counted in ``calls`` (a real agent's store)."""

    def __init__(self, store: Store, calls: Calls) -> None:
        self._store, self._calls = store, calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name == "close":
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            return self._calls.timed(name, lambda: attr(*args, **kwargs))

        return timed


class RealNode:
    """A real edge node: a server process on loopback, the real agent's loop in a thread."""

    def __init__(
        self,
        index: int,
        work: Path,
        store: Store,
        calls: Calls,
        interval: float,
        stop: threading.Event,
    ) -> None:
        from edgewise.runtime.agent.sync import Agent, AgentSettings
        from edgewise.runtime.client.client import EdgewiseClient
        from tests.runtime.store.helpers import start_empty_server

        self.node = f"real-{index:03d}"
        repo = work / self.node / "repo"
        repo.mkdir(parents=True)
        self.server = start_empty_server(repo, work / self.node / "server")
        settings = AgentSettings(
            model=MODEL,
            repo=repo,
            server=self.server.target,
            server_metrics=self.server.metrics_url,
            alias=ALIAS,
            node_id=self.node,
            interval=interval,
            backoff_initial=BACKOFF_INITIAL,
            backoff_max=BACKOFF_MAX,
            watch_seconds=0.0,  # the simulated agents do not watch either
            load_timeout=60.0,
        )
        self.client = EdgewiseClient(self.server.target)
        self.store = CountedStore(store, calls)
        self.agent = Agent(settings, self.store, self.client)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
        self.deployed: tuple[int, str] | None = None
        self.deployed_at = 0.0
        self.seen: tuple[int, float] | None = None  # (version, when the agent first saw it)
        self.deploy_seconds: float | None = None  # from seeing the version to serving it
        self.error: BaseException | None = None

    def _run(self, stop: threading.Event) -> None:
        try:
            self.agent.run(stop)
        except BaseException as exc:  # reported by the case (the node never converges)
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def observe(self) -> None:
        """The version the agent made the default (its gauge, set when the state is saved)."""
        registry = self.agent.metrics.registry
        now = time.monotonic()
        target = int(registry.get_sample_value("edgewise_agent_target_version") or 0)
        if target and (self.seen is None or self.seen[0] != target):
            self.seen = (target, now)
        version = int(registry.get_sample_value("edgewise_agent_deployed_version") or 0)
        if version and (self.deployed is None or self.deployed[0] != version):
            self.deployed, self.deployed_at = (version, ""), now
            if self.seen is not None and self.seen[0] == version:
                self.deploy_seconds = now - self.seen[1]

    def serving(self) -> int | None:
        for status in self.client.repository_index():
            if status.name == MODEL and status.is_default and status.state == "READY":
                return int(status.version)
        return None

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class SimAgent(threading.Thread):
    def __init__(
        self,
        node: str,
        store: Store,
        calls: Calls,
        interval: float,
        deploy_seconds: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(daemon=True)
        self.node, self.store, self.calls = node, store, calls
        self.interval, self.deploy_seconds, self._stop_event = interval, deploy_seconds, stop
        self.deployed: tuple[int, str] | None = None
        self.report: NodeReport | None = None  # a report not yet taken by the store
        self.deployed_at = 0.0
        self.rng = random.Random(node)

    def run(self) -> None:
        time.sleep(self.rng.uniform(0, self.interval))
        failures = 0
        while not self._stop_event.is_set():
            try:
                self.poll()
                failures = 0
                delay = self.interval * self.rng.uniform(0.8, 1.2)
            except EdgewiseError:  # the agent's backoff (Agent.backoff_delay, its defaults)
                failures += 1
                delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** (failures - 1))
                delay *= self.rng.uniform(0.5, 1.0)
            self._stop_event.wait(delay)

    def poll(self) -> None:
        store, calls = self.store, self.calls
        if self.report is not None:  # a report that failed is sent again, as the agent does
            report = self.report
            calls.timed("report_node", lambda: store.report_node(report))
            self.report = None
        record = calls.timed("resolve_alias", lambda: store.resolve_alias(MODEL, ALIAS))
        target = (record.version, record.model_sha256)
        if target == self.deployed:
            return
        policy = calls.timed("read_policy", lambda: read_policy(store, MODEL, ALIAS))
        if policy is not None and policy.waves and self.deployed is not None:
            reports = calls.timed("node_reports", lambda: store.node_reports(MODEL))
            if wave_wait(self.node, reports, record.version, record.model_sha256, policy.waves):
                return
        time.sleep(self.deploy_seconds)
        self.deployed, self.deployed_at = target, time.monotonic()
        report = NodeReport(
            node=self.node, model=MODEL, version=record.version, sha256=record.model_sha256,
            health="ok", state="idle", target_version=record.version, updated_at=utc_now(),
        )  # fmt: skip
        self.report = report
        calls.timed("report_node", lambda: store.report_node(report))
        self.report = None


def packages(root: Path) -> list[Path]:
    import pandas as pd
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from edgewise.runtime.convert.converter import convert

    data = load_iris(as_frame=True)
    frame = pd.DataFrame(data.data)
    made = []
    for version, c in enumerate((1.0, 0.1), start=1):
        model = LogisticRegression(C=c, max_iter=500).fit(frame, data.target)
        made.append(convert(model, frame, name=MODEL, repo=root, version=version).path)
    return made


def converge(
    agents: list[SimAgent | RealNode],
    admin: Store,
    version: int,
    timeout: float,
    during: Callable[[], None],
) -> dict[str, Any]:
    real = [a for a in agents if isinstance(a, RealNode)]
    for node in real:
        node.deploy_seconds = None
    flipped = time.monotonic()
    admin.set_alias(MODEL, ALIAS, version)
    # The outage (or nothing) in a thread of its own: the real nodes are observed meanwhile.
    outage = threading.Thread(target=during, daemon=True)
    outage.start()
    deadline = flipped + timeout
    while time.monotonic() < deadline:
        for node in real:
            node.observe()
        if all(a.deployed and a.deployed[0] == version for a in agents):
            break
        time.sleep(0.05)
    outage.join()

    def seconds(of: list[SimAgent | RealNode] | list[RealNode]) -> list[float]:
        return [
            a.deployed_at - flipped
            for a in of
            if a.deployed and a.deployed[0] == version and a.deployed_at >= flipped
        ]

    done, real_done = seconds(agents), seconds(real)
    converged = len(done) == len(agents)
    result: dict[str, Any] = {
        "converged": converged,
        "agents_done": len(done),
        "p50_seconds": round(statistics.median(done), 2) if done else None,
        "max_seconds": round(max(done), 2) if converged else None,
    }
    if real:
        result.update(
            real_nodes=len(real),
            real_p50_seconds=round(statistics.median(real_done), 2) if real_done else None,
            real_max_seconds=round(max(real_done), 2) if len(real_done) == len(real) else None,
            # From the poll that saw the version to the switch (the waves' wait included).
            real_deploy_seconds=[
                None if node.deploy_seconds is None else round(node.deploy_seconds, 2)
                for node in real
            ],
            real_serving=sum(node.serving() == version for node in real),
            real_errors=[repr(node.error) for node in real if node.error is not None],
        )
    return result


def run_store(kind: str, args: argparse.Namespace, work: Path, folders: list[Path]) -> None:
    from edgewise.runtime.store import open_store
    from edgewise.runtime.store.register import register

    proxy = None
    mlflow = None
    agents: list[SimAgent | RealNode] = []
    stop = threading.Event()
    if kind == "mlflow":
        from tests.mlflow_server import start_mlflow
        from tests.runtime.store.faultproxy import FaultProxy

        mlflow = start_mlflow(work / "mlflow")
        proxy = FaultProxy(("127.0.0.1", mlflow.port))

        def make(url: str | None = None) -> Store:
            from edgewise.runtime.store.mlflow_rest import MlflowStore

            assert mlflow is not None and proxy is not None
            return MlflowStore(url or proxy.url, mlflow.username, mlflow.password, timeout=10)

        admin = make(mlflow.url)  # the publisher goes around the proxy
    else:
        from edgewise.runtime.store.sqlite import SqliteStore

        database = work / "sqlite" / "store.db"
        admin = SqliteStore(database)

        def make(url: str | None = None) -> Store:
            return open_store(f"sqlite:///{database}")

    try:
        # A new version for each case (1: the start, 2: at once, 3: waves, 4: store down, 5:
        # store slow), the two packages in turn: the real agents refuse a lower version than
        # one they served (rollback protection), as a real fleet's would.
        for index in range(5):
            register(admin, folders[index % 2], alias=ALIAS)
        admin.set_alias(MODEL, ALIAS, 1)
        calls = Calls()
        real = min(args.real, args.agents)
        for i in range(real):
            agents.append(RealNode(i, work / "nodes", make(), calls, args.interval, stop))
        agents += [
            SimAgent(f"node-{i:03d}", make(), calls, args.interval, args.deploy_seconds, stop)
            for i in range(real, args.agents)
        ]
        for agent in agents:
            agent.start()
        timeout = args.interval * 12 + 60
        base = {
            "store": kind,
            "agents": args.agents,
            "real_nodes": real,
            "interval_seconds": args.interval,
        }
        first = converge(agents, admin, 1, timeout, lambda: None)
        calls.reset()
        time.sleep(args.steady_seconds)
        steady = calls.summary(args.steady_seconds)
        print(json.dumps({"case": "steady", **base, **steady, "initial": first}), flush=True)

        calls.reset()
        at_once = converge(agents, admin, 2, timeout, lambda: None)
        load = calls.summary(at_once["max_seconds"] or timeout)
        print(
            json.dumps({"case": "converge", "waves": "none", **base, **at_once, **load}), flush=True
        )

        write_policy(admin, MODEL, ALIAS, parse_policy(WAVES))
        calls.reset()
        waved = converge(agents, admin, 3, timeout, lambda: None)
        load = calls.summary(waved["max_seconds"] or timeout)
        ratio = (
            round(waved["max_seconds"] / at_once["max_seconds"], 2)
            if waved["max_seconds"] and at_once["max_seconds"]
            else None
        )
        print(
            json.dumps(
                {
                    "case": "converge",
                    "waves": "1 node, 25 %, all",
                    **base,
                    **waved,
                    **load,
                    "baseline_max_seconds": at_once["max_seconds"],
                    "ratio": ratio,
                }
            ),
            flush=True,
        )
        write_policy(admin, MODEL, ALIAS, None)

        def outage() -> None:
            if proxy is not None:
                proxy.down()
                time.sleep(args.down_seconds)
                proxy.start()
            else:
                moved = database.with_name("moved.db")
                database.rename(moved)
                time.sleep(args.down_seconds)
                moved.rename(database)

        calls.reset()
        down = converge(agents, admin, 4, timeout + args.down_seconds, outage)
        load = calls.summary(down["max_seconds"] or timeout)
        print(
            json.dumps(
                {
                    "case": "store_down",
                    "down_seconds": args.down_seconds,
                    **base,
                    **down,
                    **load,
                    "baseline_max_seconds": at_once["max_seconds"],
                    "ratio": round(down["max_seconds"] / at_once["max_seconds"], 2)
                    if down["max_seconds"] and at_once["max_seconds"]
                    else None,
                }
            ),
            flush=True,
        )

        if proxy is not None:
            proxy.state.delay = args.slow_seconds
            proxy.set_mode("slow")
            calls.reset()
            slow = converge(agents, admin, 5, timeout * 3, lambda: None)
            load = calls.summary(slow["max_seconds"] or timeout)
            proxy.set_mode("pass")
            print(
                json.dumps(
                    {
                        "case": "store_slow",
                        "delay_seconds": args.slow_seconds,
                        **base,
                        **slow,
                        **load,
                        "baseline_max_seconds": at_once["max_seconds"],
                        "ratio": round(slow["max_seconds"] / at_once["max_seconds"], 2)
                        if slow["max_seconds"] and at_once["max_seconds"]
                        else None,
                    }
                ),
                flush=True,
            )
        stop.set()
        for agent in agents:
            agent.join(timeout=30)
            agent.store.close()
    finally:
        stop.set()
        for agent in agents:
            if isinstance(agent, RealNode):
                agent.join(timeout=30)
                agent.close()
        admin.close()
        if proxy is not None:
            proxy.down()
        if mlflow is not None:
            mlflow.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument(
        "--real", type=int, default=3, help="of the agents, real edge nodes (server + agent)"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="poll interval, seconds")
    parser.add_argument("--deploy-seconds", type=float, default=0.5)
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--down-seconds", type=float, default=10.0)
    parser.add_argument("--slow-seconds", type=float, default=0.2)
    parser.add_argument("--stores", default="sqlite,mlflow")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgewise-fleet-") as temporary:
        work = Path(temporary)
        folders = packages(work / "packages")
        for kind in args.stores.split(","):
            run_store(kind, args, work / kind, folders)


if __name__ == "__main__":
    main()
