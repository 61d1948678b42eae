"""The Feast layout readers' pieces that need no Feast: murmur3 (vectors from the ``mmh3``
package Feast uses, ``mmh3.hash(key, signed=False)``), Value decoding (messages as protobuf
encodes them), entity keys, the settings' refusals and a store that is not there."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from edgewise.runtime.serving.features import FeatureSettings
from edgewise.runtime.serving.online_store import (
    RedisOnlineStore,
    SqliteOnlineStore,
    StoreError,
    decode_value,
    entity_key,
    murmur3_32,
    read_registry,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 1009084850),
        ("abc", 3017643002),
        ("patient_stats:age", 2015032212),
        ("hello world!!", 3804944959),
    ],
)
def test_murmur3_matches_mmh3(text: str, expected: int) -> None:
    assert murmur3_32(text.encode()) == expected


def test_decode_value_scalars() -> None:
    assert decode_value(b"\x29" + struct.pack("<d", 1.25)) == 1.25  # double_val = 5
    assert decode_value(b"\x35" + struct.pack("<f", -0.5)) == -0.5  # float_val = 6
    assert decode_value(b"\x20\x07") == 7  # int64_val = 4
    assert decode_value(b"\x20" + b"\xff" * 9 + b"\x01") == -1  # negative int64
    assert decode_value(b"\x18" + b"\xfe" + b"\xff" * 8 + b"\x01") == -2  # negative int32 = 3
    assert decode_value(b"\x38\x01") is True  # bool_val = 7
    assert decode_value(b"\x12\x02hi") == "hi"  # string_val = 2
    assert decode_value(b"") is None  # unset: null


def test_entity_key_layout() -> None:
    key = entity_key(["patient_id"], [4], [5])
    assert key == struct.pack("<III", 1, 2, 10) + b"patient_id" + struct.pack("<IIq", 4, 8, 5)
    # Several join keys are sorted by name, names first, then values.
    two = entity_key(["b", "a"], [2, 3], ["x", 9])
    assert two == (
        struct.pack("<I", 2)
        + struct.pack("<II", 2, 1) + b"a" + struct.pack("<II", 2, 1) + b"b"
        + struct.pack("<IIi", 3, 4, 9) + struct.pack("<II", 2, 1) + b"x"
    )  # fmt: skip


def test_settings_refusals_name_the_field(tmp_path: Path) -> None:
    base = {
        "registry": "r.db",
        "project": "p",
        "online_store": {"type": "sqlite", "path": "o.db"},
        "feature_service": "s",
    }
    assert FeatureSettings.from_json(base, tmp_path).registry == tmp_path / "r.db"
    cases = {
        "features.online_store": {**base, "online_store": {"type": "bigtable"}},
        "give feature_service or features": {**base, "features": ["v:f"]},
        "features.on_missing": {**base, "on_missing": "guess"},
        "features.budget_ms": {**base, "budget_ms": 0},
        "unknown field(s) extra": {**base, "extra": 1},
        "features.project is required": {k: v for k, v in base.items() if k != "project"},
    }
    for words, data in cases.items():
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            FeatureSettings.from_json(data, tmp_path)


def test_stores_that_are_not_there(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        SqliteOnlineStore(tmp_path / "none.db", "p").read("v", [b"k"], ["f"], 0.1)
    with pytest.raises(ValueError, match="feature registry"):
        read_registry(tmp_path / "none.db", "p")
    (tmp_path / "junk.db").write_bytes(b"\x0f\xff")
    with pytest.raises(ValueError, match="not a Feast registry"):
        read_registry(tmp_path / "junk.db", "p")
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match="down"):
        RedisOnlineStore("127.0.0.1", port, "p").read("v", [b"k"], ["f"], 0.5)


def test_redis_read_bounded_by_its_budget() -> None:
    """A Redis that accepts the connection and never answers: the read is refused once its
    budget is spent (the socket's kernel timeouts), with the budget in the message, and the
    connection is dropped (the next read connects again)."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    store = RedisOnlineStore("127.0.0.1", port, "p")
    try:
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(StoreError, match=r"over the 50\.0 ms budget"):
                store.read("v", [b"k"], ["f"], 0.05)
            assert 0.03 <= time.monotonic() - began < 2.0
        assert len(accepted) == 2  # dropped after the refusal, connected again
    finally:
        store.close()
        server.close()
        for conn in accepted:
            conn.close()


def test_resp_replies() -> None:
    """The RESP2 parser: a reply cut anywhere is incomplete (None), whole it is read with where
    it ends; nil bulk strings and arrays, integers, simple strings, errors."""
    from edgewise.runtime.serving.online_store import parse_reply

    reply = b"*3\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:42\r\n+OK\r\n"
    for cut in range(len(reply)):
        assert parse_reply(reply[:cut], 0) is None
    assert parse_reply(reply + b"$1\r\nx\r\n", 0) == ([b"abc", None, [42, b"OK"]], len(reply))
    assert parse_reply(b"*-1\r\n", 0) == (None, 5)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        parse_reply(b"-WRONGTYPE bad\r\n", 0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_redis_replies_in_pieces(tmp_path: Path) -> None:
    """HMGET replies larger than one ``recv`` (a 40,000-item list of doubles, ~320 kB per
    entity), nil fields, an entity the store does not have, over TCP and the Unix socket of a
    real redis-server: read in pieces, each value equals what was written (the hashes are
    written in Feast's Redis layout with plain RESP commands)."""
    import socket

    from tests import feast_repo as fr
    from tests.prerequisites import unmet

    reason = fr.redis_missing()
    if reason is not None:
        unmet(reason)
    items = [i / 7 for i in range(40_000)]
    packed = struct.pack(f"<{len(items)}d", *items)
    inner = b"\x0a" + _varint(len(packed)) + packed  # DoubleList {repeated double val = 1}
    big = b"\x7a" + _varint(len(inner)) + inner  # Value.double_list_val = 15
    small = b"\x29" + struct.pack("<d", 2.5)  # Value.double_val = 5
    stamp = b"\x08" + _varint(1_700_000_000)  # Timestamp {seconds = 1}
    view, project = "v", "p"
    fields = {"big": big, "small": small}
    with fr.redis_server(tmp_path / "redis") as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for entity, names in ((1, ("big", "small")), (2, ("big",))):
                key = entity_key(["id"], [4], [entity]) + project.encode()
                parts = [b"HSET", key, f"_ts:{view}".encode(), stamp]
                for name in names:
                    parts += [
                        struct.pack("<I", murmur3_32(f"{view}:{name}".encode())),
                        fields[name],
                    ]
                sock.sendall(
                    b"*%d\r\n" % len(parts)
                    + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
                )
                assert sock.recv(64).startswith(b":")
        keys = [entity_key(["id"], [4], [i]) for i in (1, 2, 3)]
        for store in (
            RedisOnlineStore("127.0.0.1", port, project),
            RedisOnlineStore.from_connection_string(
                f"127.0.0.1:1,unix_socket_path={fr.redis_socket(tmp_path / 'redis')}", project
            ),
        ):
            try:
                for _ in range(2):  # a second read on the same connection
                    rows = store.read(view, keys, ["small", "big"], 5.0)
                    assert rows[0] == (1_700_000_000.0, [2.5, items])
                    assert rows[1] == (1_700_000_000.0, [None, items])
                    assert rows[2] is None
            finally:
                store.close()
