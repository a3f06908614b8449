"""A node's hubs with history on Redis, in one process: the Redis side is a
fake the test drives, so that the order of the read's reply, the frames on
the subscription and the mark (three things no real run can order at will)
is the test's. See wshub/roomstream.py for the seam this checks."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable

from wshub import protocol
from wshub.backplane import Envelope, EventKind
from wshub.backplane.memory import MemoryBackplane
from wshub.history import Entry, History, JoinQuery, Recovery
from wshub.ids import ConnectionId, NodeId
from wshub.node import Node
from wshub.protocol import RelayKind
from wshub.rooms import RoomName

from .test_hub import Client, loop, make_node, run

__all__ = ["loop"]  # the event loop fixture of test_hub

ROOM = RoomName("s")
OTHER = NodeId("n2")
SENDER = ConnectionId("ws-1-sssssssss")


class FakeShared:
    """What a hub and the node use of ClusterHistory, driven by the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.joins: dict[ConnectionId, tuple[JoinQuery | None, Callable[..., None]]] = {}
        self.published: list[tuple[bytes, str, RelayKind, str | None, asyncio.Future]] = []
        self.failures: list[str] = []
        self.fills: list[tuple[str, int, Callable[..., None]]] = []

    def publish(
        self,
        room: RoomName,
        payload: bytes,
        sender: ConnectionId,
        kind: RelayKind,
        exclude: ConnectionId | None,
    ) -> asyncio.Future[tuple[str, int]]:
        future: asyncio.Future[tuple[str, int]] = self.loop.create_future()
        self.published.append((payload, sender, kind, exclude, future))
        return future

    def pending(self) -> bool:
        """Publications still wait for the test's answer (ClusterHistory.pending)."""
        return any(not future.done() for *_, future in self.published)

    def join(
        self,
        room: RoomName,
        connection_id: ConnectionId,
        query: JoinQuery | None,
        done: Callable[[Recovery | None], None],
    ) -> None:
        self.joins[connection_id] = (query, done)

    def marked(self, connection_id: ConnectionId) -> None:
        pass

    def fill(self, room: RoomName, epoch: str, offset: int, done: Callable[..., None]) -> None:
        self.fills.append((epoch, offset, done))

    def failed(self, what: str, room: str, exc: BaseException | None) -> None:
        self.failures.append(what)


def shared_node(loop: asyncio.AbstractEventLoop, backplane: MemoryBackplane | None = None):
    node = make_node(loop, backplane)
    node.history = History(size=0)  # as on a --redis-url node
    fake = FakeShared(loop)
    node.cluster_history = fake  # type: ignore[assignment]
    return node, fake


def recorded(node: Node, offset: int, content: str, exclude: str = "") -> bytes:
    """Frame *offset* of the room arriving on the subscription."""
    payload = protocol.with_offset(
        protocol.encode_relay(RelayKind.BROADCAST, SENDER, content, 0.0), offset
    )
    node.on_envelope(Envelope(OTHER, EventKind.RECORDED, ROOM, ConnectionId(exclude), payload))
    return payload


def entry(payload: bytes, offset: int) -> Entry:
    return Entry(offset, payload, SENDER, RelayKind.BROADCAST, None)


def joined(node: Node, fake: FakeShared, path: str) -> tuple[Client, ConnectionId]:
    client = Client(node, path)
    run(node)
    assert client.status() == 0, "held until the history answered"
    (connection_id,) = [cid for cid in fake.joins if cid not in getattr(fake, "_seen", set())]
    fake.__dict__.setdefault("_seen", set()).add(connection_id)
    return client, connection_id


def answer(node: Node, fake: FakeShared, cid: ConnectionId, recovery: Recovery | None) -> None:
    fake.joins[cid][1](recovery)
    run(node)


