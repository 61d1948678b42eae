"""One conformance suite over every front end: the same call gets the same answer.

Each front end (grpcio, the native C++ front end, and HTTP/REST where it is served) runs in a
real server with TLS, bearer tokens and an in-flight limit, the strict set-up a deployment
has. A case asserts the outcome in one vocabulary (the gRPC status name; an HTTP caller maps
its status through the server's own table), so a case that only some front ends pass fails
for the others. The oracle of every answer is onnxruntime called directly on the package's
model file.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edgewise.runtime.config.settings import ClientSecurity
from tests.certs import Certificates, make_certificates
from tests.conformance.transports import Caller, GrpcCaller, HttpCaller, Outcome, Tensor
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

TOKEN = "conformance-token-0123456789abcdef"
#: Scoped credentials, from a tokens file (TOKEN, from EDGEWISE_TOKENS, holds every scope).
INFER_TOKEN = "conformance-infer-0123456789abcdef"
READ_TOKEN = "conformance-read-0123456789abcdef"
LIMIT = 2  # --max-inflight: small, so the shedding case can reach it


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("conformance") / "repo"
    for name in ("logreg", "regressor"):
        shutil.copytree(model_repo / name, target / name)
    # The regressor waits in a batch queue that waits long: a call's deadline passes in there.
    (target / "regressor" / "config.json").write_text(
        json.dumps(
            {
                "batching": {
                    "max_batch_size": 64,
                    "max_queue_delay_us": 400_000,
                    "idle_dispatch": False,
                }
            }
        )
    )
    return target


#: Every front end: the gRPC ones and HTTP/REST (served beside the default gRPC front end).
ALL_FRONT_ENDS = (*FRONT_ENDS, "http")


@pytest.fixture(scope="module", params=ALL_FRONT_ENDS)
def front_end(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(
    front_end: str,
    repo: Path,
    certs: Certificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    wire = ["--http-port", "0"] if front_end == "http" else front_end_args(front_end)
    tokens = tmp_path_factory.mktemp(f"tokens-{front_end}") / "tokens"
    tokens.write_text(f"{INFER_TOKEN} infer infer-client\n{READ_TOKEN} read reader\n")
    running = start_server(
        repo,
        tmp_path_factory.mktemp(f"server-{front_end}"),
        [
            *wire,
            "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
            "--max-inflight", str(LIMIT), "--monitoring", "off",
        ],
        env={"EDGEWISE_TOKENS": TOKEN, "EDGEWISE_TOKENS_FILE": str(tokens)},
        security=ClientSecurity(tls_ca=certs.ca, token=TOKEN),
    )  # fmt: skip
    if front_end != "http":
        log = running.log()
        assert f"front end: {front_end}" in log, log
    yield running
    assert running.stop() == 0, running.log()


def make_caller(front_end: str, server: RunningServer, ca: Path | None) -> Caller:
    """A caller for ``front_end`` that trusts ``ca`` (None: plaintext)."""
    if front_end == "http":
        assert server.http_port is not None
        if ca is None:
            return HttpCaller(f"http://127.0.0.1:{server.http_port}")
        return HttpCaller(
            f"https://127.0.0.1:{server.http_port}", ssl.create_default_context(cafile=str(ca))
        )
    if ca is None:
        return GrpcCaller(server.target)
    return GrpcCaller(
        server.target, grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    )


@pytest.fixture(scope="module")
def caller(front_end: str, server: RunningServer, certs: Certificates) -> Iterator[Caller]:
    made = make_caller(front_end, server, certs.ca)
    yield made
    made.close()


def width(repo: Path, model: str) -> int:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    return int(session.get_inputs()[0].shape[1])


def oracle(repo: Path, model: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The model's own answer: onnxruntime on the package's model file, no edgewise code."""
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: rows}), strict=True))


def features(repo: Path, model: str, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width(repo, model))).astype(np.float32)


# ---- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("model", ["logreg", "regressor"])
def test_an_answer_is_the_model_s_own(caller: Caller, repo: Path, raw: bool, model: str) -> None:
    rows = features(repo, model, 7, seed=3)
    outcome = caller.infer(model, [Tensor("features", "FP32", rows)], raw=raw, token=TOKEN)
    assert outcome.code == "OK", outcome.message
    expected = oracle(repo, model, rows)
    assert set(outcome.outputs) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(outcome.outputs[name], values, rtol=1e-6, atol=1e-7)


