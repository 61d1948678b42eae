"""The hash-pinned lockfiles, compiled from pyproject.toml, and the check that they are current.

``python requirements/lock.py compile`` (``make lock``) resolves pyproject's dependencies with uv
(``uv pip compile --universal --generate-hashes --python-version 3.11``) into

- ``requirements/serve.txt``: the core ``dependencies``, what a serving node, the sync agent and
  an image install;
- ``requirements/dev.txt``: the ``dev`` extra, what ``make`` installs into ``.venv`` and CI runs.

uv keeps every pin already in a file that still satisfies pyproject (the file is its preference),
so regenerating after an unrelated change moves nothing; ``--upgrade-package NAME`` moves one.
Each file's first line records a digest of the dependency tables it was compiled from.

``python requirements/lock.py check`` (``make lock-check``, part of ``make check``) recomputes that
digest from pyproject.toml and exits 1 with one line naming the stale file when it differs:
pyproject's dependencies changed and ``make lock`` was not run. It needs no network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
#: The lockfile and the extra it is compiled with (None: the core dependencies only).
LOCKS: dict[str, str | None] = {"serve.txt": None, "dev.txt": "dev"}
PYTHON_VERSION = "3.11"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "


def dependency_digest(pyproject: Path = PYPROJECT) -> str:
    """The sha256 of what a lock is compiled from: requires-python, the core dependencies and
    every extra (an extra includes others by name), in a canonical JSON form, so comments and
    formatting of pyproject.toml do not count, and any change of a requirement does."""
    project: dict[str, Any] = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    tables = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    canonical = json.dumps(tables, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_digest(lockfile: Path) -> str | None:
    """The digest a lockfile's first line records, or None (no file, or no such line)."""
    if not lockfile.is_file():
        return None
    with lockfile.open(encoding="utf-8") as handle:
        first = handle.readline().rstrip("\n")
    return first[len(DIGEST_PREFIX) :] if first.startswith(DIGEST_PREFIX) else None


def compile_locks(uv: str, extra_args: list[str]) -> None:
    """Compile every lockfile from pyproject.toml and record the digest in each."""
    digest = dependency_digest()
    for name, extra in LOCKS.items():
        out = ROOT / "requirements" / name
        command = [
            uv, "pip", "compile", str(PYPROJECT.relative_to(ROOT)),
            "--quiet", "--universal", "--generate-hashes", "--python-version", PYTHON_VERSION,
            "--custom-compile-command", "make lock",
            "--output-file", str(out.relative_to(ROOT)),
            *(["--extra", extra] if extra else []),
            *extra_args,
        ]  # fmt: skip
        subprocess.run(command, cwd=ROOT, check=True)
        body = out.read_text(encoding="utf-8")
        if body.startswith(DIGEST_PREFIX):  # uv copies no header of ours; drop an old one anyway
            body = body.split("\n", 1)[1]
        out.write_text(f"{DIGEST_PREFIX}{digest}\n{body}", encoding="utf-8")


def check_locks() -> int:
    """0 when every lockfile records pyproject's current digest; else 1, one line per file."""
    digest = dependency_digest()
    stale = 0
    for name in LOCKS:
        path = ROOT / "requirements" / name
        recorded = recorded_digest(path)
        if recorded != digest:
            why = "missing" if not path.is_file() else "stale: pyproject's dependencies changed"
            print(f"requirements/{name} is {why}; run `make lock`", file=sys.stderr)
            stale = 1
    return stale


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        return check_locks()
    if argv[:1] == ["compile"]:
        uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
        if uv is None:
            print("uv is not installed (pip install uv; it is in the dev extra)", file=sys.stderr)
            return 1
        compile_locks(uv, argv[1:])
        return 0
    print("usage: lock.py check | compile [uv pip compile options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
