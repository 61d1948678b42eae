"""Container profiles: the shipped ones, the format's validation, and how overrides reach the
server."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from edgewise.runtime.config.limits import OVERRIDABLE
from edgewise.runtime.config.settings import ENV_PREFIX, ServerSettings
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.resources.container_profiles import (
    Profile,
    list_profiles,
    load_profile,
    parse_profile,
)

MiB = 1 << 20
GiB = 1 << 30
PROFILES_DIR = Path(__file__).resolve().parents[3] / "containers" / "profiles"


def test_shipped_profiles() -> None:
    found = {p.name: p for p in list_profiles([PROFILES_DIR])}
    assert set(found) >= {"edge-tiny", "edge-small", "edge-medium", "batch-large"}
    expected = {
        "edge-tiny": (0.5, 256 * MiB),
        "edge-small": (1.0, 512 * MiB),
        "edge-medium": (2.0, 1 * GiB),
        "batch-large": (8.0, 8 * GiB),
    }
    for name, (cpus, memory) in expected.items():
        assert (found[name].cpus, found[name].memory_bytes) == (cpus, memory)
        assert found[name].description
    assert dict(found["batch-large"].overrides) == {"intra_op_threads": 4, "worker_threads": 2}
    for profile in found.values():
        budget = profile.budget()  # every shipped profile is valid under its own limits
        assert budget.compute_threads <= budget.compute_thread_limit


def test_lookup_by_name_and_by_path(tmp_path: Path) -> None:
    by_name = load_profile("edge-small", [PROFILES_DIR])
    by_path = load_profile(str(PROFILES_DIR / "edge-small.toml"))
    assert by_name == by_path
    assert load_profile("edge-small").cpus == 1.0  # default folders: the checkout's
    with pytest.raises(InvalidInput, match=r"no profile named 'huge'.*known: .*edge-tiny"):
        load_profile("huge", [PROFILES_DIR])
    with pytest.raises(InvalidInput, match="does not exist"):
        load_profile(str(tmp_path / "missing.toml"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


BASE = 'description = "test"\ncpus = 1\nmemory = "512MiB"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('description = "x"\ncpus = 1\n', "missing required key 'memory'"),
        (BASE + "gpus = 1\n", "unknown key"),
        (BASE.replace("cpus = 1", "cpus = 0"), "cpus must be between"),
        (BASE.replace("cpus = 1", 'cpus = "one"'), "cpus must be a number"),
        (BASE.replace("cpus = 1", "cpus = true"), "cpus must be a number"),
        (BASE.replace('"512MiB"', '"a lot"'), "memory: 'a lot' is not a size"),
        (BASE.replace('"512MiB"', '"64MiB"'), "below the minimum"),
        (BASE.replace('"test"', '""'), "description must be one non-empty line"),
        (BASE + "[overrides]\nthreads = 3\n", "unknown override 'threads'"),
        (BASE + "[overrides]\nworker_threads = 4\n", "compute threads"),
        (BASE + "[overrides]\nworker_threads = 0\n", "positive integer"),
        (BASE + "[overrides]\nmemory_arena = 1\n", "true or false"),
        (BASE + "overrides = 3\n", r"\[overrides\] must be a table"),
        ("cpus = [", "not valid TOML"),
    ],
)
def test_invalid_profiles_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "bad", text)
    with pytest.raises(InvalidInput, match=message) as info:
        load_profile(str(path))
    assert str(path) in info.value.message


def test_profile_names_are_checked() -> None:
    with pytest.raises(InvalidInput, match="lower case"):
        parse_profile("Edge_Small", {"description": "x", "cpus": 1, "memory": "1GiB"})


def test_sizes_in_overrides_and_memory_as_bytes(tmp_path: Path) -> None:
    text = (
        'description = "x"\ncpus = 2\nmemory = 1073741824\n'
        '[overrides]\nmax_message_bytes = "8MiB"\nmemory_arena = false\n'
    )
    profile = load_profile(str(write(tmp_path, "custom", text)))
    assert profile.memory_bytes == GiB
    assert dict(profile.overrides) == {"max_message_bytes": 8 * MiB, "memory_arena": False}
    assert profile.budget().max_message_bytes == 8 * MiB


def test_environment_reaches_the_settings_the_server_reads() -> None:
    """Every override becomes a variable ServerSettings reads (or numba's own), and reading it
    back gives the value the profile set."""
    overrides: dict[str, int | bool] = {
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        "numba_threads": 1,
        "worker_threads": 1,
        "max_inflight": 5,
        "max_message_bytes": 2 * MiB,
        "memory_budget_bytes": 300 * MiB,
        "memory_arena": True,
    }
    assert set(overrides) == set(OVERRIDABLE)
    profile = Profile("t", "t", 2.0, 512 * MiB, overrides)
    env = profile.environment()
    assert env["NUMBA_NUM_THREADS"] == "1"
    settings_fields = {f.name for f in fields(ServerSettings)}
    for key in OVERRIDABLE:
        if key != "numba_threads":
            assert key in settings_fields
            assert ENV_PREFIX + key.upper() in env
    settings = ServerSettings.from_sources({}, environ=env, limits=profile.limits())
    for key, value in overrides.items():
        if key != "numba_threads":
            assert getattr(settings, key) == value, key
    assert settings.budget is not None and settings.budget.numba_threads == 1
