"""Data capture through real servers (serve --capture-dir): what the files hold against what was
sent and what onnxruntime answers, sampling by request id, labels joined by the export, SIGKILL
leaving only complete files, and the refusals of bad settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tritonclient.http as triton

from edgewise.runtime.cli.main import main
from edgewise.runtime.serving.capture import sampled
from edgewise.runtime.serving.capture_files import captured_files
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

FLUSH = ["--capture-flush-seconds", "0.05"]


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logreg (30 numeric features, a classifier with quality on) and mixed (string inputs)."""
    target = tmp_path_factory.mktemp("capture") / "repo"
    for name in ("logreg", "mixed"):
        shutil.copytree(model_repo / name, target / name)
    return target


def manifest(repo: Path, model: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((repo / model / "1" / "manifest.json").read_text())
    return data


def rows_of(repo: Path, n: int, seed: int) -> np.ndarray:
    width = int(manifest(repo, "logreg")["inputs"][0]["shape"][1])  # type: ignore[index]
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def read_all(folder: Path) -> pa.Table:
    tables = [pq.read_table(path) for path in captured_files(folder)]
    assert tables, f"no capture file in {folder}"
    return pa.concat_tables(tables)


@pytest.fixture
def server_factory(repo: Path, tmp_path: Path) -> Iterator[list[RunningServer]]:
    servers: list[RunningServer] = []
    yield servers
    for server in servers:
        server.stop()


def serve(servers: list[RunningServer], repo: Path, workdir: Path, *args: str) -> RunningServer:
    server = start_server(repo, workdir, list(args))
    servers.append(server)
    return server


@pytest.mark.parametrize("front_end", [*FRONT_ENDS, "http"])
def test_rate_one_captures_every_request_as_sent_and_answered(
    front_end: str, repo: Path, tmp_path: Path, server_factory: list[RunningServer]
) -> None:
    """20 requests of 1 to 4 rows (the project's client on gRPC, tritonclient.http on the HTTP
    front end); after SIGTERM the files hold every row: the inputs as sent, the outputs as
    answered and as onnxruntime computes them."""
    folder = tmp_path / "captured"
    grpc_front = "grpcio" if front_end == "http" else front_end
    server = serve(
        server_factory, repo, tmp_path, *front_end_args(grpc_front), "--http-port", "0",
        "--capture-dir", str(folder), "--capture-rate", "1.0", *FLUSH,
    )  # fmt: skip
    sent: dict[str, np.ndarray] = {}
    answered: dict[str, dict[str, np.ndarray]] = {}
    http = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    with server.client() as client:
        for index in range(20):
            rows = rows_of(repo, 1 + index % 4, seed=index)
            request_id = f"req-{index}"
            sent[request_id] = rows
            if front_end == "http":
                tensor = triton.InferInput("features", list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows, binary_data=index % 2 == 0)
                result = http.infer("logreg", [tensor], request_id=request_id)
                answered[request_id] = {
                    name: result.as_numpy(name) for name in ("label", "probabilities")
                }
            else:
                outputs = client.infer(
                    "logreg", {"features": rows}, request_id=request_id, raw=index % 2 == 0
                ).outputs
                answered[request_id] = {name: outputs[name] for name in ("label", "probabilities")}
    http.close()
    assert server.stop() == 0  # SIGTERM: what is queued is written
    table = read_all(folder / "logreg")
    assert table.num_rows == sum(len(r) for r in sent.values())
    session = ort.InferenceSession(str(repo / "logreg" / "1" / "model.onnx"))
    data = table.to_pydict()
    by_request: dict[str, list[int]] = {}
    for place, request_id in enumerate(data["request_id"]):
        by_request.setdefault(request_id, []).append(place)
    assert set(by_request) == set(sent)
    for request_id, places in by_request.items():
        assert [data["row"][p] for p in places] == list(range(len(places)))
        captured = np.array([data["input.features"][p] for p in places], dtype=np.float32)
        np.testing.assert_array_equal(captured, sent[request_id])
        label = np.array([data["output.label"][p] for p in places])
        probabilities = np.array([data["output.probabilities"][p] for p in places])
        np.testing.assert_array_equal(label, answered[request_id]["label"].reshape(-1))
        np.testing.assert_array_equal(probabilities, answered[request_id]["probabilities"])
        oracle_label, oracle_probabilities = session.run(
            ["label", "probabilities"], {"features": sent[request_id]}
        )
        np.testing.assert_array_equal(label, oracle_label.reshape(-1))
        np.testing.assert_allclose(probabilities, oracle_probabilities, rtol=1e-6, atol=1e-7)
    assert set(data["model"]) == {"logreg"} and set(data["version"]) == {"1"}
    stamps = [t.timestamp() for t in data["timestamp"]]
    assert all(abs(t - time.time()) < 600 for t in stamps)


def test_rate_half_captures_exactly_the_requests_its_hash_picks(
    repo: Path, tmp_path: Path, server_factory: list[RunningServer]
) -> None:
    """At 0.5 the captured request ids are exactly those :func:`sampled` picks (deterministic
    by id), about half of them; the project's client, typed contents, string inputs."""
    folder = tmp_path / "captured"
    server = serve(
        server_factory, repo, tmp_path, "--front-end", "grpcio",
        "--capture-dir", str(folder), "--capture-rate", "0.5", *FLUSH,
    )  # fmt: skip
    ids = [f"order-{index:04d}" for index in range(200)]
    with server.client() as client:
        for index, request_id in enumerate(ids):
            client.infer("logreg", {"features": rows_of(repo, 1, index)}, request_id=request_id)
        strings = np.array([[b"low"], [b"high"]], dtype=object)
        mixed_inputs = {
            spec["name"]: (
                strings
                if spec["datatype"] == "BYTES"
                else np.ones((2, int(spec["shape"][1])), dtype=np.float32)
            )
            for spec in manifest(repo, "mixed")["inputs"]  # type: ignore[attr-defined]
        }
        client.infer("mixed", mixed_inputs, request_id="mixed-1", raw=False)
        text = metrics_text(server)
    assert server.stop() == 0
    expected = {i for i in ids if sampled(i, 0.5)}
    assert 70 <= len(expected) <= 130  # the hash spreads ids
    table = read_all(folder / "logreg")
    assert set(table.column("request_id").to_pylist()) == expected
    assert table.num_rows == len(expected)
    assert metric_value(text, "edgewise_capture_records_total", model="logreg") == len(expected)
    if sampled("mixed-1", 0.5):
        mixed = read_all(folder / "mixed").to_pydict()
        for spec in manifest(repo, "mixed")["inputs"]:  # type: ignore[attr-defined]
            if spec["datatype"] == "BYTES":
                assert mixed[f"input.{spec['name']}"] == ["low", "high"]


def test_labels_sent_as_feedback_join_the_export(
    repo: Path,
    tmp_path: Path,
    server_factory: list[RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Labels sent to the server (SubmitFeedback) are written beside the captured requests;
    ``capture export --labelled`` joins them by request id and row, the columns named by the
    package's features; ``--labels`` adds a table's labels."""
    folder = tmp_path / "captured"
    server = serve(
        server_factory, repo, tmp_path, "--front-end", "grpcio",
        "--capture-dir", str(folder), *FLUSH,
    )  # fmt: skip
    sent = {f"r{index}": rows_of(repo, 2, 100 + index) for index in range(10)}
    with server.client() as client:
        for request_id, rows in sent.items():
            client.infer("logreg", {"features": rows}, request_id=request_id)
        truth = [(f"r{index}", row, (index + row) % 2) for index in range(6) for row in (0, 1)]
        assert client.submit_feedback("logreg", truth).joined == len(truth)
    assert server.stop() == 0
    out = tmp_path / "train.parquet"
    code = main(
        ["capture", "export", "logreg", "--capture-dir", str(folder), "--labelled",
         "--repo", str(repo), "--output", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    dataset = pq.read_table(out).to_pydict()
    features = [f["name"] for f in manifest(repo, "logreg")["features"]]  # type: ignore[attr-defined]
    assert list(dataset)[: len(features) + 1] == [*features, "label"]
    assert len(dataset["label"]) == len(truth)
    expected = {(i, r): label for i, r, label in truth}
    for place, (request_id, row) in enumerate(
        zip(dataset["request_id"], dataset["row"], strict=True)
    ):
        assert dataset["label"][place] == expected[(request_id, row)]
        values = [dataset[name][place] for name in features]
        np.testing.assert_array_equal(np.array(values, dtype=np.float32), sent[request_id][row])
        assert dataset["version"][place] == "1"
    # A labels table (as `edgewise feedback` reads) adds r9's rows.
    table = tmp_path / "more.csv"
    table.write_text("request_id,label,row\nr9,1,0\nr9,0,1\n")
    code = main(
        ["capture", "export", "logreg", "--capture-dir", str(folder), "--labelled",
         "--labels", str(table), "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    dataset = pq.read_table(out).to_pydict()
    assert len(dataset["label"]) == len(truth) + 2
    assert "features_0" in dataset  # no --repo package: named by the input tensor
    assert main(["capture", "stats", "--capture-dir", str(folder)]) == 0
    assert "logreg" in capsys.readouterr().out


def test_sigkill_leaves_only_complete_files(
    repo: Path, tmp_path: Path, server_factory: list[RunningServer]
) -> None:
    """A server killed with SIGKILL while it captures and writes: its writer process writes what
    it received and exits on its own; every .parquet in the folder reads whole; what a write cut
    short is a hidden temporary file, removed when a server opens the folder again."""
    folder = tmp_path / "captured"
    server = serve(
        server_factory, repo, tmp_path, "--front-end", "grpcio",
        "--capture-dir", str(folder), "--capture-flush-seconds", "0.01",
    )  # fmt: skip
    with server.client() as client:
        deadline = time.monotonic() + 60
        index = 0
        while time.monotonic() < deadline:  # until several files are written
            client.infer("logreg", {"features": rows_of(repo, 8, index)}, request_id=f"k{index}")
            index += 1
            if index % 20 == 0 and len(list(captured_files(folder))) >= 3:
                break
        assert len(list(captured_files(folder))) >= 3
        for more in range(50):  # the writer is busy as the kill lands
            client.infer("logreg", {"features": rows_of(repo, 8, more)}, request_id=f"z{more}")
    writers = psutil.Process(server.process.pid).children()
    assert [w.cmdline()[-3] for w in writers] == ["edgewise.runtime.serving.capture_writer"]
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    _, alive = psutil.wait_procs(writers, timeout=30)  # it ends at its stdin's end
    assert not alive
    files = list(captured_files(folder))
    assert files
    total = 0
    for path in files:
        table = pq.read_table(path)  # raises on a half-written file
        assert table.num_rows > 0
        total += table.num_rows
    assert total % 8 == 0
    # A server opening the folder again removes what a cut-short write left.
    again = serve(server_factory, repo, tmp_path, "--capture-dir", str(folder))
    assert again.stop() == 0
    assert not [p for p in folder.rglob(".tmp-*")]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--capture-rate", "1.5"], "capture-rate must be a fraction from 0 to 1"),
        (["--capture-max-bytes", "-1"], "capture-max-bytes must be positive"),
        (["--capture-queue", "0"], "capture-queue must be at least 1"),
        (["--capture-queue-bytes", "0"], "capture-queue-bytes must be at least 1"),
    ],
)
def test_bad_capture_settings_are_one_line_and_exit_one(
    args: list[str], says: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--repo", str(repo), "--capture-dir", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert says in err and len(err.strip().splitlines()) == 1


def test_unwritable_capture_dir_is_refused_at_start(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["serve", "--repo", str(repo), "--capture-dir", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 1
    assert "capture-dir" in err and "cannot write there" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_rate_in_config_json_is_refused_at_start(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "repo"
    shutil.copytree(repo / "logreg", target / "logreg")
    (target / "logreg" / "config.json").write_text(json.dumps({"capture": {"rate": -0.1}}))
    code = main(["serve", "--repo", str(target), "--capture-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 1
    assert "capture.rate must be a number from 0 to 1" in err and "config.json" in err


def test_capture_without_pyarrow_names_the_extra(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An image without pyarrow: serve --capture-dir refuses with one line naming the extra."""
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    code = main(["serve", "--repo", str(repo), "--capture-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 1
    assert "pip install edgewise[data]" in err and len(err.strip().splitlines()) == 1


def test_export_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node without pyarrow: ``capture export`` says which extra in one line (it raised
    ModuleNotFoundError out of the CLI, a traceback)."""
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    out = tmp_path / "out.parquet"
    code = main(
        ["capture", "export", "logreg", "--capture-dir", str(tmp_path), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "pip install edgewise[data]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_config_json_rate_overrides_the_flag(
    repo: Path, tmp_path: Path, server_factory: list[RunningServer]
) -> None:
    """``{"capture": {"rate": 0}}`` turns one model's capture off while the flag says 1."""
    target = tmp_path / "repo"
    for name in ("logreg", "mixed"):
        shutil.copytree(repo / name, target / name)
    (target / "mixed" / "config.json").write_text(json.dumps({"capture": {"rate": 0}}))
    folder = tmp_path / "captured"
    server = serve(server_factory, target, tmp_path, "--capture-dir", str(folder), *FLUSH)
    strings = np.array([[b"low"]], dtype=object)
    with server.client() as client:
        inputs = {
            spec["name"]: (
                strings
                if spec["datatype"] == "BYTES"
                else np.ones((1, int(spec["shape"][1])), dtype=np.float32)
            )
            for spec in manifest(target, "mixed")["inputs"]  # type: ignore[attr-defined]
        }
        client.infer("mixed", inputs, request_id="m")
        client.infer("logreg", {"features": rows_of(target, 1, 0)}, request_id="l")
    assert server.stop() == 0
    assert read_all(folder / "logreg").num_rows == 1
    assert not list(captured_files(folder / "mixed"))


def test_export_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing folder, a model never captured: one line, exit 1, no output file."""
    out = tmp_path / "out.parquet"
    base = ["capture", "export", "logreg", "--output", str(out)]
    assert main([*base, "--capture-dir", str(tmp_path / "nowhere")]) == 1
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--capture-dir", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "nothing captured for model 'logreg'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
