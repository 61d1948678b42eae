"""Lineage of a model version: the training code's git commit, parameters, metrics, a fingerprint
of the training data, author and time. Collected by ``edgewise register``; nothing here talks to a
store."""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import Manifest, sha256_file
from edgewise.runtime.store.base import Lineage

__all__ = [
    "check_lineage_inputs",
    "collect_lineage",
    "data_fingerprint",
    "git_info",
    "parse_key_values",
    "read_json_mapping",
    "utc_now",
]


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(folder: Path, *args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _strip_credentials(url: str) -> str:
    """A remote URL without any user:password part."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return ""
    if parts.scheme and parts.netloc and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        return urllib.parse.urlunsplit(parts._replace(netloc=host))
    return url


def git_info(folder: Path) -> tuple[str, bool | None, str]:
    """``(commit, dirty, origin)`` of the git work tree holding ``folder``; ``("unknown", None,
    "")`` when it is not in one (or git is missing)."""
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return "unknown", None, ""
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    origin = _git(folder, "config", "--get", "remote.origin.url") or ""
    return commit, None if status is None else bool(status), _strip_credentials(origin)


def _files_under(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for filename in sorted(filenames):
                full = Path(dirpath) / filename
                found.append((full.relative_to(path).as_posix(), full))
        return found
    raise InvalidInput(f"training data {path}: no such file or folder")


def data_fingerprint(paths: Sequence[Path]) -> str:
    """``sha256:<hex>`` over the training data: for each path (a file, or every file under a
    folder, in sorted order) its relative name, size and sha256. Renaming the top folder keeps the
    fingerprint; changing any byte or file name changes it."""
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        for relative, full in _files_under(path):
            line = f"{index}\0{relative}\0{full.stat().st_size}\0{sha256_file(full)}\n"
            digest.update(line.encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def parse_key_values(items: Iterable[str], what: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; :class:`InvalidInput` for a malformed one."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"{what} {item!r}: expected KEY=VALUE")
        result[key.strip()] = value
    return result


def read_json_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"{what} file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} file {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} file {path}: expected a JSON object")
    return data


def _metric(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"metric {key!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise InvalidInput(f"metric {key!r}: {value!r} is not a finite number")
    return number


def check_lineage_inputs(
    *,
    code_dir: Path | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: Sequence[Path] = (),
) -> None:
    """Refuse what :func:`collect_lineage` would refuse, before anything is written: a code
    folder that is not a folder, a metric that is not a finite number, a data path that does
    not exist. :class:`InvalidInput` naming the value."""
    if code_dir is not None and not code_dir.is_dir():
        what = "no such folder" if not code_dir.exists() else "not a folder"
        raise InvalidInput(f"--code-dir {code_dir}: {what} (the training code's git work tree)")
    for key, value in (metrics or {}).items():
        _metric(str(key), value)
    for path in data:
        if not (path.is_file() or path.is_dir()):
            raise InvalidInput(f"training data {path}: no such file or folder")


def collect_lineage(
    manifest: Manifest,
    *,
    code_dir: Path | None = None,
    code_version: str | None = None,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: Sequence[Path] = (),
    author: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Lineage:
    """The lineage of a package about to be registered.

    The code version is ``code_version`` if given, else the git commit of ``code_dir`` (default:
    the working directory). The data fingerprint is computed over ``data``; without it, the
    conversion sample's sha256 recorded in the manifest is used when there is one. The author is
    ``author``, else git's ``user.name``, else the login name.
    """
    check_lineage_inputs(code_dir=code_dir, metrics=metrics, data=data)
    folder = code_dir if code_dir is not None else Path.cwd()
    commit, dirty, origin = git_info(folder)
    if code_version:
        commit, dirty = code_version, None
    if data:
        fingerprint = data_fingerprint(data)
        sources = tuple(str(p) for p in data)
    else:
        sample = manifest.source.get("sample")
        sample_info: Mapping[str, Any] = sample if isinstance(sample, Mapping) else {}
        sample_sha = sample_info.get("sha256")
        fingerprint = f"sha256:{sample_sha}" if sample_sha else ""
        sources = (str(sample_info.get("file", "conversion sample")),) if sample_sha else ()
    who = author or _git(folder, "config", "user.name") or ""
    if not who:
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = "unknown"
    return Lineage(
        code_version=commit,
        code_dirty=dirty,
        code_origin=origin,
        params={str(k): str(v) for k, v in (params or {}).items()},
        metrics={str(k): _metric(str(k), v) for k, v in (metrics or {}).items()},
        data_fingerprint=fingerprint,
        data_sources=sources,
        created_at=utc_now(),
        author=who,
        package_created_at=manifest.created_at,
        extra=dict(extra or {}),
    )
