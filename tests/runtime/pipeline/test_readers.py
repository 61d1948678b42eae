"""Readers of the embedded store leave it as they found it: ``pipeline runs``/``show`` and
``models list``/``show`` create no file next to the database (no -wal, no -shm left behind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.runtime.cli.main import main
from edgewise.runtime.pipeline.records import SqliteRunLog
from edgewise.runtime.store.sqlite import SqliteStore


@pytest.mark.parametrize(
    "command",
    [
        ["pipeline", "runs"],
        ["pipeline", "runs", "--json"],
        ["pipeline", "show", "20200101T000000Z-00000000"],
        ["models", "list"],
        ["models", "show", "nosuch"],
    ],
)
def test_a_reader_leaves_no_file_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    store = tmp_path / "store.db"
    SqliteStore(store, create=True).close()
    writer = SqliteRunLog(store, create=True)
    assert writer.list_runs() == []
    writer.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["store.db", "store.db-artifacts"]
    main([*command, "--store", str(store)])
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
