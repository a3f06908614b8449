"""Recovery on one node, sentence by sentence of decisions.md 13 and 19, where
no socket test pinned them yet: the window's edge at every offset, a backend
``message`` whose ``exclude`` named the former connection, a member alone in
its room, refused frames, and relays that arrived in one read (kept as one run)
recovered from every position."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

import httpx
import pytest

from .conftest import TIMEOUT, Client, Server, start_server
from .rawws import RawClient, encode_frame

KEY = "k-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")


@pytest.fixture(scope="module")
def node() -> Iterator[Server]:
    srv = start_server(*OPEN, "--history-size", "5", "--api-keys", KEY)
    yield srv
    srv.stop()
    assert not [line for line in srv.stderr_lines if "Traceback" in line], "".join(srv.stderr_lines)


def replay_of(client: Client) -> list[dict]:
    """The frames between the welcome and the answer to a ping sent now."""
    client.send({"type": "ping"})
    frames = []
    while (frame := client.recv())["type"] != "pong":
        frames.append(frame)
    return frames


def test_the_window_edge_at_every_offset(node: Server) -> None:
    """--history-size 5, 8 published: 4..8 held. since 0..2 need an entry
    gone (recovered false, nothing replayed); 3 (not held itself) to 8 (the
    top) recover exactly what follows; 9 is above the top."""
    reader, sender = node.client("edge"), node.client("edge")
    reader.recv_type("user_joined")
    for i in range(1, 9):
        sender.send({"type": "broadcast", "content": f"b{i}"})
    live = [reader.recv_type("broadcast") for _ in range(8)]
    epoch = reader.welcome["epoch"]
    for since in range(10):
        client = node.client(f"edge?since={epoch}:{since}")
        frames = replay_of(client)
        client.close()
        recovered = 3 <= since <= 8
        want = [dict(frame, replayed=True) for frame in live[since:]] if recovered else []
        assert client.welcome["recovered"] is recovered, since
        assert (client.welcome["missed"], frames) == (len(want), want), since
        assert client.welcome["offset"] == 8


def test_a_backend_message_that_excluded_the_former_connection_is_not_replayed(
    node: Server,
) -> None:
    """19: "its own messages and any message whose exclude named it are left
    out of its replay"; a backend broadcast and a message excluding someone
    else are replayed; without previous everything is."""
    gone, other = node.client("excl"), node.client("excl")
    gone.recv_type("user_joined")
    epoch = gone.welcome["epoch"]
    with httpx.Client(base_url=node.http_url, timeout=TIMEOUT, headers=AUTH) as http:
        for body in (
            {"type": "message", "room": "excl", "content": "not for gone", "exclude": gone.id},
            {"type": "message", "room": "excl", "content": "not for other", "exclude": other.id},
            {"type": "broadcast", "room": "excl", "content": "for all", "exclude": gone.id},
        ):
            assert http.post("/api/publish", json=body).status_code == 200
    assert [gone.recv_type("message", "broadcast")["content"] for _ in range(2)] == [
        "not for other",
        "for all",
    ]
    gone.close()
    back = node.client(f"excl?since={epoch}:0&previous={gone.id}")
    assert [frame["content"] for frame in replay_of(back)] == ["not for other", "for all"]
    assert back.welcome["missed"] == 2
    fresh = node.client(f"excl?since={epoch}:0")
    assert [frame["offset"] for frame in replay_of(fresh)] == [1, 2, 3]
    for client in (other, back, fresh):
        client.close()


def test_alone_in_a_room_and_refused_frames(node: Server) -> None:
    """A member alone in its room: its messages reach no one but are accepted,
    so they take offsets and enter the history; refused frames (empty, too
    long, a lone surrogate) take none."""
    alone = node.client("alone")
    alone.send({"type": "message", "content": "one"})
    alone.send({"type": "message", "content": "   "})
    alone.send({"type": "message", "content": "x" * 1001})
    alone.send('{"type":"message","content":"\\ud800"}')
    alone.send("plain two")
    alone.send({"type": "broadcast", "content": "three"})
    frames = replay_of(alone)
    assert [frame.get("code") for frame in frames if frame["type"] == "error"] == [
        "empty_content",
        "content_too_long",
        "invalid_content",
    ]
    assert [frame["offset"] for frame in frames if frame["type"] == "broadcast"] == [3]
    late = node.client("alone?history=5")
    assert late.welcome["offset"] == 3
    assert [frame["content"] for frame in replay_of(late)] == ["one", "plain two", "three"]
    for client in (alone, late):
        client.close()


@pytest.mark.parametrize("bound", [(), ("--history-memory", "9000", "--history-size", "50")])
def test_relays_read_in_one_go_recover_from_every_position(
    make_server: Callable[..., Server], bound: tuple[str, ...]
) -> None:
    """Bursts of up to 40 relays (message, broadcast, plain text) written in
    one TCP write are kept as runs; cut by the size cap or by a small memory
    bound, a recovery from any position still replays exactly the frames as
    first sent, less the former connection's own messages, and history=N the
    last N held."""
    srv = make_server(*OPEN, *(bound or ("--history-size", "10")))
    rnd = random.Random(7)
    watcher = srv.client("runs")
    raw, status, _ = RawClient.open(srv.host, srv.port, path="/websocket/runs")
    assert status == 101
    sender = json.loads(raw.recv_frame()[1])["connectionId"]
    watcher.recv_type("user_joined")
    live: list[dict] = []
    for burst in range(6):
        count = rnd.randint(2, 40)
        data = b""
        for i in range(count):
            content = f"{burst}-{i}" + "x" * rnd.randint(0, 200)
            kind = rnd.choice(["message", "broadcast", "plain"])
            text = content if kind == "plain" else json.dumps({"type": kind, "content": content})
            data += encode_frame(0x1, text.encode())
        raw.send(data)
        live += [watcher.recv_type("message", "broadcast") for _ in range(count)]
    top = live[-1]["offset"]
    assert [frame["offset"] for frame in live] == list(range(1, top + 1))
    epoch = watcher.welcome["epoch"]
    recovered = 0
    for since in range(top + 1):
        client = srv.client(f"runs?since={epoch}:{since}&previous={sender}")
        frames = replay_of(client)
        client.close()
        if not client.welcome["recovered"]:
            assert frames == [] and client.welcome["missed"] == 0
            continue
        recovered += 1
        want = [
            dict(frame, replayed=True)
            for frame in live[since:]
            if not (frame["type"] == "message" and frame["connectionId"] == sender)
        ]
        assert (client.welcome["missed"], frames) == (len(want), want), since
    held = recovered - 1  # since=top recovers with none held
    assert held >= 5
    for count in (1, 3, held, 1000):
        client = srv.client(f"runs?history={count}")
        frames = replay_of(client)
        client.close()
        assert frames == [dict(frame, replayed=True) for frame in live[-min(count, held) :]]
    raw.close()
    watcher.close()