def relays(client: Client) -> list[tuple[int | None, str, bool]]:
    return [
        (m.get("offset"), str(m["content"]), bool(m.get("replayed")))  # type: ignore[misc]
        for m in client.messages()
        if m["type"] in ("message", "broadcast")
    ]


def test_the_seam_of_a_join_whose_reply_and_frames_cross(loop: asyncio.AbstractEventLoop) -> None:
    """B joins with since=e1:1 while frames 3 and 4 arrive on the
    subscription before the read's reply (3 was published before the read
    ran in Redis, so it is in the replay; 4 after): B gets 2, 3 replayed,
    then 4 and 5 live, each once."""
    node, fake = shared_node(loop)
    a, a_id = joined(node, fake, "/websocket/s")
    answer(node, fake, a_id, Recovery(True, [], "e1", 0))
    assert a.status() == 101
    welcome = a.messages()[0]
    assert (welcome["epoch"], welcome["offset"]) == ("e1", 0) and "recovered" not in welcome
    p1, p2 = recorded(node, 1, "one"), recorded(node, 2, "two")
    run(node)
    assert relays(a) == [(1, "one", False), (2, "two", False)]

    b, b_id = joined(node, fake, "/websocket/s?since=e1:1")
    query = fake.joins[b_id][0]
    assert query is not None and query.since is not None and query.since.offset == 1
    p3 = recorded(node, 3, "three")
    recorded(node, 4, "four")
    run(node)
    assert relays(a) == [(3, "three", False), (4, "four", False)]
    answer(node, fake, b_id, Recovery(True, [entry(p2, 2), entry(p3, 3)], "e1", 3))
    welcome = b.messages()
    assert (welcome[0]["recovered"], welcome[0]["missed"], welcome[0]["offset"]) == (True, 2, 3)
    assert [
        (m["offset"], m.get("replayed", False)) for m in welcome if m["type"] == "broadcast"
    ] == [(2, True), (3, True), (4, False)]
    recorded(node, 5, "five")
    run(node)
    assert relays(b) == [(5, "five", False)] and relays(a) == [(5, "five", False)]
    assert p1  # (1 was before B's position)


def test_a_message_is_not_delivered_to_the_connection_it_excludes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node, fake = shared_node(loop)
    a, a_id = joined(node, fake, "/websocket/s")
    answer(node, fake, a_id, Recovery(True, [], "e1", 0))
    b, b_id = joined(node, fake, "/websocket/s")
    answer(node, fake, b_id, Recovery(True, [], "e1", 0))
    a.messages(), b.messages()
    a.send({"type": "message", "content": "hi"})
    run(node)
    (payload, sender, kind, exclude, future) = fake.published[-1]
    assert (sender, kind, exclude) == (a_id, RelayKind.MESSAGE, a_id)
    assert b"offset" not in payload and relays(b) == []  # nothing before Redis answers
    future.set_result(("e1", 1))
    recorded(node, 1, "hi", exclude=a_id)
    run(node)
    assert relays(b) == [(1, "hi", False)] and relays(a) == []


def test_a_restart_asks_the_members_to_reconnect(loop: asyncio.AbstractEventLoop) -> None:
    node, fake = shared_node(loop)
    a, a_id = joined(node, fake, "/websocket/s")
    answer(node, fake, a_id, Recovery(True, [], "e1", 0))
    a.messages()
    for offset in (1, 2, 1):
        recorded(node, offset, f"m{offset}")
    run(node)
    frames = a.frames()
    texts = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
    # The odd one is not passed on; the close says why.
    assert [m["offset"] for m in texts if m["type"] == "broadcast"] == [1, 2]
    assert frames[-1][0] == 0x8 and struct.unpack("!H", frames[-1][1][:2])[0] == 1012
    assert fake.fills == []


