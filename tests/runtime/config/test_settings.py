"""Server settings from the environment: one reading of each variable, whoever reads it."""

from __future__ import annotations

import pytest

from edgewise.runtime.config.settings import ServerSettings, server_metrics_port
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
