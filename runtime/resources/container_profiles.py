"""Container profiles: named CPU and memory limits, in TOML files shipped with the package
(``edgewise/runtime/resources/profiles/``, package data; ``containers/profiles`` in a checkout
links to it) or in a folder of one's own.

A profile file ``NAME.toml``::

    description = "1 CPU, 512 MiB: a small edge node"   # required, one line
    cpus = 1.0                                           # required: CPU quota in cores, > 0
    memory = "512MiB"                                    # required: memory limit (or bytes)

    [overrides]                                          # optional: replace derived values
    worker_threads = 1
    memory_arena = false

The name is the file name without ``.toml`` (lower case letters, digits and dashes). Unknown keys
are errors, so a typo cannot silently do nothing. ``[overrides]`` takes the keys of
:data:`edgewise.runtime.config.limits.OVERRIDABLE`; a profile is only valid when
:func:`~edgewise.runtime.config.limits.derive_budget` accepts its overrides under its own limits
(the compute threads fit its CPUs). Overrides reach the server as environment variables
(:meth:`Profile.environment`): ``EDGEWISE_<KEY>`` for server settings and numba's own
``NUMBA_NUM_THREADS``.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.config.limits import (
    OVERRIDABLE,
    ResourceLimits,
    RuntimeBudget,
    derive_budget,
    format_bytes,
    parse_bytes,
)
from edgewise.runtime.config.values import known_keys
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "MAX_CPUS",
    "MIN_MEMORY_BYTES",
    "Profile",
    "default_profile_dirs",
    "list_profiles",
    "load_profile",
    "parse_profile",
]

#: The smallest memory limit a profile may set: an idle server takes about 92 MiB.
MIN_MEMORY_BYTES: Final = 128 << 20
MAX_CPUS: Final = 1024.0
_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEYS: Final = {"description", "cpus", "memory", "overrides"}
ENV_PREFIX: Final = "EDGEWISE_"
_ENV_NAMES: Final = {"numba_threads": "NUMBA_NUM_THREADS"}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    cpus: float
    memory_bytes: int
    overrides: Mapping[str, int | bool] = field(default_factory=dict)
    path: Path | None = None

    def limits(self) -> ResourceLimits:
        """The limits a process started under this profile sees."""
        return ResourceLimits.simulated(self.cpus, self.memory_bytes)

    def budget(self) -> RuntimeBudget:
        return derive_budget(self.limits(), self.overrides)

    def environment(self) -> dict[str, str]:
        """The overrides as the environment variables the server reads."""
        env: dict[str, str] = {}
        for key, value in sorted(self.overrides.items()):
            name = _ENV_NAMES.get(key, ENV_PREFIX + key.upper())
            env[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return env

    def summary(self) -> str:
        return f"{self.cpus:g} CPU, {format_bytes(self.memory_bytes)}"


def parse_profile(name: str, data: Mapping[str, Any], path: Path | None = None) -> Profile:
    """Validate one profile's parsed TOML; errors name the file and the key."""
    where = str(path) if path is not None else f"profile {name!r}"
    if not _NAME_RE.match(name):
        raise InvalidInput(f"{where}: profile name {name!r} must be lower case letters, digits, -")
    known_keys(where, data, _KEYS)
    for key in ("description", "cpus", "memory"):
        if key not in data:
            raise InvalidInput(f"{where}: missing required key {key!r}")
    description = data["description"]
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        raise InvalidInput(f"{where}: description must be one non-empty line")
    cpus = data["cpus"]
    if isinstance(cpus, bool) or not isinstance(cpus, int | float):
        raise InvalidInput(f"{where}: cpus must be a number of cores, not {cpus!r}")
    if not 0.01 <= float(cpus) <= MAX_CPUS:
        raise InvalidInput(f"{where}: cpus must be between 0.01 and {MAX_CPUS:g}, not {cpus}")
    memory_raw = data["memory"]
    if not isinstance(memory_raw, str | int) or isinstance(memory_raw, bool):
        raise InvalidInput(f'{where}: memory must be a size such as "512MiB", not {memory_raw!r}')
    try:
        memory = parse_bytes(memory_raw)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: memory: {exc.message}") from None
    if memory < MIN_MEMORY_BYTES:
        raise InvalidInput(
            f"{where}: memory {format_bytes(memory)} is below the minimum of "
            f"{format_bytes(MIN_MEMORY_BYTES)}"
        )
    overrides_raw = data.get("overrides", {})
    if not isinstance(overrides_raw, dict):
        raise InvalidInput(f"{where}: [overrides] must be a table")
    overrides: dict[str, int | bool] = {}
    for key, given in overrides_raw.items():
        value = given
        if key not in OVERRIDABLE:
            raise InvalidInput(
                f"{where}: unknown override {key!r} (known: {', '.join(OVERRIDABLE)})"
            )
        if key.endswith("_bytes") and isinstance(value, str):
            try:
                value = parse_bytes(value)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: overrides.{key}: {exc.message}") from None
        overrides[key] = value
    profile = Profile(name, description.strip(), float(cpus), memory, overrides, path)
    try:
        profile.budget()
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None
    return profile


def _read_profile(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read it: {exc.strerror}") from None
    return parse_profile(path.stem, data, path)


def packaged_profiles_dir() -> Path | None:
    """The profiles installed with edgewise (package data of ``edgewise.runtime.resources``),
    or None where the package is not a folder on disk (a zip import)."""
    folder = importlib.resources.files("edgewise.runtime.resources") / "profiles"
    return folder if isinstance(folder, Path) and folder.is_dir() else None


def default_profile_dirs() -> list[Path]:
    """Where profile names are looked up: ``./containers/profiles`` (one's own, first), then the
    profiles installed with edgewise (:func:`packaged_profiles_dir`): a wheel install finds them
    from any folder."""
    candidates = [Path.cwd() / "containers" / "profiles", packaged_profiles_dir()]
    seen: list[Path] = []
    for candidate in candidates:
        if candidate is None or not candidate.is_dir():
            continue
        if all(candidate.resolve() != s.resolve() for s in seen):
            seen.append(candidate)
    return seen


def list_profiles(dirs: Sequence[Path] | None = None) -> list[Profile]:
    """Every profile in ``dirs`` (default: :func:`default_profile_dirs`), first name wins."""
    found: dict[str, Profile] = {}
    for folder in dirs if dirs is not None else default_profile_dirs():
        for path in sorted(folder.glob("*.toml")):
            if path.stem not in found:
                found[path.stem] = _read_profile(path)
    return list(found.values())


def load_profile(spec: str, dirs: Sequence[Path] | None = None) -> Profile:
    """A profile by name (looked up in ``dirs``) or by the path of its ``.toml`` file."""
    if spec.endswith(".toml") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise InvalidInput(f"profile file {spec} does not exist")
        return _read_profile(path)
    folders = list(dirs) if dirs is not None else default_profile_dirs()
    for folder in folders:
        path = folder / f"{spec}.toml"
        if path.is_file():
            return _read_profile(path)
    known = sorted({p.stem for folder in folders for p in folder.glob("*.toml")})
    where = ", ".join(str(f) for f in folders) or "no profile folder (pass --profiles-dir)"
    raise InvalidInput(
        f"no profile named {spec!r} in {where}" + (f" (known: {', '.join(known)})" if known else "")
    )
