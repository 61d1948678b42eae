"""A private podman for tests, set up as ../shared/notes/containers.md measured on the project's
machines: runc (crun refuses the hybrid cgroup layout), cgroupfs, default_ulimits within root's
hard limits, storage in a work folder of its own, --network=host for builds. Everything it made
is removed afterwards: containers, images, the work folder, empty libpod_parent cgroups."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Podman:
    workdir: Path
    env: dict[str, str]

    def run(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS`` in the work folder (conmon writes an 'oom' file into its cwd)."""
        done = subprocess.run(
            ["podman", *args],
            check=False,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
            )
        return done

    def script(self, path: Path, *args: str, extra_env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["bash", str(path), *args],
            check=False,
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{path.name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout


def missing_prerequisites() -> str | None:
    """Why a real podman cannot run here (None when it can), after trying to install it."""
    if os.geteuid() != 0:
        return "needs root: podman here runs rootful with cgroupfs (see containers/README.md)"
    if shutil.which("apt-get") is None and shutil.which("podman") is None:
        return "podman is not installed and there is no apt-get to install it"
    done = subprocess.run(
        ["bash", str(ROOT / "containers" / "install-podman.sh")],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        return f"containers/install-podman.sh failed: {done.stderr.strip()[-500:]}"
    return None


@contextlib.contextmanager
def private_podman() -> Iterator[Podman]:
    workdir = Path(tempfile.mkdtemp(prefix="edgewise-podman-"))
    for name in ("storage", "runroot", "tmp"):
        (workdir / name).mkdir()
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = 4096
    (workdir / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={hard_nofile}:{hard_nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    (workdir / "storage.conf").write_text(
        f'[storage]\ndriver="overlay"\ngraphroot="{workdir}/storage"\nrunroot="{workdir}/runroot"\n'
    )
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(workdir / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
        "TMPDIR": str(workdir / "tmp"),
    }
    podman = Podman(workdir, env)
    try:
        yield podman
    finally:
        podman.run("rm", "--all", "--force", "--time", "5", check=False)
        podman.run("rmi", "--all", "--force", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        for parent in Path("/sys/fs/cgroup").glob("*/libpod_parent"):
            for folder, _, _ in os.walk(parent, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only empty groups can go; others belong to someone else


BASES = {"build": "localhost/edgewise-base:build", "runtime": "localhost/edgewise-base:runtime"}


def build_image(podman: Podman, tag: str, build_dir: Path) -> str:
    """The bases (mmdebstrap, cached in .build), then the project image from the lock's wheels
    and the native parts built on this host; returns build.sh's output (its steps, the layers'
    and site-packages entries' sizes)."""
    for flavor, name in BASES.items():
        base_tar = build_dir / f"base-{flavor}.tar"
        podman.script(
            ROOT / "containers" / "base-image.sh", str(base_tar), extra_env={"FLAVOR": flavor}
        )
        podman.run("import", "--quiet", "--change", 'CMD ["python3"]', str(base_tar), name)
    return podman.script(
        ROOT / "containers" / "build.sh",
        tag,
        extra_env={
            "ENGINE": "podman",
            "BASE_IMAGE": BASES["runtime"],
            "BUILD_IMAGE": BASES["build"],
            "BUILD_FLAGS": "--network=host",
            "PIP": str(Path(sys.executable).with_name("pip")),
        },
    )


def image_size(podman: Podman, tag: str) -> int:
    return int(podman.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
