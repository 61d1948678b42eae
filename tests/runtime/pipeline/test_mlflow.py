"""A pipeline run against a real MLflow tracking server: the run's params, metrics and tags are
visible through MLflow's own REST API, the version is registered with its alias, and the run can
be listed and reproduced from MLflow."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.mlflow_server import MlflowServer
from tests.runtime.pipeline.conftest import RunCli, Workspace, git


def _call(server: MlflowServer, endpoint: str, body: dict[str, Any] | None = None,
          **params: Any) -> dict[str, Any]:  # fmt: skip
    url = f"{server.url}/api/2.0/mlflow/{endpoint}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if body else "GET")
    token = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.loads(response.read()))


def _mlflow_run(server: MlflowServer, run_id: str) -> dict[str, Any]:
    experiment = _call(server, "experiments/get-by-name", experiment_name="edgewise-pipeline")
    found = _call(
        server,
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`edgewise.run_id` = '{run_id}'",
        },
    )["runs"]
    assert len(found) == 1
    return dict(found[0])


def test_a_run_is_an_mlflow_run_with_params_metrics_and_tags(
    mlflow_server: MlflowServer, workspace: Workspace, cli: RunCli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    pipeline = workspace.pipeline(store=mlflow_server.url)
    code, out, err = cli("pipeline", "run", pipeline, "--json")
    assert code == 0, err
    record = json.loads(out)
    run = _mlflow_run(mlflow_server, record["run_id"])
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert json.loads(params["train.command"])[1:] == ["train.py", "--C", "1.0"]
    assert params["data.label"] == "target" and params["register.alias"] == "production"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert metrics["step.train.seconds"] > 0
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["edgewise.outcome"] == "succeeded"
    assert tags["mlflow.source.git.commit"] == git(workspace.root, "rev-parse", "HEAD")
    assert tags["edgewise.data_fingerprint"] == record["data"]["fingerprint"]
    # the registered version and its alias, as MLflow's registry has them
    alias = _call(mlflow_server, "registered-models/alias", name="cancer", alias="production")
    version = alias["model_version"]
    assert int(version["version"]) == record["registered"]["version"]
    version_tags = {t["key"]: t["value"] for t in version["tags"]}
    assert version_tags["edgewise.model_sha256"] == record["artifacts"]["onnx_sha256"]
    assert (
        json.loads(version_tags["edgewise.lineage"])["params"]["pipeline.run_id"]
        == (record["run_id"])
    )

    # listed and reproduced from MLflow
    code, out, _ = cli("pipeline", "runs", "--store", mlflow_server.url)
    assert code == 0 and record["run_id"] in out
    code, out, err = cli("pipeline", "reproduce", record["run_id"], "--store", mlflow_server.url)
    assert code == 0, err
    assert "identical" in out

    # a failed run: FAILED in MLflow with the step and the reason, the alias unmoved
    code, _, err = cli("pipeline", "run", workspace.pipeline(store=mlflow_server.url,
                                                             args=("--fail",)))  # fmt: skip
    assert code == 1 and "failed at train" in err
    failed_id = err.split("run ", 1)[1].split(" ", 1)[0]
    failed = _mlflow_run(mlflow_server, failed_id)
    assert failed["info"]["status"] == "FAILED"
    failed_tags = {t["key"]: t["value"] for t in failed["data"]["tags"]}
    assert failed_tags["edgewise.failed_step"] == "train"
    assert "exited with 3" in failed_tags["edgewise.reason"]
    alias = _call(mlflow_server, "registered-models/alias", name="cancer", alias="production")
    assert int(alias["model_version"]["version"]) == record["registered"]["version"]
