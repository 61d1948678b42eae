"""The audit log on a real server: every control-plane call (allowed, refused UNAUTHENTICATED or
PERMISSION_DENIED, failed, undecodable) writes exactly one JSON line naming the credential by
id (never the secret), the method, the request's fields and the status the client saw; other
calls write nothing. The file rotates by size without splitting a line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.audit import AUDITED
from edgewise.runtime.frontends.audit_log import AuditLog
from edgewise.runtime.frontends.scopes import METHOD_SCOPES
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from tests.servers import FRONT_ENDS, RunningServer, front_end_args, start_server

ADMIN = "audit-admin-0123456789abcdef"
READ = "audit-read-0123456789abcdef"
_REPO = "/edgewise.v1.ModelRepositoryService/"
_ROLLOUT = "/edgewise.v1.RolloutService/"


def test_every_admin_method_is_audited() -> None:
    admin = {method for method, scope in METHOD_SCOPES.items() if scope == "admin"}
    assert admin <= set(AUDITED)
    assert "/edgewise.v1.QualityService/SubmitFeedback" in AUDITED


@pytest.fixture(scope="module", params=FRONT_ENDS)
def audited(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("audit")
    repo = root / "repo"
    shutil.copytree(model_repo / "logreg", repo / "logreg")
    tokens = root / "tokens"
    tokens.write_text(f"{ADMIN} admin,read,infer ops\n{READ} read reader\n")
    audit = root / "audit.jsonl"
    server = start_server(
        repo,
        root / "server",
        ["--tokens-file", str(tokens), "--audit-log", str(audit),
         *front_end_args(request.param)],
    )  # fmt: skip
    yield server, audit
    assert server.stop() == 0, server.log()


def call(server: RunningServer, method: str, body: Message | bytes, token: str | None) -> str:
    """The status name the client sees for one call."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    payload = body if isinstance(body, bytes) else body.SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        send = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            send(payload, timeout=60, metadata=metadata)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return str(exc.code().name)
    return "OK"


def records(audit: Path) -> list[dict[str, object]]:
    lines = audit.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") != "audit-log-opened"]


def test_every_control_call_writes_exactly_one_line(
    audited: tuple[RunningServer, Path],
) -> None:
    server, audit = audited
    before = len(records(audit))
    feedback = epb.FeedbackRequest(
        model="logreg", labels=[epb.Label(request_id=f"r{i}", class_index=1) for i in range(40)]
    )
    calls: list[tuple[str, Message | bytes, str | None, str | None]] = [
        (f"{_REPO}UnloadModel", epb.UnloadModelRequest(name="logreg"), READ, "reader"),
        (f"{_REPO}UnloadModel", epb.UnloadModelRequest(name="logreg"), None, None),
        (f"{_REPO}UnloadModel", epb.UnloadModelRequest(name="logreg"), "wrong" * 5, None),
        (f"{_REPO}UnloadModel", epb.UnloadModelRequest(name="logreg"), ADMIN, "ops"),
        (f"{_REPO}LoadModel", epb.LoadModelRequest(name="logreg", make_default=True), ADMIN, "ops"),
        (f"{_REPO}LoadModel", b"\xff\xfe not a request", ADMIN, "ops"),
        (f"{_REPO}LoadModel", epb.LoadModelRequest(name="no-such-model"), ADMIN, "ops"),
        ("/edgewise.v1.MonitoringService/ResetWindow", epb.ResetWindowRequest(model="logreg"),
         ADMIN, "ops"),
        ("/edgewise.v1.QualityService/ResetQuality", epb.ResetQualityRequest(model="logreg"),
         ADMIN, "ops"),
        ("/edgewise.v1.QualityService/SubmitFeedback", feedback, ADMIN, "ops"),
        (f"{_ROLLOUT}SetVersionLabel",
         epb.SetVersionLabelRequest(model="logreg", label="stable", version="1"), ADMIN, "ops"),
        (f"{_ROLLOUT}SetTrafficSplit",
         epb.SetTrafficSplitRequest(model="logreg", weights=[epb.VersionWeight(version="1",
                                                                                weight=100)]),
         ADMIN, "ops"),
        (f"{_ROLLOUT}SetShadow", epb.SetShadowRequest(model="logreg"), READ, "reader"),
    ]  # fmt: skip
    seen = [call(server, method, body, token) for method, body, token, _ in calls]
    # Calls that are not control calls write nothing.
    assert call(server, f"{_REPO}RepositoryIndex", epb.RepositoryIndexRequest(), READ) == "OK"
    # logreg was unloaded above (the LoadModel with make_default and no version is refused), so
    # GetRollout answers NOT_FOUND: a read, refused or not, writes no line either.
    assert call(server, f"{_ROLLOUT}GetRollout", epb.GetRolloutRequest(model="logreg"),
                READ) == "NOT_FOUND"  # fmt: skip
    assert {"OK", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"} <= set(seen)
    written = records(audit)[before:]
    assert len(written) == len(calls), written
    for (method, body, _, who), code, record in zip(calls, seen, written, strict=True):
        assert record["method"] == method.rsplit("/", 1)[1]
        assert record["service"] == method.strip("/").rsplit("/", 1)[0]
        assert record["outcome"] == code, record
        assert isinstance(record["who"], dict) and record["who"]["credential"] == who
        assert record["forwarded"] is False and str(record["time"]).endswith("Z")
        if code not in ("OK",):
            assert record["message"], record
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or isinstance(body, bytes):
            assert record["request"] is None  # never read
        else:
            fields = record["request"]
            assert isinstance(fields, dict)
            assert fields.get("name", fields.get("model")) in ("logreg", "no-such-model")
    load = written[4]
    assert load["request"] == {"name": "logreg", "make_default": True}
    assert written[9]["request"] == {"model": "logreg", "labels": {"count": 40}}
    text = audit.read_text()
    assert ADMIN not in text and READ not in text  # the secrets never


def test_the_log_rotates_by_size_and_keeps_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2048, backups=3)
    for index in range(200):
        log.write({"method": "LoadModel", "index": index, "padding": "x" * 40})
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [
        "audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"
    ]  # fmt: skip
    kept = []
    for file in (path.with_name("audit.jsonl.3"), path.with_name("audit.jsonl.2"),
                 path.with_name("audit.jsonl.1"), path):  # fmt: skip
        assert file.stat().st_size <= 2048
        kept.extend(json.loads(line)["index"] for line in file.read_text().splitlines())
    assert kept == list(range(200 - len(kept), 200))  # the newest, in order, none lost between
    assert path.stat().st_mode & 0o777 == 0o600


def test_bad_audit_settings_are_one_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"audit-log: .* is not a folder"):
        AuditLog(tmp_path / "missing" / "audit.jsonl")
    with pytest.raises(InvalidInput, match="audit-log-max-bytes"):
        AuditLog(tmp_path / "audit.jsonl", max_bytes=10)
