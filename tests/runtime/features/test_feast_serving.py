"""Feature lookups against a real Feast repository (tests/feast_repo.py): Feast applies and
materializes it (in its own environment, once for the module), a model is trained on its
point-in-time training set, and a real edgewise server answers requests that carry entity keys
only. The oracles are Feast's own reads (``get_online_features``) and onnxruntime on the values
Feast answers; the server never imports Feast."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from edgewise.runtime.client.client import InferResult, ServerError
from edgewise.runtime.convert.converter import convert
from edgewise.runtime.errors import EdgewiseError
from edgewise.runtime.pipeline.spec import parse_spec
from edgewise.runtime.pipeline.steps import load_data
from edgewise.runtime.serving.offline_features import historical_features
from edgewise.runtime.serving.online_store import (
    RedisOnlineStore,
    SqliteOnlineStore,
    entity_key,
    read_registry,
)
from tests import feast_repo as fr
from tests.prerequisites import unmet
from tests.servers import RunningServer, start_server

UNKNOWN = 100_000  # a patient the store does not have


@dataclass
class Setup:
    repo: Path  # the feature repository
    models: Path  # the edgewise model repository
    online: dict[str, list[Any]]  # Feast's get_online_features, old snapshot
    ids: list[int]
    bmi: dict[int, float]
    server: RunningServer
    model: LinearRegression
    X: pd.DataFrame


def _features_section(repo: Path, **extra: Any) -> dict[str, Any]:
    return {
        "registry": str(repo / "data" / "registry.db"),
        "project": fr.PROJECT,
        "online_store": {"type": "sqlite", "path": str(repo / "data" / "online_store.db")},
        "feature_service": fr.SERVICE,
        "request_inputs": [fr.REQUEST_INPUT],
        **extra,
    }


def _configure(models: Path, name: str, section: dict[str, Any] | None) -> None:
    if section is not None:
        (models / name / "config.json").write_text(json.dumps({"features": section}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    reason = fr.feast_missing()
    if reason is not None:
        unmet(reason)
    root = tmp_path_factory.mktemp("feast")
    repo = fr.write_repo(root / "feature_repo")
    entities = fr.training_entities()
    entities.drop(columns=["target"]).to_parquet(root / "entities.parquet")
    ids = [0, 1, 7, 441, UNKNOWN]
    answer = fr.run_feast(
        repo,
        apply=True,
        materialize_end=fr.BETWEEN.isoformat(),
        online_ids=ids,
        historical={"entities": str(root / "entities.parquet"), "out": str(root / "train.parquet")},
    )
    # The deployment step of docs/features.md: the online store in WAL mode (persistent), so that
    # materialization's write transactions never block the server's reads.
    with sqlite3.connect(repo / "data" / "online_store.db") as conn:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    # The model is trained on Feast's point-in-time training set (the old snapshot at BETWEEN).
    train = pd.read_parquet(root / "train.parquet").sort_values(fr.ENTITY)
    target = entities.set_index(fr.ENTITY).loc[train[fr.ENTITY], "target"].to_numpy()
    X = train[list(fr.COLUMNS)].astype(np.float64)
    assert np.allclose(X["age"].to_numpy(), fr.snapshots().iloc[: len(X)]["age"].to_numpy())
    model = LinearRegression().fit(X, target)
    models = root / "models"
    for name in (
        "risk", "risk_default", "risk_nocache", "plain", "risk_badservice", "risk_down",
        "risk_down_default",
    ):  # fmt: skip
        convert(model, X, name=name, repo=models)
    _configure(models, "risk", _features_section(repo, on_missing="not_found"))
    _configure(models, "risk_default", _features_section(repo))
    _configure(
        models, "risk_nocache", _features_section(repo, cache={"ttl_seconds": 0}, budget_ms=2000)
    )
    _configure(models, "risk_badservice", _features_section(repo, feature_service="nope"))
    down = _features_section(repo)
    down["online_store"] = {"type": "sqlite", "path": str(root / "missing.db")}
    _configure(models, "risk_down", down)
    # A store that is down under on_store_error "default" (and on_missing "not_found", which
    # does not apply: the entity was not looked up): the reference profile's means.
    _configure(
        models,
        "risk_down_default",
        {**down, "on_store_error": "default", "on_missing": "not_found"},
    )
    bmi = dict(zip(entities[fr.ENTITY], entities[fr.REQUEST_INPUT], strict=True))
    server = start_server(models, root / "server")
    try:
        yield Setup(repo, models, answer["online"], ids, bmi, server, model, X)
    finally:
        server.stop()


def _request(ids: list[int], bmi: list[float]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        fr.ENTITY: np.array(ids, dtype=np.int64).reshape(-1, 1),
        fr.REQUEST_INPUT: np.array(bmi, dtype=np.float32).reshape(-1, 1),
    }


def _expected(setup: Setup, rows: dict[str, list[Any]], ids: list[int]) -> np.ndarray[Any, Any]:
    """onnxruntime on the values Feast answered (and the request-time input)."""
    index = {int(i): n for n, i in enumerate(rows[fr.ENTITY])}
    X = np.array(
        [
            [setup.bmi[i] if c == fr.REQUEST_INPUT else rows[c][index[i]] for c in fr.COLUMNS]
            for i in ids
        ],
        dtype=np.float32,
    )
    session = ort.InferenceSession(str(setup.models / "plain" / "1" / "model.onnx"))
    return np.asarray(session.run(None, {"features": X})[0])


def _metric(setup: Setup, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(setup.server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_registry_and_sqlite_reads_equal_feasts(setup: Setup) -> None:
    registry = read_registry(setup.repo / "data" / "registry.db", fr.PROJECT)
    assert registry.services[fr.SERVICE] == ((fr.VIEW, fr.FEATURES),)
    view = registry.views[fr.VIEW]
    assert [c.name for c in view.entity_columns] == [fr.ENTITY]
    assert view.ttl_seconds == 2 * 86400
    store = SqliteOnlineStore(setup.repo / "data" / "online_store.db", fr.PROJECT)
    keys = [entity_key([fr.ENTITY], [4], [i]) for i in setup.ids]
    rows = store.read(fr.VIEW, keys, fr.FEATURES, budget=5.0)
    online = setup.online
    for n, row in enumerate(rows):
        if setup.ids[n] == UNKNOWN:
            assert row is None
            assert all(online[f][n] is None for f in fr.FEATURES)
            continue
        assert row is not None
        stamp, values = row
        assert stamp == pytest.approx(fr.T0.timestamp())
        assert values == [online[f][n] for f in fr.FEATURES]


def test_served_with_entity_keys_only(setup: Setup) -> None:
    ids = [0, 1, 7, 441]
    with setup.server.client() as client:
        got = client.infer("risk", _request(ids, [setup.bmi[i] for i in ids]))
        want = _expected(setup, setup.online, ids)
        np.testing.assert_allclose(
            got.outputs["predictions"].reshape(-1), want.reshape(-1), rtol=1e-5
        )
        # Twice more: answered from the cache the second time, the same values.
        again = client.infer("risk", _request(ids, [setup.bmi[i] for i in ids]))
        np.testing.assert_array_equal(again.outputs["predictions"], got.outputs["predictions"])
    assert _metric(setup, "edgewise_feature_cache_hits_total", model="risk") >= len(ids)
    assert _metric(setup, "edgewise_feature_lookups_total", model="risk") >= 2 * len(ids)
    assert _metric(setup, "edgewise_feature_lookup_seconds_count", model="risk") >= 2


def test_model_without_lookups_unaffected(setup: Setup) -> None:
    rows = setup.online
    X = np.array(
        [[setup.bmi[0] if c == fr.REQUEST_INPUT else rows[c][0] for c in fr.COLUMNS]],
        dtype=np.float32,
    )
    with setup.server.client() as client:
        got = client.infer("plain", {"features": X})
        looked_up = client.infer("risk", _request([0], [setup.bmi[0]]))
    np.testing.assert_allclose(
        got.outputs["predictions"], looked_up.outputs["predictions"], rtol=1e-6
    )


def _assert_reference_means(
    setup: Setup, fallback: InferResult, request_input: float = 0.0
) -> None:
    """The answer is the plain model's on the reference profile's means, the request input as
    sent (``request_input``)."""
    means = setup.X.mean().to_numpy(dtype=np.float32).reshape(1, -1)
    means[0, list(fr.COLUMNS).index(fr.REQUEST_INPUT)] = request_input
    session = ort.InferenceSession(str(setup.models / "plain" / "1" / "model.onnx"))
    np.testing.assert_allclose(
        fallback.outputs["predictions"].reshape(-1),
        np.asarray(session.run(None, {"features": means})[0]).reshape(-1),
        rtol=1e-4,
    )


def test_unknown_entity_per_policy(setup: Setup) -> None:
    with setup.server.client() as client:
        with pytest.raises(ServerError) as caught:
            client.infer("risk", _request([0, UNKNOWN], [0.0, 0.0]))
        assert caught.value.status == grpc.StatusCode.NOT_FOUND
        assert f"patient_id={UNKNOWN}" in caught.value.details
        answered = client.infer("risk_default", _request([UNKNOWN], [0.01]))
        assert client.infer("plain", {"features": np.zeros((1, 10), np.float32)}).outputs
    # on_missing "default": every column the reference profile's mean (bmi as sent).
    _assert_reference_means(setup, answered, request_input=0.01)
    assert (
        _metric(setup, "edgewise_feature_lookup_errors_total", model="risk", reason="not_found")
        >= 1
    )
    assert (
        _metric(setup, "edgewise_feature_skew_total", model="risk_default", reason="missing") >= 9
    )


def test_bad_requests_name_the_input(setup: Setup) -> None:
    with setup.server.client() as client:
        with pytest.raises(ServerError) as caught:
            client.infer("risk", {fr.ENTITY: np.array([[0]], dtype=np.int64)})
        assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "'bmi'" in caught.value.details
        with pytest.raises(ServerError) as caught:
            client.infer(
                "risk",
                {
                    fr.ENTITY: np.array([[0.5]], dtype=np.float32),
                    "bmi": np.zeros((1, 1), np.float32),
                },
            )
        assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "entity key 'patient_id'" in caught.value.details


def test_unknown_feature_service_fails_the_load(setup: Setup) -> None:
    with setup.server.client() as client:
        with pytest.raises(ServerError) as caught:
            client.infer("risk_badservice", _request([0], [0.0]))
        assert caught.value.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
        states = {s.name: s for s in client.repository_index()}
        assert client.infer("plain", {"features": np.zeros((1, 10), np.float32)}).outputs
    state = states["risk_badservice"]
    assert "feature service 'nope' is not in the registry" in state.reason
    assert "diabetes_v1" in state.reason
    assert (
        _metric(setup, "edgewise_model_events_total", model="risk_badservice", event="load_failed")
        >= 1
    )


def test_store_down_is_unavailable_and_counted(setup: Setup) -> None:
    with setup.server.client() as client:
        with pytest.raises(ServerError) as caught:
            client.infer("risk_down", _request([0], [0.0]))
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE
        assert "feature lookup failed" in caught.value.details
        assert client.infer("plain", {"features": np.zeros((1, 10), np.float32)}).outputs
        fallback = client.infer("risk_down_default", _request([0], [0.0]))
        _assert_reference_means(setup, fallback)
    assert (
        _metric(
            setup, "edgewise_feature_lookup_errors_total", model="risk_down", reason="store_error"
        )
        >= 1
    )


class _SilentStore:
    """A store that accepts connections and never answers (a socket that reads nothing) on
    127.0.0.1 at ``port``; ``connected`` is released once per connection accepted."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port: int = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.connected = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return
            self.connected.release()

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_slow_store_per_policy_and_counted(setup: Setup, tmp_path: Path) -> None:
    """A store that accepts the connection and never answers (a socket that reads nothing):
    the lookup gives up at its budget, UNAVAILABLE naming the budget under on_store_error
    "unavailable", the reference profile's means under "default"; counted as slow; a model
    without lookups is answered meanwhile."""
    store = _SilentStore()
    stuck = {"type": "redis", "connection_string": f"127.0.0.1:{store.port}"}
    try:
        for name, policy in (("risk_slow", "unavailable"), ("risk_slow_default", "default")):
            convert(setup.model, setup.X, name=name, repo=setup.models)
            section = _features_section(
                setup.repo, cache={"ttl_seconds": 0}, budget_ms=100, on_store_error=policy
            )
            _configure(setup.models, name, {**section, "online_store": stuck})
        with setup.server.client() as client:
            client.load_model("risk_slow")
            client.load_model("risk_slow_default")
            began = time.monotonic()
            with pytest.raises(ServerError) as caught:
                client.infer("risk_slow", _request([0], [0.0]))
            assert time.monotonic() - began >= 0.08
            assert caught.value.status == grpc.StatusCode.UNAVAILABLE
            assert "over the" in caught.value.details and "ms budget" in caught.value.details
            assert client.infer("plain", {"features": np.zeros((1, 10), np.float32)}).outputs
            fallback = client.infer("risk_slow_default", _request([0], [0.0]))
        _assert_reference_means(setup, fallback)
        for name in ("risk_slow", "risk_slow_default"):
            assert (
                _metric(setup, "edgewise_feature_lookup_errors_total", model=name, reason="slow")
                >= 1
            )
    finally:
        store.close()


