"""What a run depends on, as fingerprints: the training code's version (git commit plus a hash
of its uncommitted changes), the environment (package versions) and step keys (a hash over a
step's inputs' fingerprints)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.store.lineage import git_info

__all__ = [
    "CodeVersion",
    "code_version",
    "environment",
    "step_key",
]

KEY_PACKAGES: Final = (
    "edgewise",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "skl2onnx",
    "onnx",
    "onnxruntime",
    "joblib",
    "scipy",
)
"""Packages whose versions are recorded by name (every installed one is in the hash)."""
_SKIPPED_DIRS: Final = frozenset({".git", "__pycache__", ".hg", ".svn"})


@dataclass(frozen=True)
class CodeVersion:
    folder: str
    commit: str  # "unknown" outside a git work tree
    dirty: bool | None
    # sha256 of the uncommitted changes (tracked diff + untracked files), "" when clean; outside
    # git, of every file of the folder
    diff_sha256: str
    origin: str = ""

    @property
    def label(self) -> str:
        """``commit``, ``commit+dirty.<first 12 of the diff hash>`` or ``tree.<12>``."""
        if self.commit == "unknown":
            return f"tree.{self.diff_sha256[:12]}"
        if self.dirty:
            return f"{self.commit}+dirty.{self.diff_sha256[:12]}"
        return self.commit

    def same_as(self, other: CodeVersion) -> bool:
        return (self.commit, self.diff_sha256) == (other.commit, other.diff_sha256)

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "commit": self.commit,
            "dirty": self.dirty,
            "diff_sha256": self.diff_sha256,
            "origin": self.origin,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CodeVersion:
        dirty = data.get("dirty")
        return cls(
            folder=str(data.get("folder", "")),
            commit=str(data.get("commit", "unknown")),
            dirty=None if dirty is None else bool(dirty),
            diff_sha256=str(data.get("diff_sha256", "")),
            origin=str(data.get("origin", "")),
        )


def _git_bytes(folder: Path, *args: str) -> bytes | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(folder), *args], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _excluded(path: Path, exclude: Sequence[Path]) -> bool:
    resolved = path.resolve()
    for given in exclude:
        root = given.resolve()
        if resolved == root or root in resolved.parents:
            return True
        # a store's database and its companions: store.db-wal, store.db-artifacts/...
        if resolved.name.startswith(root.name + "-") and resolved.parent == root.parent:
            return True
        if any(
            p.name.startswith(root.name + "-") and p.parent == root.parent for p in resolved.parents
        ):
            return True
    return False


def _tree_hash(folder: Path, exclude: Sequence[Path]) -> str:
    """sha256 over every file under ``folder`` (relative name and content) but the excluded ones,
    version-control folders and Python caches."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIPPED_DIRS and not _excluded(Path(dirpath) / d, exclude)
        )
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if _excluded(path, exclude) or path.is_symlink():
                continue
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            try:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError:
                digest.update(b"<unreadable>")
    return digest.hexdigest()


def _glob_escaped(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _exclude_pathspecs(folder: Path, exclude: Sequence[Path]) -> list[str]:
    """git pathspecs leaving out ``exclude`` (those under ``folder``) and a store's companions
    (``store.db-wal``, ``store.db-artifacts/...``), as :func:`_excluded` does for untracked
    files: a committed pipeline file or data file is not code either."""
    root = folder.resolve()
    specs = []
    for given in exclude:
        try:
            relative = given.resolve().relative_to(root).as_posix()
        except ValueError:
            continue  # outside the code folder: git does not see it
        if relative == ".":
            continue
        escaped = _glob_escaped(relative)
        specs += [f":(exclude,glob){escaped}", f":(exclude,glob){escaped}/**"]
        specs += [f":(exclude,glob){escaped}-*", f":(exclude,glob){escaped}-*/**"]
    return specs


def _changes(folder: Path, exclude: Sequence[Path]) -> tuple[bool, str]:
    """Whether the work tree under ``folder`` differs from its commit, and a sha256 over the
    difference: ``git diff HEAD`` (binary) and every untracked, not ignored file (name and
    content) outside ``exclude``. Two work trees with the same commit and hash run the same
    code."""
    digest = hashlib.sha256()
    spec = [".", *_exclude_pathspecs(folder, exclude)]
    diff = _git_bytes(folder, "diff", "HEAD", "--binary", "--no-ext-diff", "--", *spec) or b""
    digest.update(diff)
    listing = _git_bytes(folder, "ls-files", "--others", "--exclude-standard", "-z", "--", *spec)
    untracked = 0
    for name in sorted(n for n in (listing or b"").split(b"\0") if n):
        path = folder / name.decode("utf-8", "surrogateescape")
        if _excluded(path, exclude) or "__pycache__" in path.parts:
            continue
        untracked += 1
        digest.update(b"\0untracked\0" + name + b"\0")
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(b"<unreadable>")
    dirty = bool(diff.strip()) or untracked > 0
    return dirty, digest.hexdigest() if dirty else ""


def code_version(folder: Path, exclude: Sequence[Path] = ()) -> CodeVersion:
    """The version of the training code in ``folder``: its git commit, whether the work tree has
    uncommitted changes (untracked files included) and a hash of them. Outside git the commit is
    ``unknown`` and the hash covers every file of the folder. ``exclude``: paths that are not
    code (the pipeline's work folder, the store's database)."""
    if not folder.is_dir():
        raise InvalidInput(f"[train] code {folder}: no such folder")
    commit, _dirty, origin = git_info(folder)
    if commit == "unknown":
        return CodeVersion(str(folder), "unknown", None, _tree_hash(folder, exclude), "")
    dirty, changes = _changes(folder, exclude)
    return CodeVersion(str(folder), commit, dirty, changes, origin)


def environment() -> dict[str, Any]:
    """Python, the platform, the key packages' versions and a hash of every installed one."""
    installed: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed[str(name).lower().replace("_", "-")] = str(dist.version)
    listing = "\n".join(f"{k}=={v}" for k, v in sorted(installed.items()))
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "packages": {name: installed.get(name, "") for name in KEY_PACKAGES},
        "installed_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "installed_count": len(installed),
    }


def step_key(step: str, inputs: Mapping[str, Any]) -> str:
    """The cache key of a step: sha256 over its name and inputs (JSON, sorted keys)."""
    text = json.dumps({"step": step, **inputs}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
