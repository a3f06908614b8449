"""One contract, every backplane: the in-memory one, the Redis one, and the
Redis one on a Redis Cluster.

Each test builds a few backplanes on one medium (a shared in-process broker,
a real redis-server, or a real 3-primary Redis Cluster of redis-server
processes, with a key prefix of the test's own) and drives them
through their interface. The node on the other side of the seam is a
recording :class:`Recorder`. Every room is a channel: a backplane hears a
room only while it is subscribed to it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable, Mapping

import pytest

from wshub.backplane import Envelope, EventKind
from wshub.backplane.memory import MemoryBackplane, MemoryBroker
from wshub.backplane.redis import RedisBackplane
from wshub.backplane.redis_cluster import RedisClusterBackplane
from wshub.ids import ConnectionId, NodeId
from wshub.protocol import encode_user_joined
from wshub.rooms import RoomName

from ..conftest import TIMEOUT

_prefixes = itertools.count()

Backplane = MemoryBackplane | RedisBackplane


class Recorder:
    """The node side of the seam: records what the backplane tells it."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.found: list[tuple[str, ConnectionId]] = []
        self.lost: list[tuple[str, ConnectionId]] = []
        self.ready: list[str] = []
        self.local: set[tuple[RoomName, ConnectionId]] = set()
        self.local_users: dict[ConnectionId, str] = {}
        self.users: dict[ConnectionId, str] = {}  # told with the found and lost
        self.changed = asyncio.Event()

    def on_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self.changed.set()

    def on_connections_found(
        self, room: RoomName, ids: Iterable[ConnectionId], users: Mapping[ConnectionId, str]
    ) -> None:
        self.found.extend((room, i) for i in ids)
        self.users.update(users)
        self.changed.set()

    def on_connections_lost(
        self, room: RoomName, ids: Iterable[ConnectionId], users: Mapping[ConnectionId, str]
    ) -> None:
        self.lost.extend((room, i) for i in ids)
        self.users.update(users)
        self.changed.set()

    def on_room_ready(self, room: RoomName) -> None:
        self.ready.append(room)
        self.changed.set()

    def local_presence(self) -> list[tuple[RoomName, ConnectionId, str | None]]:
        return [(room, cid, self.local_users.get(cid)) for room, cid in self.local]

    def relays(self, room: str = "") -> list[bytes]:
        return [e.payload for e in self.envelopes if e.kind is EventKind.RELAY and e.room == room]

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


Factory = Callable[..., Awaitable[tuple[Backplane, Recorder]]]


async def subscribe(bp: Backplane, recorder: Recorder, *rooms: str) -> None:
    """Subscribe *rooms* and wait until each is ready."""
    for room in rooms:
        before = recorder.ready.count(room)
        if not bp.subscribe(RoomName(room)):
            await recorder.until(lambda r=room, n=before: recorder.ready.count(r) > n)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def medium(request):
    """Returns a coroutine factory making started backplanes on one medium,
    subscribed to *rooms* (the default room unless told)."""
    if request.param == "memory":
        broker = MemoryBroker()

        async def make(name: str, ttl: float = 30.0, rooms: tuple[str, ...] = ("",)):
            recorder = Recorder()
            backplane = MemoryBackplane(NodeId(name), broker, node_ttl=ttl)
            await backplane.start(recorder)
            await subscribe(backplane, recorder, *rooms)
            return backplane, recorder
    else:
        cluster = request.param == "redis-cluster"
        url = request.getfixturevalue("redis_cluster" if cluster else "redis_server").url
        kind = RedisClusterBackplane if cluster else RedisBackplane
        prefix = f"contract{next(_prefixes)}"

        async def make(name: str, ttl: float = 30.0, rooms: tuple[str, ...] = ("",)):
            recorder = Recorder()
            backplane = kind(url, NodeId(name), node_ttl=ttl, prefix=prefix, probe_interval=0.2)
            await backplane.start(recorder)
            assert backplane.ready()[0]
            await subscribe(backplane, recorder, *rooms)
            return backplane, recorder

    return make


