"""Server settings from the environment: one reading of each variable, whoever reads it."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from edgewise.runtime.config.settings import ServerSettings, server_metrics_port, switch
from edgewise.runtime.errors import InvalidInput


@pytest.mark.parametrize("raw", ["70000", "-2", "65536", "nine"])
def test_the_metrics_port_a_client_derives_is_refused_like_the_servers(raw: str) -> None:
    """The agent derives the server's metrics port from EDGEWISE_METRICS_PORT; a value the
    server refuses is refused there too, with the same message (70000 gave a URL no server
    listens on)."""
    environ = {"EDGEWISE_METRICS_PORT": raw}
    with pytest.raises(InvalidInput) as server:
        ServerSettings.from_sources({}, environ=environ)
    with pytest.raises(InvalidInput) as client:
        server_metrics_port(environ)
    assert client.value.message == server.value.message


@pytest.mark.parametrize(("raw", "port"), [("9102", 9102), ("0", 0), ("-1", -1), ("", 8002)])
def test_the_metrics_port_a_client_derives_is_the_servers(raw: str, port: int) -> None:
    environ = {"EDGEWISE_METRICS_PORT": raw}
    assert server_metrics_port(environ) == port
    assert ServerSettings.from_sources({}, environ=environ).metrics_port == port
    assert server_metrics_port({}) == ServerSettings.metrics_port == 8002


SWITCH_WORDS = [("on", True), ("off", False), ("true", True), ("False", False), ("1", True),
                ("0", False), ("yes", True), ("no", False), (" ON ", True)]  # fmt: skip


@pytest.mark.parametrize(("word", "value"), SWITCH_WORDS)
@pytest.mark.parametrize("name", ["monitoring", "quality", "admission"])
def test_on_off_settings_are_booleans_from_any_source(name: str, word: str, value: bool) -> None:
    """On/off words are read at the edge (flags, overrides, EDGEWISE_*), once: inside the
    program the setting is a bool."""
    from_env = ServerSettings.from_sources({}, environ={f"EDGEWISE_{name.upper()}": word})
    from_override = ServerSettings.from_sources({name: word}, environ={})
    assert getattr(from_env, name) is value
    assert getattr(from_override, name) is value
    assert getattr(ServerSettings.from_sources({name: value}, environ={}), name) is value
    assert getattr(ServerSettings.from_sources({}, environ={}), name) is True  # the default


@pytest.mark.parametrize("name", ["monitoring", "quality", "admission"])
def test_a_word_that_is_not_on_or_off_is_refused_naming_the_setting(name: str) -> None:
    with pytest.raises(InvalidInput, match=f"EDGEWISE_{name.upper()}='maybe'"):
        ServerSettings.from_sources({}, environ={f"EDGEWISE_{name.upper()}": "maybe"})
    with pytest.raises(InvalidInput, match=f"{name} must be on or off, not 'maybe'"):
        ServerSettings.from_sources({name: "maybe"}, environ={})
    # Built directly, a string is a mistake the checks name (it would read as true).
    with pytest.raises(InvalidInput, match=f"{name} must be on or off, not 'off'"):
        replace(ServerSettings(), **{name: "off"}).validate()


def test_the_on_off_flags_take_the_same_words() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--monitoring", type=switch)
    assert parser.parse_args(["--monitoring", "off"]).monitoring is False
    assert parser.parse_args(["--monitoring", "true"]).monitoring is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--monitoring", "sometimes"])


def test_the_supervisors_children_read_back_what_it_writes() -> None:
    """The supervisor hands settings down as EDGEWISE_* text (str(value)): a bool's text
    reads back as the same bool."""
    for value in (True, False):
        environ = {"EDGEWISE_MONITORING": str(value), "EDGEWISE_ADMISSION": str(value)}
        settings = ServerSettings.from_sources({}, environ=environ)
        assert settings.monitoring is value and settings.admission is value
