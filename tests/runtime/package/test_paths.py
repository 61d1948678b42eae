"""Paths, names and versions at every entry point: the rules themselves, manifests, the
server's repository scan, the control RPCs, the loaders of the agent, evaluate and the batch
scorer, and ONNX external data that points outside its package."""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import external_data_helper
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier

from edgewise.runtime.agent.sync import validate_package
from edgewise.runtime.batch.options import parse_model_ref
from edgewise.runtime.client.client import ServerError
from edgewise.runtime.convert.converter import convert
from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.evaluation.evaluate import ModelRef
from edgewise.runtime.package.manifest import (
    MODEL_FILE,
    file_entry,
    list_versions,
    read_manifest,
    validate_model_name,
    write_manifest,
)
from edgewise.runtime.package.paths import (
    check_external_data,
    ensure_inside,
    external_data_locations,
    graph_class_labels,
    parse_version,
    resolve_inside,
    validate_relative_path,
)
from edgewise.runtime.serving.model import SessionSettings, load_model
from edgewise.runtime.store.base import VersionRecord
from edgewise.runtime.store.lineage import Lineage
from tests import models
from tests.fresh import run_python
from tests.runtime.store.helpers import copy_package, logreg_inputs
from tests.servers import RunningServer, start_server

UNSAFE_PATHS = [
    "", ".", "..", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "C:\\x",
    "x\x00y", ".hidden", "-flag", "a/" * 9 + "b", "x" * 600, "sp ace", "ünï", "a/",
]  # fmt: skip
SAFE_PATHS = ["model.onnx", "weights/part-1.bin", "a_b.c-d", "_x"]
BAD_VERSIONS = ["", "0", "01", "-1", "+1", " 1", "1 ", "1.0", "1e3", "\u00b2", "\u0663", "x"]


def test_relative_paths_versions_and_names() -> None:
    for path in UNSAFE_PATHS:
        with pytest.raises(PackageError, match="not a safe relative path"):
            validate_relative_path(path)
    for path in SAFE_PATHS:
        assert validate_relative_path(path) == path
    for text in BAD_VERSIONS:
        with pytest.raises(InvalidInput):
            parse_version(text)
    assert parse_version("7") == 7 and parse_version("123") == 123
    for name in ("..", "../x", "a/b", "", ".x", "a..b", "x" * 200, "\u00e9"):
        with pytest.raises(InvalidInput):
            validate_model_name(name)
    for text in ("logreg:\u00b2", "logreg:0", "../x:1", "logreg:\u0663"):
        with pytest.raises(InvalidInput):
            parse_model_ref(text)
        with pytest.raises(InvalidInput):
            ModelRef.parse(text)


def test_links_may_stay_inside_but_never_leave(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "a").mkdir(parents=True)
    (root / "inside").symlink_to(root / "a")
    (root / "outside").symlink_to(tmp_path)
    (root / "loop").symlink_to(root / "loop")
    assert ensure_inside(root, root / "inside") == (root / "a").resolve()
    for name in ("outside", "outside/repo/../x"):
        with pytest.raises(PackageError, match="outside"):
            resolve_inside(root, name) if ".." not in name else ensure_inside(root, root / name)
    with pytest.raises(PackageError):
        ensure_inside(root, root / "loop")


