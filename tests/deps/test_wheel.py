"""A wheel install is a real install: the wheel built from this tree holds the container
profiles as package data, and an installed copy (not this checkout) renders a profile from a
folder that is no checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "runtime" / "resources" / "profiles"


def _source_copy(target: Path) -> Path:
    """The files git would hand a clean clone (tracked, and new ones not ignored), copied:
    the wheel is built from them, never in the shared checkout's build/ folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        source = ROOT / os.fsdecode(raw)
        destination = target / os.fsdecode(raw)
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet committed
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            destination.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, destination)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = _source_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(out), str(source)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("edgewise-*.whl")
    return path


def test_the_wheel_ships_the_profiles(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("edgewise/runtime/resources/profiles/")}
    expected = {f"edgewise/runtime/resources/profiles/{p.name}" for p in PROFILES.glob("*.toml")}
    assert expected and shipped == expected
    # The checkout's containers/profiles is the same folder (a link), not a second copy.
    assert (ROOT / "containers" / "profiles").resolve() == PROFILES.resolve()
    # Compiled parts are built on the node or in the image, never carried by a plain wheel.
    assert not [n for n in names if n.endswith(".so")]


def test_an_installed_copy_renders_a_profile_outside_a_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
         str(wheel)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site, so no .pth and no editable finder pointing at this checkout; the installed
    # copy first on the path, then this environment's dependencies.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
    }
    probe = subprocess.run(
        [sys.executable, "-S", "-c",
         "import edgewise.runtime.resources.container_profiles as c; print(c.__file__); "
         "print(*(p.name for p in c.list_profiles()))"],
        check=False, capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    module_file, names = probe.stdout.splitlines()
    assert Path(module_file).is_relative_to(target)
    assert set(names.split()) == {p.stem for p in PROFILES.glob("*.toml")}
    rendered = subprocess.run(
        [sys.executable, "-S", "-m", "edgewise.runtime.cli", "containers", "render",
         "--profile", "edge-small", "--format", "compose"],
        check=False, capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert "512" in rendered.stdout and "edge-small" in rendered.stdout, rendered.stdout