def env(
    node: str, kind: EventKind, conn: str = "", payload: bytes = b"", room: str = ""
) -> Envelope:
    return Envelope(NodeId(node), kind, RoomName(room), ConnectionId(conn), payload)


async def settle(*backplanes: Backplane) -> None:
    """Let what was published reach Redis (a no-op in memory)."""
    await asyncio.sleep(0)
    for bp in backplanes:
        if isinstance(bp, RedisBackplane):
            await bp._flush()


def test_relays_reach_every_other_node_in_order(medium) -> None:
    """A relay reaches every other node in the room once, in the order
    published, never its sender."""

    async def body() -> None:
        (a, ra), (b, rb), (c, rc) = [await medium(n) for n in ("a", "b", "c")]
        payloads = [f"m{i}".encode() for i in range(200)]
        for p in payloads:
            a.publish(env("a", EventKind.RELAY, "ws-1", p))
        await rb.until(lambda: len(rb.relays()) == 200)
        await rc.until(lambda: len(rc.relays()) == 200)
        assert rb.relays() == payloads and rc.relays() == payloads
        b.publish(env("b", EventKind.RELAY, "ws-2", b"back"))
        await ra.until(lambda: ra.relays() == [b"back"])
        assert b"back" not in rb.relays()
        for bp in (a, b, c):
            await bp.stop()

    asyncio.run(body())


