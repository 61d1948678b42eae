"""``edgewise register``: publish a model package to a store with its lineage.

The package folder ``REPO/NAME/VERSION`` is verified (manifest, sha256 of every file), copied to
a private temporary folder (the original is never modified), given golden requests if it has none
(recorded from synthetic rows, see :mod:`edgewise.runtime.package.golden`), and published: every
file with its sha256 and size, ``manifest.json`` included. The store assigns the version number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.runtime.errors import InvalidInput, ModelNotFound, PackageError
from edgewise.runtime.package.golden import GOLDEN_FILE, add_golden
from edgewise.runtime.package.manifest import (
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    file_entry,
    read_manifest,
    read_manifest_bytes,
    validate_model_name,
    verify_files,
    write_manifest,
)
from edgewise.runtime.package.signing import (
    SIGNATURE_FILE,
    SignatureError,
    load_private_key,
    read_signature,
    sign_package,
)
from edgewise.runtime.store.base import Store, VersionRecord, safe_join, validate_alias
from edgewise.runtime.store.lineage import collect_lineage

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgewise.runtime.evaluation.gate import GateVerdict

__all__ = [
    "ALLOW_SCHEMA_CHANGE",
    "RegisterResult",
    "package_files",
    "parse_package_path",
    "register",
]

log = logging.getLogger(__name__)

ALLOW_SCHEMA_CHANGE = "allow_schema_change"
"""Manifest ``config`` key: the package may change the input schema of the deployed version."""


@dataclass(frozen=True)
class RegisterResult:
    record: VersionRecord
    alias: str | None  # the alias moved to the new version (None: none, or the gate failed)
    golden_added: bool
    gate: GateVerdict | None = None


GATE_LINEAGE_KEY = "gate"
"""Lineage ``extra`` key: the promotion gate's verdict (a compact JSON summary)."""


def _gate_summary(verdict: GateVerdict) -> str:
    """The verdict as stored in the lineage: short enough for an MLflow tag."""
    failures = [check.message for check in verdict.failures][:10]
    return json.dumps(
        {"passed": verdict.passed, "summary": verdict.summary(), "failures": failures},
        separators=(",", ":"),
    )[:4000]


def run_gate(store: Store, spec: Path, package: Path, name: str, alias: str | None) -> GateVerdict:
    """The gate on ``package``, against the version ``alias`` names in the store (if any)."""
    from edgewise.runtime.evaluation.gate import evaluate_gate
    from edgewise.runtime.store.transfer import fetch_file

    current = None
    if alias is not None:
        try:
            current = store.resolve_alias(name, alias)
        except ModelNotFound:
            current = None
    with tempfile.TemporaryDirectory(prefix="edgewise-gate-") as scratch:
        baseline = None
        if current is not None:
            baseline = Path(scratch) / name / str(current.version)
            baseline.mkdir(parents=True)
            for entry in current.files:
                fetch_file(store, current, entry, baseline)
        return evaluate_gate(spec, package, baseline=baseline)


def parse_package_path(path: Path) -> tuple[Path, str, int]:
    """``REPO/NAME/VERSION`` -> ``(repo, name, version)``, refusing unsafe names and links."""
    if path.is_symlink():
        raise InvalidInput(f"{path}: is a symbolic link; give the package folder itself")
    name, version_text = path.parent.name, path.name
    validate_model_name(name)
    if not version_text.isascii() or not version_text.isdigit() or version_text.startswith("0"):
        raise InvalidInput(f"{path}: expected REPO/NAME/VERSION with an integer VERSION")
    if not path.is_dir():
        raise InvalidInput(f"{path}: no such package folder")
    return path.parent.parent, name, int(version_text)


def package_files(folder: Path, manifest: Manifest) -> tuple[FileEntry, ...]:
    """Every file of a package for the store: the manifest's list plus ``manifest.json`` (and
    its signature ``manifest.sig`` when the package is signed)."""
    extra = [MANIFEST_FILE]
    if (folder / SIGNATURE_FILE).is_file():
        extra.append(SIGNATURE_FILE)
    return (*manifest.files, *(file_entry(folder, name) for name in extra))


def _copy_package(source: Path, manifest: Manifest, target: Path) -> None:
    for relative in [*(f.path for f in manifest.files), MANIFEST_FILE]:
        origin = safe_join(source, relative)
        if origin.is_symlink() or not origin.is_file():
            raise PackageError(f"{origin}: not a regular file")
        destination = safe_join(target, relative)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, destination)


def _next_version(store: Store, name: str) -> int:
    """The number the store gives the next version of ``name`` (checked after publishing: a
    concurrent register, or a store that skips numbers, makes the published one differ)."""
    latest = next((m.latest_version for m in store.list_models() if m.name == name), None)
    return (latest or 0) + 1


