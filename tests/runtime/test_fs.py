"""The one atomic write (runtime/_fs.py): a file is replaced whole or not at all, and a write
that fails leaves the old file and no temporary file."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgewise.runtime import _fs
from edgewise.runtime._fs import TEMP_PREFIX, replacing, write_bytes_atomic, write_text_atomic


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_a_new_file_and_replaces_an_old_one(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_text_atomic(path, "first é\n")
    assert path.read_bytes() == "first é\n".encode()
    write_bytes_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert _entries(tmp_path) == ["config.json"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="cut short"), replacing(path) as temporary:
        seen.append(temporary)
        temporary.write_text("half of the new")
        raise RuntimeError("cut short")
    assert path.read_text() == "old"
    assert _entries(tmp_path) == ["state.json"]
    assert seen[0].parent == tmp_path and seen[0].name.startswith(TEMP_PREFIX)


@pytest.mark.parametrize("failing", ["fsync_file", "replace"])
def test_a_failed_fsync_or_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "manifest.sig"
    path.write_text("old")

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "replace":
        monkeypatch.setattr(_fs.os, "replace", disk_full)
    else:
        monkeypatch.setattr(_fs, "fsync_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert _entries(tmp_path) == ["manifest.sig"]


def test_a_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    with pytest.raises(ValueError), replacing(path) as temporary:
        temporary.write_text("a,b\n")
        raise ValueError("a column the format cannot hold")
    assert _entries(tmp_path) == []


def test_the_renamed_file_and_its_folder_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "part.parquet"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((Path(name).name, path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(_fs.os, "fsync", recording)
    write_text_atomic(path, "rows")
    (file_name, renamed_yet), folder = synced
    assert file_name.startswith(TEMP_PREFIX) and not renamed_yet  # the file, before the rename
    assert folder == (tmp_path.name, True)  # the folder, after it


def _write_concurrently(path: Path, texts: list[str]) -> None:
    """Writers, one per text, each writing its text five times from the same moment; the first
    error a writer meets is raised here."""
    start = threading.Barrier(len(texts))

    def write(text: str) -> None:
        start.wait()
        for _ in range(5):
            write_text_atomic(path, text)

    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        for future in [pool.submit(write, text) for text in texts]:
            future.result()


def test_concurrent_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Every writer has its own temporary name: the file is always one writer's whole text."""
    path = tmp_path / "state.json"
    texts = [str(n) * 50_000 for n in range(8)]
    _write_concurrently(path, texts)
    assert path.read_text() in texts
    assert _entries(tmp_path) == ["state.json"]


def test_the_concurrent_writers_test_sees_a_shared_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: with one temporary name per process (as the agent's state file
    had) a writer finds its temporary file renamed away or overwritten by another."""
    monkeypatch.setattr(
        _fs, "_temporary_name", lambda path: path.with_name(f"{TEMP_PREFIX}{os.getpid()}")
    )
    path = tmp_path / "state.json"
    texts = [str(n) * 50_000 for n in range(8)]
    with pytest.raises((OSError, AssertionError)):  # seen: FileNotFoundError in round one
        for _ in range(20):  # a race: each round gives it a chance
            _write_concurrently(path, texts)
            assert path.read_text() in texts