@pytest.mark.parametrize("front_end", ["grpcio", "native"])
def test_slow_store_holds_up_no_other_model(setup: Setup, tmp_path: Path, front_end: str) -> None:
    """Models without lookups are answered while a lookup waits on a store that does not
    answer: once one such call has taken its budget, the next ones run beside other calls
    (the serving core's and the native front end's moving averages of a call's time), so a
    plain call sent while a lookup call waits is answered before it."""
    if front_end == "native":
        from edgewise.runtime.frontends.native.binding import load_front

        module, reason = load_front()
        if module is None:
            unmet(f"the native front end is not available: {reason}")
    store = _SilentStore()
    models = tmp_path / "models"
    convert(setup.model, setup.X, name="plain", repo=models)
    convert(setup.model, setup.X, name="stuck", repo=models)
    section = _features_section(setup.repo, cache={"ttl_seconds": 0}, budget_ms=300)
    section["online_store"] = {"type": "redis", "connection_string": f"127.0.0.1:{store.port}"}
    _configure(models, "stuck", section)
    server = start_server(models, tmp_path / "server", extra_args=["--front-end", front_end])
    finished: dict[str, float] = {}

    def stuck_call() -> None:
        with server.client() as client, pytest.raises(ServerError):
            client.infer("stuck", _request([0], [0.0]))
        finished["stuck"] = time.monotonic()

    try:
        with server.client() as client:
            client.infer("plain", {"features": np.zeros((1, 10), np.float32)})
            with pytest.raises(ServerError) as caught:  # the first: its budget, in full
                client.infer("stuck", _request([0], [0.0]))
            assert caught.value.status == grpc.StatusCode.UNAVAILABLE
            assert store.connected.acquire(timeout=30)
            waiting = threading.Thread(target=stuck_call)
            waiting.start()
            assert store.connected.acquire(timeout=30)  # the second lookup waits on the store now
            client.infer("plain", {"features": np.zeros((1, 10), np.float32)})
            finished["plain"] = time.monotonic()
            waiting.join(timeout=60)
        assert finished["plain"] < finished["stuck"]
    finally:
        server.stop()
        store.close()


