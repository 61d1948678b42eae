"""The model package format: manifest, paths, reference profile, golden requests,
signing, feature schema. Read by everyone; imports no server."""

from edgewise.runtime.package.manifest import (
    MANIFEST_FILE,
    Feature,
    Manifest,
    TensorSpec,
    read_manifest,
    verify_files,
    write_manifest,
)

__all__ = [
    "MANIFEST_FILE",
    "Feature",
    "Manifest",
    "TensorSpec",
    "read_manifest",
    "verify_files",
    "write_manifest",
]
