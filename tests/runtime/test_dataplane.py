"""DataPlane.execute: the monitor's statistics of a request answered on the event loop are taken
after the answer, on the loop's next turn; everywhere else before it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from edgewise.runtime.dataplane import DataPlane, PreparedRequest
from edgewise.runtime.model import LoadedModel, SessionSettings, load_model
from edgewise.runtime.monitor import ModelMonitor, MonitorConfig
from edgewise.runtime.package import read_manifest
from edgewise.runtime.profile import read_profile


@pytest.fixture
def monitored(model_repo: Path) -> LoadedModel:
    folder = model_repo / "logreg" / "1"
    model = load_model("logreg", 1, folder, SessionSettings())
    profile = read_profile(folder, read_manifest(folder))
    assert profile is not None
    model.monitor = ModelMonitor("logreg", "1", profile, MonitorConfig(window_rows=0))
    return model


def request(model: LoadedModel, rows: int) -> PreparedRequest:
    features = np.random.default_rng(rows).normal(10, 5, size=(rows, 30)).astype(np.float32)
    return PreparedRequest(model, {"features": features}, None, True, "", rows)


def monitored_rows(model: LoadedModel) -> int:
    assert model.monitor is not None
    return model.monitor.current.rows


def test_off_the_loop_statistics_are_taken_before_the_answer(monitored: LoadedModel) -> None:
    response = DataPlane.execute(request(monitored, 3))
    assert response.outputs[0].shape == [3]
    assert monitored_rows(monitored) == 3


def test_on_the_loop_statistics_follow_the_answer_on_the_next_turn(
    monitored: LoadedModel,
) -> None:
    async def scenario() -> tuple[int, int]:
        DataPlane.execute(request(monitored, 4), on_loop=True)
        DataPlane.execute(request(monitored, 2), on_loop=True)
        before = monitored_rows(monitored)  # answered, not yet counted
        await asyncio.sleep(0)  # one turn of the loop
        return before, monitored_rows(monitored)

    before, after = asyncio.run(scenario())
    assert (before, after) == (0, 6)


def test_a_failing_statistics_update_is_logged_and_the_answer_stands(
    monitored: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    assert monitored.monitor is not None

    def broken(feeds: object) -> None:
        raise RuntimeError("statistics broke")

    monitored.monitor.observe = broken  # type: ignore[method-assign]

    async def scenario() -> int:
        response = DataPlane.execute(request(monitored, 1), on_loop=True)
        await asyncio.sleep(0)
        return len(response.raw_output_contents)

    with caplog.at_level(logging.ERROR, logger="edgewise.runtime.dataplane"):
        assert asyncio.run(scenario()) == 2
    assert "monitoring statistics of an answered request failed" in caplog.text
    assert "statistics broke" in caplog.text
