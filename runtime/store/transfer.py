"""Downloading a version's files: streamed, resumable, size-capped, verified.

A file is written to ``<dest>.part`` (created without following symbolic links), resumed from
that file's size on the next try when the store can serve ranges, and renamed to ``<dest>`` only
once its size and sha256 match what the store recorded. Bytes beyond the recorded size are never
written; a sha256 mismatch deletes the partial file (it would only resume garbage) and raises
:class:`~edgewise.runtime.store.base.ArtifactCorrupt`; a dropped connection keeps it and raises
:class:`~edgewise.runtime.store.base.StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgewise.runtime.errors import PackageError, ResourceExhausted
from edgewise.runtime.package.manifest import FileEntry, sha256_file
from edgewise.runtime.store.base import (
    ArtifactCorrupt,
    Store,
    StoreUnavailable,
    VersionRecord,
    safe_join,
)

__all__ = ["FetchResult", "check_size_cap", "fetch_file", "part_path"]

CHUNK: Final = 256 * 1024


@dataclass(frozen=True)
class FetchResult:
    transferred: int  # bytes that came over the network this time
    resumed_from: int  # where the transfer started (0: from the beginning)
    already_there: bool  # the complete file was already on disk


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def check_size_cap(record: VersionRecord, max_bytes: int) -> None:
    total = record.total_bytes
    if total > max_bytes:
        raise ResourceExhausted(
            f"{record.name} version {record.version} is {total} bytes, over the download cap "
            f"of {max_bytes} bytes"
        )
    for entry in record.files:
        if entry.size < 0:
            raise PackageError(f"{record.name} version {record.version}: negative size")


def fetch_file(
    store: Store,
    record: VersionRecord,
    entry: FileEntry,
    root: Path,
    on_bytes: Callable[[int], None] | None = None,
) -> FetchResult:
    """Download ``entry`` of ``record`` into ``root/entry.path`` (see the module docstring)."""
    dest = safe_join(root, entry.path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == entry.size and sha256_file(dest) == entry.sha256:
        return FetchResult(0, 0, True)
    part = part_path(dest)
    if part.is_symlink():
        raise PackageError(f"{part}: is a symbolic link; refusing to write through it")
    offset = part.stat().st_size if part.exists() else 0
    if offset > entry.size:
        offset = 0
    transferred = 0
    resumed_from = 0
    if offset < entry.size or entry.size == 0:
        stream = store.open_file(record, entry, offset)
        try:
            start = stream.offset
            resumed_from = start
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
            flags |= os.O_APPEND if start > 0 else os.O_TRUNC
            fd = os.open(part, flags, 0o644)
            with os.fdopen(fd, "wb") as handle:
                if start > 0 and handle.tell() != start:
                    handle.truncate(start)
                written = start
                try:
                    while True:
                        chunk = stream.read(min(CHUNK, entry.size - written + 1))
                        if not chunk:
                            break
                        if written + len(chunk) > entry.size:
                            handle.close()
                            part.unlink()
                            raise ArtifactCorrupt(
                                f"{record.name} version {record.version} {entry.path}: the store "
                                f"sent more than the recorded {entry.size} bytes"
                            )
                        handle.write(chunk)
                        written += len(chunk)
                        transferred += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                finally:
                    if not handle.closed:
                        handle.flush()
                        os.fsync(handle.fileno())
        finally:
            stream.close()
        if written < entry.size:
            raise StoreUnavailable(
                f"{record.name} version {record.version} {entry.path}: the transfer ended after "
                f"{written} of {entry.size} bytes (kept for resuming)"
            )
    digest = sha256_file(part)
    if digest != entry.sha256:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise ArtifactCorrupt(
            f"{record.name} version {record.version} {entry.path}: sha256 {digest[:12]}… differs "
            f"from the store's {entry.sha256[:12]}… (corrupted artifact)"
        )
    os.replace(part, dest)
    return FetchResult(transferred, resumed_from, False)
