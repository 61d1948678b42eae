"""What a feature lookup adds to a served request, lookups per second, and what a server whose
models look nothing up pays for the feature: one run, one JSON line per case.

    .venv/bin/python benchmarks/feature_lookup.py [--rounds R (5)] [--requests N (400)]

Setup: tests/feast_repo.py's Feast repository (diabetes, nine features in one feature view,
``bmi`` a request-time input) is applied and materialized by Feast 0.67 in its own environment
(``.venv-feast``), to its SQLite online store and, where ``redis-server`` is installed, to a Redis
the run starts. A linear model is converted into one repository once per case: ``direct`` (the
request sends all ten features), ``sqlite``, ``redis`` and ``redis_unix`` (the request sends the
entity key and ``bmi``; the cache is off, so every request reads the store; ``redis_unix`` reads
the same Redis through its Unix socket, ``unix_socket_path``), ``sqlite_cached`` (the cache on:
after the first request, hits). One edgewise server (default front end) serves them all. The
load average (1, 5, 15 min) is reported at the start and the end.

``lookup_added_latency``: client round trips at concurrency 1 (EdgewiseClient, one row,
one entity), in alternating rounds over the cases (order rotated each round); per round the
p50 of each case; reported: median over rounds of p50, and the median of the per-round
differences against ``direct`` (targets: +50 us SQLite, +150 us Redis). The server's own
lookup time (edgewise_feature_lookup_seconds) is reported as its mean.

``core_added_latency``: the serving core alone, in this process (no network, no server):
``DataPlane.prepare`` of the same one-entity requests (the lookup, the checks and the decoding
of the request; the model does not run), alternating rounds as above; reported: median over
rounds of p50, the median of the per-round differences against ``direct``, its ratio to the
target, and lookups per second (prepared requests per second of one thread, one entity each).
Twice: back to back (the CPU's caches hot), and with 500 us idle before each request (a served
request at concurrency 1 finds them as cold: other processes ran meanwhile).

``store_read_latency``: the readers alone in this process: p50 of one read of one entity,
back to back and with 500 us idle before each. ``store_reads_per_second``: reads of 1 and 32
entities per second, SQLite and Redis (TCP and, ``redis_unix``, its Unix socket).

``cold_parts``: SQLite's own statement for one entity's rows, a bare ``SELECT 1`` and the
three Prometheus updates of a lookup, timed apart the same two ways.

``lookup_added_latency`` also reports the server's own mean time per request
(``edgewise_request_duration_seconds``, decode to encode) and its difference against
``direct``: what the server adds, apart from the client and the network.

The SQLite online store is put in WAL mode first, as docs/features.md has a deployment do once
after ``feast apply`` (reads then take no file lock).

``plain_server``: a server whose repository holds only ``direct``: time from start to SERVING,
RSS once serving, and whether it imported the lookup modules (``python -X importtime`` on the
server's log), against a server whose repository also holds a model with lookups, alternating.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sklearn.linear_model import LinearRegression  # noqa: E402

from edgewise.runtime.convert.converter import convert  # noqa: E402
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from edgewise.runtime.serving.codecs import encode_inputs  # noqa: E402
from edgewise.runtime.serving.dataplane import DataPlane  # noqa: E402
from edgewise.runtime.serving.monitor_config import MonitorConfig  # noqa: E402
from edgewise.runtime.serving.online_store import (  # noqa: E402
    RedisOnlineStore,
    SqliteOnlineStore,
    entity_key,
)
from tests import feast_repo as fr  # noqa: E402
from tests.servers import start_server  # noqa: E402

#: Issue 24's targets: what a lookup may add to a request's p50, one entity (us).
TARGETS_US = {"sqlite": 50.0, "sqlite_cached": 50.0, "redis": 150.0, "redis_unix": 150.0}


def section(repo: Path, store: dict[str, str], cache: bool) -> dict[str, Any]:
    return {
        "registry": str(repo / "data" / "registry.db"),
        "project": fr.PROJECT,
        "online_store": store,
        "feature_service": fr.SERVICE,
        "request_inputs": [fr.REQUEST_INPUT],
        "on_missing": "not_found",
        "cache": {"ttl_seconds": 60 if cache else 0},
        "budget_ms": 1000,  # a shared machine stalls now and then: measured, not refused
    }


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def reads_per_second(store: Any, keys: list[bytes], seconds: float = 1.0) -> float:
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        store.read(fr.VIEW, keys, fr.FEATURES, 1.0)
        done += 1
    return done * len(keys) / (time.perf_counter() - began)


def p50_us(call: Any, rounds: int, gap: float) -> float:
    """The median over ``rounds`` of the p50 of ``call()``, ``gap`` seconds idle before each
    (0: back to back)."""
    p50s = []
    for _ in range(rounds):
        times = []
        for _ in range(300 if gap else 2000):
            if gap:
                time.sleep(gap)
            began = time.perf_counter_ns()
            call()
            times.append(time.perf_counter_ns() - began)
        p50s.append(statistics.median(times) / 1000)
    return statistics.median(p50s)


def emit_parts(database: Path, rounds: int) -> None:
    """``cold_parts``: pieces of a lookup timed apart, back to back and 500 us idle before
    each: SQLite's own statement for one entity's rows (a kept cursor, ``fetchall``, nothing
    decoded), a bare ``SELECT 1``, and the three Prometheus updates a lookup makes (two
    counters, one histogram observation)."""
    from prometheus_client import CollectorRegistry

    from edgewise.runtime.serving.features import FeatureMetrics

    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    cursor = conn.cursor()
    table = f"{fr.PROJECT}_{fr.VIEW}"
    statement = f'SELECT feature_name, value, event_ts FROM "{table}" WHERE entity_key = ?'
    key = [entity_key([fr.ENTITY], [4], [5])]
    metrics = FeatureMetrics(CollectorRegistry())
    lookups, misses = metrics.lookups.labels("m"), metrics.cache_misses.labels("m")
    latency = metrics.latency.labels("m")

    def updates() -> None:
        misses.inc(1)
        lookups.inc(1)
        latency.observe(0.00005)

    parts = {
        "sqlite_statement": lambda: cursor.execute(statement, key).fetchall(),
        "sqlite_select_1": lambda: cursor.execute("SELECT 1").fetchall(),
        "prometheus_updates": updates,
    }
    for name, call in parts.items():
        emit(
            {
                "case": "cold_parts",
                "part": name,
                "p50_us": round(p50_us(call, rounds, 0.0), 2),
                "p50_us_500us_idle": round(p50_us(call, rounds, 0.0005), 2),
            }
        )
    conn.close()


def read_p50_us(store: Any, keys: list[bytes], rounds: int, gap: float) -> float:
    """:func:`p50_us` of one store read of ``keys``."""
    return p50_us(lambda: store.read(fr.VIEW, keys, fr.FEATURES, 1.0), rounds, gap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    emit({"case": "load_average", "when": "start", "load": os.getloadavg()})
    with (
        tempfile.TemporaryDirectory(prefix="feature-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        repo = fr.write_repo(root / "sqlite_repo")
        fr.run_feast(repo, apply=True, materialize_end=fr.NOW.isoformat())
        with sqlite3.connect(repo / "data" / "online_store.db") as conn:  # the deployment step
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        redis_repo = None
        redis_port = None
        if fr.redis_missing() is None:
            redis_port = stack.enter_context(fr.redis_server(root / "redis"))
            redis_repo = fr.write_repo(root / "redis_repo", redis_port=redis_port)
            fr.run_feast(redis_repo, apply=True, materialize_end=fr.NOW.isoformat())
        entities = fr.training_entities()
        X = fr.snapshots().iloc[: len(entities)][list(fr.FEATURES)].copy()
        X.insert(2, fr.REQUEST_INPUT, entities[fr.REQUEST_INPUT].to_numpy())
        model = LinearRegression().fit(X, entities["target"])
        models = root / "models"
        sqlite_store = {"type": "sqlite", "path": str(repo / "data" / "online_store.db")}
        configs: dict[str, dict[str, Any] | None] = {
            "direct": None,
            "sqlite": section(repo, sqlite_store, cache=False),
            "sqlite_cached": section(repo, sqlite_store, cache=True),
        }
        if redis_repo is not None:
            configs["redis"] = section(
                redis_repo,
                {"type": "redis", "connection_string": f"127.0.0.1:{redis_port}"},
                cache=False,
            )
            # The same Redis through its Unix socket (Feast's unix_socket_path parameter).
            unix = f"127.0.0.1:{redis_port},unix_socket_path={fr.redis_socket(root / 'redis')}"
            configs["redis_unix"] = section(
                redis_repo, {"type": "redis", "connection_string": unix}, cache=False
            )
        for name, config in configs.items():
            convert(model, X, name=name, repo=models)
            if config is not None:
                (models / name / "config.json").write_text(json.dumps({"features": config}))
        plain = root / "plain"
        convert(model, X, name="direct", repo=plain)

        # ---- store reads per second, in this process ------------------------------------------
        readers: dict[str, Any] = {
            "sqlite": SqliteOnlineStore(repo / "data" / "online_store.db", fr.PROJECT)
        }
        if redis_port is not None:
            readers["redis"] = RedisOnlineStore("127.0.0.1", redis_port, fr.PROJECT)
            readers["redis_unix"] = RedisOnlineStore(
                "127.0.0.1",
                redis_port,
                fr.PROJECT,
                unix_socket=str(fr.redis_socket(root / "redis")),
            )
        emit_parts(repo / "data" / "online_store.db", args.rounds)
        for store_name, reader in readers.items():
            key = [entity_key([fr.ENTITY], [4], [5])]
            for gap in (0.0, 0.0005):
                emit(
                    {
                        "case": "store_read_latency",
                        "store": store_name,
                        "idle_gap_us": round(gap * 1e6),
                        "p50_us": round(read_p50_us(reader, key, args.rounds, gap), 1),
                    }
                )
            for count in (1, 32):
                keys = [entity_key([fr.ENTITY], [4], [i]) for i in range(count)]
                emit(
                    {
                        "case": "store_reads_per_second",
                        "store": store_name,
                        "entities_per_read": count,
                        "entities_per_second": round(reads_per_second(reader, keys)),
                    }
                )

        # ---- the serving core alone, in this process -----------------------------------------
        core(models, X, list(configs), args.rounds, args.requests * 5, gap=0.0)
        core(models, X, list(configs), args.rounds, args.requests, gap=0.0005)

        # ---- added latency on a served request ----------------------------------------------
        server = start_server(models, root / "server")
        try:
            row = X.iloc[[5]].to_numpy(dtype=np.float32)
            direct = {"features": row}
            looked = {
                fr.ENTITY: np.array([[5]], dtype=np.int64),
                fr.REQUEST_INPUT: row[:, [2]].copy(),
            }
            cases = list(configs)
            p50s: dict[str, list[float]] = {c: [] for c in cases}
            with server.client() as client:
                for case in cases:  # warm up
                    for _ in range(50):
                        client.infer(case, direct if case == "direct" else looked)
                for r in range(args.rounds):
                    order = cases[r % len(cases) :] + cases[: r % len(cases)]
                    for case in order:
                        inputs = direct if case == "direct" else looked
                        times = []
                        for _ in range(args.requests):
                            began = time.perf_counter()
                            client.infer(case, inputs)
                            times.append(time.perf_counter() - began)
                        p50s[case].append(statistics.median(times) * 1e6)
            served: dict[str, float] = {}
            for case in cases:  # the server's own time per request, decode to encode (mean)
                total = metric(
                    server.metrics_url, "edgewise_request_duration_seconds_sum", model=case
                )
                count = metric(
                    server.metrics_url, "edgewise_request_duration_seconds_count", model=case
                )
                served[case] = total / count * 1e6
            for case in cases:
                added = [a - b for a, b in zip(p50s[case], p50s["direct"], strict=True)]
                count = metric(
                    server.metrics_url, "edgewise_feature_lookup_seconds_count", model=case
                )
                total = metric(
                    server.metrics_url, "edgewise_feature_lookup_seconds_sum", model=case
                )
                target = TARGETS_US.get(case)
                emit(
                    {
                        "case": "lookup_added_latency",
                        "model": case,
                        "p50_us": round(statistics.median(p50s[case]), 1),
                        "added_p50_us": round(statistics.median(added), 1),
                        "target_us": target,
                        "ratio_to_target": (
                            round(statistics.median(added) / target, 2) if target else None
                        ),
                        "server_lookup_mean_us": round(total / count * 1e6, 1) if count else None,
                        "server_request_mean_us": round(served[case], 1),
                        "server_added_mean_us": round(served[case] - served["direct"], 1),
                        "rounds": args.rounds,
                        "requests_per_round": args.requests,
                    }
                )
        finally:
            server.stop()

        # ---- a server without lookups -------------------------------------------------------
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
        results: dict[str, dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for label, folder in (("plain", plain), ("with_lookup_model", models))[
                :: 1 if r % 2 else -1
            ]:
                began = time.perf_counter()
                running = _start(folder, root / f"start-{label}-{r}", env)
                with running as srv:
                    seconds = time.perf_counter() - began
                    log = srv.log()
                    entry = results.setdefault(label, {"start_s": [], "rss_mib": [], "imports": []})
                    entry["start_s"].append(seconds)
                    entry["rss_mib"].append(rss_kib(srv.process.pid) / 1024)
                    entry["imports"].append(float("edgewise.runtime.serving.features" in log))
        for label, entry in results.items():
            emit(
                {
                    "case": "plain_server",
                    "server": label,
                    "start_to_serving_s": round(statistics.median(entry["start_s"]), 3),
                    "rss_mib": round(statistics.median(entry["rss_mib"]), 1),
                    "imports_feature_modules": bool(max(entry["imports"])),
                    "rounds": args.rounds,
                }
            )
        emit({"case": "load_average", "when": "end", "load": os.getloadavg()})


def core(models: Path, X: Any, cases: list[str], rounds: int, requests: int, gap: float) -> None:
    """``core_added_latency`` (see the module's docstring), ``gap`` seconds idle before each
    request (0: back to back)."""
    from edgewise.runtime.serving.repository import ModelRepository

    repository = ModelRepository(models, monitor_defaults=MonitorConfig(enabled=False))
    repository.load_all()
    dataplane = DataPlane(repository)
    row = X.iloc[[5]].to_numpy(dtype=np.float32)
    requests_of: dict[str, pb.ModelInferRequest] = {}
    for case in cases:
        request = pb.ModelInferRequest(model_name=case)
        inputs = (
            {"features": row}
            if case == "direct"
            else {fr.ENTITY: np.array([[5]], np.int64), fr.REQUEST_INPUT: row[:, [2]].copy()}
        )
        encode_inputs(request, inputs, raw=True)
        requests_of[case] = request
    p50s: dict[str, list[float]] = {c: [] for c in cases}
    rates: dict[str, list[float]] = {c: [] for c in cases}
    for case in cases:  # warm up: connections opened, caches filled
        for _ in range(200):
            dataplane.prepare(requests_of[case])
    for r in range(rounds):
        for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
            request = requests_of[case]
            times = []
            began = time.perf_counter()
            for _ in range(requests):
                if gap:
                    time.sleep(gap)
                start = time.perf_counter_ns()
                dataplane.prepare(request)
                times.append(time.perf_counter_ns() - start)
            rates[case].append(requests / (time.perf_counter() - began))
            p50s[case].append(statistics.median(times) / 1000)
    for case in cases:
        added = statistics.median(a - b for a, b in zip(p50s[case], p50s["direct"], strict=True))
        target = TARGETS_US.get(case)
        emit(
            {
                "case": "core_added_latency",
                "model": case,
                "idle_gap_us": round(gap * 1e6),
                "p50_us": round(statistics.median(p50s[case]), 1),
                "added_p50_us": round(added, 1),
                "target_us": target,
                "ratio_to_target": round(added / target, 2) if target else None,
                "lookups_per_second": (
                    round(statistics.median(rates[case])) if case != "direct" and not gap else None
                ),
                "rounds": rounds,
                "requests_per_round": requests,
            }
        )
    for case in cases:
        features = repository.get(case).features
        if features is not None:
            features.close()


@contextlib.contextmanager
def _start(folder: Path, workdir: Path, env: dict[str, str]) -> Iterator[Any]:
    server = start_server(folder, workdir, env=env)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    main()
