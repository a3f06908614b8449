"""A node, its hubs and its connections in one process, without sockets.

Each connection gets a fake transport that records what the server writes;
the test plays the client by feeding request and frame bytes to
``data_received`` and runs the event loop only to let the fan-out flush. The
backplane is the in-memory one (or, to hold a room's upgrades, one that
reports its subscriptions ready later).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator

import pytest

from wshub.backplane.memory import MemoryBackplane
from wshub.config import Config
from wshub.connection import Connection
from wshub.echo import EchoEndpoint
from wshub.gateway import Gateway
from wshub.http import Request, response
from wshub.ids import NodeId
from wshub.node import Node
from wshub.rooms import RoomName
from wshub.routes import Route

from ..rawws import encode_frame

REQUEST = (
    "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class FakeTransport:
    """What a connection needs of an asyncio transport; records the writes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.out = bytearray()
        self.closing = False
        self.protocol: Connection | None = None

    def write(self, data: bytes | memoryview) -> None:
        assert not self.closing, "written after close"
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            assert self.protocol is not None
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False  # respond() then closes at once

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.0.0.1", 40000) if name == "peername" else default


class Client:
    """The client side of one in-process connection."""

    def __init__(self, node: Node, path: str) -> None:
        self.transport = FakeTransport(node.loop)
        self.conn = node.new_connection()
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.conn.data_received(REQUEST.format(path=path).encode())
        self._read = 0

    def status(self) -> int:
        head = bytes(self.transport.out).split(b"\r\n", 1)[0]
        return int(head.split(b" ")[1]) if head else 0

    def send(self, message: dict[str, object]) -> None:
        self.conn.data_received(encode_frame(0x1, json.dumps(message).encode()))

    def frames(self) -> list[tuple[int, bytes]]:
        """Server frames written since the last call (after the 101 head)."""
        data = bytes(self.transport.out)
        start = data.index(b"\r\n\r\n") + 4 if self._read == 0 else self._read
        frames = []
        pos = start
        while pos < len(data):
            opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
            pos += 2
            if n == 126:
                (n,) = struct.unpack("!H", data[pos : pos + 2])
                pos += 2
            frames.append((opcode, data[pos : pos + n]))
            pos += n
        self._read = pos
        return frames

    def messages(self) -> list[dict[str, object]]:
        return [json.loads(payload) for opcode, payload in self.frames() if opcode == 0x1]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_node(loop: asyncio.AbstractEventLoop, backplane: MemoryBackplane | None = None) -> Node:
    node = Node(Config(), loop, backplane=backplane or MemoryBackplane(NodeId("n1")))
    loop.run_until_complete(node.backplane.start(node))
    return node


def run(node: Node) -> None:
    """Let what was queued be written: the loop's pending callbacks, then the
    fan-out's pass at once (presence may otherwise wait for company)."""
    for _ in range(2):
        node.loop.run_until_complete(asyncio.sleep(0))
        node.fanout.flush()


def test_a_room_routes_to_its_members_only(loop: asyncio.AbstractEventLoop) -> None:
    node = make_node(loop)
    a, b, c = Client(node, "/websocket/r"), Client(node, "/websocket/r"), Client(node, "/websocket")
    run(node)
    assert a.status() == b.status() == c.status() == 101
    welcome_a, *rest_a = a.messages()
    assert welcome_a["type"] == "welcome" and welcome_a["room"] == "r"
    assert [m["type"] for m in rest_a] == ["user_joined"]  # b's
    assert [m["type"] for m in b.messages()] == ["welcome"]
    assert c.messages()[0]["connectionCount"] == 1
    a.send({"type": "message", "content": "hi"})
    a.send({"type": "broadcast", "content": "all"})
    run(node)
    assert [(m["type"], m["content"]) for m in b.messages()] == [
        ("message", "hi"),
        ("broadcast", "all"),
    ]
    assert [m["type"] for m in a.messages()] == ["broadcast"]
    assert c.messages() == []
    assert node.room_count() == 2 and node.rooms[RoomName("r")].count() == 2


