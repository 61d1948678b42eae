"""The capture folder: complete Parquet files, the oldest removed past the size cap, and its
files, bytes and removals always what the folder holds (a hypothesis state machine)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgewise.runtime.serving.capture_files import CaptureFolder, captured_files


def table(rows: int, seed: int = 0) -> pa.Table:
    values = np.random.default_rng(seed).normal(size=rows)
    return pa.table({"request_id": [f"r{i}" for i in range(rows)], "x": values})


def on_disk(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in captured_files(root)}


def test_cap_removes_the_oldest_files_first(tmp_path: Path) -> None:
    changes: list[tuple[int, int, int]] = []
    probe = CaptureFolder(tmp_path / "probe", 1 << 30)
    size = probe.write("m/1", table(50)).size
    cap = 3 * size + size // 2  # room for three files of this size
    folder = CaptureFolder(tmp_path / "c", cap, lambda *change: changes.append(change))
    written = [folder.write("m/1", table(50, seed)).path for seed in range(6)]
    kept = list(captured_files(tmp_path / "c"))
    assert kept == written[-3:]  # the three newest, oldest first
    assert folder.removed == 3 and sum(c[2] for c in changes) == 3
    assert changes[-1][:2] == (3, sum(p.stat().st_size for p in kept))
    for path in kept:
        assert pq.read_table(path).num_rows == 50


def test_opening_a_folder_counts_its_files_and_removes_cut_short_writes(tmp_path: Path) -> None:
    """A temporary file left by a dead writer goes; one a running sibling process is writing
    (serve --processes N) stays."""
    folder = CaptureFolder(tmp_path, 1 << 30)
    folder.write("m/1", table(10))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        leftover = (
            tmp_path / "m" / "1" / f".tmp-0123abcd-1765000000000000000-{dead.pid}-000001.parquet"
        )
        leftover.write_bytes(b"PAR1 half a file")
        sibling = (
            tmp_path / "m" / "1" / f".tmp-4567abcd-1765000000000000000-{alive.pid}-000001.parquet"
        )
        sibling.write_bytes(b"PAR1 being written")
        again = CaptureFolder(tmp_path, 1 << 30)
        assert not leftover.exists()
        assert sibling.exists()
    finally:
        alive.communicate(b"")
    assert [f.path for f in again.files] == list(captured_files(tmp_path))
    assert again.bytes == sum(on_disk(tmp_path).values())


def test_a_failed_write_leaves_no_file_and_changes_nothing(tmp_path: Path) -> None:
    folder = CaptureFolder(tmp_path, 1 << 30)
    folder.write("m/1", table(5))
    before = (folder.files, folder.bytes)
    try:
        folder.write("m/1", object())  # not a table: pyarrow refuses it
    except Exception:
        pass
    else:
        raise AssertionError("writing a non-table should fail")
    assert (folder.files, folder.bytes) == before
    assert not list(tmp_path.rglob(".tmp-*"))
    assert len(list(captured_files(tmp_path))) == 1


class FolderMachine(RuleBasedStateMachine):
    """Writes of random sizes under a small cap, reopenings (a restarted server) and files
    deleted behind its back by an operator; after each step the folder's own account (files,
    bytes, removals) agrees with what is on disk and the cap holds."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="capture-sm-"))
        self.cap = 6000
        self.folder = CaptureFolder(self.root, self.cap)
        self.written = 0
        self.removed = 0  # by the cap, over every opening
        self.deleted = 0  # by the operator

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(rows=st.integers(1, 400), model=st.sampled_from(["a/1", "a/2", "b/1"]))
    def write(self, rows: int, model: str) -> None:
        before = self.folder.removed
        self.folder.write(model, table(rows, rows))
        self.written += 1
        self.removed += self.folder.removed - before

    @rule()
    def reopen(self) -> None:
        self.folder = CaptureFolder(self.root, self.cap)
        self.removed += self.folder.removed

    @precondition(lambda self: bool(list(captured_files(self.root))))
    @rule(data=st.data())
    def operator_deletes_and_reopens(self, data: st.DataObject) -> None:
        paths = list(captured_files(self.root))
        data.draw(st.sampled_from(paths)).unlink()
        self.deleted += 1
        self.reopen()

    @invariant()
    def account_matches_the_folder(self) -> None:
        disk = on_disk(self.root)
        assert [f.path for f in self.folder.files] == list(disk)
        assert [f.size for f in self.folder.files] == list(disk.values())
        assert self.folder.bytes == sum(disk.values()) <= self.cap
        assert len(disk) == self.written - self.removed - self.deleted
        assert not list(self.root.rglob(".tmp-*"))


TestFolderMachine = FolderMachine.TestCase
TestFolderMachine.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
