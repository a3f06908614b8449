"""History and recovery on one node (decisions.md 13 and 19), over real sockets.

Every ``message`` and ``broadcast`` carries the room's next ``offset``; the
``welcome`` names the room's ``epoch`` and last offset; ``?since=EPOCH:OFFSET``
replays what was missed (``replayed: true``) between the welcome and live
traffic, or says ``recovered: false``; ``?history=N`` replays the last N. The
same cases on Redis, across nodes: test_cluster_recovery.py.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from .conftest import TIMEOUT, Client, RedisServer, Server
from .waiting import wait_until

_rooms = itertools.count()
UPGRADE_HEADERS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")


def new_room() -> str:
    return f"rec{next(_rooms)}"


@pytest.fixture(scope="module")
def node() -> Iterator[Server]:
    from .conftest import start_server

    srv = start_server(*OPEN, "--history-size", "5")
    yield srv
    srv.stop()
    assert not [line for line in srv.stderr_lines if "Traceback" in line], "".join(srv.stderr_lines)


def read_relays(client: Client, count: int) -> list[dict]:
    return [client.recv_type("message", "broadcast") for _ in range(count)]


def join(server: Server, room: str, query: str) -> tuple[Client, list[dict]]:
    """Connect with *query*; the welcome, then the frames up to a pong (the
    replay comes straight after the welcome, before anything else)."""
    client = server.client(f"{room}?{query}" if query else room)
    client.send({"type": "ping"})
    frames = []
    while True:
        frame = client.recv()
        if frame["type"] == "pong":
            return client, frames
        if frame["type"] in ("message", "broadcast"):
            frames.append(frame)


def seeded_room(server: Server, count: int) -> tuple[str, Client, Client, str]:
    """A room with *count* messages from a sender; (room, sender, reader, epoch)."""
    room = new_room()
    reader = server.client(room)
    sender = server.client(room)
    reader.recv_type("user_joined")
    for i in range(1, count + 1):
        sender.send({"type": "message", "content": f"m{i}"})
    got = read_relays(reader, count)
    assert [frame["offset"] for frame in got] == list(range(1, count + 1))
    return room, sender, reader, reader.welcome["epoch"]


def test_offsets_and_welcome_fields(node: Server) -> None:
    """Each message and broadcast carries the next offset of its room; a
    welcome names the room's epoch and last offset; presence has none."""
    room = new_room()
    a = node.client(room)
    assert isinstance(a.welcome["epoch"], str) and a.welcome["offset"] == 0
    assert "recovered" not in a.welcome and "missed" not in a.welcome
    b = node.client(room)
    joined = a.recv_type("user_joined")
    assert "offset" not in joined
    a.send({"type": "message", "content": "one"})
    a.send({"type": "broadcast", "content": "two"})
    assert b.recv_type("message")["offset"] == 1
    assert b.recv_type("broadcast")["offset"] == 2
    assert a.recv_type("broadcast")["offset"] == 2
    c = node.client(room)
    assert c.welcome["offset"] == 2 and c.welcome["epoch"] == a.welcome["epoch"]
    other = node.client(new_room())
    assert other.welcome["offset"] == 0 and other.welcome["epoch"] != a.welcome["epoch"]


@pytest.mark.parametrize(
    ("since", "recovered", "missed"),
    [
        (0, True, [1, 2, 3, 4, 5]),  # from the start (all 5 still held)
        (2, True, [3, 4, 5]),  # the middle
        (5, True, []),  # the top
        (6, False, []),  # above the top
    ],
)
def test_recover(node: Server, since: int, recovered: bool, missed: list[int]) -> None:
    room, _, _, epoch = seeded_room(node, 5)
    client, frames = join(node, room, f"since={epoch}:{since}")
    assert client.welcome["recovered"] is recovered
    assert client.welcome["missed"] == len(missed)
    assert client.welcome["epoch"] == epoch and client.welcome["offset"] == 5
    assert [frame["offset"] for frame in frames] == missed
    assert all(frame["replayed"] is True for frame in frames)
    assert [frame["content"] for frame in frames] == [f"m{i}" for i in missed]