def test_a_close_frame_ends_membership_once(loop: asyncio.AbstractEventLoop) -> None:
    node = make_node(loop)
    a, b = Client(node, "/websocket/r"), Client(node, "/websocket/r")
    run(node)
    a.messages(), b.messages()
    b.conn.data_received(encode_frame(0x8, struct.pack("!H", 1000)))
    run(node)
    assert b.frames()[-1][0] == 0x8  # the server's Close
    assert b.transport.closing
    left = a.messages()
    assert [m["type"] for m in left] == ["user_left"] and left[0]["totalUsers"] == 1
    assert node.n_closing == 0 and len(node.connections) == 1
    a.conn.data_received(encode_frame(0x8, struct.pack("!H", 1000)))
    run(node)
    assert node.room_count() == 0 and node.connections == {}


class LateBackplane(MemoryBackplane):
    """Reports every subscription ready only when told (as Redis does once
    the subscription is acknowledged and the room's presence read)."""

    def subscribe(self, room: RoomName) -> bool:
        super().subscribe(room)
        return False


def test_upgrades_wait_for_their_room_and_keep_what_the_client_sent(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node = make_node(loop, LateBackplane(NodeId("n1")))
    a = Client(node, "/websocket/late")
    a.send({"type": "ping"})  # before the 101: kept for after the welcome
    run(node)
    assert a.status() == 0 and a.conn.session.state.name == "CONNECTING"
    node.on_room_ready(RoomName("late"))
    run(node)
    assert a.status() == 101
    assert [m["type"] for m in a.messages()] == ["welcome", "pong"]
    # A second member of a room that is ready now is welcomed at once.
    b = Client(node, "/websocket/late")
    run(node)
    assert b.messages()[0]["connectionCount"] == 2


def test_an_upgrade_that_gives_up_while_waiting_leaves_no_trace(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node = make_node(loop, LateBackplane(NodeId("n1")))
    a = Client(node, "/websocket/late")
    a.transport.close()
    run(node)
    assert node.gateway.connecting == 0 and node.admission.open_total == 0
    assert node.admission.handshakes_total == 0
    node.on_room_ready(RoomName("late"))
    run(node)
    assert a.status() == 0 and node.room_count() == 0


def test_a_route_with_a_body_gets_it_whole_and_a_larger_one_is_413(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """What the backend API will need: a POST route bounded in size gets its
    body however it arrives; past the bound, 413; a wrong method, 405."""
    node = make_node(loop)
    got: list[bytes] = []

    def publish(conn: Connection, request: Request) -> None:
        got.append(request.body)
        conn.respond(response(200, b"{}", content_type="application/json"))

    node.gateway = Gateway(
        node.config,
        loop.time,
        rooms=node,
        admission=node.admission,
        counters=node.counters,
        routes=[Route("/api/publish", publish, methods=("POST",), max_body=64)],
        echo=EchoEndpoint(host=node, fanout=node.fanout),
    )

    def post(body: bytes, length: int | None, pieces: int = 3) -> FakeTransport:
        transport = FakeTransport(loop)
        conn = node.new_connection()
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
        head = f"POST /api/publish HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n"
        data = head.encode() + body
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            if not transport.closing:
                conn.data_received(data[i : i + step])
        loop.run_until_complete(asyncio.sleep(0))
        return transport

    body = b'{"room": "lobby", "content": "' + b"x" * 30 + b'"}'
    answer = post(body, len(body), pieces=7)
    assert got == [body] and answer.out.startswith(b"HTTP/1.1 200 ")
    chunked = post(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", None, pieces=9)
    assert got[-1] == b"hello world" and chunked.out.startswith(b"HTTP/1.1 200 ")
    too_big = post(b"y" * 65, 65)
    assert too_big.out.startswith(b"HTTP/1.1 413 ") and len(got) == 2
    too_big = post(b"40\r\n" + b"z" * 64 + b"\r\n1\r\nz\r\n0\r\n\r\n", None)
    assert too_big.out.startswith(b"HTTP/1.1 413 ") and len(got) == 2
    transport = FakeTransport(loop)
    conn = node.new_connection()
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"GET /api/publish HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.out.startswith(b"HTTP/1.1 405 ") and b"Allow: POST" in transport.out