def test_redis_reads_equal_feasts_and_serve(setup: Setup, tmp_path: Path) -> None:
    """The same repository with Redis as its online store: the reader's values equal Feast's
    get_online_features, and a model served from it answers as from SQLite."""
    reason = fr.redis_missing()
    if reason is not None:
        unmet(reason)
    with fr.redis_server(tmp_path / "redis") as port:
        repo = fr.write_repo(tmp_path / "redis_repo", redis_port=port)
        answer = fr.run_feast(
            repo, apply=True, materialize_end=fr.BETWEEN.isoformat(), online_ids=setup.ids
        )
        online = answer["online"]
        store = RedisOnlineStore.from_connection_string(f"127.0.0.1:{port}", fr.PROJECT)
        keys = [entity_key([fr.ENTITY], [4], [i]) for i in setup.ids]
        rows = store.read(fr.VIEW, keys, fr.FEATURES, budget=5.0)
        store.close()
        for n, row in enumerate(rows):
            if setup.ids[n] == UNKNOWN:
                assert row is None
                continue
            assert row is not None
            assert row[0] == pytest.approx(fr.T0.timestamp())
            assert row[1] == [online[f][n] for f in fr.FEATURES]
        convert(setup.model, setup.X, name="risk_redis", repo=setup.models)
        section = _features_section(repo, on_missing="not_found")
        section["online_store"] = {"type": "redis", "connection_string": f"127.0.0.1:{port}"}
        _configure(setup.models, "risk_redis", section)
        ids = [0, 1, 7, 441]
        with setup.server.client() as client:
            client.load_model("risk_redis")
            got = client.infer("risk_redis", _request(ids, [setup.bmi[i] for i in ids]))
            with pytest.raises(ServerError) as caught:
                client.infer("risk_redis", _request([UNKNOWN], [0.0]))
            assert caught.value.status == grpc.StatusCode.NOT_FOUND
        np.testing.assert_allclose(
            got.outputs["predictions"].reshape(-1),
            _expected(setup, online, ids).reshape(-1),
            rtol=1e-5,
        )
    # Redis gone: the lookup is UNAVAILABLE (store_error), counted; the server carries on.
    with setup.server.client() as client:
        with pytest.raises(ServerError) as caught:
            client.infer("risk_redis", _request([2], [0.0]))
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE
    assert (
        _metric(
            setup, "edgewise_feature_lookup_errors_total", model="risk_redis", reason="store_error"
        )
        >= 1
    )


