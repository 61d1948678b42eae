"""Feedback and online quality through a real server: a refused batch changes nothing, labels
join the version that answered, reading the report changes nothing and the reset is its own
command; the `edgewise feedback` labels table; the quality verbs over TLS with a token."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from edgewise.runtime.cli.labels import read_labels
from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput
from tests.certs import make_certificates
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.runtime.store.helpers import diabetes_inputs, logreg_inputs
from tests.servers import RunningServer, start_server

TOKEN = "quality-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logreg versions 1 and 2 (the same package twice) and the regressor."""
    root = tmp_path_factory.mktemp("quality") / "repo"
    shutil.copytree(model_repo / "logreg" / "1", root / "logreg" / "1")
    shutil.copytree(model_repo / "logreg" / "1", root / "logreg" / "2")
    shutil.copytree(model_repo / "regressor", root / "regressor")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        repo,
        tmp_path_factory.mktemp("quality-server"),
        ["--monitoring", "off", "--version-policy", "all", "--front-end", "grpcio"],
    )
    yield running
    assert running.stop() == 0, running.log()


def predict(
    client: EdgewiseClient, repo: Path, prefix: str, count: int, version: str = "1"
) -> list[int]:
    """``count`` one-row requests ``{prefix}{i}`` to logreg; their predicted classes."""
    predicted = []
    for i in range(count):
        inputs = logreg_inputs(repo / "logreg" / "1", start=i)
        result = client.infer("logreg", inputs, version=version, request_id=f"{prefix}{i}")
        predicted.append(int(result.outputs["label"].reshape(-1)[0]))
    return predicted


def refused(client: EdgewiseClient, model: str, labels: list, version: str = "1") -> ServerError:
    with pytest.raises(ServerError) as info:
        client.submit_feedback(model, labels, version)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT, info.value
    return info.value


def counts(client: EdgewiseClient, model: str, version: str = "1") -> tuple[int, str, int]:
    """Labels joined, the error (as text: NaN before any) and predictions kept."""
    report = client.quality_report(model, version)
    return report.labelled, repr(report.error), report.kept_predictions


def test_a_refused_batch_joins_nothing(server: RunningServer, repo: Path) -> None:
    with server.client() as client:
        predicted = predict(client, repo, "bad-", 2)
        good = ("bad-0", 0, predicted[0])
        before = counts(client, "logreg")
        for bad, says in [
            (math.nan, "label 1 (request 'bad-1' row 0): nan is not a label"),
            (7, "label 1 (request 'bad-1' row 0): 7 is not a class of model 'logreg'"),
            ("benign", "predicts int labels; got a str label"),
        ]:
            error = refused(client, "logreg", [good, ("bad-1", 0, bad)])
            assert says in error.details
            assert counts(client, "logreg") == before
        # Nothing was marked: the good label is joined now, not a duplicate.
        response = client.submit_feedback("logreg", [good], "1")
        assert (response.joined, response.unknown, response.duplicate) == (1, 0, 0)


def test_a_regressor_refuses_a_nan_label_and_counts_nothing(
    server: RunningServer, repo: Path
) -> None:
    with server.client() as client:
        inputs = diabetes_inputs(repo / "regressor" / "1", rows=2)
        predicted = client.infer("regressor", inputs, request_id="reg").outputs
        values = next(iter(predicted.values())).reshape(-1)
        before = counts(client, "regressor")
        error = refused(client, "regressor", [("reg", 0, 100.0), ("reg", 1, math.nan)])
        assert "label 1 (request 'reg' row 1)" in error.details
        assert counts(client, "regressor") == before
        response = client.submit_feedback("regressor", [("reg", 0, 100.0), ("reg", 1, 50.0)])
        assert response.joined == 2
        report = client.quality_report("regressor")
        labelled_before = before[0]
        assert report.labelled == labelled_before + 2
        expected = (abs(values[0] - 100.0) + abs(values[1] - 50.0)) / 2
        assert report.error == pytest.approx(expected, rel=1e-5)


def test_labels_without_a_version_join_the_version_that_answered(
    server: RunningServer, repo: Path
) -> None:
    with server.client() as client:
        one = predict(client, repo, "v1-", 5, version="1")
        two = predict(client, repo, "v2-", 5, version="2")
        before = {v: counts(client, "logreg", v)[0] for v in ("1", "2")}
        labels = [(f"v1-{i}", 0, p) for i, p in enumerate(one)]
        labels += [(f"v2-{i}", 0, p) for i, p in enumerate(two)]
        labels.append(("never-seen", 0, 0))
        response = client.submit_feedback("logreg", labels)
        assert (response.joined, response.unknown, response.duplicate) == (10, 1, 0)
        assert {v: counts(client, "logreg", v)[0] - before[v] for v in ("1", "2")} == {
            "1": 5,
            "2": 5,
        }
        # A bad label in the part for one version refuses the part for the other one too.
        more_one = predict(client, repo, "w1-", 1, version="1")
        predict(client, repo, "w2-", 1, version="2")
        error = refused(client, "logreg", [("w1-0", 0, more_one[0]), ("w2-0", 0, 9)], version="")
        assert "label 1 (request 'w2-0' row 0): 9 is not a class" in error.details
        assert client.submit_feedback("logreg", [("w1-0", 0, more_one[0])]).joined == 1