def test_requested_outputs_are_the_only_ones_answered(caller: Caller, repo: Path) -> None:
    rows = features(repo, "logreg", 2)
    outcome = caller.infer(
        "logreg", [Tensor("features", "FP32", rows)], outputs=["label"], token=TOKEN
    )
    assert outcome.code == "OK" and list(outcome.outputs) == ["label"]


# ---- bad input: INVALID_ARGUMENT or NOT_FOUND, with a message naming the field -------------


def _bad_cases(repo: Path) -> dict[str, tuple[Callable[[Caller], Outcome], str, str]]:
    rows = features(repo, "logreg", 2)
    good = Tensor("features", "FP32", rows)
    return {
        "unknown model": (
            lambda c: c.infer("no-such-model", [good], token=TOKEN),
            "NOT_FOUND",
            "no-such-model",
        ),
        "unknown version": (
            lambda c: c.infer("logreg", [good], token=TOKEN, version="9"),
            "NOT_FOUND",
            "9",
        ),
        "wrong width": (
            lambda c: c.infer("logreg", [Tensor("features", "FP32", rows[:, :3])], token=TOKEN),
            "INVALID_ARGUMENT",
            "features",
        ),
        "wrong datatype": (
            lambda c: c.infer(
                "logreg", [Tensor("features", "FP64", rows.astype(np.float64))], token=TOKEN
            ),
            "INVALID_ARGUMENT",
            "features",
        ),
        "unknown input": (
            lambda c: c.infer("logreg", [good, Tensor("extra", "FP32", rows)], token=TOKEN),
            "INVALID_ARGUMENT",
            "extra",
        ),
        "missing input": (
            lambda c: c.infer("logreg", [], token=TOKEN),
            "INVALID_ARGUMENT",
            "features",
        ),
        "declared shape disagrees with the data": (
            lambda c: c.infer(
                "logreg", [Tensor("features", "FP32", rows, shape=[3, rows.shape[1]])], token=TOKEN
            ),
            "INVALID_ARGUMENT",
            "features",
        ),
        "unknown output": (
            lambda c: c.infer("logreg", [good], outputs=["nope"], token=TOKEN),
            "INVALID_ARGUMENT",
            "nope",
        ),
        "undecodable body": (
            lambda c: c.infer_body(b"\xff\xfe not a request", token=TOKEN),
            "INVALID_ARGUMENT",
            "",
        ),
    }


BAD_CASES = [
    "unknown model",
    "unknown version",
    "wrong width",
    "wrong datatype",
    "unknown input",
    "missing input",
    "declared shape disagrees with the data",
    "unknown output",
    "undecodable body",
]


NAMING_A_SERVED_MODEL = set(BAD_CASES) - {"unknown model", "undecodable body"}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_its_status_and_a_message_naming_the_field(
    caller: Caller, server: RunningServer, repo: Path, case: str
) -> None:
    call, code, named = _bad_cases(repo)[case]
    before = metrics_text(server)
    outcome = call(caller)
    assert outcome.code == code, (case, outcome)
    assert named in outcome.message, (case, outcome.message)
    if case in NAMING_A_SERVED_MODEL:  # refused input is counted once, with its status
        after = metrics_text(server)
        counted = metric_value(after, "edgewise_requests_total", model="logreg", code=code)
        counted -= metric_value(before, "edgewise_requests_total", model="logreg", code=code)
        assert counted == 1, case


# ---- credentials ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "says"),
    [(None, "missing credentials"), ("not-the-token-0123456789abcdef", "invalid credentials")],
    ids=["missing", "invalid"],
)
def test_a_call_without_a_valid_token_is_unauthenticated(
    caller: Caller, repo: Path, token: str | None, says: str
) -> None:
    rows = features(repo, "logreg", 1)
    outcome = caller.infer("logreg", [Tensor("features", "FP32", rows)], token=token)
    assert (outcome.code, outcome.outputs) == ("UNAUTHENTICATED", {})
    assert says in outcome.message
    assert caller.model_metadata("logreg", token=token).code == "UNAUTHENTICATED"
    assert caller.model_metadata("logreg", token=TOKEN).code == "OK"


