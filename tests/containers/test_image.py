"""A real image, built from containers/Dockerfile with podman and run under the edge-tiny profile's
flags (as ``edgewise containers render --format docker`` gives them): it starts with the native
front end, passes its health check, serves a converted model to a client on this host (also over
TLS), answers the common call on the native fast path (docs/native.md), and reports the limits it
was started with. The build itself: only the serve lock's packages inside (no numba, llvmlite, onnx,
ml_dtypes, SciPy, scikit-learn, pip), the OCI labels, the SBOM beside it, at most 250 MB, no
untagged image left behind, every layer's and site-packages entry's size in the output.

Needs root and podman (installed by containers/install-podman.sh when missing). Skipped with the
reason otherwise, except in CI (``CI`` set), where a missing prerequisite fails the test
(tests/prerequisites.py).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import EdgewiseError
from edgewise.runtime.resources.container_profiles import load_profile
from edgewise.runtime.resources.render import RenderOptions, docker_args, healthcheck
from tests import models
from tests.certs import make_certificates
from tests.containers.podman import (
    ROOT,
    Podman,
    build_image,
    image_size,
    missing_prerequisites,
    private_podman,
)
from tests.prerequisites import unmet

# The module's image fixture builds both bases and the image from nothing on a clean checkout
# (about 6 minutes on a quiet 2-core machine, more under load), inside its first test's timeout.
pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(1500)]

TAG = "localhost/edgewise:test"
MiB = 1 << 20


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    reason = missing_prerequisites()
    if reason is not None:
        unmet(reason)  # skipped with the reason; failed under CI
    with private_podman() as engine:
        yield engine


@dataclass(frozen=True)
class Built:
    tag: str
    output: str  # build.sh's standard output


@pytest.fixture(scope="module")
def built(podman: Podman) -> Built:
    started = time.monotonic()
    output = build_image(podman, TAG, ROOT / ".build" / "containers")
    size = image_size(podman, TAG)
    print(f"\nimage {TAG}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")
    return Built(TAG, output)


@pytest.fixture(scope="module")
def image(built: Built) -> str:
    return built.tag


@pytest.fixture(scope="module")
def models_dir(podman: Podman, model_repo: Path) -> Path:
    """A world-readable copy of the model repository: the container's user (10001) reads it."""
    target = podman.workdir / "models"
    if not target.exists():
        shutil.copytree(model_repo, target)
        for path in [podman.workdir, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        target.chmod(0o755)
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name}")


FAST_CALLS = "edgewise_native_fast_calls_total"
FALLBACKS = "edgewise_native_fallback_total"


def family_total(text: str, name: str) -> float:
    """The sum of a labelled family's samples (0 when it has none)."""
    samples = [line.split()[-1] for line in text.splitlines() if line.startswith(name + "{")]
    return sum(float(sample) for sample in samples)


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def wait_fast_calls(metrics_port: int, at_least: float) -> str:
    """The metrics once the fast path's counts reach ``at_least`` (C++ counts them; the
    publisher adds them to the metrics when they are read, and drains every 50 ms), or after
    30 s; the caller asserts on the text."""
    started = time.monotonic()
    text = scrape(metrics_port)
    while time.monotonic() - started < 30:
        if family_total(text, FAST_CALLS) >= at_least:
            break
        time.sleep(0.05)
        text = scrape(metrics_port)
    return text


def wait_serving(target: str, security: ClientSecurity | None = None) -> str:
    started = time.monotonic()
    status = "no answer"
    while time.monotonic() - started < 120:
        try:
            status = healthcheck(target, timeout=1.0, security=security)
        except EdgewiseError as exc:
            status = exc.message
        if status == "SERVING":
            break
        time.sleep(0.05)
    return status


def in_container(podman: Podman, name: str, code: str) -> str:
    """Python run inside the container (the image has no shell and no coreutils)."""
    return podman.run("exec", name, "python", "-c", code).stdout.strip()