def test_past_the_window_and_wrong_epoch(node: Server) -> None:
    """--history-size 5 and 8 published: since=1 needs offset 2, gone."""
    room, _, _, epoch = seeded_room(node, 8)
    client, frames = join(node, room, f"since={epoch}:1")
    assert client.welcome["recovered"] is False and client.welcome["missed"] == 0
    assert frames == []
    client, frames = join(node, room, f"since={epoch}:3")  # 4..8 held
    assert client.welcome["recovered"] is True
    assert [frame["offset"] for frame in frames] == [4, 5, 6, 7, 8]
    client, frames = join(node, room, "since=notthisone:7")
    assert client.welcome["recovered"] is False and client.welcome["missed"] == 0
    assert client.welcome["epoch"] == epoch and frames == []


def test_previous_leaves_out_own_messages_keeps_own_broadcasts(node: Server) -> None:
    room = new_room()
    a = node.client(room)
    b = node.client(room)
    observer = node.client(room)
    epoch = a.welcome["epoch"]
    for who, kind, content in [
        (b, "message", "b1"),  # 1
        (a, "message", "a-own"),  # 2
        (a, "broadcast", "a-bcast"),  # 3
        (b, "broadcast", "b2"),  # 4
    ]:
        who.send({"type": kind, "content": content})
        # One at a time, seen by a third member: the offsets are in this order.
        assert observer.recv_type("message", "broadcast")["content"] == content
    _, frames = join(node, room, f"since={epoch}:0&previous={a.id}")
    assert [frame["content"] for frame in frames] == ["b1", "a-bcast", "b2"]
    assert [frame["offset"] for frame in frames] == [1, 3, 4]
    client, frames = join(node, room, f"since={epoch}:0")
    assert client.welcome["missed"] == 4
    assert [frame["offset"] for frame in frames] == [1, 2, 3, 4]


def test_history_n_replays_the_last_n(node: Server) -> None:
    room, _, _, epoch = seeded_room(node, 4)
    for query, offsets in [
        ("history=2", [3, 4]),
        ("history=0", []),
        ("history=99", [1, 2, 3, 4]),  # capped at what is held
        (f"history=2&since={epoch}:1", [2, 3, 4]),  # since wins
    ]:
        client, frames = join(node, room, query)
        assert [frame["offset"] for frame in frames] == offsets, query
        assert all(frame["replayed"] is True for frame in frames)
        assert ("recovered" in client.welcome) is ("since" in query)
        client.close()


def test_seam_while_another_client_keeps_sending(make_server: Callable[..., Server]) -> None:
    """Every offset exactly once, in order, across a reconnect under traffic
    (the window, 10000, holds all 3000 the sender may send)."""
    node = make_server(*OPEN, "--history-size", "10000")
    room = new_room()
    sender = node.client(room)
    watcher = node.client(room)
    sender.recv_type("user_joined")
    stop = threading.Event()
    joined = threading.Event()  # the traffic goes on only once `first` is in
    sent = [0]

    def keep_sending() -> None:
        while not stop.is_set() and sent[0] < 3000:
            if sent[0] == 20:
                joined.wait(TIMEOUT)
            sender.send({"type": "broadcast", "content": "x"})
            sent[0] += 1

    thread = threading.Thread(target=keep_sending)
    thread.start()
    try:
        wait_until(lambda: sent[0] >= 20, "some traffic before the drop")
        first = node.client(room)
        joined.set()
        seen: list[int] = []
        while len(seen) < 10:
            seen.append(first.recv_type("broadcast")["offset"])
        first.ws.close()
        # Traffic the dropped client misses: the watcher sees it published.
        while watcher.recv_type("broadcast")["offset"] < seen[-1] + 20:
            pass
        epoch = first.welcome["epoch"]
        again = node.client(f"{room}?since={epoch}:{seen[-1]}&previous={first.id}")
        assert again.welcome["recovered"] is True
        offsets: list[int] = []
        wait_until(lambda: sent[0] >= 200, "traffic after the reconnect")
    finally:
        stop.set()
        thread.join(TIMEOUT)
    total = sent[0]
    flags: list[bool] = []
    while not offsets or offsets[-1] < total:
        frame = again.recv_type("broadcast")
        offsets.append(frame["offset"])
        flags.append(frame.get("replayed", False))
    missed = again.welcome["missed"]
    assert missed >= 20
    assert offsets == list(range(seen[-1] + 1, total + 1))
    assert flags == [True] * missed + [False] * (len(offsets) - missed)
    watcher.close()


