"""Shared fixtures for the whole suite.

``model_repo`` is a model repository holding version 1 of the four reference models of
:mod:`tests.models` (``logreg``, ``forest``, ``mixed``, ``regressor``), converted once per session:
treat it as read-only. ``fresh_repo`` is a private copy of it for a test that writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.models import build_repo


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