def gap_of_two(loop: asyncio.AbstractEventLoop):
    """A member synced at 0 hears 1, then 4 (2 and 3 lost on the way), then 5."""
    node, fake = shared_node(loop)
    a, a_id = joined(node, fake, "/websocket/s")
    answer(node, fake, a_id, Recovery(True, [], "e1", 0))
    a.messages()
    sent = {offset: recorded(node, offset, f"m{offset}") for offset in (1, 4, 5)}
    run(node)
    return node, fake, a, sent


def test_a_gap_is_filled_from_the_rooms_stream(loop: asyncio.AbstractEventLoop) -> None:
    """The frames a node's subscription missed (it was rebuilt while another
    node published) are read from the room's stream and delivered in order
    with those heard meanwhile: no close (before: closed 1012 at once)."""
    node, fake, a, _ = gap_of_two(loop)
    assert relays(a) == [(1, "m1", False)], "4 and 5 wait for the read"
    ((epoch, offset, done),) = fake.fills
    assert (epoch, offset) == ("e1", 1)
    missed = [
        entry(
            protocol.with_offset(protocol.encode_relay(RelayKind.BROADCAST, SENDER, c, 0.0), o), o
        )
        for o, c in ((2, "m2"), (3, "m3"), (4, "m4"))
    ]
    done("e1", missed)
    run(node)
    assert relays(a) == [(o, f"m{o}", False) for o in (2, 3, 4, 5)]
    recorded(node, 6, "m6")
    run(node)
    assert relays(a) == [(6, "m6", False)]
    assert not [f for f in a.frames() if f[0] == 0x8]


def test_a_gap_the_stream_cannot_fill_asks_the_members_to_reconnect(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node, fake, a, _ = gap_of_two(loop)
    ((_, _, done),) = fake.fills
    done("e1", None)  # trimmed or expired (or Redis did not answer: None, None)
    run(node)
    frames = a.frames()
    texts = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
    assert [m["offset"] for m in texts if m["type"] == "broadcast"] == [1]
    assert frames[-1][0] == 0x8 and struct.unpack("!H", frames[-1][1][:2])[0] == 1012


def test_a_publication_in_another_epoch_asks_the_members_to_reconnect(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node, fake = shared_node(loop)
    a, a_id = joined(node, fake, "/websocket/s")
    answer(node, fake, a_id, Recovery(True, [], "e1", 4))
    a.messages()
    a.send({"type": "broadcast", "content": "x"})
    run(node)
    fake.published[-1][4].set_result(("e2", 1))  # Redis lost the room's history
    run(node)
    close = a.frames()[-1]
    assert close[0] == 0x8 and struct.unpack("!H", close[1][:2])[0] == 1012


class DownBackplane(MemoryBackplane):
    def ready(self) -> tuple[bool, str]:
        return False, "redis unreachable"


def test_without_redis_the_node_serves_its_own_members(loop: asyncio.AbstractEventLoop) -> None:
    """A failed read: a welcome without history; a publication while Redis
    is down: delivered here at once, without an offset, never to Redis."""
    node, fake = shared_node(loop, DownBackplane(NodeId("n1")))
    a, a_id = joined(node, fake, "/websocket/s?since=e1:3")
    answer(node, fake, a_id, None)
    welcome = a.messages()[0]
    assert welcome["recovered"] is False and welcome["missed"] == 0 and "epoch" not in welcome
    b, b_id = joined(node, fake, "/websocket/s")
    answer(node, fake, b_id, None)
    b.messages()
    a.send({"type": "broadcast", "content": "local"})
    run(node)
    assert relays(b) == [(None, "local", False)] and fake.published == []


def test_a_client_gone_while_its_join_was_read_leaves_no_trace(
    loop: asyncio.AbstractEventLoop,
) -> None:
    node, fake = shared_node(loop)
    a, a_id = joined(node, fake, "/websocket/s")
    a.transport.close()
    run(node)
    answer(node, fake, a_id, Recovery(True, [], "e1", 0))
    hub = node.rooms[ROOM]
    assert hub.members == {} and hub.joining == 0 and not hub._prepared
    assert node.room_count() == 0
