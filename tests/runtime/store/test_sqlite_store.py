"""The embedded store: content-addressed artifacts, writers in several processes, and a publisher
killed with SIGKILL in the middle of its work (nothing half-written)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgewise.runtime.errors import PackageError
from edgewise.runtime.package.manifest import read_manifest, sha256_file
from edgewise.runtime.store import Lineage
from edgewise.runtime.store.register import package_files
from edgewise.runtime.store.sqlite import SqliteStore
from tests.runtime.store.helpers import diabetes_big, logreg_v1, wait_for

PUBLISHER = """
import os, shutil, sys, tempfile
from pathlib import Path
from edgewise.runtime.package.manifest import file_entry, read_manifest
from edgewise.runtime.store import Lineage
from edgewise.runtime.store.register import package_files
from edgewise.runtime.store.sqlite import SqliteStore

db, source, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
folder = Path(tempfile.mkdtemp()) / "pkg"
shutil.copytree(source, folder)
store = SqliteStore(db)
name = read_manifest(folder).name
files = package_files(folder, read_manifest(folder))
done = 0
while count < 0 or done < count:
    # A file of fresh bytes each time, so every publish copies new artifacts.
    (folder / "noise.bin").write_bytes(os.urandom(int(sys.argv[5])))
    entries = (*files, file_entry(folder, "noise.bin"))
    record = store.publish(name, folder, entries, Lineage(author=sys.argv[4]))
    done += 1
    print(record.version, flush=True)
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return logreg_v1(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return diabetes_big(tmp_path_factory.mktemp("big"), trees=60)


def _publisher(
    db: Path, folder: Path, count: int, tag: str, noise: int = 1000
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(db), str(folder), str(count), tag, str(noise)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_integrity(db: Path) -> list[int]:
    """Every version the database lists is complete: each file present with its sha256."""
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = SqliteStore(db)
    try:
        versions = []
        for summary in store.list_models():
            for record in store.list_versions(summary.name):
                for entry in record.files:
                    path = store.artifact_path(entry.sha256)
                    assert path.stat().st_size == entry.size
                    assert sha256_file(path) == entry.sha256
                versions.append(record.version)
        return sorted(versions)
    finally:
        store.close()


def test_artifacts_are_content_addressed(small: Path, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    files = package_files(small, read_manifest(small))
    for _ in range(3):
        store.publish("logreg", small, files, Lineage())
    stored = sorted(p for p in store.artifacts.rglob("*") if p.is_file())
    assert sorted(p.name for p in stored) == sorted(f.sha256 for f in files)  # once each
    for entry in files:
        assert store.artifact_path(entry.sha256).read_bytes() == (small / entry.path).read_bytes()
    with pytest.raises(PackageError):
        store.artifact_path("../../etc/passwd")
    store.close()


def test_writers_in_several_processes(small: Path, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    SqliteStore(db).close()
    writers = [_publisher(db, small, 6, f"writer-{i}") for i in range(4)]
    outputs = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        outputs.extend(int(line) for line in out.split())
    assert sorted(outputs) == list(range(1, 25))
    assert _check_integrity(db) == list(range(1, 25))
    store = SqliteStore(db)
    authors = {r.lineage.author for r in store.list_versions("logreg")}
    assert authors == {f"writer-{i}" for i in range(4)}
    store.close()


def test_a_publisher_killed_mid_write_leaves_nothing_half_written(
    big: Path, tmp_path: Path
) -> None:
    db = tmp_path / "crash.db"
    SqliteStore(db).close()
    rng = random.Random(5)
    for _ in range(5):
        before = _check_integrity(db)
        publisher = _publisher(db, big, -1, "crashy", noise=4 << 20)
        assert publisher.stdout is not None and publisher.stderr is not None
        first = publisher.stdout.readline()  # it is publishing (one version is in)
        assert first.strip().isdigit(), publisher.stderr.read()
        # Then SIGKILL at a random moment of a later publish (copying 4 MB + the package).
        time.sleep(rng.uniform(0.0, 0.08))
        publisher.send_signal(signal.SIGKILL)
        publisher.wait()
        publisher.stdout.close()
        publisher.stderr.close()
        after = _check_integrity(db)
        assert len(after) > len(before) and after[: len(before)] == before
        assert after == list(range(1, len(after) + 1))  # no gap, no partial version
    # The store is usable after the crashes and continues the numbering.
    store = SqliteStore(db)
    record = store.publish("diabetes", big, package_files(big, read_manifest(big)), Lineage())
    assert record.version == len(_check_integrity(db))
    store.close()


def test_default_store_and_environment(small: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("EDGEWISE_STORE", None)
    command = [sys.executable, "-m", "edgewise.runtime.cli"]
    done = subprocess.run(
        [*command, "register", str(small), "--alias", "production", "--no-golden"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (home / ".edgewise" / "store.db").exists()
    assert "golden" not in done.stdout

    # EDGEWISE_STORE names the store; a reader (models list) never creates a missing one.
    env["EDGEWISE_STORE"] = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    listed = subprocess.run(
        [*command, "models", "list"], capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert listed.returncode == 1 and "does not exist" in listed.stderr
    assert not (tmp_path / "elsewhere.db").exists()
    env["EDGEWISE_STORE"] = f"sqlite:///{home / '.edgewise' / 'store.db'}"
    listed = subprocess.run(
        [*command, "models", "list"], capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert listed.returncode == 0 and "logreg" in listed.stdout


def test_schema_version_is_checked(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    SqliteStore(db).close()
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(PackageError, match="schema version 99"):
        SqliteStore(db)


def test_tampered_rows_are_refused(small: Path, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    files = package_files(small, read_manifest(small))
    store.publish("logreg", small, files, Lineage())
    rows = [f.to_json() for f in files]
    rows[0]["path"] = "/etc/passwd"
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE versions SET files = ?", (json.dumps(rows),))
    with pytest.raises(PackageError, match="not a safe relative path"):
        store.get_version("logreg", 1)
    store.close()


def test_wait_for_reports_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="waiting for nothing"):
        wait_for(lambda: False, 0.2, "nothing")
