"""`edgewise rollback` while a rollout runs, on a real server with a real agent (in a thread, as
its process runs it) and the real CLI: the candidate goes back, not the stable version. The
running rollout stops, traffic returns to the stable version at once with no failed client
request, the candidate is refused with the reason "manual", the abort is recorded in the store
with its evidence and counted in the agent's metrics; the state lock is free during the steps'
waits (a reader or a rollback never waits for a rollout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgewise.runtime.agent.policy import parse_policy, write_policy
from edgewise.runtime.agent.progressive import read_decisions
from edgewise.runtime.cli.main import main
from edgewise.runtime.store.register import register
from tests.runtime.rollout.conftest import LONG_CANARY, AgentThread, in_canary_step, metric
from tests.runtime.rollout.test_rollout_agent import Clients
from tests.runtime.store.agent_rig import Rig, served_default
from tests.runtime.store.helpers import copy_package, wait_for


def test_a_rollback_during_a_canary_aborts_the_candidate(
    rig: Rig, packages: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rig.register(0)
    rig.start_agent().run_once()
    assert served_default(rig.client, rig.name) == 1
    rig.client.set_version_label(rig.name, "canary", "1")
    assert rig.publisher is not None
    write_policy(rig.publisher, rig.name, "production", parse_policy(LONG_CANARY))
    candidate = copy_package(packages["good"], rig.root / "candidate", rig.name)
    assert register(rig.publisher, candidate, alias="production").record.version == 2

    traffic = Clients(rig.server.target, rig.name, rig.packages[0])
    traffic.start()
    running = AgentThread(rig)
    try:
        # The canary answers part of the traffic: the rollout is in its step.
        wait_for(lambda: "2" in traffic.versions, 60, "the canary answering clients")
        assert metric(rig, "edgewise_agent_rollout_step") == 1
        assert metric(rig, "edgewise_agent_rollout_version") == 2
        state = rig.state()
        assert state.rollout is not None and state.rollout.version == 2
        assert state.deployed is not None and state.deployed.version == 1
        # The step waits without the state lock: another process takes it (a reader, a
        # rollback would) while the rollout runs; a lock held would fail this after 5 s.
        with rig.state_file.locked(timeout=5.0):
            pass

        capsys.readouterr()
        code = main(["rollback", rig.name, "--repo", str(rig.repo), "--server", rig.server.target])
        assert code == 0
        assert "from version 2 to version 1" in capsys.readouterr().out
        mark = len(traffic.versions)
        # Out of traffic at once: no split, no shadow, "canary" names the stable version.
        rollout = rig.client.get_rollout(rig.name)
        assert not rollout.weights and not rollout.shadow_version
        assert dict(rollout.labels)["canary"] == "1"
        assert served_default(rig.client, rig.name) == 1
        wait_for(lambda: len(traffic.versions) > mark + 50, 60, "client traffic after it")
        # (the one request that may have been in flight at the rollback aside)
        assert set(traffic.versions[mark + 1 :]) == {"1"}

        # The agent ends the rollout: its decision, its metrics, the candidate unloaded.
        wait_for(lambda: rig.state().rollout is None, 60, "the agent ending the rollout")
        assert rig.publisher is not None
        decisions = read_decisions(rig.publisher, rig.name)
        abort = decisions[-1]
        assert abort["verdict"] == "abort" and abort["reasons"] == ["manual"]
        assert abort["candidate"] == 2 and abort["stable"] == 1
        evidence: dict[str, Any] = abort["evidence"]
        assert evidence["by"] == "edgewise rollback" and evidence["step"] == 1
        assert evidence["step_description"] == "canary 50 % for 600 s"
        assert evidence["phase"] == "rollout" and evidence["aborted_at"]
        assert metric(rig, "edgewise_agent_rollbacks_total", reason="manual") == 1
        assert metric(rig, "edgewise_agent_deploys_total", result="rolled_back") == 1
        assert metric(rig, "edgewise_agent_rollout_decisions_total", verdict="abort") == 1
        assert metric(rig, "edgewise_agent_rollout_step") == 0
        assert metric(rig, "edgewise_agent_rollout_version") == 0
        state = rig.state()
        assert state.deployed is not None and state.deployed.version == 1
        assert state.rejected[-1].version == 2 and state.rejected[-1].reason == "manual"
        assert not (rig.repo / rig.name / "2").exists()
        wait_for(
            lambda: (
                {
                    s.version
                    for s in rig.client.repository_index()
                    if s.name == rig.name and s.state == "READY"
                }
                == {"1"}
            ),
            30,
            "the candidate unloaded",
        )
        # The alias still names version 2: the agent keeps it refused, version 1 serves.
        assert rig.agent is not None
        polls = metric(rig, "edgewise_agent_polls_total", result="ok")
        wait_for(
            lambda: metric(rig, "edgewise_agent_polls_total", result="ok") > polls + 2,
            30,
            "more polls",
        )
        assert served_default(rig.client, rig.name) == 1
        assert rig.agent.health == "degraded" and "refused: manual" in rig.agent.detail
    finally:
        running.stop()
        traffic.stop()
    assert traffic.failures == [], traffic.failures[:3]

    # With no rollout running, a rollback is as before: the deployed version goes back (here
    # there is no earlier good version: refused, nothing changed).
    before = rig.state_file.path.read_bytes()
    code = main(["rollback", rig.name, "--repo", str(rig.repo), "--server", rig.server.target])
    err = capsys.readouterr().err
    assert code != 0 and "no earlier good version" in err and len(err.strip().splitlines()) == 1
    assert rig.state_file.path.read_bytes() == before


def test_a_rollback_to_another_version_during_a_rollout_is_refused(
    rig: Rig, packages: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rig.register(0)
    rig.start_agent().run_once()
    assert rig.publisher is not None
    write_policy(rig.publisher, rig.name, "production", parse_policy(LONG_CANARY))
    candidate = copy_package(packages["good"], rig.root / "candidate", rig.name)
    register(rig.publisher, candidate, alias="production")
    running = AgentThread(rig)
    try:
        wait_for(lambda: metric(rig, "edgewise_agent_rollout_step") == 1, 60, "the step")
        before = rig.state_file.path.read_bytes()
        argv = ["rollback", rig.name, "--repo", str(rig.repo), "--server", rig.server.target]
        capsys.readouterr()
        assert main([*argv, "--to", "2"]) != 0
        err = capsys.readouterr().err
        assert "being rolled out" in err and len(err.strip().splitlines()) == 1
        assert rig.state_file.path.read_bytes() == before  # refused: nothing changed
        split = {w.version: w.weight for w in rig.client.get_rollout(rig.name).weights}
        assert split == {"1": 50, "2": 50}
        assert main([*argv, "--to", "1"]) == 0  # the stable version: the abort
        wait_for(lambda: rig.state().rollout is None, 60, "the agent ending the rollout")
        assert not rig.client.get_rollout(rig.name).weights
    finally:
        running.stop()


def test_a_rollout_left_by_a_dead_agent_is_aborted_and_recorded_by_the_next_one(
    rig: Rig, packages: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent killed in a step leaves its rollout in the state file and its split on the
    server: `edgewise rollback` aborts it all the same (traffic back at once), and the next
    agent's first poll records the abort and unloads the candidate."""
    from dataclasses import replace

    from edgewise.runtime.agent.state import Rollout

    # a clean stop clears what a SIGKILL leaves: put it back as it would be
    record = in_canary_step(rig, packages)
    state = rig.state()
    assert state.rollout is None
    dead = Rollout(2, record.model_sha256, 1, 0.0)
    rig.state_file.write(replace(state, rollout=dead))
    rig.client.set_traffic_split(rig.name, [("1", 50), ("2", 50)])
    rig.client.set_version_label(rig.name, "canary", "2")

    argv = ["rollback", rig.name, "--repo", str(rig.repo), "--server", rig.server.target]
    assert main(argv) == 0
    assert "from version 2 to version 1" in capsys.readouterr().out
    rollout = rig.client.get_rollout(rig.name)
    assert not rollout.weights and dict(rollout.labels)["canary"] == "1"
    aborted = rig.state().rollout
    assert aborted is not None and aborted.aborted == "manual"  # nobody recorded it yet

    agent = rig.start_agent()
    agent.run_once()
    assert rig.state().rollout is None
    # (the clean stop above recorded the candidate withdrawn, maybe within the same second)
    verdicts = {d["verdict"]: d for d in read_decisions(rig.publisher, rig.name)}
    assert verdicts["withdrawn"]["reasons"] == ["the agent stopped"]
    decision = verdicts["abort"]
    assert (decision["verdict"], decision["reasons"]) == ("abort", ["manual"])
    assert decision["evidence"]["by"] == "edgewise rollback"
    assert metric(rig, "edgewise_agent_rollbacks_total", reason="manual") == 1
    assert {
        s.version
        for s in rig.client.repository_index()
        if s.name == rig.name and s.state == "READY"
    } == {"1"}
    assert served_default(rig.client, rig.name) == 1


def test_a_rollout_left_by_a_dead_agent_is_withdrawn_at_the_next_poll(
    rig: Rig, packages: dict[str, Path]
) -> None:
    """Not aborted: the next agent's first poll takes the candidate out of traffic and clears
    the record; the candidate is not refused."""
    from dataclasses import replace

    from edgewise.runtime.agent.state import Rollout

    record = in_canary_step(rig, packages)
    dead = Rollout(2, record.model_sha256, 1, 0.0)
    rig.state_file.write(replace(rig.state(), rollout=dead))
    rig.client.set_traffic_split(rig.name, [("1", 50), ("2", 50)])

    # The alias back on version 1: only the clearing of what the dead agent left can change
    # the server's rollout in the next poll.
    rig.publisher.set_alias(rig.name, "production", 1)
    rig.start_agent().run_once()
    assert rig.state().rollout is None
    rollout = rig.client.get_rollout(rig.name)
    assert not rollout.weights and not rollout.shadow_version
    assert dict(rollout.labels)["canary"] == "1"
    assert rig.state().rejection(2, record.model_sha256) is None  # not refused
    assert served_default(rig.client, rig.name) == 1
