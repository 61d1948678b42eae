#!/usr/bin/env bash
# Install what the container test needs on a Debian host (root): podman with runc (crun refuses
# the hybrid cgroup layout of the CI machines), mmdebstrap and eatmydata to build a base image
# without a registry. Does nothing when they are all there already.
set -euo pipefail
needed=()
for tool in podman runc mmdebstrap eatmydata; do
    command -v "$tool" >/dev/null 2>&1 || needed+=("$tool")
done
[ ${#needed[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-podman.sh: need root to install ${needed[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends podman runc mmdebstrap eatmydata \
    uidmap fuse-overlayfs slirp4netns containernetworking-plugins conmon