def _carry_signature(
    source: Path, copy: Path, key: Ed25519PrivateKey | None, next_version: Callable[[], int]
) -> int | None:
    """Sign the copy as the store's next version with ``key`` (with the sections of the source's
    ``config.json``); without a key, keep the source's signature when the manifest is unchanged
    and it signs that version (otherwise the copy is left unsigned: the signature would not
    verify). ``next_version`` asks the store (only for a signed package). Returns the version
    the copy is signed as (None: unsigned)."""
    if key is not None:
        version = next_version()
        sign_package(copy, key, version=version, config_dir=source.parent)
        return version
    signature = safe_join(source, SIGNATURE_FILE)
    if not signature.is_file() or signature.is_symlink():
        return None
    if read_manifest_bytes(copy) != read_manifest_bytes(source):
        log.warning(
            "%s: its manifest.sig is dropped (register changed the manifest); sign with --sign-key",
            source,
        )
        return None
    try:
        signed = read_signature(source).statement.version
    except SignatureError as exc:
        log.warning("%s: its manifest.sig is dropped (%s); sign with --sign-key", source, exc)
        return None
    version = next_version()
    if signed != version:
        log.warning(
            "%s: its manifest.sig is dropped (it signs version %d, the store will number this "
            "one %d); sign with --sign-key",
            source,
            signed,
            version,
        )
        return None
    shutil.copyfile(signature, copy / SIGNATURE_FILE)
    return version


def register(
    store: Store,
    package: Path,
    *,
    alias: str | None = None,
    description: str = "",
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: Sequence[Path] = (),
    code_dir: Path | None = None,
    code_version: str | None = None,
    author: str | None = None,
    allow_schema_change: bool = False,
    golden: bool = True,
    gate: Path | None = None,
    sign_key: Path | None = None,
) -> RegisterResult:
    """Publish the package folder ``package`` (``REPO/NAME/VERSION``) to ``store``.

    With ``gate`` (a gate spec file), the promotion gate runs first, against the version the
    alias names now; its verdict goes into the lineage, and a failing candidate is still
    published but the alias is not moved to it.

    With ``sign_key`` (an ed25519 private key), the package as published is signed as the
    version number the store gives it (``manifest.sig``, see
    :mod:`edgewise.runtime.package.signing`). Without it, a signature the package already has is
    kept if the manifest is published unchanged and it signs that number."""
    _, name, _ = parse_package_path(package)
    if alias is not None:
        validate_alias(alias)
    manifest = read_manifest(package)
    if manifest.name != name:
        raise PackageError(f"{package}: manifest names model {manifest.name!r}, not {name!r}")
    verify_files(package, manifest)
    key = load_private_key(sign_key) if sign_key is not None else None  # fail before work
    verdict = run_gate(store, gate, package, name, alias) if gate is not None else None
    with tempfile.TemporaryDirectory(prefix="edgewise-register-") as scratch:
        copy = Path(scratch) / name
        copy.mkdir()
        _copy_package(package, manifest, copy)
        golden_added = False
        if golden and not (copy / GOLDEN_FILE).exists():
            manifest = add_golden(copy)
            golden_added = True
            log.info("%s: no golden requests in the package; recorded %s", package, GOLDEN_FILE)
        elif golden:
            manifest = add_golden(copy)  # lists an unlisted golden.json, keeps its content
        if allow_schema_change and not manifest.config.get(ALLOW_SCHEMA_CHANGE):
            config = {**manifest.config, ALLOW_SCHEMA_CHANGE: True}
            manifest = dataclasses.replace(manifest, config=config)
            write_manifest(copy, manifest)
        verify_files(copy, manifest)
        signed_as = _carry_signature(package, copy, key, lambda: _next_version(store, name))
        lineage = collect_lineage(
            manifest,
            code_dir=code_dir,
            code_version=code_version,
            params=params,
            metrics=metrics,
            data=data,
            author=author,
        )
        if verdict is not None:
            extra = {**lineage.extra, GATE_LINEAGE_KEY: _gate_summary(verdict)}
            lineage = dataclasses.replace(lineage, extra=extra)
        record = store.publish(
            name, copy, package_files(copy, manifest), lineage, description=description
        )
    if signed_as is not None and record.version != signed_as:
        raise PackageError(
            f"{package}: published as version {record.version} of {name!r} but signed as "
            f"version {signed_as} (another register got that number first): servers and "
            "agents refuse it; register again"
        )
    if verdict is not None and not verdict.passed:
        return RegisterResult(record=record, alias=None, golden_added=golden_added, gate=verdict)
    if alias is not None:
        store.set_alias(name, alias, record.version)
        record = dataclasses.replace(record, aliases=(*record.aliases, alias))
    return RegisterResult(record=record, alias=alias, golden_added=golden_added, gate=verdict)
