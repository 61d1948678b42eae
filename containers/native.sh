#!/bin/sh
# The image's native parts, built where the target's compilers and libraries are: on the build
# host for its own architecture, or in a builder container of the target platform (build.sh).
#
#   native.sh OUT PYTHON [LEVELS]
#
# PYTHON: a python 3.11 with numba and the lock's numpy, which imports this checkout's edgewise
# (the kernels' digest covers their sources and numpy's version). LEVELS: the portable CPU levels
# of the ahead-of-time kernels (default on x86_64: x86-64-v3 x86-64-v2; an image runs on other
# CPUs than the build machine's, see kernels/_native.py). kernels/_native.py has no portable
# aarch64 level yet, and a "host" build is tied to the build machine's CPU identity (under
# emulation: the emulating host's), so elsewhere no kernels are built unless LEVELS names some:
# such an image monitors only with the jit extra. PATCHELF: the patchelf to run.
#
# Writes OUT/kernels/_native_kernels_*.so, OUT/front/_front*.so (the native gRPC front end,
# against this system's gRPC C++ library, pkg-config grpc++), OUT/front/_ort*.so (onnxruntime's
# C API module: with it, and the fast path compiled into _front, the image answers the common
# ModelInfer in C++ without the GIL, docs/native.md; it opens the onnxruntime wheel's own
# libonnxruntime.so at run time, which assemble.sh then keeps; both need onnxruntime's C API
# headers, fetched with npm or found in the .build cache, ort_headers.py: where they cannot be
# had, e.g. in an emulated builder without network, the image serves every call on the Python
# path, said on its own line) and OUT/lib/: the front end's shared
# libraries that a Debian bookworm Python base (python:3.11-slim, or base-image.sh's runtime
# flavour) does not have, each with RUNPATH $ORIGIN, the front end's pointing at
# /opt/edgewise/lib from its place in the image's site-packages (as auditwheel does for wheels).
set -eu
out=$1
python=$2
patchelf=${PATCHELF:-patchelf}
case "$(uname -m)" in
x86_64) levels=${3:-x86-64-v3 x86-64-v2} ;;
*) levels=${3:-} ;;
esac
rm -rf "$out/kernels" "$out/front" "$out/lib"
mkdir -p "$out/kernels" "$out/front" "$out/lib"
for level in $levels; do
    "$python" -m edgewise.kernels.native_build --cpu "$level" --output-dir "$out/kernels"
done
[ -n "$levels" ] || echo "native.sh: no portable kernel level for $(uname -m) (kernels/_native.py" \
    "LEVELS): no ahead-of-time kernels; the image monitors only with the jit extra"
# The C API headers first: the front end is compiled with the fast path only where they are.
if "$python" -m edgewise.runtime.frontends.native.ort_headers; then
    headers=1
else
    headers=0
    echo "native.sh: no onnxruntime C API headers (npm, or the .build cache, ort_headers.py):" \
        "no fast path; this image serves every call on the Python path (docs/native.md)"
fi
"$python" -m edgewise.runtime.frontends.native.build --output-dir "$out/front"
fast="WITHOUT the fast path"
if [ "$headers" = 1 ]; then
    "$python" -m edgewise.runtime.frontends.native.build --ort --output-dir "$out/front"
    ort=$(ls "$out"/front/_ort*.so)
    if ldd "$ort" | grep -q "not found"; then
        echo "native.sh: the onnxruntime C API module's libraries are not all here:" >&2
        ldd "$ort" | grep "not found" >&2
        exit 1
    fi
    fast="with the fast path (onnxruntime C API module $(basename "$ort"))"
fi
front=$(ls "$out"/front/_front*.so)
# The closure, less what every Debian-based Python 3.11 image has (glibc, libstdc++, libgcc,
# zlib, OpenSSL 3: Python's own ssl module links it).
ldd "$front" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    case "$soname" in
    libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | ld-linux* | \
        libstdc++.so.* | libgcc_s.so.* | libz.so.* | libssl.so.* | libcrypto.so.*) ;;
    *) cp -L "$path" "$out/lib/$soname" ;;
    esac
done
if ldd "$front" | grep -q "not found"; then
    echo "native.sh: the front end's libraries are not all here:" >&2
    ldd "$front" | grep "not found" >&2
    exit 1
fi
for library in "$out"/lib/*; do
    chmod 0644 "$library"
    "$patchelf" --set-rpath '$ORIGIN' "$library"
done
# site-packages/edgewise/runtime/frontends/native -> /opt/edgewise/lib (venv/lib/python3.11/...)
"$patchelf" --set-rpath '$ORIGIN/../../../../../../../../lib' "$front"
echo "native.sh: $(ls "$out/kernels" | wc -l) kernel modules ($levels), front end $(basename "$front") $fast, $(ls "$out/lib" | wc -l) libraries ($(du -sk "$out/lib" | cut -f1) kB)"
