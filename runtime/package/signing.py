"""Signed model packages (ed25519): a signature over a statement of everything that decides how
a version behaves.

:func:`sign_package` writes a detached ``manifest.sig`` beside ``manifest.json``::

    {"format": "edgewise.signature/2", "algorithm": "ed25519",
     "statement": {"model": "churn", "version": 5, "manifest_sha256": "…",
                   "files": {"model.onnx": "…", "profile.json": "…", "golden.json": "…"},
                   "config_sha256": "…", "signed_at": "2026-12-07T23:00:00Z", "key_id": "3f9c…"},
     "signature": "<base64 of 64 bytes>"}

The signature is over the statement's canonical JSON (sorted keys, no spaces, ASCII), so the
signed payload is exactly what the file shows. The statement binds:

* the **model name** and the **version number** (a package signed as version 3 and placed as
  version 5 is refused: ``version_mismatch``);
* the sha256 of ``manifest.json`` and of every file it lists (model, reference profile, golden
  requests: each a ``files`` entry), checked against the files by
  :func:`edgewise.runtime.package.manifest.verify_files`;
* the model's ``config.json`` (beside the version folders): the sha256 of the canonical JSON of
  its sections that decide how a version serves (:data:`CONFIG_SECTIONS`: ``monitoring``,
  ``batching``, ``quality``, ``capture``, ``features``). Not ``version_policy`` and
  ``default_version``: the repository's own pins, which ``LoadModel make_default`` and the sync
  agent write and which only pick among signed versions (the agent's rollback protection guards
  that choice); nor keys the server does not read. No file, or no section, is the digest of
  ``{}``. A section added, changed or removed after signing is refused (``config_changed``);
* when it was signed and by which key.

:func:`verify_package` checks it against :class:`TrustedKeys` (one PEM file, or a folder of
``*.pub``/``*.pem`` files) with two optional files in the same folder:

* ``keys.json``: ``{"<key id>": {"not_after": "2027-06-30T00:00:00Z"}}``: a key is not trusted
  after that instant (``expired_key``), whatever its statements say they were signed at;
* ``revoked.json``: ``{"keys": ["<key id>", …], "packages": ["<manifest sha256>", …]}``: a
  revoked key (``revoked_key``) or package (``revoked_package``) is refused. It is read again at
  every verification, so a revocation applies to the next load without a restart, and a list
  that cannot be read refuses everything (``revocation_list``).

Signatures of the first format (``edgewise.signature/1``, over the manifest's bytes alone) are
refused (``legacy_format``): they cover neither the version number nor ``config.json``, which is
the hole this format closes. Re-sign with ``edgewise keys sign REPO/NAME/VERSION --key KEY``.

The key id is the first 16 hex digits of the sha256 of the raw 32-byte public key; it only picks
the key, the signature is what proves it. Keys are PEM: the private key PKCS#8 (written with mode
0600), the public key SubjectPublicKeyInfo, as ``openssl genpkey -algorithm ed25519`` makes them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.errors import InvalidInput, PackageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "CONFIG_SECTIONS",
    "KEYS_FILE",
    "LEGACY_FORMAT",
    "REVOCATION_FILE",
    "SIGNATURE_FILE",
    "SIGNATURE_FORMAT",
    "Revocations",
    "Signature",
    "SignatureError",
    "Statement",
    "TrustedKeys",
    "config_digest",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "read_signature",
    "sign_package",
    "verify_package",
]

SIGNATURE_FILE: Final = "manifest.sig"
SIGNATURE_FORMAT: Final = "edgewise.signature/2"
LEGACY_FORMAT: Final = "edgewise.signature/1"
ALGORITHM: Final = "ed25519"
KEYS_FILE: Final = "keys.json"  # beside the trusted keys: {"<key id>": {"not_after": ISO}}
REVOCATION_FILE: Final = "revoked.json"  # beside the trusted keys: {"keys": [], "packages": []}
#: The config.json sections a signature covers: every one the server reads but the pins
#: ``version_policy`` and ``default_version`` (package.model_config.ModelConfig's fields).
CONFIG_SECTIONS: Final = ("monitoring", "batching", "quality", "capture", "features")
_MANIFEST_FILE: Final = "manifest.json"  # package.MANIFEST_FILE
_CONFIG_FILE: Final = "config.json"  # package.model_config.MODEL_CONFIG_FILE (imports manifest)
_MAX_SIGNATURE_BYTES: Final = 64 * 1024
_MAX_LIST_BYTES: Final = 4 * 1024 * 1024
_KEY_SUFFIXES: Final = (".pub", ".pem")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID: Final = re.compile(r"^[0-9a-f]{16}$")
_EMPTY_CONFIG: Final = hashlib.sha256(b"{}").hexdigest()


class SignatureError(PackageError):
    """A package's signature is missing, malformed, by an untrusted, expired or revoked key,
    does not verify, or signs another package, version or config.json than the one loaded.

    ``reason`` is a short code for metrics and tests: ``unsigned``, ``malformed``,
    ``legacy_format``, ``untrusted_key``, ``expired_key``, ``revoked_key``,
    ``revocation_list``, ``bad_signature``, ``model_mismatch``, ``version_mismatch``,
    ``manifest_changed``, ``config_changed``, ``revoked_package``."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def _crypto() -> Any:
    """The ``cryptography`` ed25519 module (a core dependency; imported when first needed)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a broken install
        raise InvalidInput(
            "package signing needs the 'cryptography' package: pip install cryptography"
        ) from None
    return ed25519


def _raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _parse_instant(text: Any, where: str) -> datetime:
    """An ISO-8601 instant with a zone (``Z`` or ``+00:00``)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected an ISO-8601 time, got {text!r}")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise ValueError(f"{where}: {text!r} has no time zone (write 2027-01-31T00:00:00Z)")
    return value.astimezone(UTC)


