#!/bin/sh
# The image's build stage (containers/Dockerfile): make /opt/edgewise from the staged context.
#
#   assemble.sh CONTEXT            (CONTEXT: the folder the Dockerfile copied, /tmp/context)
#
# 1. A virtual environment with exactly the hash-pinned lock (pip --require-hashes, no index),
#    edgewise's own wheel without dependencies; `pip check` and lockfile.py refuse any other set.
# 2. The serving kernels compiled ahead of time and the native front end, built on the build
#    host (or in a builder container for another architecture), go into the package; the front
#    end's shared libraries that a Debian/Python base lacks go to /opt/edgewise/lib (its RUNPATH
#    and theirs point there, as auditwheel does for wheels).
# 3. What serving never imports goes: pip and setuptools, packages' test suites, onnxruntime's
#    Python tools (transformers, quantization, tools: imported only by their own command lines)
#    and, unless the onnxruntime C API module (_ort, the native fast path's) came with the native
#    parts, its C API library (libonnxruntime.so: the Python binding links its own copy), numpy's
#    f2py, distutils and C headers (for building extensions), type stubs (*.pyi: read by type
#    checkers only). Shared objects are stripped (not the auditwheel-patched *.libs ones,
#    which strip breaks), byte code is compiled as unchecked hashes (an image's files never
#    change; no source stat or recompilation at start).
# 4. Checks: the lock, the imports a server makes, the native front end loads (with _ort: the
#    C API module opens libonnxruntime.so and the front end has the fast path); then the size of
#    every site-packages entry, largest last.
set -eu
context=$1
prefix=/opt/edgewise
venv=$prefix/venv
python=$venv/bin/python

python3 -m venv "$venv"
"$python" -m pip install --quiet --no-index --find-links "$context/wheels" --require-hashes \
    --only-binary=:all: --no-warn-script-location -r "$context/serve.txt"
"$python" -m pip install --quiet --no-index --no-deps --no-warn-script-location \
    "$context"/wheels/edgewise-*.whl
"$python" -m pip check
"$python" "$context/lockfile.py" check "$context/serve.txt" --allow edgewise pip setuptools
"$python" -m pip uninstall --quiet --yes pip setuptools

site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
expect_kernels=1
cp "$context"/native/kernels/_native_kernels_*.so "$site/edgewise/kernels/" 2>/dev/null || {
    expect_kernels=0
    echo "assemble: no ahead-of-time kernels in the context: monitoring needs the jit extra"
}
expect_front=0
expect_ort=0
if [ -n "$(ls "$context"/native/front/_front*.so 2>/dev/null)" ]; then
    expect_front=1
    cp "$context"/native/front/_front*.so "$site/edgewise/runtime/frontends/native/"
    mkdir -p "$prefix/lib"
    cp -P "$context"/native/lib/* "$prefix/lib/" 2>/dev/null || true
    if [ -n "$(ls "$context"/native/front/_ort*.so 2>/dev/null)" ]; then
        expect_ort=1
        cp "$context"/native/front/_ort*.so "$site/edgewise/runtime/frontends/native/"
    fi
else
    echo "assemble: no native front end in the context: the image serves with grpcio"
fi
# The onnxruntime C API module opens the wheel's own libonnxruntime.so (ort_capi.py
# library_path): kept with it, gone without it (the Python binding links its own copy).
if [ "$expect_ort" = 1 ]; then
    echo "assemble: onnxruntime C API module in the context: libonnxruntime.so kept (the fast path)"
else
    rm -f "$site"/onnxruntime/capi/libonnxruntime.so*
    echo "assemble: no onnxruntime C API module in the context: libonnxruntime.so removed;" \
        "the image serves every call on the Python path (no fast path, docs/native.md)"
fi

find "$site" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find "$site" -name '*.pyi' -type f -delete
rm -rf "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization \
    "$site"/onnxruntime/tools "$site"/numpy/_core/include \
    "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_pyinstaller "$venv"/bin/f2py \
    "$venv"/bin/numpy-config "$venv"/bin/activate* "$venv"/bin/Activate.ps1
if command -v strip >/dev/null; then
    find "$site" "$prefix/lib" -name '*.so*' -type f ! -path '*.libs/*' \
        -exec strip --strip-unneeded {} +
else
    echo "assemble: no strip in the build image: shared objects kept as they are"
fi
"$python" -m compileall -q -j0 --invalidation-mode unchecked-hash "$site" >/dev/null

# A server's imports, then the native front end and the kernels as the server loads them.
EXPECT_FRONT=$expect_front EXPECT_ORT=$expect_ort EXPECT_KERNELS=$expect_kernels "$python" - <<'EOF'
import os
import edgewise.runtime.cli.main, edgewise.runtime.app.server, onnxruntime, grpc  # noqa: F401
from edgewise.kernels import native_status
from edgewise.runtime.frontends.native.binding import front_status
from edgewise.runtime.frontends.native.ort_capi import load_ort
print(f"assemble: native front end {front_status()}; ahead-of-time kernels {native_status()}")
if os.environ["EXPECT_FRONT"] == "1" and front_status() != "loaded":
    raise SystemExit(f"assemble: the native front end does not load: {front_status()}")
if os.environ["EXPECT_ORT"] == "1":
    import edgewise.runtime.frontends.native._front as front
    ort, said = load_ort()
    print(f"assemble: onnxruntime C API module {said}; front end FAST_PATH {front.FAST_PATH}")
    if ort is None or not front.FAST_PATH:
        raise SystemExit("assemble: no fast path: the C API module or the front end's fast path")
if os.environ["EXPECT_KERNELS"] == "1" and not native_status().startswith("loaded"):
    raise SystemExit(f"assemble: the ahead-of-time kernels do not load: {native_status()}")
for name in ("numba", "llvmlite", "onnx", "ml_dtypes", "scipy", "sklearn"):
    import importlib.util
    if importlib.util.find_spec(name) is not None:
        raise SystemExit(f"assemble: {name} is installed; serving images go without it")
EOF
chmod -R a+rX,go-w "$prefix"
# Kept in the image (build.sh prints it also when this layer came from the cache).
du -sk "$site"/* "$prefix/lib" | sort -n | sed "s|$site/||" |
    awk '{printf "  %8d  %s\n", $1, $2}' > "$prefix/site-packages.txt"
echo "  $(du -sk "$prefix" | cut -f1) kB in /opt/edgewise" >> "$prefix/site-packages.txt"
chmod 0644 "$prefix/site-packages.txt"
echo "assemble: site-packages entries and /opt/edgewise/lib (kB, largest last):"
cat "$prefix/site-packages.txt"
