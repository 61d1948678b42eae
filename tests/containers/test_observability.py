"""The Prometheus alert rules and the Grafana dashboard in containers/observability/: valid for
promtool (syntax, and its rule unit tests: each alert fires on its signal), and every metric they
name is one a real server (data capture on) or the sync agent exports; the dashboard's layout,
variables and data source are consistent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edgewise.runtime.agent.sync import AgentMetrics
from edgewise.runtime.client.client import EdgewiseClient
from tests.prerequisites import unmet
from tests.servers import start_server

OBSERVABILITY = Path(__file__).resolve().parents[2] / "containers" / "observability"
RULES = OBSERVABILITY / "prometheus-rules.yaml"
RULES_TESTS = OBSERVABILITY / "prometheus-rules.test.yaml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"

#: Metric names in PromQL: ours and prometheus_client's process and platform collectors'.
_METRIC: re.Pattern[str] = re.compile(r"\b((?:edgewise|process|python)_[a-zA-Z0-9_]*)")
_STRING: re.Pattern[str] = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS: re.Pattern[str] = re.compile(r"\b((?:edgewise|process|python)_[a-zA-Z0-9_]*)\{([^}]*)\}")
#: What Grafana substitutes before the query reaches Prometheus.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "6h",
    "$__interval": "1m",
    "$job": ".*",
    "$instance": ".*",
    "$model": ".*",
    "$agent_job": ".*",
    "$agent_instance": ".*",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unmet("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def rule_expressions() -> list[str]:
    document = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_expressions() -> list[str]:
    data = dashboard()
    found = [
        target["expr"]
        for panel in data["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    found += [a["expr"] for a in data["annotations"]["list"] if "expr" in a]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.*), *\w+\)", query)
            assert match is not None, query
            found.append(match.group(1))
    return found


def substituted(expr: str) -> str:
    for name in sorted(_GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, _GRAFANA_VARIABLES[name])
    assert "$" not in expr, expr
    return expr


def names_in(expr: str) -> set[str]:
    return set(_METRIC.findall(_STRING.sub('""', expr)))


# ---- what the processes export -------------------------------------------------------------


def families_of(text: str) -> dict[str, tuple[set[str], set[str]]]:
    """Sample name -> (the family's sample names, the label names seen on its samples)."""
    exported: dict[str, tuple[set[str], set[str]]] = {}
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("", "_count", "_sum"),
        }.get(family.type, ("",))
        labels = {"job", "instance"} | {key for s in family.samples for key in s.labels}
        names = {family.name + suffix for suffix in suffixes}
        for name in names:
            exported[name] = (names, labels)
    return exported


@pytest.fixture(scope="module")
def exported(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[set[str], set[str]]]]:
    """The names a real server (capture on, a few requests answered) and the agent export."""
    pytest.importorskip("pyarrow", reason="data capture needs pyarrow (the edgewise[data] extra)")
    workdir = tmp_path_factory.mktemp("observability")
    server = start_server(model_repo, workdir, ["--capture-dir", str(workdir / "capture")])
    try:
        with EdgewiseClient(server.target) as client:
            client.infer("logreg", {"features": np.zeros((2, 30), np.float32)})
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    found = families_of(text)
    agent = AgentMetrics()
    from prometheus_client import generate_latest

    found.update(families_of(generate_latest(agent.registry).decode()))
    yield found


# ---- the rules -----------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in checked.stdout


def test_promtool_rule_unit_tests_fire_each_alert() -> None:
    """prometheus-rules.test.yaml feeds each alert its signal (and a healthy neighbour) and
    expects exactly the alerts, labels and texts; the alerts it covers are the issue's."""
    tool = promtool()
    tested = subprocess.run(
        [tool, "test", "rules", RULES_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=OBSERVABILITY,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    for signal in (
        "EdgewiseHighErrorRate",
        "EdgewiseHighP99Latency",
        "EdgewiseShedding",
        "EdgewiseDrift",
        "EdgewiseOnlineQualityDrop",
        "EdgewiseAgentUnhealthy",
        "EdgewiseCaptureDropping",
    ):
        assert signal in fired, signal


def test_rules_have_what_an_alert_needs() -> None:
    document = yaml.safe_load(RULES.read_text())
    names = [rule["alert"] for group in document["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    for group in document["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_name_only_exported_metrics(
    exported: dict[str, tuple[set[str], set[str]]],
) -> None:
    for expr in rule_expressions():
        missing = names_in(expr) - exported.keys()
        assert not missing, (missing, expr)
        check_matchers(expr, exported)
    assert "edgewise_capture_dropped_total" in exported  # the capture's drop counter


def check_matchers(expr: str, exported: dict[str, tuple[set[str], set[str]]]) -> None:
    """Label names in a metric's matchers are labels the metric has (where a sample showed
    them: a labelled family with no series yet shows none, and is not checked)."""
    for name, body in _MATCHERS.findall(expr):
        _names, labels = exported[name]
        if labels == {"job", "instance"}:
            continue
        used = {m.split("=")[0].split("!")[0].strip() for m in body.split(",") if m.strip()}
        assert used <= labels | {"le"}, (name, used - labels)


# ---- the dashboard -------------------------------------------------------------------------


def test_dashboard_names_only_exported_metrics(
    exported: dict[str, tuple[set[str], set[str]]],
) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) > 30
    for expr in expressions:
        plain = substituted(expr)
        missing = names_in(plain) - exported.keys()
        assert not missing, (missing, expr)
        check_matchers(plain, exported)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, Grafana's variables substituted, as a recording rule for promtool's
    parser (it has no query checker of its own)."""
    tool = promtool()
    rules = [
        {"record": f"dashboard:query_{index}", "expr": substituted(expr)}
        for index, expr in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_layout_and_variables() -> None:
    data = dashboard()
    variables = {v["name"] for v in data["templating"]["list"]}
    text = DASHBOARD.read_text()
    for used in set(re.findall(r"\$([a-z_]+)", text)) - {"__rate_interval", "__range"}:
        assert used in variables, used
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        here = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not here & cells, f"{panel['title']} overlaps another panel"
        cells |= here
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    titles = " ".join(panel["title"] for panel in data["panels"]).lower()
    for signal in ("error", "p99", "refused", "drift", "online error", "agent", "dropped"):
        assert signal in titles, signal