def test_offline_join_equals_feasts_historical_features(setup: Setup, tmp_path: Path) -> None:
    """historical_features (no Feast) against Feast's get_historical_features on entity rows
    before the first snapshot, between, after the second, and past the view's TTL."""
    moments = [
        fr.T0 - timedelta(hours=1),  # before any value: null
        fr.T0,  # exactly at the old snapshot
        fr.BETWEEN,
        fr.T1 + timedelta(minutes=5),
        fr.T1 + timedelta(days=3),  # older than the 2-day TTL: null
    ]
    rows = pd.DataFrame(
        [(i, pd.Timestamp(m)) for i in (0, 3, 441, UNKNOWN) for m in moments],
        columns=[fr.ENTITY, "event_timestamp"],
    )
    rows["extra"] = range(len(rows))
    rows.to_parquet(tmp_path / "rows.parquet")
    fr.run_feast(
        setup.repo,
        historical={"entities": str(tmp_path / "rows.parquet"), "out": str(tmp_path / "f.parquet")},
    )
    feast = pd.read_parquet(tmp_path / "f.parquet").sort_values("extra").reset_index(drop=True)
    ours = historical_features(
        rows, setup.repo / "data" / "registry.db", fr.PROJECT, feature_service=fr.SERVICE
    )
    assert list(ours["extra"]) == list(rows["extra"])  # the entity rows' order is kept
    # Feast's file offline store leaves out the rows of a known entity with no value in the TTL
    # window (an unknown entity's rows stay, null); historical_features keeps every row, null.
    kept = ours.set_index("extra").loc[feast["extra"]]
    dropped = ours[~ours["extra"].isin(feast["extra"])]
    assert len(dropped) == 6 and dropped[list(fr.FEATURES)].isna().all().all()
    for name in fr.FEATURES:
        np.testing.assert_allclose(
            kept[name].to_numpy(dtype=float), feast[name].to_numpy(dtype=float), equal_nan=True
        )
    assert ours[fr.FEATURES[0]].isna().sum() == 3 * 2 + 5  # before, past the TTL; unknown
    with pytest.raises(ValueError, match="feature service 'nope'"):
        historical_features(
            rows, setup.repo / "data" / "registry.db", fr.PROJECT, feature_service="nope"
        )


