#!/usr/bin/env bash
# Make Debian bookworm base image tarballs with mmdebstrap, for hosts that cannot pull
# python:3.11-slim from a registry. Each is kept in OUT and reused while it exists and was made by
# this version of the script for the same flavour and architecture (a recipe digest beside it).
#
#   FLAVOR=build containers/base-image.sh [OUT]       (default .build/containers/base-FLAVOR.tar)
#   FLAVOR=runtime containers/base-image.sh           the small runtime base
#   ARCH=arm64 FLAVOR=builder containers/base-image.sh .build/containers/base-builder-arm64.tar
#   podman import --change 'CMD ["python3"]' OUT localhost/edgewise-base:FLAVOR
#
# Flavours:
#   build    minbase with python3 3.11, venv, binutils (strip) and ca-certificates: the image's
#            build stage (never shipped). About 140 MB.
#   runtime  no package manager, no shell: python3.11 (interpreter and standard library, its
#            byte code compiled), libstdc++ and their libraries, extracted without maintainer
#            scripts (mmdebstrap --variant=extract), /etc/passwd naming uid 10001. About 50 MB.
#   builder  build plus a C/C++ compiler, python3-dev, pkg-config, libgrpc++-dev and patchelf:
#            where the kernels and the native front end are compiled for another architecture
#            (containers/build.sh with PLATFORM=linux/arm64).
# All: merged /usr made by mmdebstrap's own hook (the usrmerge package would pull in perl, 47 MB),
# no documentation, manual pages or translations (copyright files stay), no apt lists or caches.
# A foreign ARCH needs qemu-user-static registered in binfmt_misc on this host (mmdebstrap runs
# the target's maintainer scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
flavor=${FLAVOR:-build}
out=${1:-.build/containers/base-$flavor.tar}
arch=${ARCH:-$(dpkg --print-architecture)}
recipe=$( (cat "$0"; echo "$flavor $arch") | sha256sum | cut -c1-16)
[ -s "$out" ] && [ "$(cat "$out.recipe" 2>/dev/null)" = "$recipe" ] && exit 0
mkdir -p "$(dirname "$out")"
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
options=(--quiet --architectures="$arch" --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*')
cleanup='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*'
case "$flavor" in
build | builder)
    packages=python3,python3-venv,ca-certificates,binutils
    [ "$flavor" = builder ] &&
        packages+=,g++,python3-dev,pkg-config,libgrpc++-dev,patchelf
    [ -d /usr/share/mmdebstrap/hooks/eatmydata ] &&
        options+=(--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata)
    mmdebstrap "${options[@]}" --variant=minbase --include="$packages" \
        --dpkgopt=force-unsafe-io --customize-hook="$cleanup" \
        bookworm "${out%.tar}.partial.tar" "$mirror"
    ;;
runtime)
    # extract: the packages and their dependencies unpacked, nothing configured (mmdebstrap runs
    # no customize hook for this variant). What configuration would have made is made here, in
    # a folder: the python3 name, the standard library's byte code (compiled inside the tree, so
    # its paths are the image's), the users, the loader cache; the package tools that came along
    # for the merged /usr (dpkg, tar, mawk) go.
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' EXIT
    mmdebstrap "${options[@]}" --variant=extract \
        --include=base-files,python3.11-minimal,libpython3.11-stdlib,libstdc++6,zlib1g \
        bookworm "$tree/root" "$mirror"
    root=$tree/root
    ln -sf python3.11 "$root/usr/bin/python3"
    rm -rf "$root"/usr/bin/{dpkg*,tar,mawk,update-alternatives} "$root"/usr/lib/dpkg \
        "$root"/usr/share/{dpkg,lintian,bug} "$root"/var/lib/dpkg "$root"/var/cache/* \
        "$root"/var/log/* "$root"/usr/lib/python3.11/{lib2to3,pydoc_data}
    # Unchecked hashes: the tar below sets every time to one value, which timestamp byte code
    # would take for a change (and recompile in memory at every start of a read-only image).
    chroot "$root" /usr/bin/python3.11 -m compileall -q -j0 --invalidation-mode unchecked-hash \
        /usr/lib/python3.11
    printf 'root:x:0:0:root:/root:/nonexistent\nedgewise:x:10001:10001:edgewise:/tmp:/nonexistent\n' \
        > "$root/etc/passwd"
    printf 'root:x:0:\nedgewise:x:10001:\n' > "$root/etc/group"
    chmod 1777 "$root/tmp"
    ldconfig -r "$root"
    tar --sort=name --numeric-owner --mtime=@0 --clamp-mtime -C "$root" \
        -cf "${out%.tar}.partial.tar" .
    ;;
*)
    echo "base-image.sh: FLAVOR must be build, runtime or builder, not '$flavor'" >&2
    exit 2
    ;;
esac
mv "${out%.tar}.partial.tar" "$out"
echo "$recipe" > "$out.recipe"
