"""Fleet waves: a wave starts only once every node of the waves before it reports the new version
healthy through the store; three real servers and agents on one SQLite store, and the rule itself
against hand-made reports."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgewise.runtime.agent.policy import parse_policy, write_policy
from edgewise.runtime.agent.sync import Agent, AgentMetrics, AgentSettings
from edgewise.runtime.agent.waves import Wave, fleet_order, wave_counts, wave_wait
from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.store import open_store
from edgewise.runtime.store.base import NodeReport
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.store.agent_rig import served_default
from tests.runtime.store.helpers import copy_package, logreg_v1, logreg_v2, start_empty_server
from tests.servers import RunningServer

SHA = "a" * 64


def _report(node: str, version: int, health: str = "ok", state: str = "idle") -> NodeReport:
    return NodeReport(node=node, model="m", version=version, sha256=SHA, health=health, state=state)


def test_wave_sizes_and_the_rule() -> None:
    waves = (Wave(nodes=1), Wave(share=0.25), Wave(share=1.0))
    assert wave_counts(waves, 100) == [1, 25, 100]
    assert wave_counts(waves, 2) == [1, 1, 2]
    nodes = [f"n{i}" for i in range(8)]
    order = fleet_order(nodes, 7)
    assert order == fleet_order(list(reversed(nodes)), 7)  # the same on every node
    assert len({fleet_order(nodes, v)[0] for v in range(20)}) > 1  # not always the same node
    first, second, third = order[0], order[1], order[5]
    reports = [_report(n, 6) for n in nodes]
    assert wave_wait(first, reports, 7, SHA, waves) == ""  # the first wave goes at once
    assert "waiting for 1 of the 1" in wave_wait(second, reports, 7, SHA, waves)
    reports = [_report(first, 7)] + [_report(n, 6) for n in nodes if n != first]
    assert wave_wait(second, reports, 7, SHA, waves) == ""  # 25 % of 8 = 2: second is in it
    assert "waiting for 1 of the 2" in wave_wait(third, reports, 7, SHA, waves)
    # A node of an earlier wave that is degraded, or still watching, holds the next wave.
    for bad in (_report(first, 7, health="degraded"), _report(first, 7, state="watching")):
        held = [bad] + [r for r in reports if r.node != first]
        assert wave_wait(second, held, 7, SHA, waves) != ""


@pytest.mark.parametrize(
    ("waves", "field"),
    [
        ([{"nodes": 1}], "last wave"),
        ([{"share": 0}, {"share": 1.0}], "waves[0].share"),
        ([{"nodes": 0}, {"share": 1.0}], "waves[0].nodes"),
        ([{"nodes": 1, "share": 0.5}, {"share": 1.0}], "waves[0]"),
        ([{"size": 1}, {"share": 1.0}], "unknown key(s) 'size'"),
    ],
)
def test_bad_waves_are_refused(waves: list[object], field: str) -> None:
    with pytest.raises(InvalidInput, match="rollout policy") as caught:
        parse_policy({"waves": waves})
    assert field in caught.value.message


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Path, RunningServer]]]:
    nodes = []
    try:
        for i in range(3):
            repo = tmp_path_factory.mktemp(f"node{i}")
            nodes.append((repo, start_empty_server(repo, tmp_path_factory.mktemp(f"server{i}"))))
        yield nodes
    finally:
        for _, server in nodes:
            server.stop()


def test_a_wave_waits_for_the_nodes_before_it(
    fleet: list[tuple[Path, RunningServer]], tmp_path: Path
) -> None:
    name = "fleetmodel"
    packages = [
        copy_package(make(tmp_path / f"src{i}"), tmp_path / f"pkg{i}", name)
        for i, make in enumerate((logreg_v1, logreg_v2))
    ]
    publisher = SqliteStore(tmp_path / "store" / "store.db")
    uri = f"sqlite:///{tmp_path / 'store' / 'store.db'}"
    agents: dict[str, tuple[Agent, EdgewiseClient]] = {}
    try:
        register(publisher, packages[0], alias="production")
        for i, (repo, server) in enumerate(fleet):
            settings = AgentSettings(
                model=name, repo=repo, server=server.target, server_metrics=server.metrics_url,
                node_id=f"node-{i}", interval=0.1, watch_seconds=0.0, local_load=False,
                report_interval=0.0,
            )  # fmt: skip
            client = EdgewiseClient(server.target)
            agents[settings.node_id] = (
                Agent(settings, open_store(uri), client, AgentMetrics()),
                client,
            )
        for agent, client in agents.values():
            assert agent.run_once()
            assert served_default(client, name) == 1
        policy = {"waves": [{"nodes": 1}, {"share": 1.0}]}
        write_policy(publisher, name, "production", parse_policy(policy))
        record = register(publisher, packages[1], alias="production").record
        first, *rest = fleet_order(list(agents), record.version)
        for node in rest:  # they go first and must wait
            agent, client = agents[node]
            agent.cycle()
            assert served_default(client, name) == 1
            assert "waiting for 1 of the 1" in agent.detail
        reports = {r.node: r for r in publisher.node_reports(name)}
        assert {reports[n].state for n in rest} == {"waiting"}
        agents[first][0].cycle()
        assert served_default(agents[first][1], name) == 2
        for node in rest:
            agents[node][0].cycle()
            assert served_default(agents[node][1], name) == 2
        reports = {r.node: r for r in publisher.node_reports(name)}
        assert {r.version for r in reports.values()} == {2}
        assert json.loads(json.dumps([r.to_json() for r in reports.values()]))  # readable
    finally:
        for agent, client in agents.values():
            agent.store.close()
            client.close()
        publisher.close()


def test_a_node_that_left_or_follows_another_alias_holds_no_wave() -> None:
    from edgewise.runtime.store.lineage import utc_now

    waves = (Wave(nodes=1), Wave(share=1.0))
    first, second = fleet_order(["a", "b"], 7)
    now = time.time()
    since = now - 30.0  # when `second` first saw version 7

    def report(target: int, age: float) -> NodeReport:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - age))
        return NodeReport(
            node=first, model="m", version=6, sha256=SHA, health="ok", state="idle",
            target_version=target, updated_at=at,
        )  # fmt: skip

    def wait(first_report: NodeReport) -> str:
        return wave_wait(second, [first_report], 7, SHA, waves, now, since, 60.0)

    assert utc_now().endswith("Z")  # the format the agents write, parsed above
    assert "waiting for 1 of the 1" in wait(report(7, 5.0))  # follows, not there yet
    assert "waiting for 1 of the 1" in wait(report(6, 45.0))  # has not polled since the flip
    assert wait(report(6, 5.0)) == ""  # polled since, still on 6: follows another alias
    assert wait(report(7, 3600.0)) == ""  # its last report is an hour old: it left


def test_waiting_ends_when_the_alias_goes_back_and_a_bad_policy_refuses(
    fleet: list[tuple[Path, RunningServer]], tmp_path: Path
) -> None:
    from edgewise.runtime.agent.policy import POLICY_PREFIX
    from edgewise.runtime.store.lineage import utc_now

    name = "waitmodel"
    repo, server = fleet[0]
    packages = [
        copy_package(make(tmp_path / f"src{i}"), tmp_path / f"pkg{i}", name)
        for i, make in enumerate((logreg_v1, logreg_v2))
    ]
    publisher = SqliteStore(tmp_path / "store" / "store.db")
    settings = AgentSettings(
        model=name, repo=repo, server=server.target, server_metrics=server.metrics_url,
        node_id="me", interval=0.1, watch_seconds=0.0, local_load=False, report_interval=0.0,
    )  # fmt: skip
    client = EdgewiseClient(server.target)
    agent = Agent(settings, open_store(f"sqlite:///{tmp_path / 'store' / 'store.db'}"), client)
    try:
        register(publisher, packages[0], alias="production")
        assert agent.run_once()
        write_policy(publisher, name, "production", parse_policy({"waves": WAVES}))
        version = register(publisher, packages[1], alias="production").record.version
        # A node ahead of this one in the order, following the alias, not there yet.
        ahead = next(n for n in (f"n{i}" for i in range(50)) if fleet_order([n, "me"], 2)[0] == n)
        publisher.report_node(
            NodeReport(node=ahead, model=name, version=1, sha256=SHA, health="ok",
                       state="idle", target_version=version, updated_at=utc_now())
        )  # fmt: skip
        agent.cycle()
        assert agent.phase == "waiting" and served_default(client, name) == 1
        publisher.set_alias(name, "production", 1)  # the alias goes back
        agent.cycle()
        assert agent.phase == "idle" and agent.health == "ok"
        # An invalid stored policy refuses the version (no retry loop of failed polls).
        publisher.set_model_tag(name, POLICY_PREFIX + "production", "{not json")
        publisher.set_alias(name, "production", version)
        agent.cycle()
        state = agent.state_file.read()
        assert any(r.version == version for r in state.rejected), state.rejected
        assert agent.failures == 0 and agent.health == "degraded"
        assert served_default(client, name) == 1
    finally:
        agent.store.close()
        client.close()
        publisher.close()


WAVES = [{"nodes": 1}, {"share": 1.0}]
