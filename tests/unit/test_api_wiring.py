"""The API's wiring in one process, without sockets: a real Node with keys,
connections on fake transports (tests/unit/test_hub.py's), requests fed as
bytes. Synchronous checks of what the socket tests can only see from outside:
pipelined requests answered one per loop pass and in order, the deadline
re-armed after each answer, the envelope that names a connection to skip,
the answers a node gives to the cluster's questions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from wshub import http
from wshub.api import ApiKeys
from wshub.backplane import Envelope, EventKind
from wshub.backplane.memory import MemoryBackplane
from wshub.config import Config
from wshub.ids import ConnectionId, NodeId
from wshub.node import Node
from wshub.protocol import RelayKind
from wshub.rooms import RoomName
from wshub.routes import Route, Router

from .test_hub import Client, FakeTransport, run

KEY = "k-0123456789abcdef"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def api_node(loop: asyncio.AbstractEventLoop, **options: object) -> Node:
    node = Node(
        Config(**options),  # type: ignore[arg-type]
        loop,
        backplane=MemoryBackplane(NodeId("n1")),
        api_keys=ApiKeys([KEY]),
    )
    loop.run_until_complete(node.backplane.start(node))
    assert node.api is not None
    loop.run_until_complete(node.api.start())
    return node


class HttpClient:
    def __init__(self, node: Node) -> None:
        self.transport = FakeTransport(node.loop)
        self.conn = node.new_connection()
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def answers(self) -> list[tuple[int, dict[str, str], bytes]]:
        data, found = bytes(self.transport.out), []
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            length = int(headers.get("content-length", "0"))
            found.append((int(lines[0].split()[1]), headers, rest[:length]))
            data = rest[length:]
        return found


def publish(body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def test_pipelined_requests_are_answered_in_order_one_per_pass(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node = api_node(loop)
    member = Client(node, "/websocket/r")
    run(node)
    member.messages()
    client = HttpClient(node)
    client.conn.data_received(
        b"".join(publish({"room": "r", "content": f"c{i}"}) for i in range(5))
    )
    assert len(client.answers()) == 1  # the rest wait for later passes, not one deep call
    for _ in range(6):
        run(node)
    answers = client.answers()
    assert [status for status, _, _ in answers] == [200] * 5
    assert [json.loads(body)["offset"] for _, _, body in answers] == [1, 2, 3, 4, 5]
    assert all(headers["connection"] == "keep-alive" for _, headers, _ in answers)
    got = [m["content"] for m in member.messages() if m["type"] == "broadcast"]
    assert got == [f"c{i}" for i in range(5)]
    assert not client.transport.closing


def test_each_answer_rearms_the_deadline(loop: asyncio.AbstractEventLoop) -> None:
    node = api_node(loop, handshake_timeout=5.0)
    client = HttpClient(node)
    first = client.conn._timer
    assert first is not None
    client.conn.data_received(publish({"content": "x"}))
    second = client.conn._timer
    assert second is not None and second is not first
    assert second.when() >= first.when()


def test_an_envelope_naming_a_member_skips_it(loop: asyncio.AbstractEventLoop) -> None:
    """What a backend's message with exclude becomes on the other nodes."""
    node = api_node(loop)
    a, b = Client(node, "/websocket/r"), Client(node, "/websocket/r")
    run(node)
    a.messages(), b.messages()
    payload = b'{"type":"message","connectionId":"server","content":"m","timestamp":"t"}'
    node.on_envelope(Envelope(NodeId("n2"), EventKind.RELAY, RoomName("r"), a.conn.id, payload))
    # A client's relay from elsewhere names its sender, which is not a member here.
    other = ConnectionId("ws-1-elsewhere")
    node.on_envelope(Envelope(NodeId("n2"), EventKind.RELAY, RoomName("r"), other, payload))
    run(node)
    assert len(a.messages()) == 1 and len(b.messages()) == 2


def test_publish_backend_gives_an_offset_and_keeps_the_exclusion(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node = api_node(loop)
    a, b = Client(node, "/websocket/h"), Client(node, "/websocket/h")
    run(node)
    a.messages(), b.messages()
    hub = node.rooms[RoomName("h")]
    offset, epoch = hub.publish_backend(
        RelayKind.MESSAGE, ConnectionId("server"), "skip a", a.conn.id
    )
    run(node)
    assert offset == 1 and epoch
    assert a.messages() == [] and b.messages()[0]["offset"] == 1
    entry = node.history.held("h")[-1]
    assert entry.exclude == a.conn.id and entry.sender == "server"
    # A room without members here: a hub made for it, not kept.
    lone = node.backend_hub(RoomName("nobody"))
    assert lone.publish_backend(RelayKind.BROADCAST, ConnectionId("s"), "x", None)[0] == 1
    assert RoomName("nobody") not in node.rooms


def test_a_nodes_answers_to_the_clusters_questions(loop: asyncio.AbstractEventLoop) -> None:
    node = api_node(loop)
    a, b, c = Client(node, "/websocket/q"), Client(node, "/websocket/q"), Client(node, "/websocket")
    run(node)
    api = node.api
    assert api is not None
    assert api.on_control({"q": "rooms"}) == {"rooms": {"q": 2, "": 1}}
    room = api.on_control({"q": "room", "room": "q"})
    assert room["node"] == "n1"
    assert sorted(room["connections"]) == sorted([[a.conn.id, None], [b.conn.id, None]])
    assert api.on_control({"q": "room", "room": "none"})["connections"] == []
    # Out-of-range or missing values from a peer close nothing.
    for bad in (
        {"q": "disconnect", "connectionId": a.conn.id, "code": 1000, "reason": ""},
        {"q": "disconnect", "connectionId": a.conn.id, "code": 4000},
        {"q": "disconnect", "code": 4000, "reason": ""},
        {"q": "what"},
    ):
        assert api.on_control(bad) in ({"closed": []}, {})
    closed = api.on_control(
        {"q": "disconnect", "connectionId": c.conn.id, "code": 4100, "reason": "r"}
    )
    assert closed == {"closed": [c.conn.id]}
    assert c.conn.close_code == 4100 and a.conn.close_code is None


def test_a_route_without_methods_takes_every_method() -> None:
    def endpoint(conn: object, request: http.Request) -> None:
        pass

    router: Router[object] = Router(
        [Route("/any/", endpoint, methods=(), prefix=True), Route("/get", endpoint)]
    )
    for method in ("GET", "POST", "DELETE", "BREW"):
        assert router.match(http.Request(method, "/any/x", ())).path == "/any/"
    try:
        router.match(http.Request("POST", "/get", ()))
    except http.HttpError as exc:
        assert exc.status == 405
    else:
        raise AssertionError("POST /get was accepted")


def test_a_keep_alive_response_says_so() -> None:
    assert b"Connection: keep-alive\r\n" in http.response(200, "x", keep_alive=True)
    assert b"Connection: close\r\n" in http.response(200, "x")
    assert http.response(401, "x").startswith(b"HTTP/1.1 401 Unauthorized\r\n")
