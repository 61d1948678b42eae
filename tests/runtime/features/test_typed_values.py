"""Values of every scalar and list type Feast writes, read without Feast from its SQLite and
Redis online stores, equal Feast's own ``get_online_features`` (Feast 0.67 in its own
environment, tests/feast_repo.py): the readers' decoding of ``feast.types.Value`` (the fast
paths for rows of doubles or floats, and the general one), the mapping of the features asked
for (any subset, any order) onto what the store holds, and an entity the store does not have."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgewise.runtime.serving.online_store import (
    RedisOnlineStore,
    SqliteOnlineStore,
    StoredRow,
    entity_key,
    read_registry,
)
from tests import feast_repo as fr
from tests.prerequisites import unmet

VIEW = "typed"
IDS = [0, 1, 2, 3, 4]
UNKNOWN = 99
DEFINITIONS = """
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, Float64, Int32, Int64, String

patient = Entity(name="patient", join_keys=["patient_id"], value_type=ValueType.INT64)
source = FileSource(name="typed", path={path!r}, timestamp_field="event_timestamp")
typed = FeatureView(
    name="typed",
    entities=[patient],
    ttl=timedelta(days=2),
    schema=[
        Field(name="f64", dtype=Float64),
        Field(name="f32", dtype=Float32),
        Field(name="i64", dtype=Int64),
        Field(name="i32", dtype=Int32),
        Field(name="flag", dtype=Bool),
        Field(name="word", dtype=String),
        Field(name="color", dtype=String),
        Field(name="f64s", dtype=Array(Float64)),
        Field(name="f32s", dtype=Array(Float32)),
        Field(name="i64s", dtype=Array(Int64)),
        Field(name="i32s", dtype=Array(Int32)),
        Field(name="words", dtype=Array(String)),
        Field(name="flags", dtype=Array(Bool)),
        Field(name="emb", dtype=Array(Float32)),
    ],
    source=source,
)
# Two of the same columns with a one-hour TTL: the values (three hours old) are stale.
short = FeatureView(
    name="typed_short",
    entities=[patient],
    ttl=timedelta(hours=1),
    schema=[Field(name="f32", dtype=Float32), Field(name="i32", dtype=Int32)],
    source=source,
)
service = FeatureService(name="diabetes_v1", features=[typed])
OBJECTS = [patient, typed, short, service]
"""
FEATURES = ("f64", "f32", "i64", "i32", "flag", "word", "color", "f64s", "f32s", "i64s", "i32s",
            "words", "flags", "emb")  # fmt: skip
#: A list feature a model takes as three columns emb[0] .. emb[2]: entity 3's has two items
#: (another length: the columns' defaults), entity 4 has none (null: the defaults).
EMB = [[0.5, 1.0, -1.0], [2.0, 0.0, 1.5], [1.0, 1.0, 1.0], [0.25, -0.5], None]


def _table() -> pa.Table:
    n = len(IDS)
    return pa.table(
        {
            "patient_id": pa.array(IDS, pa.int64()),
            "event_timestamp": pa.array([pd.Timestamp(fr.T0)] * n, pa.timestamp("us", "UTC")),
            "f64": pa.array([1.5, -2.25, 1e300, 0.0, 1 / 3], pa.float64()),
            "f32": pa.array([0.1, -3.5, 2.0, 1e-3, 7.0], pa.float32()),
            "i64": pa.array([0, -1, 2**40, -(2**62), 5], pa.int64()),
            "i32": pa.array([0, -1, 2**31 - 1, -(2**31), 7], pa.int32()),
            "flag": pa.array([True, False, True, False, True]),
            "word": pa.array(["a", "", "héllo", None, "x,y\x1f"], pa.string()),
            "color": pa.array(["red", "blue", "red", None, "green"], pa.string()),
            "f64s": pa.array([[1.0, 2.5], [], [-0.5], [1e-300], [3.0, 4.0, 5.0]]),
            "f32s": pa.array([[0.1], [], [2.0, -1.0], [3.5], [0.0]], pa.list_(pa.float32())),
            "i64s": pa.array([[1, -2], [], [2**40], [0], [-5]], pa.list_(pa.int64())),
            "i32s": pa.array([[1, -2], [], [2**31 - 1], [0], [-(2**31)]], pa.list_(pa.int32())),
            "words": pa.array([["a", "b"], [], ["é"], ["x"], ["y", "z"]]),
            "flags": pa.array([[True], [], [False, True], [False], [True, True]]),
            "emb": pa.array(EMB, pa.list_(pa.float32())),
        }
    )


def _write_repo(folder: Path, redis_port: int | None = None) -> Path:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(), data / "typed.parquet")
    (folder / "definitions.py").write_text(DEFINITIONS.format(path=str(data / "typed.parquet")))
    if redis_port is None:
        online = "  type: sqlite\n  path: data/online_store.db\n"
    else:
        online = f'  type: redis\n  connection_string: "127.0.0.1:{redis_port}"\n'
    (folder / "feature_store.yaml").write_text(
        f"project: {fr.PROJECT}\nregistry: data/registry.db\nprovider: local\n"
        f"online_store:\n{online}offline_store:\n  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    return folder


def _feast_rows(folder: Path) -> dict[str, list[Any]]:
    """Feast applies and materializes the repository; its get_online_features of IDS + UNKNOWN."""
    answer = fr.run_feast(
        folder, apply=True, materialize_end=fr.NOW.isoformat(), online_ids=[*IDS, UNKNOWN]
    )
    online: dict[str, list[Any]] = answer["online"]
    return online


def _check(rows: list[StoredRow], online: dict[str, list[Any]], features: tuple[str, ...]) -> None:
    assert len(rows) == len(IDS) + 1
    for n, row in enumerate(rows):
        if n == len(IDS):  # UNKNOWN
            assert row is None
            assert all(online[f][n] is None for f in features)
            continue
        assert row is not None
        stamp, values = row
        assert stamp == pytest.approx(fr.T0.timestamp())
        for name, value in zip(features, values, strict=True):
            want = online[name][n]
            assert value == want, (name, IDS[n], value, want)
            assert type(value) is type(want), (name, IDS[n], value, want)


@pytest.fixture(scope="module")
def feast_ready() -> None:
    reason = fr.feast_missing()
    if reason is not None:
        unmet(reason)


@pytest.fixture(scope="module")
def sqlite_repo(feast_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = _write_repo(tmp_path_factory.mktemp("typed") / "repo")
    yield folder, _feast_rows(folder)


def _keys() -> list[bytes]:
    return [entity_key([fr.ENTITY], [4], [i]) for i in [*IDS, UNKNOWN]]


def test_registry_has_the_types(sqlite_repo: Any) -> None:
    folder, _ = sqlite_repo
    view = read_registry(folder / "data" / "registry.db", fr.PROJECT).views[VIEW]
    kinds = {f.name: f.value_type for f in view.features}
    # feast.types.ValueType: DOUBLE 5, FLOAT 6, INT64 4, INT32 3, BOOL 7, STRING 2, lists +10
    assert kinds == {"f64": 5, "f32": 6, "i64": 4, "i32": 3, "flag": 7, "word": 2, "color": 2,
                     "f64s": 15, "f32s": 16, "i64s": 14, "i32s": 13, "words": 12,
                     "flags": 17, "emb": 16}  # fmt: skip


def test_sqlite_values_equal_feasts(sqlite_repo: Any) -> None:
    folder, online = sqlite_repo
    store = SqliteOnlineStore(folder / "data" / "online_store.db", fr.PROJECT)
    try:
        _check(store.read(VIEW, _keys(), FEATURES, 5.0), online, FEATURES)
        # A subset in another order, one entity at a time and all at once; then the
        # all-doubles fast path (one feature) and the all-floats one.
        subset = ("word", "i64s", "f64", "flags")
        _check(store.read(VIEW, _keys(), subset, 5.0), online, subset)
        one = [store.read(VIEW, [key], subset, 5.0)[0] for key in _keys()]
        _check(one, online, subset)
        for single in (("f64",), ("f32",), ("f64s",)):
            _check(store.read(VIEW, _keys(), single, 5.0), online, single)
    finally:
        store.close()


def test_redis_values_equal_feasts(feast_ready: None, tmp_path: Path) -> None:
    reason = fr.redis_missing()
    if reason is not None:
        unmet(reason)
    with fr.redis_server(tmp_path / "redis") as port:
        folder = _write_repo(tmp_path / "repo", redis_port=port)
        online = _feast_rows(folder)
        store = RedisOnlineStore("127.0.0.1", port, fr.PROJECT)
        try:
            _check(store.read(VIEW, _keys(), FEATURES, 5.0), online, FEATURES)
            subset = ("word", "i64s", "f64", "flags")
            _check(store.read(VIEW, _keys(), subset, 5.0), online, subset)
            for single in (("f64",), ("f32",), ("f64s",)):
                _check(store.read(VIEW, _keys(), single, 5.0), online, single)
        finally:
            store.close()


def test_categorical_feature_served_from_the_store(sqlite_repo: Any) -> None:
    """A model with a categorical column (its own BYTES [batch, 1] input) beside numeric ones,
    trained on the repository's values: served with entity keys only, it answers as onnxruntime
    does on Feast's values; an entity without a value of the categorical feature gets the
    column's most frequent training category (on_missing "default"), counted as skew."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    from edgewise.runtime.convert.converter import convert
    from tests.servers import start_server

    folder, online = sqlite_repo
    trained = [0, 1, 2, 4]  # entity 3 has no color
    X = pd.DataFrame(
        {
            "f32": [online["f32"][IDS.index(i)] for i in trained],
            "i32": [float(online["i32"][IDS.index(i)]) for i in trained],
            "color": [online["color"][IDS.index(i)] for i in trained],
        }
    )
    model = make_pipeline(
        ColumnTransformer(
            [
                ("num", "passthrough", ["f32", "i32"]),
                ("cat", OneHotEncoder(handle_unknown="ignore"), ["color"]),
            ]
        ),
        LinearRegression(),
    ).fit(X, [1.0, 2.0, 3.0, 4.0])
    models = folder.parent / "models"
    convert(model, X, name="colors", repo=models)
    section = {
        "registry": str(folder / "data" / "registry.db"),
        "project": fr.PROJECT,
        "online_store": {"type": "sqlite", "path": str(folder / "data" / "online_store.db")},
        "features": [f"{VIEW}:f32", f"{VIEW}:i32", f"{VIEW}:color"],
        "cache": {"ttl_seconds": 0},
    }
    (models / "colors" / "config.json").write_text(json.dumps({"features": section}))
    session = ort.InferenceSession(str(models / "colors" / "1" / "model.onnx"))
    names = {i.name: i for i in session.get_inputs()}
    assert names["color"].type == "tensor(string)"
    numeric = next(n for n in names if n != "color")
    colors = [online["color"][IDS.index(i)] or "red" for i in IDS]  # "red": the most frequent
    want = session.run(
        None,
        {
            numeric: np.array(
                [[online["f32"][n], online["i32"][n]] for n in range(len(IDS))], np.float32
            ),
            "color": np.array(colors, dtype=object).reshape(-1, 1),
        },
    )[0]
    server = start_server(models, folder.parent / "server")
    try:
        with server.client() as client:
            got = client.infer("colors", {fr.ENTITY: np.array(IDS, np.int64).reshape(-1, 1)})
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    finally:
        server.stop()
    np.testing.assert_allclose(
        got.outputs["predictions"].reshape(-1), np.asarray(want).reshape(-1), rtol=1e-6
    )
    skew = [
        line
        for line in text.splitlines()
        if line.startswith("edgewise_feature_skew_total{") and 'model="colors"' in line
    ]
    assert any('reason="missing"' in line and line.endswith(" 1.0") for line in skew), skew


