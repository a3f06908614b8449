"""Every message rule of decisions.md 3-5, over real sockets."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Client, Server
from .rawws import RawClient

ID = re.compile(r"^ws-\d{13}-[a-z0-9]{9}$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def settle(*clients: Client) -> None:
    """Round-trip each client so that everything queued before has arrived
    (per-connection order is preserved, so a pong comes after it)."""
    for client in clients:
        client.roundtrip()


def test_welcome_comes_first_with_id_and_count(server: Server) -> None:
    """The first frame is welcome, with a well-formed id and the count including us."""
    a = server.client()
    try:
        assert ID.match(a.id)
        assert ISO.match(a.welcome["timestamp"])
        parsed = datetime.strptime(a.welcome["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(parsed.replace(tzinfo=UTC).timestamp() - datetime.now(UTC).timestamp()) < 60
        assert a.welcome["connectionCount"] == server.stats()["connections"]["node"]
        fields = {"type", "connectionId", "timestamp", "connectionCount", "room"}
        assert set(a.welcome) == fields | {"epoch", "offset"}  # history on (decisions.md 13)
        assert a.welcome["room"] == ""  # the default room
    finally:
        a.close()


def test_ids_are_unique(server: Server) -> None:
    """Many connections get distinct ids."""
    clients = [server.client() for _ in range(50)]
    try:
        assert len({c.id for c in clients}) == 50
    finally:
        for c in clients:
            c.close()


def test_user_joined_goes_to_others_not_to_the_newcomer(server: Server) -> None:
    """user_joined reaches existing clients, with the total including the newcomer."""
    a = server.client()
    b = server.client()
    try:
        joined = a.recv_type("user_joined")
        assert joined["connectionId"] == b.id
        assert joined["totalUsers"] == b.welcome["connectionCount"]
        assert ISO.match(joined["timestamp"])
        # b's next frame is the pong to its own ping: no user_joined about itself.
        b.send({"type": "ping"})
        assert b.recv()["type"] == "pong"
    finally:
        a.close()
        b.close()


def test_message_goes_to_others_broadcast_to_all(server: Server) -> None:
    """message excludes the sender; broadcast includes it; fields are the seed's."""
    a = server.client()
    b = server.client()
    a.recv_type("user_joined")
    try:
        a.send({"type": "message", "content": "hello"})
        got = b.recv_type("message")
        assert got["content"] == "hello" and got["connectionId"] == a.id
        assert set(got) == {"type", "connectionId", "content", "timestamp", "offset"}
        assert ISO.match(got["timestamp"])
        a.send({"type": "broadcast", "content": "to everyone"})
        for client in (a, b):
            got = client.recv_type("broadcast")
            assert got["content"] == "to everyone" and got["connectionId"] == a.id
        # a never saw its own message: its next frame is the pong.
        a.send({"type": "ping"})
        assert a.recv_type("pong", "message")["type"] == "pong"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "text",
    [
        "just words",
        "{not json",
        '"a json string"',
        "42",
        "[1, 2]",
        "null",
        "true",
        '\ufeff{"type":"broadcast","content":"bom"}',
        '{"type":"message"} trailing',
        '{"type":"broadcast","content":NaN}',
    ],
)
def test_anything_but_a_json_object_is_plain_text(server: Server, text: str) -> None:
    """Invalid JSON and non-object JSON are relayed verbatim as a message."""
    a = server.client()
    b = server.client()
    try:
        a.send(text)
        got = b.recv_type("message")
        assert got == {**got, "type": "message", "content": text, "connectionId": a.id}
    finally:
        a.close()
        b.close()


def test_ping_pong_and_user_info(server: Server) -> None:
    """ping gets pong with integer ms; a client pong is silent; user_info answers."""
    a = server.client()
    try:
        a.send({"type": "pong"})  # accepted silently
        a.send({"type": "ping", "extra": "ignored"})
        pong = a.recv()
        assert pong["type"] == "pong" and isinstance(pong["timestamp"], int)
        assert abs(pong["timestamp"] / 1000 - datetime.now(UTC).timestamp()) < 60
        a.send({"type": "user_info"})
        info = a.recv()
        assert info["type"] == "user_info_response"
        assert info["connectionId"] == a.id
        assert info["connectionCount"] == server.stats()["connections"]["node"]
        assert ISO.match(info["timestamp"])
    finally:
        a.close()


REFUSED = [
    ({"content": "no type"}, "missing_type"),
    ({"type": 7, "content": "x"}, "missing_type"),
    ({"type": None}, "missing_type"),
    ({"type": "dance"}, "unknown_type"),
    ({"type": "welcome"}, "unknown_type"),
    ({"type": "error", "message": "x"}, "unknown_type"),
    ({"type": "message"}, "invalid_content"),
    ({"type": "message", "content": 5}, "invalid_content"),
    ({"type": "broadcast", "content": ["a"]}, "invalid_content"),
    ({"type": "message", "content": None}, "invalid_content"),
    ({"type": "message", "content": ""}, "empty_content"),
    ({"type": "broadcast", "content": " \t\n\u3000"}, "empty_content"),
    ({"type": "message", "content": "x" * 1001}, "content_too_long"),
    ({"type": "message", "content": "é" * 1001}, "content_too_long"),
    ({"type": "message", "content": "€" * 1001}, "content_too_long"),
    ({"type": "message", "content": "😀" * 1001}, "content_too_long"),
    ('{"type":"message","content":"\\ud800"}', "invalid_content"),
    ('{"type":"broadcast","content":"a\\udfffb"}', "invalid_content"),
    ("   ", "empty_content"),
    ("y" * 1001, "content_too_long"),
]


