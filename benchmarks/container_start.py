"""Start of the edgewise image under a profile: from ``podman run`` to gRPC health SERVING.

    sudo .venv/bin/python benchmarks/container_start.py [--profile edge-small] [--rounds 7]
        [--front-end native] [--no-build] [--image TAG]

Builds the image with containers/build.sh (the bases of containers/base-image.sh, a private
podman as tests/containers/podman.py sets it up, layers cached in .build/containers), converts
one small model (tests/models.py: the logistic regression, 30 features), then starts the
container ROUNDS times with the profile's limits (``edgewise containers render --format docker``
flags: --cpus, --memory, read-only root, no capability) and prints one JSON line per case with
the medians over the rounds:

- ``ready_wall_s``: from ``podman run`` until the health service answers SERVING (one gRPC
  channel from this host, reconnecting every 5 ms; podman's own start included);
- ``ready_from_exec_s``: from the server process's start (its /proc start time) until SERVING:
  the server's share of the above;
- ``ready_cpu_s``: the server's CPU time (user + system, /proc/PID/stat read from this host)
  when it was SERVING: the stable figure on a shared machine;
- ``import_cpu_s``: a fresh interpreter in the same container limits importing the server
  module (the part of the start that is imports).

Targets (issue 21): ready_wall_s <= 0.5 and ready_cpu_s <= 0.4 in edge-small (1 CPU, 512 MiB).
Needs root and podman (containers/install-podman.sh); says why and exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgewise.runtime.resources.container_profiles import load_profile  # noqa: E402
from edgewise.runtime.resources.render import RenderOptions, docker_args  # noqa: E402
from tests.containers.podman import (  # noqa: E402
    Podman,
    build_image,
    image_size,
    missing_prerequisites,
    private_podman,
)

TAG = "localhost/edgewise:bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def proc_stat(pid: int) -> tuple[float, float]:
    """(start time in seconds since boot, CPU seconds user + system) of a host process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the command: state is fields[0]; utime, stime are the 14th, 15th of the whole line
    utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    return start / CLOCK_TICKS, (utime + stime) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_serving(target: str, timeout: float = 60.0) -> float:
    """Poll the health service over one channel; return CLOCK_BOOTTIME when it says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [
        ("grpc.initial_reconnect_backoff_ms", 5),
        ("grpc.min_reconnect_backoff_ms", 5),
        ("grpc.max_reconnect_backoff_ms", 5),
    ]
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                answer = stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=0.25, wait_for_ready=True
                )
            except grpc.RpcError:
                continue
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return time.clock_gettime(time.CLOCK_BOOTTIME)
            time.sleep(0.005)
    raise TimeoutError(f"{target} not SERVING within {timeout} s")


@contextlib.contextmanager
def bench_podman(build: bool) -> Iterator[tuple[Podman, Path]]:
    """A private podman with the image built in it, and a model repository readable by the
    container's user; all removed afterwards."""
    reason = missing_prerequisites()
    if reason is not None:
        raise SystemExit(f"container benchmark not run: {reason}")
    with private_podman() as podman:
        models = podman.workdir / "models"
        make_repo(models)
        if build:
            build_image(podman, TAG, ROOT / ".build" / "containers")
        yield podman, models


def make_repo(models: Path) -> None:
    from tests import models as trained

    trained.convert_model("logreg", models)
    for path in [models.parent, models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


class Container:
    """One server container under a profile, started by :meth:`start`, removed on exit."""

    def __init__(
        self, podman: Podman, image: str, models: Path, profile: str, front_end: str, name: str
    ) -> None:
        self.podman, self.name = podman, name
        self.port, self.metrics_port = free_port(), free_port()
        options = RenderOptions(
            image=image, name=name, models=str(models), port=self.port,
            metrics_port=self.metrics_port, network="host",
        )  # fmt: skip
        self.args = [*docker_args(load_profile(profile), options), "--front-end", front_end]
        self.pid = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> dict[str, float]:
        started = time.clock_gettime(time.CLOCK_BOOTTIME)
        self.podman.run("run", *self.args)
        pid = self.podman.run("inspect", "--format", "{{.State.Pid}}", self.name).stdout
        self.pid = int(pid.strip())
        serving = wait_serving(self.target)
        process_start, cpu = proc_stat(self.pid)
        return {
            "ready_wall_s": serving - started,
            "ready_from_exec_s": serving - process_start,
            "ready_cpu_s": cpu,
        }

    def logs(self) -> str:
        done = self.podman.run("logs", self.name, check=False)
        return done.stdout + done.stderr

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *_: object) -> None:
        self.podman.run("rm", "--force", "--time", "2", self.name, check=False)


def import_cpu(podman: Podman, image: str, profile: str) -> float:
    limits = load_profile(profile)
    code = "import os; import edgewise.runtime.app.server; t = os.times(); print(t.user + t.system)"
    done = podman.run(
        "run", "--rm", "--network", "none", "--cpus", str(limits.cpus), "--memory",
        f"{limits.memory_bytes // (1 << 20)}m", "--read-only", "--tmpfs", "/tmp",
        "--entrypoint", "python", image, "-c", code,
    )  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def start_rounds(
    podman: Podman, image: str, models: Path, profile: str, front_end: str, rounds: int
) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    log = ""
    for index in range(rounds):
        with Container(podman, image, models, profile, front_end, f"start-{index}") as c:
            results.append(c.start())
            log = c.logs()
    front_line = next((line for line in log.splitlines() if "front end:" in line), "")
    row: dict[str, Any] = {
        "case": "container_start",
        "profile": profile,
        "front_end": front_end,
        "rounds": rounds,
        "logged_front_end": front_line.split("front end: ")[-1].split(")")[0],
    }
    for key in ("ready_wall_s", "ready_from_exec_s", "ready_cpu_s"):
        values = [r[key] for r in results]
        row[key] = round(statistics.median(values), 3)
        row[key.replace("_s", "_min_s")] = round(min(values), 3)
    row["import_cpu_s"] = round(
        statistics.median(import_cpu(podman, image, profile) for _ in range(3)), 3
    )
    row["image_mb"] = round(image_size(podman, image) / 1e6, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="edge-small")
    parser.add_argument("--front-end", default="native", choices=("native", "grpcio", "auto"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with bench_podman(build=True) as (podman, models):
        row = start_rounds(podman, TAG, models, args.profile, args.front_end, args.rounds)
        row["targets"] = {"ready_wall_s": 0.5, "ready_cpu_s": 0.4}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
