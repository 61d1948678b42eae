"""A reader that closes edgewise's output early (``edgewise ... | head``) ends the command
quietly: no "Broken pipe" error or traceback, exit 141 (128 + SIGPIPE), as a shell reports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgewise.runtime.pipeline.records import SqliteRunLog
from edgewise.runtime.store.sqlite import SqliteStore


def _empty_store(path: Path) -> None:
    """A store whose run log holds no run: ``pipeline runs`` prints one line."""
    SqliteStore(path, create=True).close()
    log = SqliteRunLog(path, create=True)
    assert log.list_runs() == []
    log.close()


def test_a_closed_output_pipe_is_quiet(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    _empty_store(store)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before edgewise writes
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "runs", "--store",
             str(store)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141


def test_output_to_a_live_pipe_is_unchanged(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    _empty_store(store)
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "pipeline", "runs", "--store", str(store)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "no pipeline runs recorded\n", done.stderr
