"""Per-credential limits of inference calls: the token bucket and the in-flight share
(serving.admission.CallQuotas: validate, then commit), and, on a real server with each front end
(grpcio, native; HTTP beside each), a credential over its rate refused RESOURCE_EXHAUSTED (HTTP
429) with the retry hint while another credential is served, counted per credential id."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.channels import CallLimits, parse_call_limits
from edgewise.runtime.config.settings import ClientSecurity, ServerSettings
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.admission import CallQuotas
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

ADMIN = "limits-admin-0123456789abcdef"
SLOW = "limits-slow-0123456789abcdef"
FAST = "limits-fast-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 128.0  # times a binary fraction holds exactly

    def __call__(self) -> float:
        return self.now


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["credential"], sample.labels["reason"]): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_the_bucket_lets_a_burst_through_then_the_rate() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    quotas = CallQuotas(CallLimits(), max_inflight=0, retry_ms=50, registry=registry, clock=clock)
    limits = CallLimits(rate=4.0, burst=3)
    assert [quotas.take("app", limits) for _ in range(3)] == [None, None, None]
    refused = quotas.take("app", limits)
    assert refused is not None and refused.reason == "rate"
    assert refused.retry_ms == 250  # one token at 4/s
    assert "'app'" in refused.message and "retry after 250 ms" in refused.message
    clock.now += 0.125  # half a token: still refused, sooner
    refused = quotas.take("app", limits)
    assert refused is not None and refused.retry_ms == 125
    clock.now += 0.125
    assert quotas.take("app", limits) is None
    assert quotas.take("other", limits) is None  # each credential has its own bucket
    assert samples(registry, "edgewise_credential_refusals_total") == {("app", "rate"): 2.0}


def test_a_share_of_the_inflight_limit_and_a_refusal_takes_nothing() -> None:
    clock = Clock()
    quotas = CallQuotas(CallLimits(share=0.25), max_inflight=8, retry_ms=70, clock=clock)
    limits = CallLimits(rate=1000.0, burst=5)  # the default's share applies beside it
    assert quotas.take("app", limits) is None and quotas.take("app", limits) is None
    refused = quotas.take("app", limits)  # 0.25 of 8: two at once
    assert refused is not None and refused.reason == "share" and refused.retry_ms == 70
    # The refused call took no token: three more fit in the burst of five once slots free up.
    quotas.give_back("app", limits)
    quotas.give_back("app", limits)
    for _ in range(3):
        assert quotas.take("app", limits) is None
        quotas.give_back("app", limits)
    refused = quotas.take("app", limits)  # five tokens taken, no time passed
    assert refused is not None and refused.reason == "rate"


def test_no_limits_anywhere_costs_no_state() -> None:
    quotas = CallQuotas(CallLimits(), max_inflight=4, retry_ms=50)
    for _ in range(100):
        assert quotas.take("app", CallLimits()) is None
    assert quotas._accounts == {}  # nothing was recorded for it


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("rate=0/s", "rate must be a number of calls a second above 0"),
        ("share=1.5", "share must be a fraction above 0 and at most 1"),
        ("burst=0 rate=1", "burst must be a whole number"),
        ("burst=4", "burst needs a rate"),
        ("speed=4", "is not a limit"),
    ],
)
def test_bad_limits_are_one_error_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        parse_call_limits(text.split(), "credential-limits")


def test_credential_limits_need_tokens() -> None:
    with pytest.raises(InvalidInput, match="credential-limits needs tokens"):
        ServerSettings.from_sources({"credential_limits": "rate=5/s"}, environ={})


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("limits")
    shutil.copytree(model_repo / "logreg", root / "repo" / "logreg")
    tokens = root / "tokens"
    tokens.write_text(
        f"{ADMIN} admin,read,infer ops\n"
        f"{SLOW} infer,read slow rate=0.2/s burst=2\n"  # one call every 5 s after two
        f"{FAST} infer,read fast\n"
    )
    running = start_server(
        root / "repo",
        root / "server",
        ["--monitoring", "off", "--tokens-file", str(tokens), "--http-port", "0",
         "--max-inflight", "16", "--credential-limits", "share=0.5",
         *front_end_args(request.param)],
        security=ClientSecurity(token=ADMIN),
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def inputs(server: RunningServer) -> dict[str, np.ndarray]:
    repo = Path(server.log_path).parents[1] / "repo"
    return {k: np.asarray(v) for k, v in logreg_inputs(repo / "logreg" / "1").items()}


def http_infer(server: RunningServer, token: str) -> tuple[int, dict[str, str], str]:
    datatypes = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}
    body = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatypes[str(array.dtype)],
                "data": array.ravel().tolist(),
            }
            for name, array in inputs(server).items()
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/models/logreg/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_a_credential_over_its_rate_is_refused_with_the_hint_others_are_served(
    server: RunningServer,
) -> None:
    before = metrics_text(server)
    data = inputs(server)
    with EdgewiseClient(server.target, timeout=30, security=ClientSecurity(token=SLOW)) as slow:
        slow.infer("logreg", data)
        slow.infer("logreg", data)  # the burst of two
        with pytest.raises(ServerError) as caught:
            slow.infer("logreg", data)
        assert caught.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'slow'" in caught.value.details and "rate" in caught.value.details
        hint = caught.value.retry_after_ms
        assert hint is not None and 0 < hint <= 5000
        # Reads are not limited: the same credential still reads.
        assert slow.server_ready()
    with EdgewiseClient(server.target, timeout=30, security=ClientSecurity(token=FAST)) as fast:
        for _ in range(5):
            assert fast.infer("logreg", data).outputs
    # HTTP: the same bucket (the credential's, not the front end's), 429 with the headers.
    status, headers, text = http_infer(server, SLOW)
    assert status == 429, text
    assert "'slow'" in json.loads(text)["error"]
    assert 0 < int(headers["retry-after-ms"]) <= 5000 and int(headers["Retry-After"]) >= 1
    assert http_infer(server, FAST)[0] == 200
    after = metrics_text(server)
    name = "edgewise_credential_refusals_total"
    labels = {"credential": "slow", "reason": "rate"}
    assert metric_value(after, name, **labels) - metric_value(before, name, **labels) == 2
    # Every call let through gave its share back, on every front end.
    assert metric_value(after, "edgewise_credential_calls_limited") == 0
