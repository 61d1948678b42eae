"""The one atomic write: a file is replaced whole or not at all.

What is written goes to a hidden temporary file beside its destination (``.tmp-<uuid>-<name>``,
unique per write, so concurrent writers never share one), is fsynced, renamed over the
destination, and the folder is fsynced so the rename survives a crash. A reader sees the old file
or the new one, never a part. A write that fails (an error, a full disk) leaves the old file (or
none) and removes its temporary file; one cut short by a crash leaves at most a ``.tmp-`` file,
which a folder's owner may recognise by :data:`TEMP_PREFIX` and remove.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = [
    "TEMP_PREFIX",
    "fsync_dir",
    "fsync_file",
    "replacing",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: How the temporary files of :func:`replacing` start (hidden: servers skip dot files).
TEMP_PREFIX: Final = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written through another handle (or by a library given its path)."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _temporary_name(path: Path) -> Path:
    """A name beside ``path`` no other write uses (one per call, not per process)."""
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``: what the block writes there replaces ``path`` atomically
    when the block ends without an error. An error in the block (or in the fsync or rename)
    leaves ``path`` as it was and removes the temporary file, then propagates."""
    temporary = _temporary_name(path)
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`replacing`)."""
    with replacing(path) as temporary, temporary.open("wb") as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (see :func:`replacing`)."""
    write_bytes_atomic(path, text.encode("utf-8"))