def test_pipeline_data_step_from_a_feature_service(setup: Setup, tmp_path: Path) -> None:
    """[data] feature_service: the training rows are the service's values joined point in time
    (the same as Feast's training set the fixture trained on), and the run's lineage names the
    service and its version; join keys and timestamps are not features."""
    fr.training_entities().to_parquet(tmp_path / "entities.parquet")
    document = {
        "model": "risk",
        "data": {
            "feature_service": {
                "registry": str(setup.repo / "data" / "registry.db"),
                "project": fr.PROJECT,
                "service": fr.SERVICE,
                "entities": "entities.parquet",
            },
            "label": "target",
        },
        "train": {"command": ["true"]},
        "convert": {},
        "evaluate": {},
        "register": {},
    }
    spec = parse_spec(document, source=str(tmp_path / "pipeline.toml"))
    assert spec.data.feature_service is not None
    data, origin = load_data(spec.data, run_dir=tmp_path / "run")
    assert origin["source"] == "feature_service"
    assert origin["feature_service"] == fr.SERVICE and origin["feature_service_version"]
    assert set(data.features) == set(fr.COLUMNS)
    frame = pd.concat([data.train, data.holdout]).sort_values(fr.ENTITY)
    np.testing.assert_allclose(
        frame[list(fr.COLUMNS)].to_numpy(dtype=float), setup.X.to_numpy(dtype=float)
    )
    both = {**document["data"], "path": "x.parquet"}
    with pytest.raises(EdgewiseError, match="one of them"):
        parse_spec({**document, "data": both}, source=str(tmp_path / "pipeline.toml"))