def test_manifests_with_unsafe_file_entries_are_refused(model_repo: Path, tmp_path: Path) -> None:
    for path in ("../model.onnx", "/etc/passwd", "a/../../b", "model.onnx/../../x"):
        folder = copy_package(model_repo / "logreg" / "1", tmp_path)
        data = json.loads((folder / "manifest.json").read_text())
        data["files"][0]["path"] = path
        (folder / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(PackageError, match="not a safe relative path"):
            read_manifest(folder)
    folder = copy_package(model_repo / "logreg" / "1", tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["profile"] = {"file": "../../profile.json"}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="profile file"):
        read_manifest(folder)
    # A listed file that is a link leaving the package is refused by the file check.
    folder = copy_package(model_repo / "logreg" / "1", tmp_path)
    outside = tmp_path / "stolen.onnx"
    shutil.move(folder / MODEL_FILE, outside)
    (folder / MODEL_FILE).symlink_to(outside)
    with pytest.raises(PackageError, match="outside"):
        load_model("logreg", int(folder.name), folder, SessionSettings())


def test_version_folders(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    for name in ("1", "2", "03", "\u00b2", "\u0663", "4x", ".staging-1"):
        (model / name).mkdir(parents=True)
    (model / "5").symlink_to(model / "2")  # inside the repository: fine
    (model / "6").symlink_to(tmp_path)  # leaves it: ignored
    assert list_versions(model) == [1, 2, 5]


# ---- ONNX external data --------------------------------------------------------------------------


def external_package(model_repo: Path, repo: Path, location: str, listed: bool = True) -> Path:
    """A logreg package whose weights live in an external data file at ``location``."""
    folder = copy_package(model_repo / "logreg" / "1", repo)
    model = onnx.load(str(folder / MODEL_FILE))
    # logreg keeps its weights in node attributes: put a (zero) bias tensor in front of it, so
    # the model has an initializer to store outside.
    first = model.graph.node[0]
    bias = onnx.numpy_helper.from_array(np.zeros(30, np.float32), "zero_bias")
    model.graph.initializer.append(bias)
    add = onnx.helper.make_node("Add", [first.input[0], "zero_bias"], ["biased_features"])
    first.input[0] = "biased_features"
    model.graph.node.insert(0, add)
    onnx.save_model(
        model,
        str(folder / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (folder / "weights.bin").is_file()
    if location != "weights.bin":
        target = (folder / location).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(folder / "weights.bin", target)
        model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        for tensor in external_data_helper._get_all_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(folder / MODEL_FILE))
    manifest = read_manifest(folder)
    files = [file_entry(folder, f.path) for f in manifest.files]
    if listed and (folder / location).resolve().is_relative_to(folder.resolve()):
        files.append(file_entry(folder, location))
    write_manifest(folder, dataclasses.replace(manifest, files=tuple(files)))
    return folder


def test_external_data_inside_the_package_and_listed_loads(
    model_repo: Path, tmp_path: Path
) -> None:
    folder = external_package(model_repo, tmp_path / "repo", "weights.bin")
    assert check_external_data(folder / MODEL_FILE, folder) == ["weights.bin"]
    model = load_model("logreg", int(folder.name), folder, SessionSettings())
    inputs = {k: np.asarray(v) for k, v in logreg_inputs(model_repo / "logreg" / "1").items()}
    assert model.run(inputs)["probabilities"].shape == (1, 2)


def _onnx_external_locations(path: Path) -> list[str]:
    """The oracle: every EXTERNAL tensor's location, as onnx itself parses the model."""
    model = onnx.load(str(path), load_external_data=False)

    def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from graph_tensors(attribute.g)
            for graph in attribute.graphs:
                yield from graph_tensors(graph)
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)

    tensors = list(graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(node_tensors(node))
    return [
        {e.key: e.value for e in t.external_data}["location"]
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _nested_external_model(folder: Path) -> Path:
    """A model whose external tensors sit in an If's branch graphs, a Constant node's attribute,
    a sparse initializer and the main graph, each in a file of its own."""
    folder.mkdir(parents=True)
    h = onnx.helper

    def branch(name: str, value: float) -> onnx.GraphProto:
        weight = onnx.numpy_helper.from_array(np.full(4, value, np.float32), f"{name}_w")
        node = h.make_node("Add", ["x", f"{name}_w"], [f"{name}_y"])
        out = h.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, [4])
        return h.make_graph([node], name, [], [out], initializer=[weight])

    constant = h.make_node(
        "Constant",
        [],
        ["c"],
        value=onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "c_value"),
    )
    sparse = h.make_sparse_tensor(
        onnx.numpy_helper.from_array(np.ones(2, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array([0, 3], np.int64), "s_idx"),
        [4],
    )
    condition = h.make_node("Greater", ["c", "x"], ["cond_all"])
    reduce = h.make_node("ReduceMin", ["cond_all"], ["cond"], keepdims=0)
    branches = h.make_node(
        "If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)
    )
    graph = h.make_graph(
        [constant, condition, reduce, branches],
        "nested",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        initializer=[onnx.numpy_helper.from_array(np.zeros(4, np.float32), "unused")],
        sparse_initializer=[sparse],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=False, size_threshold=0
    )
    # onnx's converter leaves attribute and sparse tensors inside: mark those by hand (the
    # model is only parsed, never run).
    by_hand = [
        model.graph.node[0].attribute[0].t,
        model.graph.sparse_initializer[0].values,
        model.graph.sparse_initializer[0].indices,
    ]
    for tensor in by_hand:
        external_data_helper.set_external_data(tensor, f"{tensor.name}.bin")
        tensor.data_location = onnx.TensorProto.EXTERNAL
    path = folder / MODEL_FILE
    onnx.save_model(model, str(path))
    return path


def test_external_data_is_found_as_onnx_finds_it_without_importing_onnx(
    model_repo: Path, tmp_path: Path
) -> None:
    nested = _nested_external_model(tmp_path / "nested")
    expected = sorted(_onnx_external_locations(nested))  # the order of the walk is no rule
    assert len(expected) == 6, expected  # main graph, both branches, the Constant, the sparse
    assert sorted(external_data_locations(nested)) == expected
    assert sorted(external_data_locations(nested, nested.read_bytes())) == expected
    assert sorted(check_external_data(nested, nested.parent)) == expected
    plain = external_package(model_repo, tmp_path / "repo", "weights.bin") / MODEL_FILE
    assert external_data_locations(plain) == _onnx_external_locations(plain) == ["weights.bin"]
    for name in ("logreg", "forest", "mixed", "regressor"):
        path = model_repo / name / "1" / MODEL_FILE
        assert external_data_locations(path) == _onnx_external_locations(path) == []


def test_a_tensor_marked_external_without_a_location_or_a_torn_model_is_refused(
    model_repo: Path, tmp_path: Path
) -> None:
    nested = _nested_external_model(tmp_path / "nested")
    model = onnx.load(str(nested), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.key = "place"
    onnx.save_model(model, str(nested))
    with pytest.raises(PackageError, match="'unused' is stored externally without a location"):
        external_data_locations(nested)
    content = (model_repo / "logreg" / "1" / MODEL_FILE).read_bytes() + b"\x0alocation"
    with pytest.raises(PackageError, match="not a readable ONNX model"):
        external_data_locations(tmp_path / "torn.onnx", content)


def _onnx_class_labels(path: Path) -> tuple[int, ...] | tuple[str, ...] | None:
    """The oracle: the ``classlabels_*`` lists of the main graph's nodes as onnx parses them,
    the one list when all agree."""
    found: set[tuple[int, ...] | tuple[str, ...]] = set()
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        for attribute in node.attribute:
            if attribute.name in ("classlabels_int64s", "classlabels_ints"):
                found.add(tuple(int(v) for v in attribute.ints))
            elif attribute.name == "classlabels_strings":
                found.add(tuple(v.decode("utf-8") for v in attribute.strings))
    return found.pop() if len(found) == 1 else None


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf writes a negative int64
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _length_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _packed_labels_model(labels: list[int]) -> bytes:
    """A model whose one node carries ``classlabels_int64s`` packed (onnx's Python writer never
    packs; other writers may, and protobuf readers accept both)."""
    name = _length_field(1, b"classlabels_int64s")
    ints = _length_field(8, b"".join(_varint(v) for v in labels))
    node = _length_field(5, name + ints + _varint(20 << 3) + _varint(7))  # type INTS
    return _length_field(7, _length_field(1, node))


def test_class_labels_are_read_as_onnx_reads_them(model_repo: Path, tmp_path: Path) -> None:
    pipeline, X, y = models.train_logreg()
    strings = clone(pipeline).fit(X, np.where(y == 1, "benign", "malignant"))
    convert(strings, X, name="strings", repo=tmp_path / "repo")
    _, X, y = models.train_forest()
    negative = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(X, y - 1)
    convert(negative, X, name="negative", repo=tmp_path / "repo")
    packed = tmp_path / "packed.onnx"
    packed.write_bytes(_packed_labels_model([3, -2, 0, 2**40]))
    files = [
        *(model_repo / name / "1" / MODEL_FILE for name in models.MODEL_NAMES),
        tmp_path / "repo" / "strings" / "1" / MODEL_FILE,
        tmp_path / "repo" / "negative" / "1" / MODEL_FILE,
        packed,
    ]
    read = {path: graph_class_labels(path) for path in files}
    assert read == {path: _onnx_class_labels(path) for path in files}
    assert [read[path] for path in files] == [
        (0, 1), (0, 1, 2), (0, 1, 2), None, ("benign", "malignant"), (-1, 0, 1),
        (3, -2, 0, 2**40),
    ]  # fmt: skip
    with pytest.raises(PackageError, match="not a readable ONNX model"):
        graph_class_labels(tmp_path / "torn.onnx", packed.read_bytes()[:-3])
    with pytest.raises(PackageError, match="cannot read"):
        graph_class_labels(tmp_path / "missing.onnx")


LOAD_AND_SERVE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import edgewise.runtime.cli.main, edgewise.runtime.app.server
    from edgewise.runtime.serving.monitor_config import MonitorConfig
    from edgewise.runtime.serving.repository import ModelRepository

    repo = ModelRepository(Path(sys.argv[1]), monitor_defaults=MonitorConfig(enabled=False))
    repo.load_all()
    for name in ("logreg", "forest", "mixed", "regressor"):
        assert repo.get(name) is not None, name
    external = repo.get("logreg_external")
    out = external.run({"features": np.zeros((1, 30), dtype=np.float32)})
    assert out["probabilities"].shape == (1, 2)
    print(json.dumps({m: m in sys.modules for m in ("onnx", "ml_dtypes", "scipy", "sklearn")}))
    """
)


def test_loading_and_serving_a_model_does_not_import_onnx(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    package = external_package(model_repo, tmp_path / "staging", "weights.bin")
    manifest = read_manifest(package)
    shutil.copytree(package.parent, repo / "logreg_external")
    write_manifest(
        repo / "logreg_external" / package.name,
        dataclasses.replace(manifest, name="logreg_external"),
    )
    imported = json.loads(run_python(LOAD_AND_SERVE, str(repo)).strip().splitlines()[-1])
    assert imported == {"onnx": False, "ml_dtypes": False, "scipy": False, "sklearn": False}


SERVE_AND_JOIN_LABELS = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    import numpy as np
    from edgewise.runtime.client.client import EdgewiseClient
    from edgewise.runtime.app.server import InferenceServer
    from edgewise.runtime.config.settings import ServerSettings

    def use(port):
        with EdgewiseClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving()
            rows = np.zeros((2, 30), dtype=np.float32)
            client.infer("logreg", {"features": rows}, request_id="r1")
            joined = client.submit_feedback("logreg", [("r1", 0, 1), ("r1", 1, 0)]).joined
            try:
                client.submit_feedback("logreg", [("r1", 0, 7)])  # checked against the classes
                refused = ""
            except Exception as exc:
                refused = str(exc)
            return joined, refused

    async def main():
        settings = ServerSettings.from_sources({
            "repo": Path(sys.argv[1]), "host": "127.0.0.1", "port": 0, "metrics_port": -1,
            "monitoring": "off", "grace_seconds": 0.0,
        })
        server = InferenceServer(settings)
        await server.start()
        try:
            return await asyncio.to_thread(use, server.port)
        finally:
            await server.stop(0.0)

    joined, refused = asyncio.run(main())
    imported = {m: m in sys.modules for m in ("onnx", "ml_dtypes")}
    print(json.dumps({"joined": joined, "refused": refused, "imported": imported}))
    """
)


def test_feedback_on_a_served_classifier_does_not_import_onnx(
    model_repo: Path, tmp_path: Path
) -> None:
    """The classes that labels are checked against are read with the first labels, from the
    wire format: a serving process never imports onnx (nor ml_dtypes, ~1 s)."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    result = json.loads(run_python(SERVE_AND_JOIN_LABELS, str(repo)).strip().splitlines()[-1])
    assert result["joined"] == 2
    assert "7 is not a class of model 'logreg' (classes: 0, 1)" in result["refused"]
    assert result["imported"] == {"onnx": False, "ml_dtypes": False}


def test_external_data_outside_the_package_is_refused(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cases = {
        "../weights.bin": "not a safe relative path",
        "../../../../../../tmp/weights.bin": "not a safe relative path",
        "sub/../../weights.bin": "not a safe relative path",
    }
    for location, message in cases.items():
        folder = external_package(model_repo, repo, location)
        with pytest.raises(PackageError, match=message):
            load_model("logreg", int(folder.name), folder, SessionSettings())
    # Absolute locations, links leaving the package, and files the manifest does not list.
    folder = external_package(model_repo, repo, "weights.bin")
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str((folder / "weights.bin").resolve())
    onnx.save(model, str(folder / MODEL_FILE))
    with pytest.raises(PackageError):
        check_external_data(folder / MODEL_FILE, folder)
    linked = external_package(model_repo, repo, "weights.bin")
    shutil.move(linked / "weights.bin", tmp_path / "elsewhere.bin")
    (linked / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(PackageError, match="outside"):
        check_external_data(linked / MODEL_FILE, linked)
    unlisted = external_package(model_repo, repo, "weights.bin", listed=False)
    with pytest.raises(PackageError, match="not a file listed"):
        load_model("logreg", int(unlisted.name), unlisted, SessionSettings())
    # The agent refuses it before the ONNX checker could open the file.
    record = VersionRecord("logreg", 1, read_manifest(unlisted).model_sha256, (), Lineage())
    with pytest.raises(PackageError, match="not a file listed"):
        validate_package(unlisted, record, None, local_load=False)


# ---- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    """A repository with traps in it, served."""
    root = tmp_path_factory.mktemp("hostile")
    repo = root / "repo"
    outside = root / "outside"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    shutil.copytree(model_repo / "forest", outside / "forest")
    (repo / "forest").symlink_to(outside / "forest")  # a model folder leaving the repository
    shutil.copytree(model_repo / "regressor" / "1", outside / "regressor-2")
    shutil.copytree(model_repo / "regressor", repo / "regressor")
    (repo / "regressor" / "2").symlink_to(outside / "regressor-2")  # a version folder leaving
    (repo / "regressor" / "\u00b2").mkdir()  # str.isdigit() says yes, int() says no
    (repo / "...").mkdir()
    server = start_server(repo, root / "server", ["--monitoring", "off", "--version-policy", "all"])
    yield server, repo
    assert server.stop() == 0, server.log()


def test_the_server_serves_only_what_is_inside_its_repository(
    hostile: tuple[RunningServer, Path],
) -> None:
    server, _ = hostile
    with server.client() as client:
        index = {(s.name, s.version): s.state for s in client.repository_index()}
    assert index == {("logreg", "1"): "READY", ("regressor", "1"): "READY"}, index
    assert "outside" in server.log()


def test_control_calls_refuse_unsafe_names_and_versions(
    hostile: tuple[RunningServer, Path],
) -> None:
    server, _ = hostile
    with server.client() as client:
        for name in ("../logreg", "/etc", "logreg/1", "a\\b", "", ".."):
            for call in (client.load_model, client.unload_model):
                with pytest.raises(ServerError) as info:
                    call(name)
                assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value)
                assert "model name" in info.value.details
        for version in BAD_VERSIONS[1:]:
            with pytest.raises(ServerError) as info:
                client.load_model("logreg", version)
            assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT, version
            assert "version" in info.value.details
        for name in ("../logreg", "forest"):  # forest: a folder linked from outside
            with pytest.raises(ServerError) as info:
                client.infer(name, {"features": np.zeros((1, 13), np.float32)})
            assert info.value.status == grpc.StatusCode.NOT_FOUND, info.value
        assert client.server_live()
