"""What counts as the training code's version: a pipeline file or data file committed next to
the code is not code, so editing it is no code change (no retrain for that reason, a
reproduction still accepted); a change to the code itself is one."""

from __future__ import annotations

import json

from edgewise.runtime.pipeline.fingerprint import code_version
from tests.runtime.pipeline.conftest import RunCli, Workspace, git


def test_a_committed_pipeline_file_edited_is_no_code_change(
    workspace: Workspace, cli: RunCli
) -> None:
    path = workspace.pipeline()
    git(workspace.root, "add", path.name, workspace.data.name)
    git(workspace.root, "commit", "-q", "-m", "pipeline and data")
    assert cli("pipeline", "run", path)[0] == 0
    first = workspace.runs()[0]
    assert first.code["dirty"] is False
    # an edit to the committed pipeline file that leaves train's inputs alone
    path.write_text(path.read_text().replace('alias = "production"', 'alias = "production"\n'
                                             'description = "edited"'))  # fmt: skip
    code, _, err = cli("pipeline", "run", path, "--json")
    assert code == 0, err
    second = workspace.runs()[0]
    assert second.code["dirty"] is False and second.code == first.code
    assert {s["name"]: s["status"] for s in second.steps}["train"] == "skipped"
    assert len(workspace.calls_made()) == 1
    # and the first run still reproduces (its code version is the one checked out)
    code, out, err = cli("pipeline", "reproduce", first.run_id, "--store", workspace.store,
                         "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["outcome"] == "identical"


def test_an_edit_to_the_code_is_a_code_change(workspace: Workspace) -> None:
    path = workspace.pipeline()
    git(workspace.root, "add", path.name)
    git(workspace.root, "commit", "-q", "-m", "pipeline")
    excludes = [path, workspace.data, workspace.store]
    clean = code_version(workspace.root, excludes)
    assert clean.dirty is False
    path.write_text(path.read_text() + "\n# edited\n")
    assert code_version(workspace.root, excludes).same_as(clean)
    assert code_version(workspace.root, []).dirty is True  # not excluded: a change
    (workspace.root / "train.py").write_text((workspace.root / "train.py").read_text() + "#\n")
    changed = code_version(workspace.root, excludes)
    assert changed.dirty is True and not changed.same_as(clean)
