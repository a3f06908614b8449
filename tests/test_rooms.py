"""Rooms on one node (decisions.md 12 and 19), over real sockets.

Each room is a hub of its own: counts, presence, routing and user_info are
the room's; the default room (``/websocket``) is what a seed client sees.
"""

from __future__ import annotations

import socket

import pytest
from websockets.exceptions import InvalidStatus

from .conftest import TIMEOUT, Client, Server

UPGRADE_HEADERS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def raw(server: Server, target: bytes, upgrade: bool) -> tuple[int, bytes, bytes]:
    """One raw request: (status, head, body)."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
    request += (UPGRADE_HEADERS if upgrade else b"") + b"\r\n"
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        # Until the server closes, or the head of a 101 (which stays open).
        while not answer.startswith(b"HTTP/1.1 101") or b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


def drain_presence(*clients: Client) -> None:
    for client in clients:
        client.roundtrip()


def test_rooms_keep_their_traffic_and_counts_apart(server: Server) -> None:
    """message, broadcast, user_joined and user_left reach the room's members
    only; counts are the room's; welcome and user_info_response name the room."""
    a = server.client("red")
    assert a.welcome["room"] == "red" and a.welcome["connectionCount"] == 1
    b = server.client("red")
    assert b.welcome["connectionCount"] == 2
    assert a.recv_type("user_joined")["totalUsers"] == 2
    seed = server.client()  # the default room
    assert seed.welcome["room"] == "" and seed.welcome["connectionCount"] == 1
    other = server.client("blue")
    assert other.welcome["connectionCount"] == 1
    a.send({"type": "message", "content": "red only"})
    got = b.recv_type("message")
    assert got["content"] == "red only" and got["connectionId"] == a.id
    other.send({"type": "broadcast", "content": "blue only"})
    assert other.recv_type("broadcast")["content"] == "blue only"
    a.send({"type": "user_info"})
    info = a.recv_type("user_info_response")
    assert info["room"] == "red" and info["connectionCount"] == 2
    seed.send({"type": "user_info"})
    info = seed.recv_type("user_info_response")
    assert info["room"] == "" and info["connectionCount"] == 1
    b.close()
    left = a.recv_type("user_left")
    assert left["connectionId"] == b.id and left["totalUsers"] == 1
    # Nothing of red or blue reached the seed client or crossed over: the
    # next frame each gets is the answer to its own ping.
    for client in (seed, other, a):
        client.send({"type": "ping"})
        assert client.recv()["type"] == "pong"
    for client in (a, seed, other):
        client.close()


def test_names_are_taken_as_they_are(server: Server) -> None:
    """Lobby and lobby are two rooms; a query string (but since, history and
    previous: test_recovery.py) is ignored; every character of the alphabet is
    allowed, up to 64 of them."""
    upper = server.client("Lobby")
    lower = server.client("lobby?other=ignored")
    assert lower.welcome["room"] == "lobby" and lower.welcome["connectionCount"] == 1
    upper.send({"type": "user_info"})
    assert upper.recv_type("user_info_response")["connectionCount"] == 1
    odd = server.client("A.z_0~-9" + "x" * 56)
    assert odd.welcome["room"] == "A.z_0~-9" + "x" * 56
    for client in (upper, lower, odd):
        client.close()


@pytest.mark.parametrize(
    "target",
    [
        b"/websocket/",
        b"/websocket/%41",
        b"/websocket/a%2Fb",
        b"/websocket/a/b",
        b"/websocket/" + b"x" * 65,
        b"/websocket/a+b",
        b"/websocket/a:b",
        b"/websocket/caf%C3%A9",
        b"/websocket//",
        b"/websocket/?x=1",
    ],
)
@pytest.mark.parametrize("upgrade", [True, False])
def test_a_bad_room_name_is_400_with_or_without_upgrade(
    server: Server, target: bytes, upgrade: bool
) -> None:
    before = server.metric("wshub_connections_refused_total", 'reason="bad_request"')
    status, head, body = raw(server, target, upgrade)
    assert status == 400, (target, head)
    assert b"text/plain" in head.lower() and 0 < len(body) < 200 and b"room" in body
    after = server.metric("wshub_connections_refused_total", 'reason="bad_request"')
    assert after == before + 1


def test_a_good_name_without_upgrade_headers_is_426(server: Server) -> None:
    status, head, _ = raw(server, b"/websocket/lobby", False)
    assert status == 426 and b"upgrade: websocket" in head.lower()
    status, _, _ = raw(server, b"/websocket/lobby?x=1", True)
    assert status == 101


def test_max_rooms_refuses_one_more_room_and_never_counts_the_default(make_server) -> None:
    """With --max-rooms 2, a third room is 503; the default room and rooms
    that exist still take members; an emptied room frees its place."""
    srv = make_server("--max-rooms", "2", "--ip-connect-rate", "0")
    a, b = srv.client("one"), srv.client("two")
    with pytest.raises(InvalidStatus) as info:
        srv.client("three")
    assert info.value.response.status_code == 503
    assert srv.metric("wshub_connections_refused_total", 'reason="rooms"') == 1
    seed, again = srv.client(), srv.client("one")  # the default room; a room that exists
    assert again.welcome["connectionCount"] == 2
    assert srv.stats()["rooms"] == 3
    b.close()
    srv.wait_for(lambda: srv.stats()["rooms"] == 2, "room two to empty")
    three = srv.client("three")
    assert three.welcome["connectionCount"] == 1
    for client in (a, seed, again, three):
        client.close()


def test_stats_and_metrics_report_rooms_without_room_labels(make_server) -> None:
    srv = make_server("--ip-connect-rate", "0")
    clients = [srv.client(f"room-{i}") for i in range(3)] + [srv.client()]
    stats = srv.stats()
    assert stats["rooms"] == 4
    assert stats["connections"]["open"] == stats["connections"]["node"] == 4
    assert {"connecting", "closing"} <= set(stats["connections"])
    assert srv.metric("wshub_rooms") == 4
    assert srv.metric("wshub_connections", 'state="open"') == 4
    _, _, body = srv.get("/metrics")
    assert b"room-" not in body  # no per-room label anywhere
    for client in clients:
        client.close()
    srv.wait_for(lambda: srv.stats()["rooms"] == 0, "every room to empty")
    assert srv.metric("wshub_rooms") == 0
