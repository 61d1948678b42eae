from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server


@pytest.fixture(scope="module")
def served_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared test repository, so tests may add versions to it."""
    target = tmp_path_factory.mktemp("served") / "repo"
    shutil.copytree(model_repo, target)
    return target


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    served_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RunningServer]:
    running = start_server(
        served_repo, tmp_path_factory.mktemp("server"), front_end_args(request.param)
    )
    yield running
    code = running.stop()
    assert code == 0, running.log()