def test_list_feature_fills_the_models_columns(sqlite_repo: Any) -> None:
    """A list feature fills the model's numeric columns emb[0] .. emb[2] (item i of each
    entity's list): served with entity keys only, the model answers as onnxruntime does on
    Feast's values; a list of another length, or none, takes the columns' defaults (the
    reference profile's means), counted as skew (length, missing). A list feature a numeric
    column cannot take (a list of strings; a column named like the list itself) fails the
    version's load with one line naming the feature."""
    from sklearn.linear_model import LinearRegression

    from edgewise.runtime.convert.converter import convert
    from tests.servers import start_server

    folder, online = sqlite_repo
    assert online["emb"][: len(IDS)] == EMB  # exact in float32
    rng = np.random.default_rng(7)
    X = pd.DataFrame(rng.normal(size=(12, 4)), columns=["f32", "emb[0]", "emb[1]", "emb[2]"])
    y = rng.normal(size=12)
    models = folder.parent / "list_models"
    base = {
        "registry": str(folder / "data" / "registry.db"),
        "project": fr.PROJECT,
        "online_store": {"type": "sqlite", "path": str(folder / "data" / "online_store.db")},
        "cache": {"ttl_seconds": 0},
    }
    sections = {
        "embedded": {**base, "features": [f"{VIEW}:f32", f"{VIEW}:emb"]},
        "strings": {**base, "features": [f"{VIEW}:f32", f"{VIEW}:words"]},
        "whole": {**base, "features": [f"{VIEW}:f32", f"{VIEW}:f64s"]},
    }
    columns = {
        "embedded": list(X.columns),
        "strings": ["f32", "words[0]", "words[1]", "words[2]"],
        "whole": ["f32", "f64s", "x", "y"],
    }
    for name, section in sections.items():
        frame = X.set_axis(columns[name], axis=1)
        convert(LinearRegression().fit(frame, y), frame, name=name, repo=models)
        (models / name / "config.json").write_text(json.dumps({"features": section}))
    means = X.mean().to_numpy()
    rows = []
    for n in range(len(IDS)):
        emb = online["emb"][n]
        items = emb if emb is not None and len(emb) == 3 else list(means[1:])
        rows.append([online["f32"][n], *items])
    session = ort.InferenceSession(str(models / "embedded" / "1" / "model.onnx"))
    want = session.run(None, {"features": np.array(rows, np.float32)})[0]
    server = start_server(models, folder.parent / "list_server")
    try:
        with server.client() as client:
            got = client.infer("embedded", {fr.ENTITY: np.array(IDS, np.int64).reshape(-1, 1)})
            states = {s.name: s for s in client.repository_index()}
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    finally:
        server.stop()
    np.testing.assert_allclose(
        got.outputs["predictions"].reshape(-1), np.asarray(want).reshape(-1), rtol=1e-5
    )
    skew = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgewise_feature_skew_total{") and 'model="embedded"' in line
    }
    assert skew.get("length") == 3.0 and skew.get("missing") == 3.0, skew
    reason = states["strings"].reason
    assert "feature typed:words is a list (STRING_LIST)" in reason and "\n" not in reason
    assert "only lists of numbers" in reason
    reason = states["whole"].reason
    assert "feature typed:f64s is a list (DOUBLE_LIST)" in reason and "f64s[0]" in reason