def test_joined_labels_publish_the_quality_gauges_at_once(
    server: RunningServer, repo: Path
) -> None:
    """The server runs no drift timer (monitoring off): the gauges move with the labels."""
    with server.client() as client:
        predicted = predict(client, repo, "gauge-", 3, version="2")
        labels = [(f"gauge-{i}", 0, p if i else 1 - p) for i, p in enumerate(predicted)]
        assert client.submit_feedback("logreg", labels, "2").joined == 3
        report = client.quality_report("logreg", "2")
    text = metrics_text(server)
    labels_of = {"model": "logreg", "version": "2"}
    assert metric_value(text, "edgewise_quality_labelled", **labels_of) == report.labelled
    error = metric_value(text, "edgewise_quality_error", window="all", **labels_of)
    assert error == pytest.approx(report.error)
    assert metric_value(text, "edgewise_quality_drifts", **labels_of) == report.drifts


def quality_series(text: str, version: str) -> list[str]:
    """The ``edgewise_quality_*`` series of logreg ``version`` on a scrape."""
    labels = f'model="logreg",version="{version}"'
    return [
        line
        for line in text.splitlines()
        if line.startswith("edgewise_quality_") and labels in line
    ]


def test_an_unloaded_version_has_its_quality_series_dropped_at_once(
    repo: Path, tmp_path: Path
) -> None:
    """Monitoring off, so no drift timer: the unload itself drops the version's series."""
    server = start_server(
        repo, tmp_path, ["--monitoring", "off", "--version-policy", "all", "--front-end", "grpcio"]
    )
    try:
        with server.client() as client:
            for version in ("1", "2"):
                predicted = predict(client, repo, f"gone-{version}-", 2, version=version)
                labels = [(f"gone-{version}-{i}", 0, p) for i, p in enumerate(predicted)]
                assert client.submit_feedback("logreg", labels, version).joined == 2
            before = metrics_text(server)
            assert len(quality_series(before, "2")) == 4  # error all/recent, labelled, drifts
            client.unload_model("logreg", "2")
            after = metrics_text(server)
            assert quality_series(after, "2") == []
            assert quality_series(after, "1") == quality_series(before, "1")
            # Version 1 still joins and publishes; version 2's series stay gone.
            predicted = predict(client, repo, "still-", 1, version="1")
            assert client.submit_feedback("logreg", [("still-0", 0, predicted[0])]).joined == 1
            later = metrics_text(server)
            one = {"model": "logreg", "version": "1"}
            assert metric_value(later, "edgewise_quality_labelled", **one) == 3
            assert quality_series(later, "2") == []
    finally:
        assert server.stop() == 0, server.log()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_reading_the_report_changes_nothing_and_reset_is_a_command(
    server: RunningServer, repo: Path
) -> None:
    with server.client() as client:
        # One request of every row; the labels agree with the model, then disagree on each.
        inputs = logreg_inputs(repo / "logreg" / "1", rows=569)
        predicted = client.infer("logreg", inputs, version="1", request_id="all").outputs["label"]
        labels = [
            ("all", i, int(p) if i < 300 else 1 - int(p))
            for i, p in enumerate(predicted.reshape(-1))
        ]
        client.submit_feedback("logreg", labels, "1")
        first = client.quality_report("logreg", "1")
        assert first.drifting and first.drifts >= 1
        for _ in range(3):
            assert client.quality_report("logreg", "1") == first
        done = run_cli("quality", "logreg", "--version", "1", "--server", server.target)
        assert done.returncode == 0, done.stderr
        assert "DRIFT detected" in done.stdout
        assert client.quality_report("logreg", "1") == first  # the CLI read changed nothing
        done = run_cli("quality", "logreg", "--version", "1", "--server", server.target, "--reset")
        assert done.returncode == 0, done.stderr
        assert "DRIFT detected" in done.stdout and "acknowledged" in done.stdout
        after = client.quality_report("logreg", "1")
        assert not after.drifting
        assert (after.drifts, after.labelled, after.error) == (
            first.drifts,
            first.labelled,
            first.error,
        )


