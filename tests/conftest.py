"""Shared fixtures for the whole suite.

``model_repo`` is a model repository holding version 1 of the four reference models of
:mod:`tests.models` (``logreg``, ``forest``, ``mixed``, ``regressor``), converted once per session:
treat it as read-only. ``fresh_repo`` is a private copy of it for a test that writes.

A test marked ``requires(reason)`` (:func:`tests.prerequisites.requires`) is skipped with the reason
where it cannot run, and failed under CI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.models import build_repo
from tests.prerequisites import unmet


@pytest.hookimpl(tryfirst=True)  # before pytest's own makes the temporary root from the option
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(reason): runs only where reason is None; else skipped, or failed under CI",
    )
    worker: dict[str, str] | None = getattr(config, "workerinput", None)
    if worker is not None and config.option.basetemp:
        # An xdist worker's temporary root is popen-gwN under the run's: 8 bytes more than the
        # N used here, which took the Unix sockets a native front end makes in a test's TMPDIR
        # past their 107-byte path limit.
        base = Path(config.option.basetemp)
        config.option.basetemp = str(base.with_name(worker["workerid"].removeprefix("gw")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` (make test) a module's tests run on one xdist worker, so its
    module-scoped servers start once; tests/kernels runs on one worker in its own order."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        module = item.nodeid.partition("::")[0]
        group = "tests/kernels" if module.startswith("tests/kernels/") else module
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        reason = mark.args[0] if mark.args else mark.kwargs.get("reason")
        if reason is not None:
            unmet(str(reason))


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``logreg``, ``forest``, ``mixed`` and ``regressor`` (version 1)."""
    return build_repo(tmp_path_factory.mktemp("model-repo"))


@pytest.fixture
def fresh_repo(model_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of :func:`model_repo` for this test only."""
    target = tmp_path / "repo"
    shutil.copytree(model_repo, target)
    return target
