"""Fetching onnxruntime's C API headers (runtime/frontends/native/ort_headers.py): a tarball
that is not the pinned one is refused, and a machine without npm says so in one line."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from edgewise.runtime.frontends.native import ort_headers
from edgewise.runtime.frontends.native.build import main as build_main
from edgewise.runtime.frontends.native.ort_headers import (
    HEADERS_IN_TARBALL,
    TARBALL,
    HeadersError,
    fetch_headers,
    verify_integrity,
)


def _tarball(path: Path) -> Path:
    """A tarball laid out like the package, holding a header that is not Microsoft's."""
    with tarfile.open(path, "w:gz") as archive:
        data = b"#define ORT_API_VERSION 29\n"
        member = tarfile.TarInfo(HEADERS_IN_TARBALL + "onnxruntime_c_api.h")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return path


def test_the_pinned_integrity_is_checked(tmp_path: Path) -> None:
    tarball = _tarball(tmp_path / "t.tgz")
    own = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    verify_integrity(tarball, own)  # its own digest verifies
    with pytest.raises(HeadersError, match="is not the pinned"):
        verify_integrity(tarball)
    with pytest.raises(HeadersError, match="not an sha512"):
        verify_integrity(tarball, "sha1-abc")


def test_a_cached_tarball_that_is_not_the_pinned_one_extracts_nothing(tmp_path: Path) -> None:
    _tarball(tmp_path / TARBALL)
    with pytest.raises(HeadersError, match="delete it to download again"):
        fetch_headers(tmp_path)
    assert not (tmp_path / "onnxruntime").exists()


def test_without_npm_the_build_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(ort_headers, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setenv("CXX", "/bin/true")  # a "compiler" the empty PATH does not hide
    with pytest.raises(HeadersError, match="npm not found"):
        fetch_headers(tmp_path / "cache")
    assert build_main(["--ort", "--output-dir", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("onnxruntime C API module not built (npm not found")
    assert not list(tmp_path.glob("_ort*"))
