"""Token scopes: the tokens file's format (scoped lines and the lines written before scopes),
the one table every RPC and HTTP route is in, and a real server that lets an admin credential
load and unload while a read or infer credential gets PERMISSION_DENIED, counted per scope; a
change of a token's scopes in the file is taken without a restart."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.channels import SCOPES, parse_token_entries, parse_tokens
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.scopes import HTTP_ROUTES, METHOD_SCOPES, scope_of
from edgewise.runtime.frontends.security import TokenSet
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from tests.runtime.frontends.test_server import metric_value, metrics_text
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

ADMIN = "scopes-admin-0123456789abcdef"
READ = "scopes-read-0123456789abcdef"
INFER = "scopes-infer-0123456789abcdef"
LEGACY = "scopes-legacy-0123456789abcdef"


def test_a_tokens_file_line_holds_a_token_its_scopes_and_an_id() -> None:
    text = (
        f"# comment\n{ADMIN} admin,read ops  # trailing comment\n{READ} read\n{LEGACY}, {INFER}\n"
    )
    entries = parse_token_entries(text, "tokens")
    assert [(e.token, sorted(e.scopes), e.id) for e in entries] == [
        (ADMIN, ["admin", "read"], "ops"),
        (READ, ["read"], None),
        (LEGACY, sorted(SCOPES), None),  # a line without scopes: every scope, as before
        (INFER, sorted(SCOPES), None),
    ]
    assert parse_tokens(text, "tokens") == [ADMIN, READ, LEGACY, INFER]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (f"{ADMIN} admn ops", "line 1: unknown scope 'admn' (known: infer, read, admin)"),
        (f"{ADMIN} read,writes", "unknown scope 'writes'"),
        (
            f"{ADMIN} read ops extra",
            "line 1: expected 'TOKEN SCOPES [ID] [LIMITS]', found 2 words after the scopes",
        ),
        ("short read ops", "a token must be at least 16 characters"),
    ],
)
def test_a_bad_line_is_one_error_naming_it(line: str, says: str) -> None:
    with pytest.raises(InvalidInput, match="tokens") as caught:
        parse_token_entries(line, "tokens")
    assert says in caught.value.message


def test_credentials_are_named_by_id_or_by_a_digest_prefix_never_the_secret(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN} admin ops\n{READ} read\n")
    tokens = TokenSet(path, inline=LEGACY)
    admin, read, legacy = (tokens.identify(t) for t in (ADMIN, READ, LEGACY))
    assert admin is not None and (admin.id, admin.scopes) == ("ops", frozenset({"admin"}))
    assert read is not None and read.id.startswith("token-") and READ not in read.id
    assert legacy is not None and legacy.scopes == frozenset(SCOPES)
    assert tokens.identify(INFER) is None


def test_every_rpc_and_every_http_route_has_a_scope() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for descriptor in (pb.DESCRIPTOR, epb.DESCRIPTOR)
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }
    assert methods - set(METHOD_SCOPES) == set()
    assert set(METHOD_SCOPES.values()) <= set(SCOPES)
    assert scope_of("/edgewise.v1.SomethingNew/Call") == "admin"  # closed until listed
    # The HTTP front end adds each route through this table (a route not in it is a KeyError
    # when its app is built), by the RPC it answers.
    assert set(HTTP_ROUTES.values()) <= set(METHOD_SCOPES)
    assert HTTP_ROUTES[("POST", "/v2/models/{name}/infer")].endswith("/ModelInfer")


@pytest.fixture(scope="module", params=FRONT_ENDS)
def scoped(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("scopes")
    repo = root / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    tokens = root / "tokens"
    tokens.write_text(f"{ADMIN} admin,read ops\n{READ} read reader\n{INFER} infer app\n")
    server = start_server(
        repo,
        root / "server",
        ["--monitoring", "off", "--tokens-file", str(tokens), *front_end_args(request.param)],
    )
    yield server, tokens
    assert server.stop() == 0, server.log()


def client(server: RunningServer, token: str) -> EdgewiseClient:
    return EdgewiseClient(server.target, security=ClientSecurity(token=token))


def test_control_calls_need_the_admin_scope(scoped: tuple[RunningServer, Path]) -> None:
    server, _ = scoped
    before = metrics_text(server)
    for token, name in ((READ, "reader"), (INFER, "app")):
        with client(server, token) as refused:
            for call in (lambda c: c.unload_model("logreg"), lambda c: c.load_model("logreg")):
                with pytest.raises(ServerError) as caught:
                    call(refused)
                assert caught.value.status == grpc.StatusCode.PERMISSION_DENIED
                assert (
                    "'admin' scope" in caught.value.details and f"'{name}'" in caught.value.details
                )
    with client(server, READ) as reader:
        assert [m.name for m in reader.repository_index()] == ["logreg"]
    with client(server, ADMIN) as admin:
        admin.unload_model("logreg")
        admin.load_model("logreg")
    after = metrics_text(server)
    labels = {"scope": "admin", "code": "PERMISSION_DENIED"}
    name = "edgewise_auth_refusals_total"
    assert metric_value(after, name, **labels) - metric_value(before, name, **labels) == 4


def test_a_change_of_scopes_in_the_file_is_taken_without_a_restart(
    scoped: tuple[RunningServer, Path],
) -> None:
    server, tokens = scoped
    text = tokens.read_text()
    tokens.write_text(text.replace(f"{READ} read reader", f"{READ} read,admin reader"))
    stamp = time.time() + 5  # a new mtime even on a coarse clock
    os.utime(tokens, (stamp, stamp))
    try:
        deadline = time.monotonic() + 15
        while True:
            with client(server, READ) as reader:
                try:
                    reader.load_model("logreg")
                    break
                except ServerError as exc:
                    assert exc.status == grpc.StatusCode.PERMISSION_DENIED
                    assert time.monotonic() < deadline, "the new scopes were never taken"
            time.sleep(0.2)
    finally:
        tokens.write_text(text)
