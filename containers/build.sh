#!/usr/bin/env bash
# Build the edgewise image from wheels made on this host.
#
#   containers/build.sh [TAG]            (default TAG: edgewise:latest)
#
# Environment:
#   ENGINE       podman (default) or docker
#   BASE_IMAGE   the base for both stages (default in the Dockerfile: python:3.11-slim-bookworm)
#   WHEELS       wheel folder, kept between builds (default .build/containers/wheels)
#   OFFLINE=1    build from the wheels already in WHEELS, without any index (air-gapped)
#   PIP          pip to build wheels with (default .venv/bin/pip)
#   NATIVE=0     leave out the ahead-of-time compiled kernels (numba's JIT then serves them all)
#   BUILD_FLAGS  extra flags for the engine's build command (e.g. --network=host)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-edgewise:latest}
engine=${ENGINE:-podman}
wheels=${WHEELS:-.build/containers/wheels}
pip=${PIP:-.venv/bin/pip}
context=.build/containers/context

mkdir -p "$wheels"
rm -f "$wheels"/edgewise-*.whl
# The project's own wheel, from this checkout (no index needed: the venv has setuptools).
"$pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$wheels" .
# Its dependencies: reused from $wheels when present, else downloaded once.
index=()
[ "${OFFLINE:-0}" = 1 ] && index=(--no-index)
"$pip" wheel --quiet "${index[@]}" --find-links "$wheels" --wheel-dir "$wheels" "$wheels"/edgewise-*.whl

rm -rf "$context"
mkdir -p "$context/native"
cp containers/Dockerfile containers/entrypoint.sh "$context/"

# The kernels a server runs, compiled ahead of time for portable x86-64 levels (an image runs on
# other CPUs than this one; see kernels/_native.py), so that the image serves without loading
# numba or LLVM. Built here, where there is a C compiler, in a virtual environment made from the
# same wheels as the image, so numpy and the kernel sources are the image's own. Without a
# compiler the image still works: numba's JIT serves every kernel.
if [ "${NATIVE:-1}" = 1 ] && [ "$(uname -m)" = x86_64 ] && command -v cc >/dev/null; then
    venv=.build/containers/native-venv
    [ -x "$venv/bin/python" ] || "$(dirname "$pip")/python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --no-index --find-links "$wheels" "$wheels"/edgewise-*.whl
    "$venv/bin/pip" install --quiet --no-index --no-deps --force-reinstall "$wheels"/edgewise-*.whl
    for level in x86-64-v3 x86-64-v2; do
        "$venv/bin/python" -m edgewise.kernels.native_build --cpu "$level" \
            --output-dir "$context/native" || true
    done
fi
cp -al "$(realpath "$wheels")" "$context/wheels" 2>/dev/null || cp -a "$wheels" "$context/wheels"

args=(build -t "$tag" -f "$context/Dockerfile")
[ "$engine" = podman ] && args+=(--format docker)  # OCI images drop HEALTHCHECK
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# shellcheck disable=SC2206
[ -n "${BUILD_FLAGS:-}" ] && args+=(${BUILD_FLAGS})
"$engine" "${args[@]}" "$context"
