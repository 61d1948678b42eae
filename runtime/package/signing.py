"""Signed model packages (ed25519).

The manifest lists the sha256 and size of every file of a package (``model.onnx``,
``profile.json``, ``golden.json``), so a signature over the manifest's bytes covers the whole
package: :func:`sign_package` writes a detached ``manifest.sig`` beside ``manifest.json``::

    {"format": "edgewise.signature/1", "algorithm": "ed25519", "key_id": "3f9c…",
     "manifest_sha256": "…", "signature": "<base64 of 64 bytes>"}

and :func:`verify_package` checks it against a set of trusted public keys
(:class:`TrustedKeys`: one PEM file, or a folder of ``*.pub``/``*.pem`` files) before the files
are checked against the manifest. The key id is the first 16 hex digits of the sha256 of the
raw 32-byte public key; it only picks the key, the signature is what proves it.

Keys are PEM: the private key PKCS#8 (written with mode 0600), the public key
SubjectPublicKeyInfo, as ``openssl genpkey -algorithm ed25519`` makes them.

What a signature does not cover: the version number (the folder's name) and the model's
``config.json`` (the operator's own serving settings). A signed older package placed under a
higher version number is still accepted; keep the repository writable only by the agent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
    "SIGNATURE_FILE",
    "SIGNATURE_FORMAT",
    "SignatureError",
    "TrustedKeys",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "read_signature",
    "sign_package",
    "verify_package",
]

SIGNATURE_FILE: Final = "manifest.sig"
SIGNATURE_FORMAT: Final = "edgewise.signature/1"
ALGORITHM: Final = "ed25519"
_MANIFEST_FILE: Final = "manifest.json"  # package.MANIFEST_FILE (package imports nothing here)
_MAX_SIGNATURE_BYTES: Final = 4096
_KEY_SUFFIXES: Final = (".pub", ".pem")


class SignatureError(PackageError):
    """A package's signature is missing, malformed, by an untrusted key, or does not verify."""


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


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys whose signatures are accepted, by key id."""

    keys: Mapping[str, Ed25519PublicKey]
    source: str = ""

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        """One PEM public key file, or every ``*.pub``/``*.pem`` file of a folder."""
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _KEY_SUFFIXES and p.is_file())
            if not files:
                raise InvalidInput(f"trusted keys: no *.pub or *.pem file in {path}")
        elif path.is_file():
            files = [path]
        else:
            raise InvalidInput(f"trusted keys: {path} is neither a file nor a folder")
        keys: dict[str, Ed25519PublicKey] = {}
        for file in files:
            key = _load_public_key(file)
            keys[key_id(key)] = key
        return cls(keys, str(path))

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes
    manifest_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SIGNATURE_FORMAT,
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "manifest_sha256": self.manifest_sha256,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = SIGNATURE_FILE) -> Signature:
        if not isinstance(data, dict):
            raise SignatureError(f"{where}: expected a JSON object")
        try:
            if data.get("format") != SIGNATURE_FORMAT:
                raise SignatureError(
                    f"{where}: unknown format {data.get('format')!r} (expected {SIGNATURE_FORMAT})"
                )
            if data.get("algorithm") != ALGORITHM:
                raise SignatureError(f"{where}: unsupported algorithm {data.get('algorithm')!r}")
            signature = base64.b64decode(str(data["signature"]), validate=True)
            if len(signature) != 64:
                raise SignatureError(f"{where}: an ed25519 signature has 64 bytes")
            return cls(str(data["key_id"]), signature, str(data.get("manifest_sha256", "")))
        except SignatureError:
            raise
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise SignatureError(f"{where}: malformed: {type(exc).__name__}: {exc}") from None


def read_signature(folder: Path) -> Signature:
    """Parse ``folder/manifest.sig``; :class:`SignatureError` if missing or malformed."""
    path = folder / SIGNATURE_FILE
    try:
        if path.is_symlink():
            raise SignatureError(f"{path}: is a symbolic link")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{folder}: the package is not signed (no {SIGNATURE_FILE})") from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: too large for a signature ({len(raw)} bytes)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SignatureError(f"{path}: not valid JSON: {exc}") from None
    return Signature.from_json(data, str(path))


def sign_package(folder: Path, private_key: Ed25519PrivateKey | Path) -> Path:
    """Sign ``folder/manifest.json`` as it is on disk; writes ``folder/manifest.sig``."""
    key = load_private_key(private_key) if isinstance(private_key, Path) else private_key
    manifest = (folder / _MANIFEST_FILE).read_bytes()
    signature = Signature(
        key_id(key.public_key()), key.sign(manifest), hashlib.sha256(manifest).hexdigest()
    )
    path = folder / SIGNATURE_FILE
    write_text_atomic(path, json.dumps(signature.to_json(), indent=2) + "\n")
    return path


def verify_package(folder: Path, trusted: TrustedKeys, manifest_bytes: bytes | None = None) -> str:
    """Check ``folder/manifest.sig`` over the manifest's bytes against the trusted keys; returns
    the key id. :class:`SignatureError` names what is wrong. The files themselves are checked
    against the (now trusted) manifest by :func:`edgewise.runtime.package.manifest.verify_files`."""
    from cryptography.exceptions import InvalidSignature

    signature = read_signature(folder)
    key = trusted.keys.get(signature.key_id)
    if key is None:
        raise SignatureError(
            f"{folder}: signed by key {signature.key_id!r}, which is not trusted "
            f"(trusted: {', '.join(sorted(trusted.keys)) or 'none'})"
        )
    if manifest_bytes is None:
        try:
            manifest_bytes = (folder / _MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise SignatureError(f"{folder}: cannot read {_MANIFEST_FILE}: {exc}") from None
    try:
        key.verify(signature.signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"{folder}: the signature of {_MANIFEST_FILE} does not verify with key "
            f"{signature.key_id} (manifest changed after signing, or a forged signature)"
        ) from None
    return signature.key_id
