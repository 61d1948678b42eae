"""Fetch onnxruntime's C API headers, which the onnxruntime wheel does not ship.

    python -m edgewise.runtime.frontends.native.ort_headers [--cache-dir DIR]

The wheel ships the library (``onnxruntime/capi/libonnxruntime.so.*``) but not
``onnxruntime_c_api.h``. Microsoft's official headers come, unchanged, inside the iOS
xcframework that the npm package :data:`PACKAGE` (MIT, "ONNX Runtime Plugin for Unity") bundles.
``npm pack`` downloads that exact version into the cache folder (kept: a second run downloads
nothing), its sha512 must equal :data:`INTEGRITY` pinned here (what
``npm view PACKAGE@VERSION dist.integrity`` printed when it was pinned), and only the
framework's ``Headers/*.h`` are extracted, into ``CACHE/onnxruntime/include/``. Nothing from
the package is committed to the repository.

The headers declare :data:`HEADER_API_VERSION`; a newer library serves every older API version,
so they work with the wheel's library as long as it is at least that version.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Final

__all__ = [
    "HEADER_API_VERSION",
    "INTEGRITY",
    "PACKAGE",
    "HeadersError",
    "default_cache_dir",
    "fetch_headers",
    "verify_integrity",
]

PACKAGE: Final = "com.github.asus4.onnxruntime"
VERSION: Final = "0.4.9"
#: ``npm view com.github.asus4.onnxruntime@0.4.9 dist.integrity``
INTEGRITY: Final = (
    "sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7"
    "IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
)
#: ``ORT_API_VERSION`` of the headers in that package (onnxruntime 1.29's C API).
HEADER_API_VERSION: Final = 29
#: The folder of the headers inside the package's tarball.
HEADERS_IN_TARBALL: Final = (
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
)
TARBALL: Final = f"{PACKAGE}-{VERSION}.tgz"
#: Written into the include folder last: its presence says the extraction completed.
STAMP: Final = ".integrity"

_REPO_ROOT: Final = Path(__file__).resolve().parents[3]


class HeadersError(Exception):
    """The headers cannot be had here (no npm, no registry, a tarball that does not verify)."""


def default_cache_dir() -> Path:
    """The repository's ``.build`` folder (the current directory's outside a checkout)."""
    root = _REPO_ROOT if (_REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return root / ".build"


def verify_integrity(tarball: Path, integrity: str = INTEGRITY) -> None:
    """Raise :class:`HeadersError` unless ``tarball``'s sha512 is ``integrity`` (npm's SRI form)."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise HeadersError(f"pinned integrity {integrity!r} is not an sha512 one")
    digest = hashlib.sha512()
    with tarball.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    got = base64.b64encode(digest.digest()).decode()
    if got != expected:
        raise HeadersError(
            f"{tarball}: sha512-{got} is not the pinned {integrity} (delete it to download again)"
        )


def _npm_pack(cache: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise HeadersError("npm not found (it downloads the onnxruntime C API headers)")
    done = subprocess.run(
        [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(cache), "--silent"],
        check=False,
        capture_output=True,
        text=True,
    )
    tarball = cache / TARBALL
    if done.returncode != 0 or not tarball.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HeadersError(f"npm pack {PACKAGE}@{VERSION} failed: {last}")
    return tarball


def _extract(tarball: Path, include: Path) -> None:
    partial = include.with_name(include.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    found = 0
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                if not member.isfile() or not member.name.startswith(HEADERS_IN_TARBALL):
                    continue
                name = member.name[len(HEADERS_IN_TARBALL) :]
                if "/" in name or not name.endswith(".h"):
                    continue
                source = archive.extractfile(member)
                if source is None:
                    continue
                (partial / name).write_bytes(source.read())
                found += 1
    except (OSError, tarfile.TarError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise HeadersError(f"{tarball}: cannot be read: {exc}") from None
    header = partial / "onnxruntime_c_api.h"
    declared = f"#define ORT_API_VERSION {HEADER_API_VERSION}\n"
    if not header.is_file() or declared not in header.read_text(errors="replace"):
        shutil.rmtree(partial, ignore_errors=True)
        raise HeadersError(
            f"{tarball}: no {HEADERS_IN_TARBALL}onnxruntime_c_api.h declaring C API version "
            f"{HEADER_API_VERSION} in it"
        )
    (partial / STAMP).write_text(INTEGRITY + "\n")
    shutil.rmtree(include, ignore_errors=True)
    partial.rename(include)


def fetch_headers(cache: Path | None = None) -> Path:
    """The folder holding ``onnxruntime_c_api.h``: extracted before from the pinned tarball, or
    now (downloading the tarball with ``npm pack`` unless the cache has it). Raises
    :class:`HeadersError` with the reason when that cannot be done."""
    cache = cache if cache is not None else default_cache_dir()
    include = cache / "onnxruntime" / "include"
    stamp = include / STAMP
    if stamp.is_file() and stamp.read_text().strip() == INTEGRITY:
        return include
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / TARBALL
    if not tarball.is_file():
        tarball = _npm_pack(cache)
    verify_integrity(tarball)
    _extract(tarball, include)
    return include


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: the repository's .build folder"
    )
    args = parser.parse_args(argv)
    try:
        include = fetch_headers(args.cache_dir)
    except HeadersError as exc:
        print(f"onnxruntime C API headers not fetched: {exc}")
        return 1
    print(f"onnxruntime C API headers: {include}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
