#!/usr/bin/env bash
# Make a Debian bookworm base image tarball (python3 3.11 and venv) with mmdebstrap, for hosts
# that cannot pull python:3.11-slim from a registry. Kept in OUT and reused while it exists.
#
#   containers/base-image.sh [OUT]     (default .build/containers/base-bookworm.tar)
#   podman import --change 'CMD ["python3"]' OUT localhost/base:bookworm
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/containers/base-bookworm.tar}
[ -s "$out" ] && exit 0
mkdir -p "$(dirname "$out")"
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
hooks=()
[ -d /usr/share/mmdebstrap/hooks/eatmydata ] && hooks=(--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata)
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    "${hooks[@]}" --dpkgopt=force-unsafe-io \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "${out%.tar}.partial.tar" "$mirror"
mv "${out%.tar}.partial.tar" "$out"
