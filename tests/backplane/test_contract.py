"""One contract, every backplane: the in-memory one and the Redis one.

Each test builds a few backplanes on one medium (a shared in-process broker,
or a real redis-server with a key prefix of the test's own) and drives them
through their interface. The node on the other side of the seam is a
recording :class:`Recorder`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from wshub.backplane import Envelope, EventKind
from wshub.backplane.memory import MemoryBackplane, MemoryBroker
from wshub.backplane.redis import RedisBackplane
from wshub.ids import ConnectionId, NodeId

from ..conftest import TIMEOUT

_prefixes = itertools.count()


class Recorder:
    """The node side of the seam: records what the backplane tells it."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.found: list[ConnectionId] = []
        self.lost: list[ConnectionId] = []
        self.local: set[ConnectionId] = set()
        self.changed = asyncio.Event()

    def on_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self.changed.set()

    def on_connections_found(self, ids) -> None:
        self.found.extend(ids)
        self.changed.set()

    def on_connections_lost(self, ids) -> None:
        self.lost.extend(ids)
        self.changed.set()

    def local_connection_ids(self):
        return list(self.local)

    def relays(self) -> list[bytes]:
        return [e.payload for e in self.envelopes if e.kind is EventKind.RELAY]

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


Factory = Callable[[str, float], Awaitable[tuple[object, Recorder]]]


@pytest.fixture(params=["memory", "redis"])
def medium(request):
    """Returns a coroutine factory making started backplanes on one medium."""
    if request.param == "memory":
        broker = MemoryBroker()

        async def make(name: str, ttl: float = 30.0):
            recorder = Recorder()
            backplane = MemoryBackplane(NodeId(name), broker, node_ttl=ttl)
            await backplane.start(recorder)
            return backplane, recorder
    else:
        redis_server = request.getfixturevalue("redis_server")
        prefix = f"contract{next(_prefixes)}"

        async def make(name: str, ttl: float = 30.0):
            recorder = Recorder()
            backplane = RedisBackplane(
                redis_server.url, NodeId(name), node_ttl=ttl, prefix=prefix, probe_interval=0.2
            )
            await backplane.start(recorder)
            assert backplane.ready()[0]
            return backplane, recorder

    return make


def env(node: str, kind: EventKind, conn: str = "", payload: bytes = b"") -> Envelope:
    return Envelope(NodeId(node), kind, ConnectionId(conn), payload)


def test_relays_reach_every_other_node_in_order(medium) -> None:
    """A relay reaches every other node once, in the order published, never its sender."""

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


def test_presence_counts_and_duplicates(medium) -> None:
    """joined/left move remote counts; each change reaches the node once."""

    async def body() -> None:
        (a, _ra), (b, rb) = await medium("a"), await medium("b")
        a.publish(env("a", EventKind.JOINED, "ws-x", b"joined-x"))
        a.publish(env("a", EventKind.JOINED, "ws-y", b"joined-y"))
        await rb.until(lambda: b.remote_count() == 2)
        assert [e.payload for e in rb.envelopes] == [b"joined-x", b"joined-y"]
        assert a.remote_count() == 0
        a.publish(env("a", EventKind.LEFT, "ws-x", b"left-x"))
        await rb.until(lambda: b.remote_count() == 1)
        assert rb.envelopes[-1].payload == b"left-x"
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_a_late_node_learns_existing_presence(medium) -> None:
    """A node that starts later counts the connections already open elsewhere."""

    async def body() -> None:
        a, ra = await medium("a")
        a.publish(env("a", EventKind.JOINED, "ws-1", b"j1"))
        a.publish(env("a", EventKind.JOINED, "ws-2", b"j2"))
        ra.local.update({ConnectionId("ws-1"), ConnectionId("ws-2")})
        await asyncio.sleep(0)  # let the publisher run
        if isinstance(a, RedisBackplane):
            await a._flush()
        b, rb = await medium("b")
        assert b.remote_count() == 2
        assert sorted(rb.found) == ["ws-1", "ws-2"]
        for bp in (a, b):
            await bp.stop()

    asyncio.run(body())


def test_a_crashed_node_is_reaped_exactly_once(medium) -> None:
    """When a node dies without goodbye, its connections are announced lost
    once on each survivor, within 2 x TTL, whoever notices first."""

    async def body() -> None:
        ttl = 0.6
        (dead, rd), (b, rb), (c, rc) = [await medium(n, ttl) for n in ("dead", "b", "c")]
        for conn in ("ws-1", "ws-2", "ws-3"):
            dead.publish(env("dead", EventKind.JOINED, conn, conn.encode()))
            rd.local.add(ConnectionId(conn))
        await rb.until(lambda: b.remote_count() == 3)
        await rc.until(lambda: c.remote_count() == 3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await dead.crash()
        await rb.until(lambda: len(rb.lost) == 3, timeout=2 * ttl + TIMEOUT)
        await rc.until(lambda: len(rc.lost) == 3, timeout=2 * ttl + TIMEOUT)
        assert loop.time() - start < 2 * ttl + 1.0
        assert sorted(rb.lost) == sorted(rc.lost) == ["ws-1", "ws-2", "ws-3"]
        assert b.remote_count() == c.remote_count() == 0
        # Several more reaping rounds change nothing: exactly once.
        await asyncio.sleep(ttl)  # a bounded observation window, not a wait for an event
        assert len(rb.lost) == 3 and len(rc.lost) == 3
        for bp in (b, c):
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