def test_image_serves_under_a_profile(podman: Podman, image: str, models_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    profile = load_profile("edge-tiny")
    options = RenderOptions(
        image=image, name="edgewise-test", models=str(models_dir), port=port,
        metrics_port=metrics_port, network="host",
    )  # fmt: skip
    started = time.monotonic()
    podman.run("run", *docker_args(profile, options))
    target = f"127.0.0.1:{port}"
    status = wait_serving(target)
    serving_after = time.monotonic() - started
    logs = podman.run("logs", "edgewise-test", check=False)
    log = logs.stdout + logs.stderr
    assert status == "SERVING", log
    print(f"\ncontainer start to SERVING: {serving_after:.2f} s (podman run included)")
    # `serve` (front end auto) picked the native front end: its libraries are in the image.
    assert "(front end: native)" in log, log

    # The image's own HEALTHCHECK (the gRPC health service) passes.
    podman.run("healthcheck", "run", "edgewise-test")

    # A client on the host gets the converted model's answers.
    model, X, _ = models.train_logreg()
    features = X.to_numpy(np.float32)[:20]
    with EdgewiseClient(target) as client:
        result = client.infer("logreg", {"features": features})
    np.testing.assert_array_equal(result.outputs["label"], model.predict(X.iloc[:20]))

    # The common call is answered on the native fast path (docs/native.md: C++ through
    # onnxruntime's C API, without the GIL): the image has the C API module and the wheel's
    # libonnxruntime.so it opens. Each one-row call is eligible (no tokens, a small body, the
    # model's version on the fast path's table, which the call above found there), so each
    # one counts, and none falls back to the Python path.
    before = wait_fast_calls(metrics_port, 1)
    calls = 20
    with EdgewiseClient(target) as client:
        for row in range(calls):
            one = client.infer("logreg", {"features": features[row : row + 1]})
            assert one.outputs["label"][0] == model.predict(X.iloc[row : row + 1])[0]
    fast_before = family_total(before, FAST_CALLS)
    text = wait_fast_calls(metrics_port, fast_before + calls)
    lines = [line for line in text.splitlines() if line.startswith("edgewise_native_f")]
    assert family_total(text, FAST_CALLS) - fast_before == calls, lines
    assert family_total(text, FALLBACKS) == family_total(before, FALLBACKS), lines
    assert "native fast path: the front end was built without it" not in log, log

    # It reports the limits it was started with: metrics and `edgewise limits` inside.
    assert metric(text, 'edgewise_resource_limit{resource="cpu_cores"}') == 0.5
    assert metric(text, 'edgewise_resource_limit{resource="memory_bytes"}') == 256 * MiB
    assert metric(text, 'edgewise_runtime_split{setting="worker_threads"}') == 1
    assert metric(text, 'edgewise_runtime_split{setting="max_message_bytes"}') == 4 * MiB
    inside = json.loads(podman.run("exec", "edgewise-test", "edgewise", "limits", "--json").stdout)
    assert inside["limits"]["cpu_quota"] == 0.5
    assert inside["limits"]["memory_limit_bytes"] == 256 * MiB

    # Non-root, read-only root filesystem, no capability at all (--cap-drop ALL) and no way to
    # gain one (no-new-privileges).
    assert in_container(podman, "edgewise-test", "import os; print(os.getuid())") == "10001"
    touch = podman.run(
        "exec", "edgewise-test", "python", "-c", "open('/opt/x', 'w')", check=False
    )  # fmt: skip
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr, touch.stderr
    status = in_container(podman, "edgewise-test", "print(open('/proc/1/status').read())")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, status
    assert fields["NoNewPrivs"].strip() == "1", status

    # The serving kernels come compiled ahead of time for a portable x86-64 level and the
    # native front end's libraries from /opt/edgewise/lib: the server answered and monitored
    # without numba or LLVM (neither is installed) and mapped the bundled gRPC C++ library.
    kernels = in_container(
        podman, "edgewise-test", "import edgewise.kernels as k; print(k.native_status())"
    )
    assert kernels.startswith("loaded (x86-64-v"), kernels
    maps = in_container(podman, "edgewise-test", "print(open('/proc/1/maps').read())")
    assert "_native_kernels_x86_64_v" in maps and "/opt/edgewise/lib/libgrpc++" in maps
    assert "llvmlite" not in maps
    # The fast path's onnxruntime: the wheel's C API library, opened by the _ort module.
    assert "/onnxruntime/capi/libonnxruntime.so" in maps and "/_ort.cpython-" in maps
    print(f"server in the container: {kernels}, VmRSS {fields['VmRSS'].strip()}")

    # SIGTERM drains and exits 0.
    podman.run("stop", "--time", "20", "edgewise-test")
    code = podman.run("inspect", "--format", "{{.State.ExitCode}}", "edgewise-test").stdout
    assert code.strip() == "0"


SERVE_ONLY_ABSENT = ("numba", "llvmlite", "onnx", "ml_dtypes", "scipy", "sklearn", "skl2onnx")


def test_image_is_the_serve_lock_with_labels_and_sbom(podman: Podman, built: Built) -> None:
    # Serve-time packages only: exactly the lock (the build refuses another set), no pip.
    listing = "import sysconfig, os; print(*os.listdir(sysconfig.get_paths()['purelib']))"
    site = in_image(podman, built.tag, listing).split()
    for name in (*SERVE_ONLY_ABSENT, "pip", "setuptools"):
        assert name not in site and not any(e.startswith(f"{name}-") for e in site), (name, site)
    assert "onnxruntime" in site and "grpc" in site and "edgewise" in site
    assert "dependency set: exactly the" in built.output
    # The native parts came with the fast path, so onnxruntime's C API library was kept.
    assert "libonnxruntime.so kept (the fast path)" in built.output, built.output
    assert any(e.startswith("_ort.cpython-") for e in in_image(podman, built.tag, (
        "import os, edgewise.runtime.frontends.native as n; print(*os.listdir(n.__path__[0]))"
    )).split())  # fmt: skip
    lock = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "containers" / "lockfile.py"),
         "pins", str(ROOT / "requirements" / "serve.txt")],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for pin in lock:
        name, version = pin.split("==")
        assert any(e.lower().replace("_", "-") == f"{name}-{version}.dist-info" for e in site), (
            pin,
            site,
        )

    # OCI labels: the version of pyproject, the revision of this checkout, created and source.
    labels = json.loads(
        podman.run("image", "inspect", "--format", "{{json .Labels}}", built.tag).stdout
    )
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    revision = labels["org.opencontainers.image.revision"].removesuffix("-dirty")
    # The commit the build was made from: HEAD or, where others committed since, an ancestor.
    ancestor = subprocess.run(
        ["git", "merge-base", "--is-ancestor", revision, "HEAD"], cwd=ROOT, check=False
    )
    assert labels["org.opencontainers.image.version"] == version
    assert re.fullmatch(r"[0-9a-f]{40}", revision) and ancestor.returncode == 0, revision
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"]
    )
    assert labels["org.opencontainers.image.source"]

    # The CycloneDX SBOM of the image's environment, beside it: the lock's components, no more.
    sbom = json.loads((ROOT / ".build" / "containers" / "sbom-amd64.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    components = {c["name"].lower().replace("_", "-"): c["version"] for c in sbom["components"]}
    assert {f"{n}=={v}" for n, v in components.items() if n != "edgewise"} == set(lock)

    # Size, the build output's listings, no untagged image left behind.
    size = image_size(podman, built.tag)
    assert size <= 250e6, f"image {size / 1e6:.0f} MB > 250 MB"
    assert "site-packages entries and /opt/edgewise/lib of" in built.output
    assert "layers of " in built.output and "onnxruntime" in built.output
    dangling = podman.run("images", "--quiet", "--filter", "dangling=true").stdout.split()
    assert dangling == [], podman.run("images", "--all").stdout


def in_image(podman: Podman, image: str, code: str) -> str:
    return podman.run(
        "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", code
    ).stdout.strip()


def test_image_serves_tls_on_the_native_front_end(
    podman: Podman, image: str, models_dir: Path
) -> None:
    certs = make_certificates(podman.workdir / "certs")
    for path in (podman.workdir / "certs").iterdir():
        path.chmod(0o644)  # the container's user reads the mounted copy
    port, metrics_port = free_port(), free_port()
    options = RenderOptions(
        image=image, name="edgewise-tls", models=str(models_dir), port=port,
        metrics_port=metrics_port, network="host",
    )  # fmt: skip
    args = docker_args(load_profile("edge-small"), options)
    at = args.index(image)
    tls = [
        "--volume", f"{podman.workdir / 'certs'}:/run/edgewise:ro",
        "--env", f"EDGEWISE_TLS_CERT=/run/edgewise/{certs.server_cert.name}",
        "--env", f"EDGEWISE_TLS_KEY=/run/edgewise/{certs.server_key.name}",
    ]  # fmt: skip
    podman.run("run", *args[:at], *tls, *args[at:])
    target = f"127.0.0.1:{port}"
    status = wait_serving(target, ClientSecurity(tls_ca=certs.ca))
    logs = podman.run("logs", "edgewise-tls", check=False)
    log = logs.stdout + logs.stderr
    assert status == "SERVING", log
    assert "(front end: native)" in log, log
    # Plain text is refused on the TLS port; the converted model answers over TLS.
    with pytest.raises(EdgewiseError):
        healthcheck(target, timeout=2.0, security=ClientSecurity())
    model, X, _ = models.train_logreg()
    with EdgewiseClient(target, security=ClientSecurity(tls_ca=certs.ca)) as client:
        result = client.infer("logreg", {"features": X.to_numpy(np.float32)[:5]})
    np.testing.assert_array_equal(result.outputs["label"], model.predict(X.iloc[:5]))
    podman.run("rm", "--force", "--time", "5", "edgewise-tls")
