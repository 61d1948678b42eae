"""Rollback protection and signatures in the agent (in the test's process; a real SQLite store, a
real server, real packages and ed25519 keys): an alias moved back to a lower version is refused
unless the rollback is explicit, refusals change nothing and are counted and reported to the
store, and the agent's own rollbacks keep working."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgewise.runtime.agent.progressive import read_decisions
from edgewise.runtime.agent.state import AgentState, Deployed
from edgewise.runtime.agent.sync import rollback
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.signing import generate_keypair, sign_package
from edgewise.runtime.store.base import Lineage
from edgewise.runtime.store.register import package_files, register
from edgewise.runtime.store.sqlite import SqliteStore
from edgewise.runtime.store.transfer import fetch_file
from tests.runtime.store.agent_rig import Rig, gauge, served_default


def _refusals(rig: Rig, reason: str) -> float:
    assert rig.agent is not None
    return gauge(rig.agent.metrics, "edgewise_agent_refusals_total", reason=reason) or 0.0


def _report(rig: Rig) -> tuple[str, str]:
    assert rig.publisher is not None
    (report,) = [r for r in rig.publisher.node_reports(rig.name) if r.node == "edge-1"]
    return report.health, report.detail


def test_an_alias_moved_back_is_refused_until_the_rollback_is_explicit(rig: Rig) -> None:
    agent = rig.start_agent()
    rig.register(0)
    agent.run_once()
    rig.register(1)
    agent.cycle()
    assert served_default(rig.client, rig.name) == 2
    assert rig.state().highest_served == 2
    state_before = rig.state_file.path.read_bytes()
    config_before = (rig.repo / rig.name / "config.json").read_bytes()

    assert rig.publisher is not None
    rig.publisher.set_alias(rig.name, "production", 1)  # a store writer moves it back
    agent.cycle()
    assert served_default(rig.client, rig.name) == 2  # nothing changed on the node
    assert rig.state_file.path.read_bytes() == state_before
    assert (rig.repo / rig.name / "config.json").read_bytes() == config_before
    assert _refusals(rig, "rollback") == 1
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 0
    health, detail = _report(rig)  # recorded in the store
    assert health == "degraded" and "rollback protection refuses it" in detail
    assert "lower than version 2" in detail
    (decision,) = [d for d in read_decisions(rig.publisher, rig.name) if d["verdict"] == "refused"]
    assert decision["description"] == "rollback protection" and decision["candidate"] == 1
    assert decision["stable"] == 2 and decision["evidence"]["highest_served"] == 2
    agent.cycle()
    assert _refusals(rig, "rollback") == 1  # counted once per target, not per poll

    # A restarted agent remembers what it served (the state file), and still refuses.
    agent = rig.start_agent()
    agent.cycle()
    assert _refusals(rig, "rollback") == 1 and served_default(rig.client, rig.name) == 2

    # Explicit: `edgewise agent --allow-rollback` (the CLI, one poll).
    rig.stop_agent()
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "agent", "--store", rig.store_uri,
         "--model", rig.name, "--repo", str(rig.repo), "--server", rig.server.target,
         "--server-metrics", rig.server.metrics_url, "--node-id", "edge-1", "--once",
         "--metrics-port", "-1", "--watch-seconds", "0", "--no-local-load", "--allow-rollback"],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deploying it (--allow-rollback)" in done.stderr
    assert served_default(rig.client, rig.name) == 1
    state = rig.state()
    assert state.deployed is not None and state.deployed.version == 1
    assert state.highest_served == 2  # the floor never falls
    agent = rig.start_agent()  # without the flag again: the alias names what serves
    agent.cycle()
    assert _refusals(rig, "rollback") == 0
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 1


def test_the_agents_own_rollbacks_stay_allowed(rig: Rig) -> None:
    agent = rig.start_agent()
    rig.register(0)
    agent.run_once()
    rig.register(1)
    agent.cycle()
    # By hand on the node (what `edgewise rollback` does): explicit, so allowed.
    assert rollback(rig.repo, rig.name, rig.client) == (2, 1)
    agent.cycle()
    assert served_default(rig.client, rig.name) == 1
    assert rig.state().highest_served == 2
    # The alias then follows the rollback to the version that serves: no refusal.
    assert rig.publisher is not None
    rig.publisher.set_alias(rig.name, "production", 1)
    agent.cycle()
    assert served_default(rig.client, rig.name) == 1
    assert _refusals(rig, "rollback") == 0
    assert gauge(agent.metrics, "edgewise_agent_healthy") == 1
    # A new version goes forward as usual.
    rig.register(1)
    agent.cycle()
    assert served_default(rig.client, rig.name) == 3 and rig.state().highest_served == 3


def test_a_state_file_from_before_the_field_keeps_its_floor() -> None:
    old = AgentState(
        model="m",
        deployed=Deployed(3, "a" * 64),
        last_good=Deployed(3, "a" * 64),
        good=(Deployed(2, "b" * 64), Deployed(5, "c" * 64), Deployed(3, "a" * 64)),
    )
    data = old.to_json()
    del data["highest_served"]
    assert AgentState.from_json(data).served_floor == 5
    raised = AgentState.from_json(data).serving(Deployed(4, "d" * 64))
    assert raised.highest_served == 5 and raised.deployed == Deployed(4, "d" * 64)
    assert AgentState(model="m").served_floor is None
    with pytest.raises(Exception, match="highest_served"):
        AgentState.from_json({**data, "highest_served": "5"})


def test_the_agent_refuses_a_package_signed_for_another_version(rig: Rig, tmp_path: Path) -> None:
    """A store writer publishes version 1's signed files again, as version 2: refused, counted
    by its reason, the server keeps version 1."""
    private, public, _ = generate_keypair(tmp_path / "keys", "release")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / "release.pub")
    rig.publisher = rig.publisher or SqliteStore(rig.store_folder / "store.db")
    first = register(rig.publisher, rig.packages[0], alias="production", sign_key=private).record
    assert first.version == 1
    agent = rig.start_agent(trusted_keys=trusted)
    agent.run_once()
    assert served_default(rig.client, rig.name) == 1
    # Version 1's files, signed as 1, fetched back and published again: the store numbers it 2.
    copy = tmp_path / "replay" / rig.name / "1"
    copy.mkdir(parents=True)
    for entry in first.files:
        fetch_file(rig.publisher, first, entry, copy)
    replayed = rig.publisher.publish(
        rig.name, copy, package_files(copy, read_manifest(copy)), Lineage()
    )
    assert replayed.version == 2
    rig.publisher.set_alias(rig.name, "production", 2)
    agent.cycle()
    assert served_default(rig.client, rig.name) == 1
    assert (
        gauge(agent.metrics, "edgewise_agent_refusals_total", reason="signature_version_mismatch")
        == 1
    )
    health, detail = _report(rig)
    assert health == "degraded" and "signed as version 1" in detail
    (decision,) = [d for d in read_decisions(rig.publisher, rig.name) if d["verdict"] == "refused"]
    assert decision["evidence"]["signature"] == "version_mismatch"
    # Signed for its number, it is deployed.
    sign_package(copy, private, version=3, config_dir=rig.repo / rig.name)
    signed = rig.publisher.publish(
        rig.name, copy, package_files(copy, read_manifest(copy)), Lineage()
    )
    assert signed.version == 3
    rig.publisher.set_alias(rig.name, "production", 3)
    agent.cycle()
    assert served_default(rig.client, rig.name) == 3
    config = json.loads((rig.repo / rig.name / "config.json").read_text())
    assert config["default_version"] == 3