def generate_keypair(folder: Path, name: str = "edgewise") -> tuple[Path, Path, str]:
    """Write ``folder/NAME.key`` (private, mode 0600) and ``folder/NAME.pub``; returns
    ``(private_path, public_path, key_id)``.

    Neither file is ever overwritten: if either exists nothing is written, and if the public key
    cannot be written the private key just written is removed (no half pair is left behind)."""
    from cryptography.hazmat.primitives import serialization

    from edgewise.runtime.package.manifest import validate_model_name

    validate_model_name(name)  # the same safe-name rule: no path parts
    private_path = folder / f"{name}.key"
    public_path = folder / f"{name}.pub"
    _refuse_existing(private_path, public_path)
    ed25519 = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"{folder}: cannot create the key folder: {exc.strerror}") from None
    _write_new(private_path, pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path, key_id(public)


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise InvalidInput(f"{path} already exists; not overwriting a key")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never an existing file or link) holding ``data``; a failed write
    removes the file it created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise InvalidInput(f"{path} already exists; not overwriting a key") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise InvalidInput(f"{path}: cannot write: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"signing key {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"signing key {path}: not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InvalidInput(f"signing key {path}: not an ed25519 key ({type(key).__name__})")
    return cast("Ed25519PrivateKey", key)


def _load_public_key(path: Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"trusted key {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"trusted key {path}: not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInput(f"trusted key {path}: not an ed25519 key ({type(key).__name__})")
    return cast("Ed25519PublicKey", key)


def _read_json_file(path: Path, what: str) -> Any:
    """A small JSON file; ``ValueError`` naming ``path`` when it cannot be read or parsed.
    Links are followed, as for the key files and ``config.json`` (a Kubernetes ConfigMap or
    Secret is mounted as links); a dangling one cannot be read."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_LIST_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if len(raw) > _MAX_LIST_BYTES:
        raise ValueError(f"{what} {path}: larger than {_MAX_LIST_BYTES} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{what} {path}: not valid JSON: {exc}") from None


@dataclass(frozen=True)
class Revocations:
    """``revoked.json``: revoked key ids and revoked packages (sha256 of their manifest)."""

    keys: frozenset[str] = frozenset()
    packages: frozenset[str] = frozenset()

    @classmethod
    def read(cls, path: Path) -> Revocations:
        """The list at ``path`` (none there: nothing revoked); ``ValueError`` naming the field."""
        if not path.exists() and not path.is_symlink():
            return cls()
        data = _read_json_file(path, "revocation list")
        if not isinstance(data, dict):
            raise ValueError(f"revocation list {path}: expected a JSON object")
        unknown = sorted(set(data) - {"keys", "packages", "comment"})
        if unknown:
            raise ValueError(f"revocation list {path}: unknown field(s) {unknown}")
        keys = data.get("keys", [])
        packages = data.get("packages", [])
        if not isinstance(keys, list) or not all(
            isinstance(k, str) and _KEY_ID.match(k) for k in keys
        ):
            raise ValueError(f"revocation list {path}: keys must be a list of 16-hex-digit key ids")
        if not isinstance(packages, list) or not all(
            isinstance(p, str) and _HEX64.match(p) for p in packages
        ):
            raise ValueError(
                f"revocation list {path}: packages must be a list of manifest sha256 digests "
                "(64 hex digits)"
            )
        return cls(frozenset(keys), frozenset(packages))


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys whose signatures are accepted, by key id, with their expiry (``keys.json``)
    and the revocation list (``revoked.json``) of their folder."""

    keys: Mapping[str, Ed25519PublicKey]
    source: str = ""
    not_after: Mapping[str, datetime] = field(default_factory=dict)
    revocation_file: Path | None = None

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        """One PEM public key file, or every ``*.pub``/``*.pem`` file of a folder; with the
        folder's ``keys.json`` and ``revoked.json`` (the key file's folder for one file)."""
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _KEY_SUFFIXES and p.is_file())
            if not files:
                raise InvalidInput(f"trusted keys: no *.pub or *.pem file in {path}")
            folder = path
        elif path.is_file():
            files = [path]
            folder = path.parent
        else:
            raise InvalidInput(f"trusted keys: {path} is neither a file nor a folder")
        keys: dict[str, Ed25519PublicKey] = {}
        for file in files:
            key = _load_public_key(file)
            keys[key_id(key)] = key
        not_after = _read_expiry(folder / KEYS_FILE, keys)
        revocation_file = folder / REVOCATION_FILE
        try:
            Revocations.read(revocation_file)  # a broken list stops the start, not a load
        except ValueError as exc:
            raise InvalidInput(f"trusted keys: {exc}") from None
        return cls(keys, str(path), not_after, revocation_file)

    def revocations(self) -> Revocations:
        """The revocation list as it is now (re-read each time); :class:`SignatureError` when it
        cannot be read (fail closed)."""
        if self.revocation_file is None:
            return Revocations()
        try:
            return Revocations.read(self.revocation_file)
        except ValueError as exc:
            raise SignatureError(
                f"{exc}; every package is refused until it is fixed", "revocation_list"
            ) from None

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)


def _read_expiry(path: Path, keys: Mapping[str, Ed25519PublicKey]) -> dict[str, datetime]:
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        data = _read_json_file(path, "trusted keys' settings")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of key id -> settings")
        expiry: dict[str, datetime] = {}
        for kid, entry in data.items():
            if kid not in keys:
                raise ValueError(
                    f"{path}: key {kid!r} is not among the trusted keys ({', '.join(sorted(keys))})"
                )
            if not isinstance(entry, dict) or set(entry) - {"not_after", "comment"}:
                raise ValueError(f'{path}: key {kid}: expected {{"not_after": ISO-8601 time}}')
            if "not_after" in entry:
                expiry[kid] = _parse_instant(entry["not_after"], f"{path}: key {kid}: not_after")
        return expiry
    except ValueError as exc:
        raise InvalidInput(f"trusted keys: {exc}") from None


# ---- what is signed ------------------------------------------------------------------------------


def config_digest(model_dir: Path) -> str:
    """sha256 of the canonical JSON of the :data:`CONFIG_SECTIONS` of ``model_dir/config.json``
    (those present and not null); the digest of ``{}`` when there is no such file.
    :class:`PackageError` when it cannot be read or is not a JSON object."""
    path = model_dir / _CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        return _EMPTY_CONFIG
    try:
        data = _read_json_file(path, "model config")
    except ValueError as exc:
        raise PackageError(str(exc)) from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object")
    sections = {k: data[k] for k in CONFIG_SECTIONS if data.get(k) is not None}
    return hashlib.sha256(_canonical(sections)).hexdigest()


@dataclass(frozen=True)
class Statement:
    """What a signature says: this model, this version, these files, this config, when, who."""

    model: str
    version: int
    manifest_sha256: str
    files: Mapping[str, str]  # path -> sha256, as the manifest lists them
    config_sha256: str
    signed_at: str
    key_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "files": dict(sorted(self.files.items())),
            "config_sha256": self.config_sha256,
            "signed_at": self.signed_at,
            "key_id": self.key_id,
        }

    def canonical(self) -> bytes:
        """The signed bytes."""
        return _canonical(self.to_json())

    @classmethod
    def from_json(cls, data: Any, where: str) -> Statement:
        if not isinstance(data, dict):
            raise SignatureError(f"{where}: statement: expected a JSON object")
        try:
            files = data["files"]
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
                for k, v in files.items()
            ):
                raise ValueError("files must map each path to a sha256 (64 hex digits)")
            version = data["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"version must be an integer >= 1, got {version!r}")
            for name in ("manifest_sha256", "config_sha256"):
                if not isinstance(data[name], str) or not _HEX64.match(data[name]):
                    raise ValueError(f"{name} must be 64 hex digits")
            statement = cls(
                model=str(data["model"]),
                version=version,
                manifest_sha256=data["manifest_sha256"],
                files=dict(files),
                config_sha256=data["config_sha256"],
                signed_at=str(data["signed_at"]),
                key_id=str(data["key_id"]),
            )
            _parse_instant(statement.signed_at, "signed_at")
        except KeyError as exc:
            raise SignatureError(f"{where}: statement: missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise SignatureError(f"{where}: statement: {exc}") from None
        if set(data) - set(statement.to_json()):
            unknown = sorted(set(data) - set(statement.to_json()))
            raise SignatureError(f"{where}: statement: unknown field(s) {unknown}")
        return statement


@dataclass(frozen=True)
class Signature:
    statement: Statement
    signature: bytes

    @property
    def key_id(self) -> str:
        return self.statement.key_id

    @property
    def manifest_sha256(self) -> str:
        return self.statement.manifest_sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SIGNATURE_FORMAT,
            "algorithm": ALGORITHM,
            "statement": self.statement.to_json(),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = SIGNATURE_FILE) -> Signature:
        if not isinstance(data, dict):
            raise SignatureError(f"{where}: expected a JSON object")
        if data.get("format") == LEGACY_FORMAT:
            raise SignatureError(
                f"{where}: signed in the old format {LEGACY_FORMAT}, which covers neither the "
                "version number nor config.json; re-sign it: edgewise keys sign "
                "REPO/NAME/VERSION --key KEY",
                "legacy_format",
            )
        if data.get("format") != SIGNATURE_FORMAT:
            raise SignatureError(
                f"{where}: unknown format {data.get('format')!r} (expected {SIGNATURE_FORMAT})"
            )
        if data.get("algorithm") != ALGORITHM:
            raise SignatureError(f"{where}: unsupported algorithm {data.get('algorithm')!r}")
        try:
            signature = base64.b64decode(str(data["signature"]), validate=True)
        except KeyError:
            raise SignatureError(f"{where}: missing field 'signature'") from None
        except (ValueError, binascii.Error) as exc:
            raise SignatureError(f"{where}: signature: not base64: {exc}") from None
        if len(signature) != 64:
            raise SignatureError(f"{where}: an ed25519 signature has 64 bytes")
        if "statement" not in data:
            raise SignatureError(f"{where}: missing field 'statement'")
        return cls(Statement.from_json(data["statement"], where), signature)


def read_signature(folder: Path) -> Signature:
    """Parse ``folder/manifest.sig``; :class:`SignatureError` if missing or malformed."""
    path = folder / SIGNATURE_FILE
    try:
        if path.is_symlink():
            raise SignatureError(f"{path}: is a symbolic link")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(
            f"{folder}: the package is not signed (no {SIGNATURE_FILE})", "unsigned"
        ) from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: too large for a signature ({len(raw)} bytes)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SignatureError(f"{path}: not valid JSON: {exc}") from None
    return Signature.from_json(data, str(path))


def _version_of(folder: Path) -> int:
    name = folder.name
    if not name.isascii() or not name.isdigit() or name.startswith("0"):
        raise InvalidInput(
            f"{folder}: not a version folder (REPO/NAME/VERSION); give the version to sign"
        )
    return int(name)


def sign_package(
    folder: Path,
    private_key: Ed25519PrivateKey | Path,
    *,
    version: int | None = None,
    config_dir: Path | None = None,
    now: datetime | None = None,
) -> Path:
    """Sign the package in ``folder`` as ``version`` of its model (default: the folder's name,
    ``REPO/NAME/VERSION``) with the behaviour sections of ``config_dir/config.json`` (default:
    the folder's parent, the model's folder); writes ``folder/manifest.sig``. The manifest is
    signed as it is on disk: check the files against it first (``verify_files``)."""
    from edgewise.runtime.package.manifest import parse_manifest, read_manifest_bytes

    key = load_private_key(private_key) if isinstance(private_key, Path) else private_key
    if version is None:
        version = _version_of(folder)
    if version < 1:
        raise InvalidInput(f"version must be >= 1, got {version}")
    raw = read_manifest_bytes(folder)
    manifest = parse_manifest(raw, str(folder / _MANIFEST_FILE))
    instant = (now or datetime.now(UTC)).astimezone(UTC)
    statement = Statement(
        model=manifest.name,
        version=version,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        files={entry.path: entry.sha256 for entry in manifest.files},
        config_sha256=config_digest(config_dir if config_dir is not None else folder.parent),
        signed_at=instant.strftime("%Y-%m-%dT%H:%M:%SZ"),
        key_id=key_id(key.public_key()),
    )
    signature = Signature(statement, key.sign(statement.canonical()))
    path = folder / SIGNATURE_FILE
    write_text_atomic(path, json.dumps(signature.to_json(), indent=2) + "\n")
    return path


def verify_package(
    folder: Path,
    trusted: TrustedKeys,
    manifest_bytes: bytes | None = None,
    *,
    name: str,
    version: int,
    config_dir: Path | None = None,
    now: datetime | None = None,
) -> Signature:
    """Check ``folder/manifest.sig`` against the trusted keys, their expiry and revocation list,
    and its statement against what is loaded: model ``name`` at ``version``, this manifest
    (``manifest_bytes``, read from ``folder`` when not given) and the behaviour sections of
    ``config_dir/config.json`` (default: the folder's parent). Returns the signature;
    :class:`SignatureError` (with its ``reason``) names what is wrong. The files themselves are
    checked against the (now trusted) manifest by
    :func:`edgewise.runtime.package.manifest.verify_files`."""
    from cryptography.exceptions import InvalidSignature

    from edgewise.runtime.package.manifest import parse_manifest

    signature = read_signature(folder)
    statement = signature.statement
    kid = statement.key_id
    revoked = trusted.revocations()
    if kid in revoked.keys:
        raise SignatureError(
            f"{folder}: signed by key {kid}, which is revoked ({trusted.revocation_file})",
            "revoked_key",
        )
    key = trusted.keys.get(kid)
    if key is None:
        raise SignatureError(
            f"{folder}: signed by key {kid!r}, which is not trusted "
            f"(trusted: {', '.join(sorted(trusted.keys)) or 'none'})",
            "untrusted_key",
        )
    try:
        key.verify(signature.signature, statement.canonical())
    except InvalidSignature:
        raise SignatureError(
            f"{folder}: the signature does not verify with key {kid} (the statement in "
            f"{SIGNATURE_FILE} changed after signing, or a forged signature)",
            "bad_signature",
        ) from None
    instant = (now or datetime.now(UTC)).astimezone(UTC)
    expiry = trusted.not_after.get(kid)
    signed_at = _parse_instant(statement.signed_at, "signed_at")
    if expiry is not None and (instant > expiry or signed_at > expiry):
        raise SignatureError(
            f"{folder}: signed by key {kid}, which expired at "
            f"{expiry.strftime('%Y-%m-%dT%H:%M:%SZ')}; re-sign with a current key",
            "expired_key",
        )
    if statement.model != name:
        raise SignatureError(
            f"{folder}: signed for model {statement.model!r}, loaded as {name!r}",
            "model_mismatch",
        )
    if statement.version != version:
        raise SignatureError(
            f"{folder}: signed as version {statement.version} of {name!r}, placed as version "
            f"{version}; a version number is part of what is signed (re-sign it as {version} "
            "if that is meant)",
            "version_mismatch",
        )
    if manifest_bytes is None:
        try:
            manifest_bytes = (folder / _MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise SignatureError(f"{folder}: cannot read {_MANIFEST_FILE}: {exc}") from None
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if digest != statement.manifest_sha256:
        raise SignatureError(
            f"{folder}: {_MANIFEST_FILE} changed after signing (sha256 {digest[:12]}…, signed "
            f"{statement.manifest_sha256[:12]}…)",
            "manifest_changed",
        )
    if digest in revoked.packages:
        raise SignatureError(
            f"{folder}: the package (manifest sha256 {digest[:12]}…) is revoked "
            f"({trusted.revocation_file})",
            "revoked_package",
        )
    manifest = parse_manifest(manifest_bytes, str(folder / _MANIFEST_FILE))
    listed = {entry.path: entry.sha256 for entry in manifest.files}
    if listed != dict(statement.files):
        raise SignatureError(
            f"{folder}: the files the statement signs differ from the manifest's",
            "manifest_changed",
        )
    config_dir = config_dir if config_dir is not None else folder.parent
    config = config_digest(config_dir)
    if config != statement.config_sha256:
        raise SignatureError(
            f"{config_dir / _CONFIG_FILE}: changed after version {version} was signed (its "
            f"sections {', '.join(CONFIG_SECTIONS)} are signed; sha256 "
            f"{config[:12]}…, signed {statement.config_sha256[:12]}…): restore it, or re-sign "
            "the versions it serves",
            "config_changed",
        )
    return signature
