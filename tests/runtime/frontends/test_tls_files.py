"""The TLS files every port reads (tls_files.py): one check at the start, whatever the front end
(a key that is not the certificate's is one error naming both, never a failed bind); a change
taken only when it can be used and put in place, refused and logged once otherwise; and the
native front end's checked copies (tls_stage.py), which only a usable change replaces."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.http_tls import server_ssl_context
from edgewise.runtime.frontends.security import server_credentials
from edgewise.runtime.frontends.tls_files import TlsFiles, TlsVersion
from edgewise.runtime.frontends.tls_stage import TlsStage
from tests.certs import Certificates, make_certificates

NOT_A_BUNDLE = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def live(certs: Certificates, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Copies of the certificate, key and CA, for a test to change."""
    folder = tmp_path / "live"
    folder.mkdir()
    files = (folder / "cert.pem", folder / "key.pem", folder / "ca.pem")
    for source, target in zip((certs.server_cert, certs.server_key, certs.ca), files, strict=True):
        shutil.copy(source, target)
    return files


def test_every_port_checks_the_files_at_the_start(certs: Certificates, tmp_path: Path) -> None:
    other = make_certificates(tmp_path / "other")
    not_ca = tmp_path / "not-ca.pem"
    not_ca.write_text(NOT_A_BUNDLE)
    starts = {
        "grpcio": server_credentials,
        "HTTP": server_ssl_context,
        "native": lambda *files: TlsStage(*files, tmp_path / "stage"),
    }
    for name, start in starts.items():
        for files, message, named in (
            ((certs.server_cert, other.server_key, None), "cannot be used together",
             (certs.server_cert, other.server_key)),
            ((certs.server_cert, tmp_path / "missing.key", None), "cannot read",
             (tmp_path / "missing.key",)),
            ((certs.server_cert, certs.server_key, not_ca), "TLS client CA", (not_ca,)),
        ):  # fmt: skip
            with pytest.raises(InvalidInput, match=message) as info:
                start(*files)
            assert all(str(path) in info.value.message for path in named), (name, info.value)


def test_a_change_is_taken_only_when_it_can_be_used(
    certs: Certificates,
    live: tuple[Path, Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    second = make_certificates(tmp_path / "second")
    cert, key, ca = live
    taken: list[TlsVersion] = []
    failing = False

    def use(version: TlsVersion) -> None:
        if failing:
            raise OSError(28, "No space left on device")
        taken.append(version)

    files = TlsFiles(cert, key, ca, "test port", use=use, check_seconds=0)
    assert [v.cert for v in taken] == [certs.server_cert.read_bytes()]
    assert files.current is taken[0] and files.current.client_ca == certs.ca.read_bytes()
    assert files.refresh() is None  # nothing changed
    with caplog.at_level(logging.INFO):
        # A key that is not the certificate's: refused once, the version in use stays.
        shutil.copy(second.server_key, key)
        assert files.refresh() is None
        assert files.refresh() is None
        assert caplog.text.count("refused") == 1 and "cannot be used together" in caplog.text
        assert "reloaded" not in caplog.text and len(taken) == 1
        # Its certificate follows: both taken at once.
        shutil.copy(second.server_cert, cert)
        version = files.refresh()
        assert version is not None and files.current is version and taken[-1] is version
        assert (version.cert, version.key) == (cert.read_bytes(), key.read_bytes())
        assert "TLS certificate reloaded for the test port" in caplog.text
        # A CA bundle that does not load: refused.
        ca.write_text(NOT_A_BUNDLE)
        assert files.refresh() is None and files.current is version
        assert caplog.text.count("refused") == 2
        # A version that cannot be put in place is refused too (not logged as reloaded).
        shutil.copy(second.ca, ca)
        failing = True
        assert files.refresh() is None and files.current is version
        assert caplog.text.count("refused") == 3 and "No space left" in caplog.text
        assert caplog.text.count("reloaded") == 1


def test_changes_are_looked_for_at_most_once_a_period(
    live: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    second = make_certificates(tmp_path / "second")
    cert, key, _ = live
    files = TlsFiles(cert, key, None, "test port", check_seconds=60)
    start = files.current
    shutil.copy(second.server_cert, cert)
    shutil.copy(second.server_key, key)
    assert files.refresh() is None and files.current is start  # not looked at yet
    assert files.refresh(now=float("inf")) is not None
    assert files.current.cert == second.server_cert.read_bytes()


def test_the_native_copies_change_only_to_a_version_that_can_be_used(
    certs: Certificates, live: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    second = make_certificates(tmp_path / "second")
    cert, key, ca = live
    stage = TlsStage(cert, key, ca, tmp_path / "private" / "tls")
    assert stage.client_ca is not None
    assert stage.cert.read_bytes() == certs.server_cert.read_bytes()
    assert stage.key.read_bytes() == certs.server_key.read_bytes()
    assert stage.client_ca.read_bytes() == certs.ca.read_bytes()
    assert stat.S_IMODE(stage.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(stage.key.stat().st_mode) == 0o600
    assert not stage.refresh()  # nothing changed
    # A key that is not the certificate's: the copies stay as they were.
    shutil.copy(second.server_key, key)
    assert not stage.refresh()
    assert stage.key.read_bytes() == certs.server_key.read_bytes()
    # The matching certificate follows: both copied at once.
    shutil.copy(second.server_cert, cert)
    assert stage.refresh()
    assert stage.cert.read_bytes() == second.server_cert.read_bytes()
    assert stage.key.read_bytes() == second.server_key.read_bytes()
    # A CA bundle that is not one: the previous bundle stays.
    ca.write_text(NOT_A_BUNDLE)
    assert not stage.refresh()
    assert stage.client_ca.read_bytes() == certs.ca.read_bytes()
    # Only the generation in use and the one before are kept (gRPC may still read it).
    assert sorted(p.name for p in stage.folder.iterdir()) == ["current", "v1", "v2"]
