"""Bearer-token authentication on a real server: every kind of missing, malformed or wrong
credential gets UNAUTHENTICATED (never a crash) and is counted; health stays open, reflection is
closed; the tokens file is re-read when it changes; clients and the CLI send tokens."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.channels import parse_tokens
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.security import AuthInterceptor, TokenSet
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.runtime.store.helpers import logreg_inputs
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

FILE_TOKEN = "file-token-0123456789abcdef"
OTHER_FILE_TOKEN = "file-token-second-0123456789"
ENV_TOKEN = "env-token-0123456789abcdef"
ROTATED_TOKEN = "rotated-token-0123456789abcdef"


def metric(server: RunningServer, name: str, **labels: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module", params=FRONT_ENDS)
def secured(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("auth")
    repo = root / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    tokens = root / "tokens.txt"
    tokens.write_text(f"# edge node tokens\n{FILE_TOKEN}\n\n{OTHER_FILE_TOKEN}  # ops\n")
    server = start_server(
        repo,
        root / "server",
        ["--monitoring", "off", "--tokens-file", str(tokens), *front_end_args(request.param)],
        env={"EDGEWISE_TOKENS": ENV_TOKEN},
    )
    yield server, tokens
    assert server.stop() == 0, server.log()


def call_with(server: RunningServer, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError | None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc
    return None


def test_every_bad_credential_is_unauthenticated_and_counted(
    secured: tuple[RunningServer, Path],
) -> None:
    server, _ = secured
    before = {r: metric(server, "edgewise_auth_failures_total", reason=r) for r in
              ("missing", "malformed", "invalid")}  # fmt: skip
    cases = {
        "missing": [(), (("x-other", "1"),)],
        "malformed": [
            (("authorization", "Basic dXNlcjpwYXNz"),),
            (("authorization", "Bearer"),),
            (("authorization", "Bearer   "),),
            (("authorization", f"Bearer {FILE_TOKEN} extra"),),
            (("authorization", FILE_TOKEN),),
        ],
        "invalid": [
            (("authorization", "Bearer wrong-token-0123456789abcdef"),),
            (("authorization", f"Bearer {FILE_TOKEN[:-1]}"),),
            (("authorization", f"Bearer {FILE_TOKEN}x"),),
            (("authorization", "Bearer ;;;;;;;;;;;;;;;;;;;;;;;;;;"),),
        ],
    }
    for metadatas in cases.values():
        for metadata in metadatas:
            error = call_with(server, metadata)
            assert error is not None, metadata
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, error)
            assert "credentials" in (error.details() or ""), error.details()
    for reason, metadatas in cases.items():
        counted = metric(server, "edgewise_auth_failures_total", reason=reason) - before[reason]
        assert counted == len(metadatas), reason
    # ...and the server is still there, answering good tokens (file and environment).
    for token in (FILE_TOKEN, OTHER_FILE_TOKEN, ENV_TOKEN):
        assert call_with(server, (("authorization", f"Bearer {token}"),)) is None
        assert call_with(server, (("authorization", f"bearer  {token} "),)) is None
    assert server.process.poll() is None


def test_every_service_is_closed_but_health(secured: tuple[RunningServer, Path]) -> None:
    server, _ = secured
    with EdgewiseClient(server.target, security=ClientSecurity()) as anonymous:
        for call in (
            anonymous.server_live,
            anonymous.server_ready,
            lambda: anonymous.model_metadata("logreg"),
            lambda: anonymous.infer("logreg", logreg_inputs(server_repo(server))),
            anonymous.repository_index,
            lambda: anonymous.load_model("logreg", "1"),
            lambda: anonymous.unload_model("logreg", "1"),
            lambda: anonymous.drift_report("logreg"),
        ):
            with pytest.raises(ServerError) as info:
                call()
            assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
        # Health is open (probes send no token) ...
        assert anonymous.health_status() == "SERVING"
    # ... and the model was never unloaded by the refused call.
    with EdgewiseClient(server.target, security=ClientSecurity(token=FILE_TOKEN)) as client:
        result = client.infer("logreg", logreg_inputs(server_repo(server)))
        assert result.model_version == "1"
    # Reflection is closed: a streaming call is refused at once, never left hanging. The client
    # sends one request and holds the stream open until the answer: a server that waited for
    # the stream's end would let the call meet its deadline instead.
    answered = threading.Event()

    def one_request_held_open() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        answered.wait(30)

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ServerReflectionInfo(one_request_held_open(), timeout=10))
        finally:
            answered.set()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health's streaming Watch is open too.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def server_repo(server: RunningServer) -> Path:
    # The fixture's repository: the server's --repo argument.
    args = server.process.args
    assert isinstance(args, list)
    return Path(args[args.index("--repo") + 1]) / "logreg" / "1"


def test_the_tokens_file_is_reread_when_it_changes(secured: tuple[RunningServer, Path]) -> None:
    server, tokens = secured
    original = tokens.read_text()
    try:
        tokens.write_text(f"{ROTATED_TOKEN}\n")
        deadline = time.monotonic() + 15
        while call_with(server, (("authorization", f"Bearer {ROTATED_TOKEN}"),)) is not None:
            assert time.monotonic() < deadline, "the new token was never accepted"
            time.sleep(0.2)
        refused = call_with(server, (("authorization", f"Bearer {FILE_TOKEN}"),))
        assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call_with(server, (("authorization", f"Bearer {ENV_TOKEN}"),)) is None
        # A broken file keeps the tokens in use (and says so in the log). The file is checked
        # when calls arrive (at most every 2 s): call until the log shows it was read.
        tokens.write_text("short\n")
        deadline = time.monotonic() + 15
        while "tokens file not reloaded" not in server.log():
            assert time.monotonic() < deadline, "the broken file was never noticed"
            assert call_with(server, (("authorization", f"Bearer {ROTATED_TOKEN}"),)) is None
            time.sleep(0.2)
        assert call_with(server, (("authorization", f"Bearer {ROTATED_TOKEN}"),)) is None
        assert metric(server, "edgewise_tokens_file_ok") == 0  # and says so in its metrics
    finally:
        tokens.write_text(original)
        deadline = time.monotonic() + 15
        while call_with(server, (("authorization", f"Bearer {FILE_TOKEN}"),)) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert metric(server, "edgewise_tokens_file_ok") == 1


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgewise.runtime.cli", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)


def test_the_cli_sends_a_token_from_the_environment_or_a_file(
    secured: tuple[RunningServer, Path], tmp_path: Path
) -> None:
    server, _ = secured
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_CLIENT_")}
    refused = run_cli("repository", "--server", server.target, "index", env=env)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "UNAUTHENTICATED" in refused.stderr
    allowed = run_cli(
        "repository", "--server", server.target, "index",
        env={**env, "EDGEWISE_CLIENT_TOKEN": ENV_TOKEN},
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert "logreg" in allowed.stdout and "READY" in allowed.stdout
    token_file = tmp_path / "token"
    token_file.write_text(FILE_TOKEN + "\n")
    with_file = run_cli(
        "repository", "--server", server.target, "--token-file", str(token_file), "index", env=env
    )
    assert with_file.returncode == 0, with_file.stderr


def test_a_bad_tokens_file_stops_the_server_with_one_line(model_repo: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tooshort\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgewise.runtime.cli", "serve", "--repo", str(model_repo),
         "--port", "0", "--metrics-port", "-1", "--tokens-file", str(tokens)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edgewise serve: error: tokens file:") and "16 characters" in last
    assert "Traceback" not in result.stderr


# ---- units ---------------------------------------------------------------------------------------


def test_token_parsing_and_matching(tmp_path: Path) -> None:
    text = f"# a comment\n{FILE_TOKEN}, {ENV_TOKEN}  # two on a line\n\n"
    assert parse_tokens(text, "x") == [FILE_TOKEN, ENV_TOKEN]
    for bad in ("short", "tab\there-0123456789", "\u00e9" * 20, "semi;colon-0123456789"):
        with pytest.raises(InvalidInput):
            parse_tokens(bad, "x")
    tokens = TokenSet(inline=FILE_TOKEN)
    assert tokens.accepts(FILE_TOKEN)
    assert not tokens.accepts(FILE_TOKEN + "0")
    assert not tokens.accepts("")
    assert not tokens.accepts(b"\xff\xfe")
    with pytest.raises(InvalidInput):
        TokenSet()
    with pytest.raises(InvalidInput):
        TokenSet(tmp_path / "missing")
    interceptor = AuthInterceptor(tokens)
    assert interceptor.check(None) == "missing"
    assert interceptor.check([("authorization", b"Bearer " + FILE_TOKEN.encode())]) is None
    assert interceptor.check([("authorization", "Token " + FILE_TOKEN)]) == "malformed"


def test_an_emptied_tokens_file_accepts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(FILE_TOKEN + "\n")
    tokens = TokenSet(path)
    assert tokens.accepts(FILE_TOKEN)
    path.write_text("# revoked\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    tokens.maybe_reload(now=time.monotonic() + 10)
    assert len(tokens) == 0
    assert not tokens.accepts(FILE_TOKEN)


def test_a_broken_tokens_file_is_reported_once_per_change_and_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text(FILE_TOKEN + "\n")
    registry = CollectorRegistry()
    tokens = TokenSet(path)
    AuthInterceptor(tokens, registry=registry)

    def file_ok() -> float | None:
        return registry.get_sample_value("edgewise_tokens_file_ok")

    def change(text: str, seconds: int) -> None:
        path.write_text(text)
        later = time.time_ns() + seconds * 10**9  # a stamp of its own, whatever the clock's grain
        os.utime(path, ns=(later, later))

    def errors_after_checks(start: float) -> int:
        caplog.clear()
        for step in range(4):  # four checks, 3 s apart: the file does not change in between
            tokens.maybe_reload(now=start + 3 * step)
        return sum(r.levelname == "ERROR" for r in caplog.records)

    assert file_ok() == 1
    now = time.monotonic() + 10
    change("short\n", 1)
    assert errors_after_checks(now) == 1
    assert file_ok() == 0 and tokens.accepts(FILE_TOKEN)  # the previous tokens stay
    change("still-short\n", 2)  # another change, another single error
    assert errors_after_checks(now + 20) == 1 and file_ok() == 0
    path.unlink()  # a file gone: one error too
    assert errors_after_checks(now + 40) == 1 and file_ok() == 0
    change(ROTATED_TOKEN + "\n", 3)
    assert errors_after_checks(now + 60) == 0
    assert file_ok() == 1 and tokens.accepts(ROTATED_TOKEN) and not tokens.accepts(FILE_TOKEN)
    inline_only = CollectorRegistry()
    AuthInterceptor(TokenSet(inline=FILE_TOKEN), registry=inline_only)
    assert inline_only.get_sample_value("edgewise_tokens_file_ok") is None  # no file, no gauge


def test_random_authorization_headers_are_refused_never_crash() -> None:
    interceptor = AuthInterceptor(TokenSet(inline=FILE_TOKEN))
    rng = np.random.default_rng(0)
    for _ in range(500):
        raw = bytes(rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8))
        value = raw.decode("latin-1")
        assert interceptor.check([("authorization", value)]) in ("malformed", "invalid")
        assert interceptor.check([("authorization", raw)]) in ("malformed", "invalid")