def test_stale_values_per_policy(sqlite_repo: Any) -> None:
    """Values older than their feature view's TTL (typed_short: one hour; the values are three
    hours old, loaded by ``feast materialize START END``, which does not filter by TTL): served
    as they are under on_stale "serve" (as Feast's reads do, marked OUTSIDE_MAX_AGE), the
    reference profile's means under "default", NOT_FOUND naming the entity under "not_found";
    each stale value counted as skew (reason stale)."""
    from datetime import timedelta

    from sklearn.linear_model import LinearRegression

    from edgewise.runtime.client.client import ServerError
    from edgewise.runtime.convert.converter import convert
    from tests.servers import start_server

    folder, online = sqlite_repo
    start = (fr.T0 - timedelta(hours=1)).isoformat()
    process = fr.feast_command(folder, "materialize", start, fr.NOW.isoformat())
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(12, 2)), columns=["f32", "i32"])
    model = LinearRegression().fit(X, rng.normal(size=12))
    models = folder.parent / "stale_models"
    for policy in ("serve", "default", "not_found"):
        convert(model, X, name=policy, repo=models)
        section = {
            "registry": str(folder / "data" / "registry.db"),
            "project": fr.PROJECT,
            "online_store": {"type": "sqlite", "path": str(folder / "data" / "online_store.db")},
            "features": ["typed_short:f32", "typed_short:i32"],
            "cache": {"ttl_seconds": 0},
            "on_stale": policy,
        }
        (models / policy / "config.json").write_text(json.dumps({"features": section}))
    session = ort.InferenceSession(str(models / "serve" / "1" / "model.onnx"))
    stored = np.array([[online["f32"][n], online["i32"][n]] for n in range(len(IDS))], np.float32)
    means = np.repeat(X.mean().to_numpy(np.float32).reshape(1, -1), len(IDS), axis=0)
    keys = {fr.ENTITY: np.array(IDS, np.int64).reshape(-1, 1)}
    server = start_server(models, folder.parent / "stale_server")
    try:
        with server.client() as client:
            served = client.infer("serve", keys)
            defaulted = client.infer("default", keys)
            with pytest.raises(ServerError) as caught:
                client.infer("not_found", keys)
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    finally:
        server.stop()
    for got, rows in ((served, stored), (defaulted, means)):
        np.testing.assert_allclose(
            got.outputs["predictions"].reshape(-1),
            np.asarray(session.run(None, {"features": rows})[0]).reshape(-1),
            rtol=1e-5,
        )
    assert caught.value.status.name == "NOT_FOUND"
    assert "patient_id=0" in caught.value.details and "only stale values" in caught.value.details
    stale = {
        line.split('model="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgewise_feature_skew_total{") and 'reason="stale"' in line
    }
    assert stale.get("serve") == stale.get("default") == 2.0 * len(IDS), stale
