"""A real image, built from containers/Dockerfile with podman and run under the edge-tiny
profile's flags (as ``edgewise containers render --format docker`` gives them): it starts, passes
its health check, serves a converted model to a client on this host, and reports the limits it was
started with.

Needs root and podman (installed by containers/install-podman.sh when missing). Skipped with the
reason otherwise, except in CI (``CI`` set), where a missing prerequisite fails the test
(tests/prerequisites.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.client.client import EdgewiseClient
from edgewise.runtime.errors import EdgewiseError
from edgewise.runtime.resources.container_profiles import load_profile
from edgewise.runtime.resources.render import RenderOptions, docker_args, healthcheck
from tests import models
from tests.containers.podman import (
    ROOT,
    Podman,
    build_image,
    image_size,
    missing_prerequisites,
    private_podman,
)
from tests.prerequisites import unmet

pytestmark = pytest.mark.slow

TAG = "localhost/edgewise:test"
MiB = 1 << 20


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    reason = missing_prerequisites()
    if reason is not None:
        unmet(reason)  # skipped with the reason; failed under CI
    with private_podman() as engine:
        yield engine


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    started = time.monotonic()
    build_image(podman, TAG, ROOT / ".build" / "containers")
    size = image_size(podman, TAG)
    print(f"\nimage {TAG}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")
    return TAG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name}")


def test_image_serves_under_a_profile(podman: Podman, image: str, model_repo: Path) -> None:
    # The container's user (10001) must read the models: a world-readable copy.
    models_dir = podman.workdir / "models"
    shutil.copytree(model_repo, models_dir)
    for path in [podman.workdir, *models_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    models_dir.chmod(0o755)
    port, metrics_port = free_port(), free_port()
    profile = load_profile("edge-tiny")
    options = RenderOptions(
        image=image, name="edgewise-test", models=str(models_dir), port=port,
        metrics_port=metrics_port, network="host",
    )  # fmt: skip
    started = time.monotonic()
    podman.run("run", *docker_args(profile, options))
    target = f"127.0.0.1:{port}"
    status = "no answer"
    while time.monotonic() - started < 120:
        try:
            status = healthcheck(target, timeout=1.0)
        except EdgewiseError as exc:
            status = exc.message
        if status == "SERVING":
            break
        time.sleep(0.05)
    serving_after = time.monotonic() - started
    logs = podman.run("logs", "edgewise-test", check=False)
    assert status == "SERVING", logs.stdout + logs.stderr
    print(f"\ncontainer start to SERVING: {serving_after:.2f} s (podman run included)")

    # The image's own HEALTHCHECK (the gRPC health service) passes.
    podman.run("healthcheck", "run", "edgewise-test")

    # A client on the host gets the converted model's answers.
    model, X, _ = models.train_logreg()
    features = X.to_numpy(np.float32)[:20]
    with EdgewiseClient(target) as client:
        result = client.infer("logreg", {"features": features})
    np.testing.assert_array_equal(result.outputs["label"], model.predict(X.iloc[:20]))

    # It reports the limits it was started with: metrics and `edgewise limits` inside.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert metric(text, 'edgewise_resource_limit{resource="cpu_cores"}') == 0.5
    assert metric(text, 'edgewise_resource_limit{resource="memory_bytes"}') == 256 * MiB
    assert metric(text, 'edgewise_runtime_split{setting="worker_threads"}') == 1
    assert metric(text, 'edgewise_runtime_split{setting="max_message_bytes"}') == 4 * MiB
    inside = json.loads(podman.run("exec", "edgewise-test", "edgewise", "limits", "--json").stdout)
    assert inside["limits"]["cpu_quota"] == 0.5
    assert inside["limits"]["memory_limit_bytes"] == 256 * MiB

    # Non-root, read-only root filesystem, numba's cache compiled at build time (no JIT).
    assert podman.run("exec", "edgewise-test", "id", "-u").stdout.strip() == "10001"
    assert podman.run("exec", "edgewise-test", "touch", "/opt/x", check=False).returncode != 0
    # No capability at all (--cap-drop ALL) and no way to gain one (no-new-privileges).
    status = podman.run("exec", "edgewise-test", "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, status
    assert fields["NoNewPrivs"].strip() == "1", status
    probe = (
        "import gc, edgewise.kernels as k; k.warmup(); "
        "from numba.core.registry import CPUDispatcher as D; "
        "d = [o for o in gc.get_objects() if isinstance(o, D)]; "
        "print(sum(sum(o.stats.cache_hits.values()) for o in d), "
        "sum(sum(o.stats.cache_misses.values()) for o in d))"
    )
    hits, misses = map(
        int, podman.run("exec", "edgewise-test", "python", "-c", probe).stdout.split()
    )
    assert hits > 0 and misses == 0

    # The serving kernels come compiled ahead of time for a portable x86-64 level
    # (containers/build.sh): the server answered and monitored without loading numba's LLVM.
    status = podman.run(
        "exec", "edgewise-test", "python", "-c",
        "import edgewise.kernels as k; print(k.native_status())",
    ).stdout.strip()  # fmt: skip
    assert status.startswith("loaded (x86-64-v"), status
    # A serving image: no scikit-learn, skl2onnx or SciPy (the convert extra) inside.
    absent = podman.run(
        "exec", "edgewise-test", "python", "-c",
        "import importlib.util as u; print([m for m in ('sklearn', 'skl2onnx', 'scipy') "
        "if u.find_spec(m)])",
    ).stdout.strip()  # fmt: skip
    assert absent == "[]", absent
    maps = podman.run("exec", "edgewise-test", "cat", "/proc/1/maps").stdout
    assert "llvmlite" not in maps and "_native_kernels_x86_64_v" in maps
    fields = dict(
        line.split(":", 1)
        for line in podman.run("exec", "edgewise-test", "cat", "/proc/1/status").stdout.splitlines()
    )
    print(f"server in the container: {status}, VmRSS {fields['VmRSS'].strip()}")

    # SIGTERM drains and exits 0.
    podman.run("stop", "--time", "20", "edgewise-test")
    code = podman.run("inspect", "--format", "{{.State.ExitCode}}", "edgewise-test").stdout
    assert code.strip() == "0"
