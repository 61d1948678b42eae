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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(reason): runs only where reason is None; else skipped, or failed under CI",
    )


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
