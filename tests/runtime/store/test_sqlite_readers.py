"""A reader of the embedded store never creates it, reports it unavailable while it is missing,
and sees it again when it comes back (or when another store replaces it)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edgewise.runtime.errors import PackageError
from edgewise.runtime.store import StoreUnavailable, open_store
from edgewise.runtime.store.register import register
from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.store.helpers import logreg_v1


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return logreg_v1(tmp_path_factory.mktemp("package"))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_reader_never_creates_a_missing_store_and_sees_it_once_it_exists(
    tmp_path: Path, package: Path
) -> None:
    path = tmp_path / "store" / "store.db"
    reader = open_store(f"sqlite:///{path}")
    for call in (
        reader.list_models,
        lambda: reader.resolve_alias("logreg", "production"),
        lambda: reader.node_reports("logreg"),
    ):
        with pytest.raises(StoreUnavailable, match="does not exist"):
            call()
    assert _tree(tmp_path) == []  # no folder, no database, no artifacts folder

    writer = open_store(f"sqlite:///{path}", create=True)
    register(writer, package, alias="production")
    assert reader.resolve_alias("logreg", "production").version == 1  # the same reader object
    writer.close()
    reader.close()


def test_a_reader_follows_the_store_away_and_back_and_to_a_replacement(
    tmp_path: Path, package: Path
) -> None:
    folder = tmp_path / "store"
    writer = SqliteStore(folder / "store.db")
    register(writer, package, alias="production")
    writer.close()
    reader = open_store(f"sqlite:///{folder / 'store.db'}")
    assert reader.resolve_alias("logreg", "production").version == 1

    folder.rename(tmp_path / "away")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        reader.resolve_alias("logreg", "production")
    assert not folder.exists()
    (tmp_path / "away").rename(folder)
    assert reader.resolve_alias("logreg", "production").version == 1

    # Another store (two versions) put where the first one was: the reader reads the new one.
    folder.rename(tmp_path / "old")
    other = SqliteStore(folder / "store.db")
    register(other, package)
    register(other, package, alias="production")
    other.close()
    assert reader.resolve_alias("logreg", "production").version == 2
    reader.close()


def test_models_list_on_a_missing_store_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "store.db"
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "models", "list", "--store", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("schema", ["99", None], ids=["newer-schema", "not-a-store"])
def test_a_store_a_reader_refuses_is_refused_at_every_call(
    tmp_path: Path, package: Path, schema: str | None
) -> None:
    path = tmp_path / "store.db"
    writer = SqliteStore(path)
    register(writer, package, alias="production")
    writer.close()
    with sqlite3.connect(path) as db:
        if schema is None:
            db.execute("DROP TABLE meta")
        else:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (schema,))
    db.close()
    reader = open_store(f"sqlite:///{path}")
    for _ in range(2):  # the refused connection is not kept, so the check runs again
        with pytest.raises(PackageError, match=r"schema version 99|not an edgewise store"):
            reader.resolve_alias("logreg", "production")
    reader.close()