def test_feedback_cli_reads_ids_as_text_and_refuses_bad_cells(
    server: RunningServer, repo: Path, tmp_path: Path
) -> None:
    with server.client() as client:
        [label] = predict(client, repo, "000", 1, version="2")  # request id "0000"
        before = counts(client, "logreg", "2")
        table = tmp_path / "labels.csv"
        for text, says in [
            (f"request_id,label,row\n0000,{label},\n", "line 2: empty row"),
            ("request_id,label\n0000,\n", "line 2: empty label"),
            (f"request_id,label\n,{label}\n", "line 2: empty request_id"),
            (f"request_id,label,row\n0000,{label},-1\n", "line 2: row must be a whole number"),
            (f"request_id,label\n0000,{label}\n0000,nan\n", "line 3: label nan is not a finite"),
        ]:
            table.write_text(text)
            done = run_cli("feedback", "logreg", "--labels", str(table), "--server", server.target)
            assert done.returncode == 1, done
            [line] = done.stderr.strip().splitlines()  # one line, no traceback
            assert line.startswith(f"edgewise feedback: error: {table}: {says}"), line
            assert counts(client, "logreg", "2") == before  # nothing was sent
        table.write_text(f"request_id,label\n0000,{label}\n")
        done = run_cli("feedback", "logreg", "--labels", str(table), "--server", server.target)
        assert done.returncode == 0, done.stderr
        assert "joined 1, unknown 0, duplicate 0" in done.stdout
        done = run_cli("feedback", "logreg", "--labels", str(table), "--server", server.target)
        assert "joined 0, unknown 0, duplicate 1" in done.stdout
        # A label the server refuses: one line, exit 1.
        predict(client, repo, "cli-bad-", 1, version="2")
        table.write_text("request_id,label\ncli-bad-0,7\n")
        done = run_cli("feedback", "logreg", "--labels", str(table), "--server", server.target)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "INVALID_ARGUMENT" in done.stderr and "7 is not a class" in done.stderr


def test_labels_table_cells(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("request_id,label,row\n00042,1,3\nb,2.5,0\nc,yes,1\nd, 0 ,2\n")
    assert read_labels(csv) == [("00042", 3, 1), ("b", 0, 2.5), ("c", 1, "yes"), ("d", 2, 0)]
    assert read_labels(csv, "str")[:3] == [("00042", 3, "1"), ("b", 0, "2.5"), ("c", 1, "yes")]
    with pytest.raises(InvalidInput, match=r"line 3: label 2\.5 is not a class index"):
        read_labels(csv, "int")
    with pytest.raises(InvalidInput, match="line 4: label 'yes' is not a number"):
        read_labels(csv, "float")
    csv.write_text("request_id,label\n1,1\n2,2.5\n")
    assert read_labels(csv, "float") == [("1", 0, 1.0), ("2", 0, 2.5)]
    assert isinstance(read_labels(csv, "float")[0][2], float)
    parquet = tmp_path / "labels.parquet"
    pd.DataFrame({"request_id": ["7", "8"], "label": [1.5, np.nan]}).to_parquet(parquet)
    with pytest.raises(InvalidInput, match=r"labels.parquet: row 1: empty label"):
        read_labels(parquet)
    pd.DataFrame({"request_id": ["7"], "label": ["no"]}).to_parquet(parquet)
    assert read_labels(parquet) == [("7", 0, "no")]
    missing = tmp_path / "none.csv"
    missing.write_text("id,label\n1,1\n")
    with pytest.raises(InvalidInput, match="no column 'request_id'"):
        read_labels(missing)


def test_quality_verbs_and_healthcheck_over_tls_with_a_token(
    model_repo: Path, tmp_path: Path
) -> None:
    certs = make_certificates(tmp_path / "certs")
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    security = ClientSecurity(tls_ca=certs.ca, token=TOKEN)
    secure = start_server(
        repo,
        tmp_path / "server",
        ["--monitoring", "off", "--tls-cert", str(certs.server_cert),
         "--tls-key", str(certs.server_key), "--no-health-open"],
        env={"EDGEWISE_TOKENS": TOKEN},
        security=security,
    )  # fmt: skip
    try:
        with secure.client() as client:
            inputs = logreg_inputs(repo / "logreg" / "1")
            label = int(client.infer("logreg", inputs, request_id="tls").outputs["label"][0])
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        table = tmp_path / "labels.csv"
        table.write_text(f"request_id,label\ntls,{label}\n")
        flags = ["--server", secure.target, "--tls-ca", str(certs.ca)]
        verbs = [
            ["feedback", "logreg", "--labels", str(table)],
            ["quality", "logreg"],
            ["containers", "healthcheck"],
        ]
        for verb in verbs:
            # Without the token (TLS only) the server refuses; with it, the verb works.
            done = run_cli(*verb, *flags)
            assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr, (verb, done)
            assert "Traceback" not in done.stderr
            done = run_cli(*verb, *flags, "--token-file", str(token_file))
            assert done.returncode == 0, (verb, done.stderr)
        quality = run_cli("quality", "logreg", *flags, "--token-file", str(token_file))
        assert "1 labelled predictions" in quality.stdout
        health = run_cli("containers", "healthcheck", *flags, "--token-file", str(token_file))
        assert health.stdout.strip() == "SERVING"
    finally:
        assert secure.stop() == 0, secure.log()
