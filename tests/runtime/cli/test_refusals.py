"""A refused call changes nothing: ``register`` and ``pipeline run`` refuse bad inputs before
the store is opened, so no store (database, artifacts folder) is created by a refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.runtime.cli.main import main
from tests.runtime.pipeline.conftest import Workspace, workspace
from tests.runtime.store.helpers import logreg_v1

__all__ = ["workspace"]


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metric", "acc=notnum"], "metric 'acc': 'notnum' is not a number"),
        (["--alias", "bad alias"], "alias"),
        (["--gate", "nosuch.toml"], "nosuch.toml"),
        (["--sign-key", "nosuch.key"], "nosuch.key"),
        (["--data", "nosuch.csv"], "training data nosuch.csv: no such file or folder"),
        (["--code-dir", "/nonexistent"], "--code-dir /nonexistent: no such folder"),
    ],
)
def test_a_refused_register_creates_no_store(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    package = logreg_v1(tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store.db"
    code, err = _run(capsys, "register", package, "--store", f"sqlite:///{store}", *extra)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no store.db, no -artifacts


def test_register_a_missing_package_creates_no_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store.db"
    code, err = _run(capsys, "register", tmp_path / "repo" / "m" / "1", "--store", store)
    assert code == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_pipeline_with_no_code_folder_creates_no_store(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    path = workspace.pipeline()
    path.write_text(path.read_text().replace("[train]\n", '[train]\ncode = "nosuchdir"\n'))
    code, err = _run(capsys, "pipeline", "run", path)
    assert code == 1 and err.count("\n") == 1 and "nosuchdir" in err, err
    assert not workspace.store.exists()
    assert not any(p.name.startswith("store.db") for p in workspace.root.iterdir())
