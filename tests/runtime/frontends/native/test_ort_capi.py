"""The C API session (runtime/frontends/native/ort_capi.py, _ort.cc) against onnxruntime's own
Python InferenceSession on the suite's real models: same outputs, clear errors for feeds that do
not fit, and onnxruntime runs without the GIL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgewise.runtime.errors import InvalidInput, ModelLoadError
from edgewise.runtime.frontends.native.ort_capi import CapiSession, load_ort
from edgewise.runtime.package.manifest import MODEL_FILE, parse_manifest, read_manifest_bytes
from edgewise.runtime.package.schema import frame_to_inputs, onnxruntime_inputs
from edgewise.runtime.serving.model import SessionSettings, load_model
from tests.models import MODEL_NAMES, TRAINERS
from tests.prerequisites import unmet

SETTINGS = SessionSettings()


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    module, reason = load_ort()
    if module is None:
        unmet(reason)


def _folder(repo: Path, name: str) -> Path:
    return repo / name / "1"


def _sessions(repo: Path, name: str) -> tuple[CapiSession, ort.InferenceSession]:
    content = (_folder(repo, name) / MODEL_FILE).read_bytes()
    python = ort.InferenceSession(
        content, sess_options=SETTINGS.session_options(), providers=["CPUExecutionProvider"]
    )
    return CapiSession(content, SETTINGS, name), python


def _feeds(repo: Path, name: str, rows: int | None = None) -> dict[str, np.ndarray[Any, Any]]:
    """The model's V2 inputs (float32 features, ``bytes`` object arrays for categoricals) for
    its training data."""
    folder = _folder(repo, name)
    manifest = parse_manifest(read_manifest_bytes(folder), str(folder))
    _, X, _ = TRAINERS[name]()
    return frame_to_inputs(manifest, X if rows is None else X.iloc[:rows])


def _same(capi: dict[str, np.ndarray[Any, Any]], python: dict[str, np.ndarray[Any, Any]]) -> None:
    assert capi.keys() == python.keys()
    for key, want in python.items():
        got = capi[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("rows", [1, 32, None])
def test_outputs_match_onnxruntimes_python_session(
    model_repo: Path, name: str, rows: int | None
) -> None:
    capi, python = _sessions(model_repo, name)
    feeds = _feeds(model_repo, name, rows)
    names = [o.name for o in python.get_outputs()]
    want = dict(zip(names, python.run(names, onnxruntime_inputs(feeds)), strict=True))
    got = capi.run(feeds)  # string inputs as bytes, as V2 requests carry them
    _same(got, want)
    if "label" in want:  # a classifier: the labels the probabilities say
        np.testing.assert_array_equal(got["label"], want["label"])
        assert (got["label"] == got["probabilities"].argmax(axis=1)).mean() > 0.99


def test_session_describes_inputs_and_outputs_as_onnxruntime_does(model_repo: Path) -> None:
    capi, python = _sessions(model_repo, "mixed")
    assert [i[0] for i in capi.inputs] == [i.name for i in python.get_inputs()]
    assert [o[0] for o in capi.outputs] == [o.name for o in python.get_outputs()]
    kinds = {i[0]: i[1] for i in capi.inputs}
    assert kinds == {"features": "float32", "alcohol_level": "string", "color_band": "string"}
    assert dict((i[0], i[2]) for i in capi.inputs)["features"] == (-1, 13)


def test_one_output_asked_for(model_repo: Path) -> None:
    capi, python = _sessions(model_repo, "forest")
    feeds = _feeds(model_repo, "forest", 5)
    got = capi.run(feeds, ["probabilities"])
    assert list(got) == ["probabilities"]
    np.testing.assert_allclose(got["probabilities"], python.run(["probabilities"], feeds)[0])


def test_a_strided_array_is_read_as_its_values(model_repo: Path) -> None:
    capi, python = _sessions(model_repo, "logreg")
    features = np.asfortranarray(_feeds(model_repo, "logreg")["features"][::3])
    assert not features.flags.c_contiguous
    want = python.run(None, {"features": np.ascontiguousarray(features)})
    got = capi.run({"features": features})
    np.testing.assert_allclose(got["probabilities"], want[1], rtol=1e-6)


def _refusal(capi: CapiSession, feeds: dict[str, Any], *words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        capi.run(feeds)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_wrong_dtype_names_the_input(model_repo: Path) -> None:
    capi, _ = _sessions(model_repo, "logreg")
    features = _feeds(model_repo, "logreg", 4)["features"].astype(np.float64)
    _refusal(capi, {"features": features}, "'features'", "float64", "float32")


def test_wrong_shape_names_the_input(model_repo: Path) -> None:
    capi, _ = _sessions(model_repo, "logreg")
    features = _feeds(model_repo, "logreg", 4)["features"]
    _refusal(capi, {"features": features[:, :29]}, "'features'", "[4, 29]", "[-1, 30]")
    _refusal(capi, {"features": features[0]}, "'features'", "[30]")


def test_unknown_and_missing_inputs_are_named(model_repo: Path) -> None:
    capi, _ = _sessions(model_repo, "mixed")
    feeds = _feeds(model_repo, "mixed", 3)
    _refusal(capi, {**feeds, "colour": feeds["color_band"]}, "'colour'", "'color_band'")
    del feeds["color_band"]
    _refusal(capi, feeds, "'color_band'", "missing")


def test_a_string_input_holding_numbers_is_named(model_repo: Path) -> None:
    capi, _ = _sessions(model_repo, "mixed")
    feeds = _feeds(model_repo, "mixed", 3)
    feeds["alcohol_level"] = np.array([[1], [2], [3]], dtype=object)
    _refusal(capi, feeds, "'alcohol_level'", "int", "not a string")


def test_not_an_array_and_an_unknown_output_are_named(model_repo: Path) -> None:
    capi, _ = _sessions(model_repo, "logreg")
    _refusal(capi, {"features": [[0.0] * 30]}, "'features'", "list")
    with pytest.raises(InvalidInput, match="'scores'"):
        capi.run(_feeds(model_repo, "logreg", 1), ["scores"])


def test_a_run_onnxruntime_refuses_is_the_python_sides_error(model_repo: Path) -> None:
    capi, _ = _sessions(model_repo, "mixed")
    loaded = load_model("mixed", 1, _folder(model_repo, "mixed"), SETTINGS)
    feeds = _feeds(model_repo, "mixed", 3)
    feeds["color_band"] = feeds["color_band"][:2]  # batch sizes that differ: a failed Concat
    with pytest.raises((InvalidInput, ModelLoadError)) as python_side:
        loaded.run(feeds)
    with pytest.raises(type(python_side.value), match=r"onnxruntime refused the run.*Concat"):
        capi.run(feeds)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_an_empty_batch_answers_as_onnxruntimes_python_session(model_repo: Path, name: str) -> None:
    capi, python = _sessions(model_repo, name)
    feeds = _feeds(model_repo, name, 0)
    assert all(array.shape[0] == 0 for array in feeds.values())
    names = [o.name for o in python.get_outputs()]
    try:
        want = dict(zip(names, python.run(names, onnxruntime_inputs(feeds)), strict=True))
    except Exception as exc:  # onnxruntime refuses it: so must the C API session, cleanly
        with pytest.raises(InvalidInput):
            capi.run(feeds)
        assert type(exc).__name__
        return
    _same(capi.run(feeds), want)


def _typed_model() -> bytes:
    """int64 + int64, float64 * float64, not(bool), and a string passed through."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "a"], ["a2"]),
            helper.make_node("Mul", ["b", "b"], ["b2"]),
            helper.make_node("Not", ["c"], ["not_c"]),
            helper.make_node("Identity", ["s"], ["s_out"]),
        ],
        "typed",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["n", 2]),
            helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["n", 2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, ["n"]),
            helper.make_tensor_value_info("s", TensorProto.STRING, ["n"]),
        ],
        [
            helper.make_tensor_value_info("a2", TensorProto.INT64, ["n", 2]),
            helper.make_tensor_value_info("b2", TensorProto.DOUBLE, ["n", 2]),
            helper.make_tensor_value_info("not_c", TensorProto.BOOL, ["n"]),
            helper.make_tensor_value_info("s_out", TensorProto.STRING, ["n"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_integer_double_bool_and_string_tensors_round_trip() -> None:
    content = _typed_model()
    capi = CapiSession(content, SETTINGS, "typed")
    python = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    feeds = {
        "a": np.array([[1, -2], [2**40, 7]], dtype=np.int64),
        "b": np.array([[0.5, -3.0], [1e100, 2.0]], dtype=np.float64),
        "c": np.array([True, False]),
        "s": np.array(["héllo", ""], dtype=object),
    }
    names = [o.name for o in python.get_outputs()]
    _same(capi.run(feeds), dict(zip(names, python.run(names, feeds), strict=True)))
    _refusal(capi, {**feeds, "a": feeds["a"].astype(np.int32)}, "'a'", "int32", "int64")


def test_outputs_outlive_the_session(model_repo: Path) -> None:
    capi, python = _sessions(model_repo, "forest")
    feeds = _feeds(model_repo, "forest", 8)
    got = capi.run(feeds)["probabilities"]
    del capi
    np.testing.assert_allclose(got, python.run(["probabilities"], feeds)[0], rtol=1e-6)


def _concurrently(*targets: Callable[[], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_runs_release_the_gil(model_repo: Path) -> None:
    """Two threads run the session while a Python thread watches ``running``: the count of runs
    inside onnxruntime, changed only while the GIL is released. Were the GIL held during a run,
    no Python thread could ever see it above zero; the watcher must see both runs at once."""
    capi, python = _sessions(model_repo, "forest")
    features = np.tile(_feeds(model_repo, "forest")["features"], (40, 1))  # 7120 rows
    want = python.run(["probabilities"], {"features": features})[0]
    both_seen = threading.Event()
    done = threading.Event()
    seen: list[int] = []
    results: list[np.ndarray[Any, Any]] = []

    def watch() -> None:
        count = 0
        while not done.is_set():
            running = capi.running
            if running:
                seen.append(running)
                if running >= 2:
                    both_seen.set()
                    return
            count += 1
        assert count > 0

    def work() -> None:
        try:
            for _ in range(400):  # a bound for a GIL that is never released: the test then fails
                results.append(capi.run({"features": features}, ["probabilities"])["probabilities"])
                if both_seen.is_set():
                    return
        finally:
            if len(results) >= 800 or both_seen.is_set():
                done.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    errors = _concurrently(work, work)
    done.set()
    watcher.join()
    assert not errors, errors
    assert seen, "no Python thread ever ran while onnxruntime was running: the GIL was held"
    assert max(seen) == 2, f"the two runs never overlapped (seen {sorted(set(seen))})"
    for result in results:
        np.testing.assert_allclose(result, want, rtol=1e-6)