def test_ttl_expiry(make_server: Callable[..., Server]) -> None:
    srv = make_server(*OPEN, "--history-ttl", "0.3", "--sweep-interval", "0.1")
    room, _, _, epoch = seeded_room(srv, 3)

    def expired() -> bool:
        client, frames = join(srv, room, f"since={epoch}:0")
        client.close()
        return client.welcome["recovered"] is False and frames == []

    wait_until(expired, "the entries to pass --history-ttl")
    client, frames = join(srv, room, f"since={epoch}:3")  # the top still recovers
    assert client.welcome["recovered"] is True and client.welcome["missed"] == 0


def test_restart_is_a_new_epoch(make_server: Callable[..., Server]) -> None:
    srv = make_server(*OPEN)
    room, _, _, epoch = seeded_room(srv, 2)
    srv.stop()
    again = make_server(*OPEN)  # the node restarted: its memory history is new
    client, frames = join(again, room, f"since={epoch}:1")
    assert client.welcome["recovered"] is False and client.welcome["missed"] == 0
    assert client.welcome["epoch"] != epoch and frames == []


def raw_status(server: Server, target: str) -> tuple[int, bytes]:
    request = b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + UPGRADE_HEADERS + b"\r\n"
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize(
    "query",
    [
        "since=abc",
        "since=:5",
        "since=ep:-1",
        "since=ep:1.5",
        "since=e%20p:1",
        "history=-1",
        "history=ten",
        "previous=nobody",
        "history=1&history=2",
    ],
)
def test_bad_query_is_400_before_the_upgrade(node: Server, query: str) -> None:
    status, _ = raw_status(node, f"/websocket/{new_room()}?{query}")
    assert status == 400
    status, _ = raw_status(node, f"/websocket?{query}")
    assert status == 400


def test_good_query_on_the_default_room(node: Server) -> None:
    status, _ = raw_status(node, "/websocket?since=ep%3A0&history=3&other=x")
    assert status == 101


def assert_history_off(server: Server) -> None:
    room = new_room()
    a = server.client(room)
    assert "offset" not in a.welcome and "epoch" not in a.welcome
    b = server.client(room)
    a.recv_type("user_joined")
    a.send({"type": "message", "content": "m"})
    a.send({"type": "broadcast", "content": "b"})
    for frame in (b.recv_type("message"), b.recv_type("broadcast"), a.recv_type("broadcast")):
        assert "offset" not in frame
    client, frames = join(server, room, "since=anything:0")
    assert client.welcome["recovered"] is False and client.welcome["missed"] == 0
    assert "offset" not in client.welcome and "epoch" not in client.welcome and frames == []
    client, frames = join(server, room, "history=5")
    assert frames == [] and "offset" not in client.welcome
    assert raw_status(server, f"/websocket/{room}?since=bad")[0] == 400


def test_history_off(make_server: Callable[..., Server]) -> None:
    assert_history_off(make_server(*OPEN, "--history-size", "0"))


def test_cluster_node_with_history_off(
    make_server: Callable[..., Server], redis_server: RedisServer
) -> None:
    srv = make_server(*OPEN, "--redis-url", redis_server.url, "--history-size", "0")
    assert_history_off(srv)


def test_replay_is_valid_json_frames(node: Server) -> None:
    room, _, _, epoch = seeded_room(node, 1)
    client = node.client(f"{room}?since={epoch}:0")
    raw = client.ws.recv(timeout=TIMEOUT)
    assert json.loads(raw)["replayed"] is True
