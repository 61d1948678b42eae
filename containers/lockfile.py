"""The image's dependency set against the hash-pinned lock (requirements/serve.txt).

    python containers/lockfile.py pins LOCK [--machine M]          name==version, one a line
    python containers/lockfile.py select LOCK DIR [--machine M]    the lock's wheels found in DIR
    python containers/lockfile.py check LOCK [--allow NAME ...]    the running environment

``pins`` and ``select`` run on the build host (``--machine`` evaluates the lock's markers for
another platform's ``platform_machine``, e.g. aarch64; ``select`` takes only wheels whose sha256
the lock lists, and exits 1 naming the pins without one); ``check`` runs inside the image's build
stage with the virtual environment's python and exits 1 with one line per difference when the
installed distributions are not exactly the lock's pins (a missing, an extra or another version),
so that the build refuses a dependency set that differs from the lock. Needs ``packaging``
(pinned in the serve lock, as onnxruntime requires it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

from packaging.markers import Marker, default_environment
from packaging.utils import canonicalize_name, parse_wheel_filename

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?")


_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def _entries(lock: Path, machine: str | None) -> dict[str, tuple[str, set[str]]]:
    """The lock's pins whose markers hold here (or on ``machine``): name -> (version, hashes)."""
    environment = dict(default_environment())
    if machine is not None:
        environment["platform_machine"] = machine
    found: dict[str, tuple[str, set[str]]] = {}
    current: set[str] = set()  # the hashes of the pin being read (of a skipped one: dropped)
    for number, line in enumerate(lock.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("--hash="):
            current.update(_HASH.findall(stripped))
            continue
        if not stripped or stripped.startswith("#") or line[0] in " \t-":
            continue
        match = _PIN.match(line)
        if match is None:
            raise SystemExit(f"{lock}:{number}: not a name==version pin: {stripped}")
        name, version, marker = match.groups()
        current = set(_HASH.findall(line))
        if marker and not Marker(marker.strip()).evaluate(environment):
            continue
        found[canonicalize_name(name)] = (version, current)
    if not found:
        raise SystemExit(f"{lock}: no pins")
    return found


def pins(lock: Path, machine: str | None = None) -> dict[str, str]:
    """The lock's pins whose markers hold here (or on ``machine``): canonical name -> version."""
    return {name: version for name, (version, _) in _entries(lock, machine).items()}


def select(lock: Path, folder: Path, machine: str | None = None) -> list[Path]:
    """One wheel per pin from ``folder`` whose sha256 the lock lists; exits naming the pins that
    have none."""
    wanted = _entries(lock, machine)
    chosen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        name = canonicalize_name(name)
        if name not in wanted or wanted[name][0] != str(version) or name in chosen:
            continue
        target = machine or platform.machine()
        if not any(tag.platform == "any" or tag.platform.endswith(target) for tag in tags):
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() in wanted[name][1]:
            chosen[name] = path
    missing = sorted(set(wanted) - set(chosen))
    if missing:
        raise SystemExit(f"no wheel in {folder} for {', '.join(missing)} (from {lock})")
    return [chosen[name] for name in sorted(chosen)]


def differences(lock: Path, allow: set[str]) -> list[str]:
    """How the running environment's distributions differ from the lock's pins."""
    wanted = pins(lock)
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }
    lines = []
    for name in sorted(set(wanted) | set(installed)):
        if name in allow:
            continue
        if name not in installed:
            lines.append(f"missing {name}=={wanted[name]}")
        elif name not in wanted:
            lines.append(f"not in the lock: {name}=={installed[name]}")
        elif installed[name] != wanted[name]:
            lines.append(f"{name} {installed[name]} installed, the lock pins {wanted[name]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pins", "select", "check"):
        command = sub.add_parser(name)
        command.add_argument("lock", type=Path)
        if name == "select":
            command.add_argument("folder", type=Path)
        if name == "check":
            command.add_argument("--allow", nargs="*", default=[], help="names not in the lock")
        else:
            command.add_argument("--machine", default=None, help="platform_machine, e.g. aarch64")
    args = parser.parse_args(argv)
    if args.command == "pins":
        for name, version in sorted(pins(args.lock, args.machine).items()):
            print(f"{name}=={version}")
    elif args.command == "select":
        for path in select(args.lock, args.folder, args.machine):
            print(path)
    else:
        found = differences(args.lock, {canonicalize_name(n) for n in args.allow})
        if found:
            print(
                f"the image's dependency set differs from {args.lock.name}, refused: "
                + "; ".join(found),
                file=sys.stderr,
            )
            return 1
        print(f"dependency set: exactly the {len(pins(args.lock))} pins of {args.lock.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