def test_a_credential_without_the_method_s_scope_is_permission_denied(
    caller: Caller, server: RunningServer, repo: Path
) -> None:
    rows = features(repo, "logreg", 2)
    before = metrics_text(server)
    refused = caller.infer("logreg", [Tensor("features", "FP32", rows)], token=READ_TOKEN)
    assert (refused.code, refused.outputs) == ("PERMISSION_DENIED", {})
    assert "'infer' scope" in refused.message and "'reader'" in refused.message
    assert READ_TOKEN not in refused.message
    metadata = caller.model_metadata("logreg", token=INFER_TOKEN)
    assert metadata.code == "PERMISSION_DENIED" and "'read' scope" in metadata.message
    # Each credential is let through where its scope is the method's.
    assert caller.model_metadata("logreg", token=READ_TOKEN).code == "OK"
    answered = caller.infer("logreg", [Tensor("features", "FP32", rows)], token=INFER_TOKEN)
    assert answered.code == "OK"
    for name, expected in oracle(repo, "logreg", rows).items():
        np.testing.assert_allclose(answered.outputs[name], expected, rtol=1e-6, atol=1e-7)
    after = metrics_text(server)
    for scope in ("infer", "read"):
        labels = {"scope": scope, "code": "PERMISSION_DENIED"}
        counted = metric_value(after, "edgewise_auth_refusals_total", **labels)
        assert counted - metric_value(before, "edgewise_auth_refusals_total", **labels) == 1


def test_a_plaintext_client_gets_no_answer(
    front_end: str, server: RunningServer, repo: Path
) -> None:
    plain = make_caller(front_end, server, None)
    try:
        rows = features(repo, "logreg", 1)
        outcome = plain.infer("logreg", [Tensor("features", "FP32", rows)], token=TOKEN, timeout=5)
    finally:
        plain.close()
    assert outcome.code == "UNAVAILABLE"


# ---- deadlines and load ---------------------------------------------------------------------


def test_a_call_whose_deadline_passes_in_the_server_is_not_run(
    caller: Caller, server: RunningServer, repo: Path
) -> None:
    """The deadline travels with the call: one that passes while the call waits in a batch queue
    ends it there, DEADLINE_EXCEEDED for the client and in the server's own count, and the model
    never runs it."""

    def counted(code: str) -> float:
        return metric_value(
            metrics_text(server), "edgewise_requests_total", model="regressor", code=code
        )

    ok_before, late_before = counted("OK"), counted("DEADLINE_EXCEEDED")
    rows = features(repo, "regressor", 1)
    outcome = caller.infer(
        "regressor", [Tensor("features", "FP32", rows)], token=TOKEN, timeout=0.05
    )
    assert outcome.code == "DEADLINE_EXCEEDED"
    give_up = time.monotonic() + 10
    while counted("DEADLINE_EXCEEDED") == late_before and time.monotonic() < give_up:
        time.sleep(0.05)  # the queue's timer ends the call on the server 0.4 s after it came
    assert counted("DEADLINE_EXCEEDED") == late_before + 1
    assert counted("OK") == ok_before


def test_calls_past_the_in_flight_limit_are_shed_with_a_retry_hint(
    caller: Caller, server: RunningServer, repo: Path
) -> None:
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    big = features(repo, "logreg", 20_000)

    def call() -> None:
        for _ in range(4):
            outcome = caller.infer("logreg", [Tensor("features", "FP32", big)], token=TOKEN)
            with lock:
                outcomes.append(outcome)

    before = metric_value(metrics_text(server), "edgewise_shed_requests_total")
    threads = [threading.Thread(target=call) for _ in range(4 * LIMIT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = {outcome.code for outcome in outcomes}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, [o for o in outcomes if o.code not in codes]
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes
    shed = [outcome for outcome in outcomes if outcome.code == "RESOURCE_EXHAUSTED"]
    assert {outcome.retry_after_ms for outcome in shed} == {"50"}
    after = metric_value(metrics_text(server), "edgewise_shed_requests_total")
    assert after - before == len(shed)
