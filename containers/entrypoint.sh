#!/bin/sh
# Seed numba's cache (compiled when the image was built) into the writable NUMBA_CACHE_DIR, then
# run edgewise with the container's arguments (default: serve).
set -eu
seed=/opt/edgewise/numba-cache
if [ -n "${NUMBA_CACHE_DIR:-}" ] && [ -d "$seed" ] && [ ! -e "$NUMBA_CACHE_DIR/.seeded" ]; then
    if mkdir -p "$NUMBA_CACHE_DIR" 2>/dev/null && cp -R "$seed/." "$NUMBA_CACHE_DIR/"; then
        : > "$NUMBA_CACHE_DIR/.seeded"
    else
        echo "edgewise: cannot write $NUMBA_CACHE_DIR; numba kernels compile on first use" >&2
    fi
fi
exec edgewise "$@"
