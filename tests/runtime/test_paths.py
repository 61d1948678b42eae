"""Paths, names and versions at every entry point: the rules themselves, manifests, the
server's repository scan, the control RPCs, the loaders of the agent, evaluate and the batch
scorer, and ONNX external data that points outside its package."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import external_data_helper

from edgewise.runtime.agent import validate_package
from edgewise.runtime.batch.options import parse_model_ref
from edgewise.runtime.client import ServerError
from edgewise.runtime.errors import InvalidInput, PackageError
from edgewise.runtime.evaluate import ModelRef
from edgewise.runtime.model import SessionSettings, load_model
from edgewise.runtime.package import (
    MODEL_FILE,
    file_entry,
    list_versions,
    read_manifest,
    validate_model_name,
    write_manifest,
)
from edgewise.runtime.paths import (
    check_external_data,
    ensure_inside,
    parse_version,
    resolve_inside,
    validate_relative_path,
)
from edgewise.runtime.store.base import VersionRecord
from edgewise.runtime.store.lineage import Lineage
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