def test_a_run_of_relays_is_each_published_in_order(medium) -> None:
    """publish_relays() (a read's relays, Hub.on_plain_relays) is publish()
    of each of them, in order with the single ones around it."""

    async def body() -> None:
        (a, _), (b, rb) = [await medium(n) for n in ("a", "b")]
        a.publish(env("a", EventKind.RELAY, "ws-1", b"first"))
        a.publish_relays(RoomName(""), ConnectionId("ws-1"), [b"r1", b"r2", b"r3"])
        a.publish(env("a", EventKind.RELAY, "ws-1", b"last"))
        await rb.until(lambda: len(rb.relays()) == 5)
        assert rb.relays() == [b"first", b"r1", b"r2", b"r3", b"last"]
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_presence_counts_and_duplicates(medium) -> None:
    """joined/left move the room's remote counts; each change reaches the node once."""

    async def body() -> None:
        (a, _ra), (b, rb) = await medium("a"), await medium("b")
        a.publish(env("a", EventKind.JOINED, "ws-x", b"joined-x"))
        a.publish(env("a", EventKind.JOINED, "ws-y", b"joined-y"))
        await rb.until(lambda: b.remote_count(RoomName("")) == 2)
        assert [e.payload for e in rb.envelopes] == [b"joined-x", b"joined-y"]
        assert a.remote_count(RoomName("")) == 0
        a.publish(env("a", EventKind.LEFT, "ws-x", b"left-x"))
        await rb.until(lambda: b.remote_count(RoomName("")) == 1)
        assert rb.envelopes[-1].payload == b"left-x"
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_a_late_subscriber_learns_the_rooms_presence(medium) -> None:
    """A node that subscribes to a room later counts the connections already
    open there elsewhere, before it is told the room is ready, and is not told
    they joined (its newcomer's welcome counts them)."""

    async def body() -> None:
        a, ra = await medium("a", rooms=("lobby",))
        a.publish(env("a", EventKind.JOINED, "ws-1", b"j1", room="lobby"))
        a.publish(env("a", EventKind.JOINED, "ws-2", b"j2", room="lobby"))
        a.publish(env("a", EventKind.JOINED, "ws-3", b"j3", room="other"))
        ra.local.update({(RoomName("lobby"), ConnectionId("ws-1"))})
        await settle(a)
        b, rb = await medium("b", rooms=())
        assert b.remote_count(RoomName("lobby")) == 0
        await subscribe(b, rb, "lobby")
        assert b.remote_count(RoomName("lobby")) == 2
        assert b.remote_count(RoomName("other")) == 0
        assert rb.found == [] and rb.envelopes == []
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_a_crashed_node_is_reaped_exactly_once_room_by_room(medium) -> None:
    """When a node dies without goodbye, its connections are announced lost
    once on each survivor, within 2 x TTL, whoever notices first, each in its
    own room and only on the nodes subscribed to that room."""

    async def body() -> None:
        ttl = 0.6
        dead, rd = await medium("dead", ttl, rooms=("r1", "r2"))
        b, rb = await medium("b", ttl, rooms=("r1",))
        c, rc = await medium("c", ttl, rooms=("r1", "r2"))
        for conn, room in (("ws-1", "r1"), ("ws-2", "r1"), ("ws-3", "r2")):
            dead.publish(env("dead", EventKind.JOINED, conn, conn.encode(), room=room))
            rd.local.add((RoomName(room), ConnectionId(conn)))
        await rb.until(lambda: b.remote_count(RoomName("r1")) == 2)
        await rc.until(lambda: c.remote_count(RoomName("r2")) == 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await dead.crash()
        await rb.until(lambda: len(rb.lost) == 2, timeout=2 * ttl + TIMEOUT)
        await rc.until(lambda: len(rc.lost) == 3, timeout=2 * ttl + TIMEOUT)
        assert loop.time() - start < 2 * ttl + 1.0
        assert sorted(rb.lost) == [("r1", "ws-1"), ("r1", "ws-2")]
        assert sorted(rc.lost) == [("r1", "ws-1"), ("r1", "ws-2"), ("r2", "ws-3")]
        assert b.remote_count(RoomName("r1")) == c.remote_count(RoomName("r2")) == 0
        # Several more reaping rounds change nothing: exactly once.
        await asyncio.sleep(ttl)  # a bounded observation window, not a wait for an event
        assert len(rb.lost) == 2 and len(rc.lost) == 3
        for bp in (b, c):
            await bp.stop()

    asyncio.run(body())


def test_a_crashed_nodes_users_are_named_in_what_is_announced_lost(medium) -> None:
    """The survivors tell the user id of each authenticated connection of a
    dead node (decisions.md 15), whether they learned it from the join event
    or from the room's presence read when they subscribed; none for an
    anonymous one, and the same for a user id holding the separators."""

    async def body() -> None:
        ttl = 0.6
        dead, rd = await medium("dead", ttl, rooms=("r1",))
        early, re = await medium("early", ttl, rooms=("r1",))
        tricky = 'al|ice\t"userId"\n'
        for conn, user in (("ws-1", "alice"), ("ws-2", None), ("ws-3", tricky)):
            frame = encode_user_joined(ConnectionId(conn), 1, 0.0, user_id=user)
            dead.publish(
                Envelope(
                    NodeId("dead"),
                    EventKind.JOINED,
                    RoomName("r1"),
                    ConnectionId(conn),
                    frame,
                    user,
                )
            )
            rd.local.add((RoomName("r1"), ConnectionId(conn)))
        await re.until(lambda: early.remote_count(RoomName("r1")) == 3)
        late, rl = await medium("late", ttl, rooms=("r1",))
        assert late.remote_count(RoomName("r1")) == 3 and rl.found == []
        await dead.crash()
        for recorder in (re, rl):
            await recorder.until(lambda r=recorder: len(r.lost) == 3, timeout=2 * ttl + TIMEOUT)
            assert recorder.users == {"ws-1": "alice", "ws-3": tricky}
        for bp in (early, late):
            await bp.stop()

    asyncio.run(body())


def test_own_events_never_come_back(medium) -> None:
    """A node never receives its own envelopes."""

    async def body() -> None:
        (a, ra), (b, rb) = await medium("a"), await medium("b")
        a.publish(env("a", EventKind.RELAY, "ws-1", b"mine"))
        b.publish(env("b", EventKind.RELAY, "ws-2", b"marker"))
        await ra.until(lambda: b"marker" in ra.relays())
        await rb.until(lambda: b"mine" in rb.relays())
        assert ra.relays() == [b"marker"]
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_a_node_hears_nothing_of_a_room_it_is_not_in(medium) -> None:
    """Relays, joins and leaves of a room reach only the nodes subscribed to
    it: the others receive nothing at all (their received count stays put)."""

    async def body() -> None:
        a, ra = await medium("a", rooms=("busy",))
        b, rb = await medium("b", rooms=("busy",))
        c, rc = await medium("c", rooms=("quiet",))
        received = c.received
        a.publish(env("a", EventKind.JOINED, "ws-1", b"j", room="busy"))
        for i in range(50):
            a.publish(env("a", EventKind.RELAY, "ws-1", f"m{i}".encode(), room="busy"))
        a.publish(env("a", EventKind.LEFT, "ws-1", b"l", room="busy"))
        # Then one relay in c's room, from the same publisher: once it is
        # heard, everything published before it was delivered (or never will be).
        a.publish(env("a", EventKind.RELAY, "ws-1", b"for c", room="quiet"))
        await rb.until(lambda: len(rb.relays("busy")) == 50)
        await rc.until(lambda: rc.relays("quiet") == [b"for c"])
        assert [e.room for e in rc.envelopes] == ["quiet"]
        assert c.received == received + 1
        assert c.remote_count(RoomName("busy")) == 0
        assert all(e.room == "busy" for e in rb.envelopes)
        for bp in (a, b, c):
            await bp.stop()

    asyncio.run(body())


def test_after_unsubscribing_a_room_is_silent(medium) -> None:
    """A node that unsubscribed from a room hears nothing more of it, and
    hears it again once subscribed again, with the room's presence."""

    async def body() -> None:
        a, ra = await medium("a", rooms=("r", "marker"))
        b, rb = await medium("b", rooms=("r", "marker"))
        a.publish(env("a", EventKind.RELAY, "ws-1", b"before", room="r"))
        await rb.until(lambda: rb.relays("r") == [b"before"])
        b.unsubscribe(RoomName("r"))
        await settle(b)
        await asyncio.sleep(0.05)  # let Redis take the UNSUBSCRIBE: a bounded wait
        a.publish(env("a", EventKind.JOINED, "ws-2", b"j2", room="r"))
        a.publish(env("a", EventKind.RELAY, "ws-1", b"while away", room="r"))
        a.publish(env("a", EventKind.RELAY, "ws-1", b"m", room="marker"))
        await rb.until(lambda: rb.relays("marker") == [b"m"])
        assert rb.relays("r") == [b"before"]
        assert b.remote_count(RoomName("r")) == 0
        await settle(a)
        await subscribe(b, rb, "r")
        assert b.remote_count(RoomName("r")) == 1  # ws-2, from the room's presence
        a.publish(env("a", EventKind.RELAY, "ws-1", b"after", room="r"))
        await rb.until(lambda: rb.relays("r") == [b"before", b"after"])
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_rooms_keep_apart(medium) -> None:
    """Two rooms on the same nodes: each envelope arrives once, tagged with
    its own room, and counts are per room."""

    async def body() -> None:
        a, ra = await medium("a", rooms=("x", "y"))
        b, rb = await medium("b", rooms=("x", "y"))
        a.publish(env("a", EventKind.JOINED, "ws-1", b"jx", room="x"))
        a.publish(env("a", EventKind.RELAY, "ws-1", b"to x", room="x"))
        a.publish(env("a", EventKind.RELAY, "ws-1", b"to y", room="y"))
        await rb.until(lambda: len(rb.envelopes) == 3)
        assert [(e.room, e.payload) for e in rb.envelopes] == [
            ("x", b"jx"),
            ("x", b"to x"),
            ("y", b"to y"),
        ]
        assert b.remote_count(RoomName("x")) == 1 and b.remote_count(RoomName("y")) == 0
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())
