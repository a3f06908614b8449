"""One node or a cluster: every client sees the same (decisions.md 3-6, 12-14, 19).

Each scenario of the table below runs twice: on "a hub" of one ``wshub serve``
and on a hub of two ``wshub serve`` nodes sharing one real redis-server, its
clients alternating between the two nodes (client 0 on node 0, client 1 on
node 1, ...). A scenario writes what each client sees into a transcript,
with what differs by nature taken out (connection ids become the clients'
names, timestamps a checked placeholder, epochs a name per distinct epoch,
an API listing's ``node`` a placeholder). The test asserts the two
transcripts are equal: the same frames, fields, counts and order. The
scenarios assert the decisions as well, so that two hubs wrong the same way
fail too.

Clients wait for events (``recv`` with a bound, ``wait_until``), never for a
fixed time. Between steps a scenario waits until every member has seen a
join or a departure, as any sane client of a cluster would, so that the
order of events across nodes is the one the scenario made.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import TIMEOUT, Client, RedisServer, Server, start_server
from .rawws import RawClient
from .test_auth_server import AUTH, NO_LIMITS, bearer, token
from .test_cluster import STEADY_LEASE
from .waiting import wait_until

KEY = "k-parity-0123456789"
HISTORY = 5
USER_LIMIT = 2
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_names = itertools.count()


@dataclass
class Hub:
    """One or two nodes seen as one hub; a scenario's clients by name."""

    kind: str
    nodes: list[Server]
    clients: dict[str, Client] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # connection id -> name
    epochs: dict[str, str] = field(default_factory=dict)  # epoch -> its placeholder
    transcript: list[Any] = field(default_factory=list)
    joined: int = 0
    prefix: str = ""
    rooms: int = 0

    def room(self) -> str:
        """A fresh room name, the same on both hubs for one scenario."""
        self.rooms += 1
        return f"{self.prefix}-{self.rooms}"

    def node(self, i: int) -> Server:
        return self.nodes[i % len(self.nodes)]

    def reset(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        self.names.clear()
        self.epochs.clear()
        self.transcript = []
        self.joined = 0
        self.rooms = 0

    # -- what a client sees, made comparable -----------------------------------------

    def normal(self, value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self.normal(v, k) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [self.normal(v) for v in value]
        if isinstance(value, str) and value.startswith("ws-"):
            return self.names.get(value, "?unknown")
        if key in ("timestamp", "expiresAt") and isinstance(value, str):
            assert ISO.match(value), value
            return "<iso>"
        if key == "timestamp" and isinstance(value, int):
            return "<ms>"
        if key == "epoch" and isinstance(value, str):
            return self.epochs.setdefault(value, f"E{len(self.epochs)}")
        if key == "node":
            assert isinstance(value, str) and value, value
            return "<node>"
        return value

    def note(self, who: str, frame: Any) -> Any:
        normal = self.normal(frame)
        self.transcript.append((who, normal))
        return normal

    # -- clients -------------------------------------------------------------------------

    def join(self, name: str, room: str, query: str = "", **kwargs: object) -> dict:
        """Client *name* opens a connection to *room* on the next node; every
        member there before hears its ``user_joined`` (checked, noted).
        Answers the normalised welcome."""
        members = [other for other in self.clients.values() if other.welcome["room"] == room]
        srv = self.node(self.joined)
        self.joined += 1
        path = room + (f"?{query}" if query else "")
        client = srv.client(path or None, **kwargs)  # "": /websocket, the default room
        self.names[client.id] = name
        self.clients[name] = client
        welcome = self.note(name, client.welcome)
        for other_name, other in self.clients.items():
            if other in members:
                joined = self.recv(other_name, "user_joined")
                assert joined["connectionId"] == name, joined
        return welcome

    def leave(self, name: str) -> None:
        """Client *name* closes; every other member of its room hears ``user_left``."""
        client = self.clients.pop(name)
        room = client.welcome["room"]
        client.close()
        for other_name, other in self.clients.items():
            if other.welcome["room"] == room:
                left = self.recv(other_name, "user_left")
                assert left["connectionId"] == name, left

    def send(self, name: str, frame: dict | str | bytes) -> None:
        self.clients[name].send(frame)

    def recv(self, name: str, *types: str) -> dict:
        """The next frame of client *name* but the server's heartbeat ``ping``,
        noted; it must be one of *types* when given."""
        while True:
            frame = self.clients[name].recv()
            if frame["type"] != "ping":
                break
        normal = self.note(name, frame)
        assert not types or frame["type"] in types, (name, frame)
        return normal

    def quiet(self, *names: str) -> None:
        """Nothing more reached *names* (all clients by default) before a pong
        to a ping sent now: the scenario accounted for every frame."""
        for name in names or list(self.clients):
            self.send(name, {"type": "ping"})
            assert self.recv(name)["type"] == "pong"
        self.transcript = [e for e in self.transcript if not is_pong(e)]

    # -- the backend API, through any node ------------------------------------------

    def api(self, i: int, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        response = httpx.request(
            method,
            self.node(i).http_url + path,
            headers={"Authorization": f"Bearer {KEY}"},
            json=body,
            timeout=TIMEOUT * 2,
        )
        answer = self.normal(response.json())
        self.transcript.append(("api", method, path, response.status_code, answer))
        return response.status_code, answer


def hub_args(*extra: str) -> list[str]:
    return [
        *NO_LIMITS,
        "--api-keys",
        KEY,
        "--history-size",
        str(HISTORY),
        "--auth",
        "optional",
        *AUTH,
        "--max-connections-per-user",
        str(USER_LIMIT),
        *extra,
    ]


def start_hub(kind: str, redis: RedisServer, *extra: str) -> Hub:
    args = hub_args(*extra)
    if kind == "one":
        return Hub(kind, [start_server(*args)])
    cluster = ["--redis-url", redis.url, "--cluster-name", f"parity{next(_names)}"]
    cluster += STEADY_LEASE  # the hubs live for the whole module: no false reap
    return Hub(kind, [start_server(*args, *cluster) for _ in range(2)])


def stop_hub(hub: Hub) -> None:
    hub.reset()
    for srv in hub.nodes:
        srv.stop()
    lines = [line for srv in hub.nodes for line in srv.stderr_lines]
    assert not [line for line in lines if "Traceback" in line], "".join(lines)


LIMITED = (
    *("--history-size", "0", "--max-rooms", "2"),
    *("--message-rate", "0.2", "--message-burst", "3"),
    *("--rate-limit-refusals", "2", "--rate-limit-window", "60"),
)
"""The other hub: history off, two rooms a node, a tight rate limit."""


@pytest.fixture(scope="module")
def hubs(redis_server: RedisServer) -> Iterator[dict[str, dict[str, Hub]]]:
    made = {
        "default": {kind: start_hub(kind, redis_server) for kind in ("one", "two")},
        "limited": {kind: start_hub(kind, redis_server, *LIMITED) for kind in ("one", "two")},
    }
    yield made
    for pair in made.values():
        for hub in pair.values():
            stop_hub(hub)


# -- The scenarios ------------------------------------------------------------------------
# Each takes a fresh hub (no client yet) and leaves its transcript in hub.transcript.


def presence_and_counts(hub: Hub) -> None:
    """3 and 12: welcome fields, user_joined/user_left with cluster-wide counts,
    user_info_response with the room."""
    r = hub.room()
    welcome = hub.join("a", r)
    assert welcome == {
        "type": "welcome",
        "connectionId": "a",
        "timestamp": "<iso>",
        "connectionCount": 1,
        "room": r,
        "epoch": "E0",
        "offset": 0,
    }
    assert hub.join("b", r)["connectionCount"] == 2
    assert hub.join("c", r)["connectionCount"] == 3
    for name in ("a", "b", "c"):
        hub.send(name, {"type": "user_info"})
        info = hub.recv(name, "user_info_response")
        assert info["connectionCount"] == 3 and info["room"] == r, info
        assert info["connectionId"] == name
    hub.leave("b")
    hub.send("c", {"type": "user_info"})
    assert hub.recv("c", "user_info_response")["connectionCount"] == 2
    joined = [f for who, f in hub.transcript if f["type"] == "user_joined"]
    assert [f["totalUsers"] for f in joined] == [2, 3, 3]
    left = [f for who, f in hub.transcript if f["type"] == "user_left"]
    assert [f["totalUsers"] for f in left] == [2, 2]
    hub.quiet()


def message_and_broadcast(hub: Hub) -> None:
    """3, 4, 13: message to all but its sender, broadcast to all with the sender,
    plain text is a message; offsets grow by one per room, the same for every
    recipient."""
    r = hub.room()
    for name in ("a", "b", "c"):
        hub.join(name, r)
    hub.send("a", {"type": "message", "content": "one"})
    for name in ("b", "c"):
        got = hub.recv(name, "message")
        assert got["content"] == "one" and got["connectionId"] == "a" and got["offset"] == 1
    hub.send("b", {"type": "broadcast", "content": "two"})
    for name in ("a", "b", "c"):
        got = hub.recv(name, "broadcast")
        assert got["content"] == "two" and got["connectionId"] == "b" and got["offset"] == 2
    hub.send("c", "plain [1, 2")  # not JSON: plain text, a message
    hub.send("c", '"a json string"')  # JSON but not an object: plain text too
    for name in ("a", "b"):
        first, second = hub.recv(name, "message"), hub.recv(name, "message")
        assert (first["content"], first["offset"]) == ("plain [1, 2", 3)
        assert (second["content"], second["offset"]) == ('"a json string"', 4)
    hub.send("a", {"type": "message", "content": "x", "extra": [1]})  # extra fields ignored
    for name in ("b", "c"):
        assert "extra" not in hub.recv(name, "message")
    hub.quiet()


def one_order_from_two_senders(hub: Hub) -> None:
    """13: two senders on two nodes at once, every member sees one order."""
    r = hub.room()
    for name in ("a", "b", "c", "d"):
        hub.join(name, r)
    for i in range(10):
        hub.send("a", {"type": "broadcast", "content": f"a{i}"})
        hub.send("b", {"type": "broadcast", "content": f"b{i}"})
    seen: dict[str, list[tuple[int, str]]] = {}
    for name in ("a", "b", "c", "d"):
        frames = [hub.clients[name].recv() for _ in range(20)]
        assert all(f["type"] == "broadcast" for f in frames), frames
        seen[name] = [(f["offset"], f["content"]) for f in frames]
    first = seen["a"]
    assert [offset for offset, _ in first] == list(range(1, 21))
    assert all(order == first for order in seen.values()), seen
    for sender in "ab":  # one sender's order kept
        assert [c for _, c in first if c[0] == sender] == [f"{sender}{i}" for i in range(10)]
    # The interleaving of the two senders may differ run to run: the
    # transcript keeps what must not.
    hub.transcript.append(("order", sorted(c for _, c in first), [o for o, _ in first]))
    hub.quiet()


def history_replay(hub: Hub) -> None:
    """13, 19: ?history=N after the welcome, capped at the history size, on a node
    that may not be the sender's."""
    r = hub.room()
    hub.join("a", r)
    for i in range(1, 8):
        hub.send("a", {"type": "broadcast", "content": f"m{i}"})
        assert hub.recv("a", "broadcast")["offset"] == i
    welcome = hub.join("b", r, "history=3")
    assert welcome["offset"] == 7 and "recovered" not in welcome
    got = [hub.recv("b", "broadcast") for _ in range(3)]
    assert [(f["content"], f["offset"], f.get("replayed")) for f in got] == [
        ("m5", 5, True),
        ("m6", 6, True),
        ("m7", 7, True),
    ]
    hub.join("c", r, "history=50")  # capped at HISTORY
    got = [hub.recv("c", "broadcast") for _ in range(HISTORY)]
    assert [f["offset"] for f in got] == list(range(8 - HISTORY, 8))
    hub.join("d", r, "history=0")
    hub.quiet()


def recovery_elsewhere(hub: Hub) -> None:
    """13, 19: ?since=EPOCH:OFFSET&previous=ID on another node than the one left:
    exactly what the former connection would have been sent, then live."""
    r = hub.room()
    hub.join("a", r)  # node 0
    hub.join("b", r)  # node 1: the one that leaves
    hub.send("b", {"type": "message", "content": "b1"})
    hub.recv("a", "message")
    left = hub.clients["b"]
    epoch, offset, old = left.welcome["epoch"], 1, left.id
    hub.leave("b")
    hub.send("a", {"type": "message", "content": "while away 1"})
    hub.send("a", {"type": "broadcast", "content": "while away 2"})
    hub.recv("a", "broadcast")
    hub.joined = 2  # b comes back on node 0: another node than the one it left, when two
    welcome = hub.join("b2", r, f"since={epoch}:0&previous={old}")
    assert (welcome["recovered"], welcome["missed"]) == (True, 2), welcome
    got = [hub.recv("b2", "message", "broadcast") for _ in range(2)]
    assert [(f["content"], f["offset"], f["replayed"]) for f in got] == [
        ("while away 1", 2, True),
        ("while away 2", 3, True),
    ]
    hub.send("a", {"type": "message", "content": "live"})
    live = hub.recv("b2", "message")
    assert live["offset"] == 4 and "replayed" not in live
    # A wrong epoch or an offset past the history: recovered false, nothing replayed.
    assert hub.join("c", r, "since=nope:1")["recovered"] is False
    assert hub.join("d", r, f"since={epoch}:{offset + 100}")["recovered"] is False
    hub.quiet()


def rooms_apart(hub: Hub) -> None:
    """12: rooms are hubs of their own; the default room is the empty name."""
    r1, r2 = hub.room(), hub.room()
    hub.join("a", r1)
    hub.join("b", r2)
    hub.join("c", r1)
    hub.join("d", "")
    assert hub.clients["d"].welcome["room"] == ""
    hub.send("a", {"type": "broadcast", "content": "r1 only"})
    for name in ("a", "c"):
        got = hub.recv(name, "broadcast")
        assert got["offset"] == 1
    hub.send("b", {"type": "message", "content": "r2 alone"})  # nobody else in r2
    hub.send("b", {"type": "broadcast", "content": "r2 to itself"})
    got = hub.recv("b", "broadcast")
    assert got["offset"] == 2  # the message counted too
    hub.send("b", {"type": "user_info"})
    assert hub.recv("b", "user_info_response")["connectionCount"] == 1
    hub.quiet()


def bad_frames(hub: Hub) -> None:
    """3, 4, 5: every refused frame gets its error code; nothing reaches the
    other member; the connection stays open."""
    r = hub.room()
    hub.join("a", r)
    hub.join("b", r)
    refused = [
        ({"type": "message", "content": "   "}, "empty_content"),
        ({"type": "message", "content": "x" * 1001}, "content_too_long"),
        ({"type": "broadcast", "content": 5}, "invalid_content"),
        ('{"type":"message","content":"\\ud800"}', "invalid_content"),
        ({"content": "no type"}, "missing_type"),
        ({"type": 7}, "missing_type"),
        ({"type": "nope"}, "unknown_type"),
        ({"type": "welcome"}, "unknown_type"),
        (b"\x01\x02", "binary_not_supported"),
    ]
    for frame, code in refused:
        hub.send("b", frame)
        error = hub.recv("b", "error")
        assert error["code"] == code and isinstance(error["message"], str), (frame, error)
    hub.send("b", {"type": "pong"})  # a sign of life, silently taken
    hub.send("b", {"type": "message", "content": "é" * 1000})  # 1000 code points pass
    assert hub.recv("a", "message")["offset"] == 1
    hub.quiet()


def close_codes(hub: Hub) -> None:
    """5: a frame past 64 KiB closes with 1009, invalid UTF-8 with 1007; the
    other member hears user_left once."""
    r = hub.room()
    hub.join("a", r)
    hub.join("b", r)
    hub.join("c", r)
    big = hub.clients["b"]
    big.ws.send("x" * (64 * 1024 + 1))
    with pytest.raises(ConnectionClosed) as closed:
        big.ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    hub.transcript.append(("closed", "b", closed.value.rcvd.code))
    assert closed.value.rcvd.code == 1009
    hub.clients.pop("b")
    for name in ("a", "c"):
        assert hub.recv(name, "user_left")["connectionId"] == "b"
    hub.quiet()


def api_publish_rooms_disconnect(hub: Hub) -> None:
    """14, 19: publish through either node, listings cluster-wide, disconnect
    a connection on the other node."""
    r = hub.room()
    hub.join("a", r)
    hub.join("b", r)
    hub.join("c", r, **bearer(token("carol")))
    status, answer = hub.api(1, "POST", "/api/publish", {"room": r, "content": "from api"})
    assert status == 200 and answer == {"room": r, "offset": 1, "epoch": "E0"}, answer
    for name in ("a", "b", "c"):
        got = hub.recv(name, "broadcast")
        assert got["connectionId"] == "server" and got["offset"] == 1
    body = {"type": "message", "room": r, "content": "m", "exclude": hub.clients["b"].id}
    body["connectionId"] = "backend-1"
    assert hub.api(0, "POST", "/api/publish", body)[0] == 200
    for name in ("a", "c"):
        assert hub.recv(name, "message")["connectionId"] == "backend-1"
    for i in range(2):
        status, detail = hub.api(i, "GET", f"/api/rooms/{r}")
        assert status == 200 and detail["connectionCount"] == 3, detail
        ids = sorted(c["connectionId"] for c in detail["connections"])
        assert ids == ["a", "b", "c"], detail
        users = [c.get("userId") for c in detail["connections"] if c["connectionId"] == "c"]
        assert users == ["carol"], detail
        status, listing = hub.api(i, "GET", "/api/rooms")
        mine = [entry for entry in listing["rooms"] if entry["room"] == r]
        assert mine == [{"room": r, "connectionCount": 3}], listing
    hub.transcript = [  # the sorting of the listings' entries is not the protocol's
        entry if entry[0] != "api" else (*entry[:4], sort_lists(entry[4]))
        for entry in hub.transcript
    ]
    hub.transcript = [e for e in hub.transcript if e[:3] != ("api", "GET", "/api/rooms")]
    target = hub.clients["b"]  # on node 1 when two
    status, answer = hub.api(0, "POST", "/api/disconnect", {"connectionId": target.id})
    assert status == 200, answer
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            target.ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    hub.transcript.append(("closed", "b", closed.value.rcvd.code))
    assert closed.value.rcvd.code == 4000
    hub.clients.pop("b")
    for name in ("a", "c"):
        assert hub.recv(name, "user_left")["connectionId"] == "b"
    status, _ = hub.api(1, "POST", "/api/disconnect", {"connectionId": target.id})
    assert status == 404
    status, _ = hub.api(1, "POST", "/api/disconnect", {"userId": "carol", "code": 4100})
    assert status == 200
    carol = hub.clients.pop("c")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            carol.ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4100
    assert hub.recv("a", "user_left")["connectionId"] == "c"
    status, detail = hub.api(1, "GET", f"/api/rooms/{hub.room()}")  # no members: 200, 0
    assert status == 200 and detail["connectionCount"] == 0
    hub.quiet()


def users_limited_across_nodes(hub: Hub) -> None:
    """15: --max-connections-per-user counted across the cluster: one more
    gets error too_many_connections and 4429, never a welcome, on either node."""
    r = hub.room()
    hub.join("watch", r)
    hub.join("u1", r, **bearer(token("dave")))
    hub.join("u2", r, **bearer(token("dave")))
    for i in range(2):
        ws = hub.node(i).connect(r, **bearer(token("dave")))
        error = json.loads(ws.recv(timeout=TIMEOUT))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None
        hub.transcript.append(("refused", i, error["type"], error["code"], closed.value.rcvd.code))
        assert (error["code"], closed.value.rcvd.code) == ("too_many_connections", 4429)
    hub.leave("u1")
    wait_until(lambda: admitted(hub.node(0), r), "dave's slot back on either node")
    hub.recv("watch", "user_joined")
    hub.recv("u2", "user_joined")
    hub.recv("watch", "user_left")
    hub.recv("u2", "user_left")
    hub.quiet()


def bad_queries(hub: Hub) -> None:
    """13, 19: bad since/history/previous and bad room names: 400 before the upgrade."""
    for path in (
        "p?since=abc",
        "p?since=e:-1",
        "p?history=-1",
        "p?history=x",
        "p?previous=nope",
        "bad%20name",
        "x" * 65,
    ):
        with pytest.raises(InvalidStatus) as refused:
            hub.node(0).connect(path)
        hub.transcript.append(("status", path, refused.value.response.status_code))
        assert refused.value.response.status_code == 400, path


def is_pong(entry: Any) -> bool:
    return len(entry) == 2 and isinstance(entry[1], dict) and entry[1].get("type") == "pong"


def sort_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: sort_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((sort_lists(v) for v in value), key=json.dumps)
    return value


def admitted(srv: Server, r: str) -> bool:
    ws = srv.connect(r, **bearer(token("dave")))
    first = json.loads(ws.recv(timeout=TIMEOUT))
    if first["type"] == "welcome":
        ws.close()
        return True
    ws.close()
    return False


def invalid_utf8_closes_1007(hub: Hub) -> None:
    """5: invalid UTF-8 in a text frame closes with 1007; user_left once."""
    r = hub.room()
    hub.join("a", r)
    hub.join("b", r)
    srv = hub.node(hub.joined)
    hub.joined += 1
    raw, status, _ = RawClient.open(srv.host, srv.port, path=f"/websocket/{r}")
    try:
        assert status == 101
        opcode, payload, _ = raw.recv_frame()
        welcome = json.loads(payload)
        hub.names[welcome["connectionId"]] = "raw"
        hub.note("raw", welcome)
        for name in ("a", "b"):
            assert hub.recv(name, "user_joined")["connectionId"] == "raw"
        raw.send_text(b'{"type":"message","content":"\xff\xfe"}')
        code, _ = raw.recv_close()
        hub.transcript.append(("closed", "raw", code))
        assert code == 1007
    finally:
        raw.close()
    for name in ("a", "b"):
        assert hub.recv(name, "user_left")["connectionId"] == "raw"
    hub.quiet()


def history_of_a_room_without_members(hub: Hub) -> None:
    """14, 19, 13: an API publication into a room without members is 200 and
    enters its history; a message whose exclude named a connection is left
    out of that connection's recovery, through the other node."""
    r = hub.room()
    status, answer = hub.api(0, "POST", "/api/publish", {"room": r, "content": "early"})
    assert status == 200 and answer["offset"] == 1
    welcome = hub.join("a", r, "history=5")  # node 0
    assert welcome["offset"] == 1
    assert hub.recv("a", "broadcast")["content"] == "early"
    hub.join("b", r)  # node 1
    old = hub.clients["b"]
    hub.leave("b")
    body = {"type": "message", "room": r, "content": "not for b", "exclude": old.id}
    assert hub.api(1, "POST", "/api/publish", body)[0] == 200
    hub.recv("a", "message")
    assert hub.api(0, "POST", "/api/publish", {"room": r, "content": "for all"})[0] == 200
    hub.recv("a", "broadcast")
    hub.joined = 2  # back on node 0, another node than the one it left
    epoch = old.welcome["epoch"]
    welcome = hub.join("b2", r, f"since={epoch}:1&previous={old.id}")
    assert (welcome["recovered"], welcome["missed"]) == (True, 1), welcome
    assert hub.recv("b2", "broadcast")["content"] == "for all"
    top = hub.join("c", r, f"since={epoch}:3")  # the top itself: recovered, nothing missed
    assert (top["recovered"], top["missed"]) == (True, 0), top
    hub.quiet()


def tokens_expire_refresh_and_rooms(hub: Hub) -> None:
    """15, 19: a userId on every frame a user sends; refresh; exp closes 4401;
    a room outside the token's rooms closes 4403 after one error."""
    r = hub.room()
    hub.join("a", r)
    hub.join("e", r, **bearer(token("erin", ttl=2)))
    assert hub.clients["e"].welcome["userId"] == "erin"
    hub.send("e", {"type": "broadcast", "content": "hi"})
    for name in ("a", "e"):
        assert hub.recv(name, "broadcast")["userId"] == "erin"
    hub.send("e", {"type": "refresh", "token": token("mallory")})  # another sub
    assert hub.recv("e", "error")["code"] == "unauthorized"
    hub.send("e", {"type": "refresh", "token": "garbage"})
    assert hub.recv("e", "error")["code"] == "unauthorized"
    ws = hub.node(1).connect(r, **bearer(token("fay", rooms=["elsewhere"])))
    error = json.loads(ws.recv(timeout=TIMEOUT))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    hub.transcript.append(("refused", error["code"], closed.value.rcvd.code))
    assert (error["code"], closed.value.rcvd.code) == ("forbidden_room", 4403)
    erin = hub.clients.pop("e")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            hub.transcript.append(("e", hub.normal(json.loads(erin.ws.recv(timeout=TIMEOUT)))))
    assert closed.value.rcvd is not None
    hub.transcript.append(("closed", "e", closed.value.rcvd.code, closed.value.rcvd.reason))
    assert closed.value.rcvd.code == 4401
    left = hub.recv("a", "user_left")
    assert left["connectionId"] == "e" and left["userId"] == "erin", left
    hub.quiet()


def default_room_through_the_api(hub: Hub) -> None:
    """12, 14, 19: the default room is the empty name; a publication without
    a room goes there; its detail is GET /api/rooms/."""
    hub.join("a", "")
    hub.join("b", "")
    status, answer = hub.api(1, "POST", "/api/publish", {"content": "to the lobby"})
    assert status == 200 and answer["room"] == "", answer
    for name in ("a", "b"):
        assert hub.recv(name, "broadcast")["content"] == "to the lobby"
    status, detail = hub.api(0, "GET", "/api/rooms/")
    assert status == 200 and detail["room"] == "" and detail["connectionCount"] == 2
    hub.transcript[-1] = (*hub.transcript[-1][:4], sort_lists(hub.transcript[-1][4]))
    for body, code in (
        ({"content": ""}, "empty_content"),
        ({"content": "x" * 1001}, "content_too_long"),
        ({"room": "p", "type": "broadcast"}, "invalid_content"),
        ({"content": "x", "connectionId": "ws-1-abc"}, "invalid_sender"),
        ({"content": "x", "room": "bad name"}, None),
        ({"content": "x", "type": "shout"}, None),
    ):
        status, answer = hub.api(1, "POST", "/api/publish", body)
        assert status == 400, (body, answer)
        assert code is None or answer["error"]["code"] == code, (body, answer)
    hub.quiet()


def disconnect_a_user_on_both_nodes(hub: Hub) -> None:
    """14: POST /api/disconnect {"userId"} closes the user's connections on
    every node with the code and reason asked; user_left once for each."""
    r = hub.room()
    hub.join("w", r)  # node 0
    hub.join("g1", r, **bearer(token("gina")))  # node 1
    hub.join("g2", r, **bearer(token("gina")))  # node 0
    body = {"userId": "gina", "code": 4321, "reason": "bye gina"}
    status, answer = hub.api(1, "POST", "/api/disconnect", body)
    assert status == 200, answer
    hub.transcript[-1] = (*hub.transcript[-1][:4], sort_lists(hub.transcript[-1][4]))
    for name in ("g1", "g2"):
        gone = hub.clients.pop(name)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                gone.ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None
        hub.transcript.append(("closed", name, closed.value.rcvd.code, closed.value.rcvd.reason))
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4321, "bye gina")
    left = [hub.clients["w"].recv() for _ in range(2)]
    assert all(frame["type"] == "user_left" for frame in left), left
    # The two nodes close theirs at once: which goes first is not the protocol's,
    # the count the watcher is left with is.
    ids = sorted(hub.normal(f)["connectionId"] for f in left)
    hub.transcript.append(("w", "user_left", ids, left[-1]["totalUsers"]))
    assert ids == ["g1", "g2"] and all(f.get("userId") == "gina" for f in left), left
    assert left[-1]["totalUsers"] == 1, left
    hub.quiet()


def limited_rooms_and_history_off(hub: Hub) -> None:
    """12, 19 with --max-rooms 2 and --history-size 0: a third room on a node
    is 503; no offsets, no epoch; since answers recovered false, missed 0."""
    rooms = [hub.room() for _ in range(3)]
    welcome = hub.join("a", rooms[0])  # node 0
    assert "epoch" not in welcome and "offset" not in welcome, welcome
    hub.join("b", rooms[0])  # node 1
    hub.join("c", rooms[1])  # node 0
    hub.join("d", rooms[1])  # node 1
    for _ in range(2):  # node 0, then node 1 (one node: the same one twice)
        with pytest.raises(InvalidStatus) as refused:
            hub.node(hub.joined).connect(rooms[2])
        hub.joined += 1
        hub.transcript.append(("status", refused.value.response.status_code))
        assert refused.value.response.status_code == 503
    hub.join("e", "")  # the default room never counts
    hub.send("a", {"type": "broadcast", "content": "x"})
    for name in ("a", "b"):
        assert "offset" not in hub.recv(name, "broadcast")
    since = hub.join("f", rooms[0], "since=abc:3")
    assert (since["recovered"], since["missed"]) == (False, 0), since
    hub.quiet()


def rate_limited_then_1008(hub: Hub) -> None:
    """8: past the burst, frames are refused with rate_limited and dropped;
    past the refusals, 1008."""
    r = hub.room()
    hub.join("a", r)
    hub.join("b", r)
    for i in range(3):
        hub.send("b", {"type": "message", "content": f"m{i}"})
    for i in range(3):
        assert hub.recv("a", "message")["content"] == f"m{i}"
    hub.send("b", {"type": "message", "content": "over"})
    assert hub.recv("b", "error")["code"] == "rate_limited"
    flooder = hub.clients.pop("b")
    flooder.send({"type": "message", "content": "over again"})
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            hub.transcript.append(("b", hub.normal(json.loads(flooder.ws.recv(timeout=TIMEOUT)))))
    assert closed.value.rcvd is not None
    hub.transcript.append(("closed", "b", closed.value.rcvd.code))
    assert closed.value.rcvd.code == 1008
    assert hub.recv("a", "user_left")["connectionId"] == "b"
    hub.quiet()


def presence_in_order_with_messages(hub: Hub) -> None:
    """3, 9: a client that joins and sends at once is announced before its
    message; one that sends and closes at once, after it: on one node the
    order is the node's, a cluster must keep it across nodes, also while
    other rooms' comings and goings keep the node's presence updates busy."""
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            sockets = [hub.node(1).connect(f"{hub.prefix}-churn{n % 20}") for _ in range(5)]
            for ws in sockets:
                ws.close()
            n += 1

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for thread in churners:
        thread.start()
    try:
        for _ in range(20):
            r = hub.room()
            hub.join("a", r)  # node 0, node 1, node 0...: quick's node every other time
            ws = hub.node(1).connect(r)  # node 1 when two
            ws.send(json.dumps({"type": "message", "content": "hello"}))
            ws.send(json.dumps({"type": "message", "content": "bye"}))
            welcome = json.loads(ws.recv(timeout=TIMEOUT))
            hub.names[welcome["connectionId"]] = "quick"
            ws.close()
            seen = [hub.recv("a", "user_joined", "message", "user_left")["type"] for _ in range(4)]
            assert seen == ["user_joined", "message", "message", "user_left"], (
                hub.kind,
                hub.rooms,
                seen,
            )
            hub.quiet()
            hub.clients.pop("a").close()  # alone in its room: no one to tell
    finally:
        stop.set()
        for thread in churners:
            thread.join()


def joins_at_once_on_both_nodes(hub: Hub) -> None:
    """3: two clients joining one room at the same moment, one on each node:
    each welcome counts itself, and the last count each is told (its welcome,
    or a user_joined after it) is 2.

    Not asserted, a difference left open (see REPORT-parity.md): on two nodes
    both welcomes may say 1 (each node read the room's presence before the
    other's join was written), where one node always says 1 then 2."""
    for _ in range(5):
        r = hub.room()
        pairs = at_once([hub.node(0), hub.node(1)], r)
        assert all(welcome["connectionCount"] >= 1 for _, welcome in pairs), pairs
        told = [last_count_told(ws, welcome["connectionCount"]) for ws, welcome in pairs]
        hub.transcript.append(("told", told))
        assert told == [2, 2], (told, pairs)
        for ws, _ in pairs:
            ws.close()
        for srv in hub.nodes:
            wait_until(lambda srv=srv: srv.stats()["connections"]["node"] == 0, "both gone")


def at_once(servers: list[Server], r: str) -> list[tuple[Any, dict]]:
    """One connection to *r* on each of *servers*, opened together: each
    with its welcome."""
    pairs: list[tuple[Any, dict]] = []
    barrier = threading.Barrier(len(servers))

    def connect(srv: Server) -> None:
        barrier.wait()
        ws = srv.connect(r)
        pairs.append((ws, json.loads(ws.recv(timeout=TIMEOUT))))

    threads = [threading.Thread(target=connect, args=(srv,)) for srv in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(pairs) == len(servers)
    return pairs


def last_count_told(ws: Any, count: int) -> int:
    """The room's count as a client is told it: its welcome's, then each
    user_joined's, until it says 2 (bounded)."""
    told = [count]

    def heard() -> bool:
        if told[-1] != 2:
            frame = json.loads(ws.recv(timeout=TIMEOUT))
            if frame["type"] == "user_joined":
                told.append(frame["totalUsers"])
        return told[-1] == 2

    wait_until(heard, "a count of 2")
    return told[-1]


SCENARIOS: list[tuple[str, Callable[[Hub], None]]] = [
    ("default", presence_and_counts),
    ("default", message_and_broadcast),
    ("default", one_order_from_two_senders),
    ("default", history_replay),
    ("default", recovery_elsewhere),
    ("default", rooms_apart),
    ("default", bad_frames),
    ("default", close_codes),
    ("default", invalid_utf8_closes_1007),
    ("default", api_publish_rooms_disconnect),
    ("default", history_of_a_room_without_members),
    ("default", default_room_through_the_api),
    ("default", users_limited_across_nodes),
    ("default", tokens_expire_refresh_and_rooms),
    ("default", disconnect_a_user_on_both_nodes),
    ("default", bad_queries),
    ("default", presence_in_order_with_messages),
    ("default", joins_at_once_on_both_nodes),
    ("limited", limited_rooms_and_history_off),
    ("limited", rate_limited_then_1008),
]


@pytest.mark.parametrize(("config", "scenario"), SCENARIOS, ids=lambda s: getattr(s, "__name__", s))
def test_one_node_and_a_cluster_look_the_same(
    hubs: dict[str, dict[str, Hub]], config: str, scenario: Callable[[Hub], None]
) -> None:
    transcripts = {}
    for kind, hub in hubs[config].items():
        hub.reset()
        hub.prefix = scenario.__name__.replace("_", "-")[:40]
        scenario(hub)
        transcripts[kind] = hub.transcript
        hub.reset()
    assert transcripts["two"] == transcripts["one"]