def test_materialization_while_serving(setup: Setup) -> None:
    """``feast materialize-incremental`` loads the new snapshot while the server answers:
    every request is answered, first with old values, then with new ones."""
    ids = [0, 1, 7]
    old = _expected(setup, setup.online, ids).reshape(-1)
    new_rows = {k: list(v) for k, v in setup.online.items()}
    for f in fr.FEATURES:
        new_rows[f] = [None if v is None else v + 1.0 for v in new_rows[f]]
    new = _expected(setup, new_rows, ids).reshape(-1)
    assert not np.allclose(old, new)
    seen: list[str] = []
    with setup.server.client() as client:
        process = fr.feast_command(setup.repo, "materialize-incremental", fr.NOW.isoformat())
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            got = client.infer("risk_nocache", _request(ids, [setup.bmi[i] for i in ids]))
            values = got.outputs["predictions"].reshape(-1)
            if np.allclose(values, old, rtol=1e-5):
                seen.append("old")
            elif np.allclose(values, new, rtol=1e-5):
                seen.append("new")
            else:
                seen.append("mixed")
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output
        final = client.infer("risk_nocache", _request(ids, [setup.bmi[i] for i in ids]))
    np.testing.assert_allclose(final.outputs["predictions"].reshape(-1), new, rtol=1e-5)
    assert seen and seen[0] == "old"
    # Old never comes back once new has been answered (one transaction per view and batch).
    if "new" in seen:
        assert "old" not in seen[seen.index("new") :]
    # Rows switch per write transaction of Feast's (one per batch of entities): a request may
    # see some rows new and others old while it runs, never a value that is neither.