@pytest.mark.parametrize(("frame", "code"), REFUSED)
def test_refused_frames_answer_error_and_reach_no_one(
    server: Server, frame: dict | str, code: str
) -> None:
    """A refused frame gets an error with its code, stays open, and relays nothing."""
    a = server.client()
    b = server.client()
    try:
        a.send(frame)
        error = a.recv_type("error")
        assert error["code"] == code and error["message"]
        a.send({"type": "message", "content": "sentinel"})
        assert b.recv_type("message")["content"] == "sentinel"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("char", ["x", "é", "€", "😀", "e\u0301"[1]])
def test_1000_code_points_pass(server: Server, char: str) -> None:
    """Length is counted in code points whatever their UTF-8 size."""
    a = server.client()
    b = server.client()
    try:
        a.send({"type": "message", "content": char * 1000})
        assert b.recv_type("message")["content"] == char * 1000
    finally:
        a.close()
        b.close()


def test_content_is_relayed_as_data(server: Server) -> None:
    """Markup, control characters, NUL and bidi marks arrive exactly as sent."""
    a = server.client()
    b = server.client()
    content = '<script>alert("x")</script>\x00\x07\u202e\u200b"\\'
    try:
        a.send({"type": "broadcast", "content": content, "unknown": {"nested": 1}})
        assert b.recv_type("broadcast")["content"] == content
    finally:
        a.close()
        b.close()


def test_binary_frames_are_refused(server: Server) -> None:
    """A binary frame gets binary_not_supported and is not relayed."""
    a = server.client()
    b = server.client()
    try:
        a.send(b"\x00\x01binary")
        assert a.recv_type("error")["code"] == "binary_not_supported"
        a.send("after")
        assert b.recv_type("message")["content"] == "after"
    finally:
        a.close()
        b.close()


def test_fragmented_text_message_is_one_message(server: Server) -> None:
    """A text message sent in fragments is relayed once, whole."""
    a = server.client()
    b = server.client()
    try:
        a.ws.send(iter(["frag", "ment", "ed"]))
        assert b.recv_type("message")["content"] == "fragmented"
    finally:
        a.close()
        b.close()


def test_user_left_once_on_close(server: Server) -> None:
    """A clean close announces user_left once, with the new total."""
    a = server.client()
    b = server.client()
    a.recv_type("user_joined")
    b.close()
    left = a.recv_type("user_left")
    assert left["connectionId"] == b.id
    assert left["totalUsers"] == server.stats()["connections"]["node"]
    a.send({"type": "ping"})
    assert a.recv()["type"] == "pong"  # no second user_left
    a.close()


def test_user_left_once_on_dropped_socket(server: Server) -> None:
    """A socket dropped without a close frame still yields exactly one user_left."""
    a = server.client()
    raw, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    raw_welcome = raw.recv_frame()
    raw_id = json.loads(raw_welcome[1])["connectionId"]
    assert a.recv_type("user_joined")["connectionId"] == raw_id
    raw.close()
    assert a.recv_type("user_left")["connectionId"] == raw_id
    a.roundtrip()
    a.close()


def test_message_too_big_closes_1009(server: Server) -> None:
    """A message over --max-message-size closes the connection with 1009."""
    a = server.client()
    b = server.client()
    try:
        with pytest.raises(ConnectionClosed) as info:
            a.ws.send("x" * 70000)
            while True:
                a.ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert b.recv_type("user_left")["connectionId"] == a.id
    finally:
        b.close()


def test_invalid_utf8_closes_1007_and_relays_nothing(server: Server) -> None:
    """Invalid UTF-8 in a text frame closes with 1007; nothing is delivered."""
    b = server.client()
    raw, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    raw.recv_frame()  # welcome
    raw.send_frame(0x1, b"ok \xff\xfe bad")
    code, _ = raw.recv_close()
    assert code == 1007
    left = b.recv_type("user_left", "message")
    assert left["type"] == "user_left"
    raw.close()
    b.close()


def test_server_survives_and_counts(server: Server) -> None:
    """Outcome counters move: INCOMING, VALIDATED, ROUTED and FAILED."""
    before = server.stats()["messages"]
    a = server.client()
    a.send({"type": "ping"})
    a.recv_type("pong")
    a.send({"type": "nope"})
    a.recv_type("error")
    a.close()
    after = server.stats()["messages"]
    assert after["INCOMING"] - before["INCOMING"] == 2
    assert after["VALIDATED"] - before["VALIDATED"] == 1
    assert after["ROUTED"] - before["ROUTED"] == 1
    assert after["FAILED"] - before["FAILED"] == 1
