"""One contract, both histories: the memory one of a single node and the Redis
one of a cluster give the same answers to the same publications.

Each engine is driven through a small async adapter; the Redis one talks to a
real ``redis-server`` (the ``redis_server`` fixture) with a key prefix of the
test's own. The last tests are what only the Redis history does: atomic
offsets seen by subscribers, concurrent publishers, the capped stream, TTL and
``FLUSHALL``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
import redis.asyncio as aioredis

from wshub import protocol
from wshub.backplane.redis_history import RedisHistory
from wshub.clusterhistory import ClusterHistory
from wshub.history import Entry, History, Recovery
from wshub.ids import ConnectionId, NodeId
from wshub.protocol import RelayKind

from ..conftest import TIMEOUT

M, B = RelayKind.MESSAGE, RelayKind.BROADCAST
A_ID, B_ID, C_ID = "ws-1-aaaaaaaaa", "ws-2-bbbbbbbbb", "ws-3-ccccccccc"
_prefixes = itertools.count()


class MemoryEngine:
    def __init__(self, size: int, ttl: float) -> None:
        self.history = History(size=size, ttl=ttl)

    async def publish(
        self, room: str, kind: RelayKind, sender: str, exclude: str | None = None, content="x"
    ) -> tuple[str, int]:
        now = time.monotonic()
        h = self.history
        offset = h.next_offset(room, now)
        payload = protocol.encode_relay(kind, ConnectionId(sender), content, 0.0, offset)
        h.append(room, Entry(offset, payload, sender, kind, exclude), now)
        return h.state(room, now)[0], offset

    async def state(self, room: str) -> tuple[str, int]:
        return self.history.state(room, time.monotonic())

    async def recover(self, room: str, epoch: str, offset: int, previous: str | None) -> Recovery:
        return self.history.recover(room, epoch, offset, previous, time.monotonic())

    async def recent(self, room: str, count: int) -> Recovery:
        return self.history.recent(room, count, time.monotonic())

    async def close(self) -> None:
        pass


class RedisEngine:
    def __init__(self, url: str, size: int, ttl: float) -> None:
        self.prefix = f"hc{next(_prefixes)}"
        self.history = RedisHistory.from_url(url, prefix=self.prefix, size=size, ttl=ttl)

    async def publish(
        self, room: str, kind: RelayKind, sender: str, exclude: str | None = None, content="x"
    ) -> tuple[str, int]:
        payload = protocol.encode_relay(kind, ConnectionId(sender), content, 0.0)
        return await self.history.publish(
            room,
            f"{self.prefix}:room:{room}",
            b"node|relay||",
            Entry(0, payload, sender, kind, exclude),
        )

    async def state(self, room: str) -> tuple[str, int]:
        return await self.history.state(room)

    async def recover(self, room: str, epoch: str, offset: int, previous: str | None) -> Recovery:
        return await self.history.recover(room, epoch, offset, previous)

    async def recent(self, room: str, count: int) -> Recovery:
        return await self.history.recent(room, count)

    async def close(self) -> None:
        await self.history.aclose()


@pytest.fixture(params=["memory", "redis"])
def engine(request):
    """A factory of engines of one kind: make(size=100, ttl=120.0)."""
    made = []

    def make(size: int = 100, ttl: float = 120.0):
        if request.param == "memory":
            e = MemoryEngine(size, ttl)
        else:
            e = RedisEngine(request.getfixturevalue("redis_server").url, size, ttl)
        made.append(e)
        return e

    return make


async def five(e) -> str:
    """Room r: 1 A message, 2 B broadcast, 3 A broadcast, 4 B message,
    5 server message excluding C. Returns the epoch."""
    await e.publish("r", M, A_ID)
    await e.publish("r", B, B_ID)
    await e.publish("r", B, A_ID)
    await e.publish("r", M, B_ID)
    epoch, offset = await e.publish("r", M, "server", exclude=C_ID)
    assert offset == 5
    return epoch


CURRENT = object()


@pytest.mark.parametrize(
    ("name", "size", "epoch", "offset", "previous", "recovered", "missed"),
    [
        ("from the start", 100, CURRENT, 0, None, True, [1, 2, 3, 4, 5]),
        ("from the middle", 100, CURRENT, 2, None, True, [3, 4, 5]),
        ("from the top", 100, CURRENT, 5, None, True, []),
        ("above the top", 100, CURRENT, 6, None, False, []),
        ("far above the top", 100, CURRENT, 10**18, None, False, []),
        ("wrong epoch", 100, "nope", 2, None, False, []),
        ("past the window", 3, CURRENT, 1, None, False, []),
        ("window edge", 3, CURRENT, 2, None, True, [3, 4, 5]),
        ("previous A", 100, CURRENT, 0, A_ID, True, [2, 3, 4, 5]),
        ("previous B keeps its broadcast", 100, CURRENT, 0, B_ID, True, [1, 2, 3, 5]),
        ("previous C excluded", 100, CURRENT, 0, C_ID, True, [1, 2, 3, 4]),
    ],
)
def test_recover_contract(engine, name, size, epoch, offset, previous, recovered, missed) -> None:
    """The cases of decisions.md 19's recovery window, on both engines."""

    async def body() -> None:
        e = engine(size=size)
        current = await five(e)
        result = await e.recover("r", current if epoch is CURRENT else epoch, offset, previous)
        assert result.recovered is recovered, name
        assert [m.offset for m in result.missed] == missed, name
        assert (result.epoch, result.offset) == (current, 5)
        for m in result.missed:
            frame = json.loads(m.payload)
            assert frame["offset"] == m.offset and "replayed" not in frame
            assert json.loads(protocol.replayed(m.payload))["replayed"] is True
        await e.close()

    asyncio.run(body())


@pytest.mark.parametrize(
    ("size", "count", "expected"), [(100, 2, [4, 5]), (100, 0, []), (3, 50, [3, 4, 5])]
)
def test_recent_contract(engine, size, count, expected) -> None:
    async def body() -> None:
        e = engine(size=size)
        epoch = await five(e)
        result = await e.recent("r", count)
        assert [m.offset for m in result.missed] == expected
        assert (result.epoch, result.offset) == (epoch, 5)
        await e.close()

    asyncio.run(body())


def test_state_of_a_new_room_is_stable(engine) -> None:
    """A room nobody published in has an epoch at offset 0, and keeps it: the
    first publication happens under the epoch the first welcome named."""

    async def body() -> None:
        e = engine()
        epoch, top = await e.state("fresh")
        assert top == 0 and epoch
        assert await e.publish("fresh", B, A_ID) == (epoch, 1)
        assert (await e.recover("fresh", epoch, 0, None)).recovered
        assert await e.state("other") != (epoch, 0)
        await e.close()

    asyncio.run(body())


def test_entries_expire_after_the_ttl(engine) -> None:
    """After --history-ttl the entries are gone: recovery from before them
    fails, from the top it still works (nothing missed)."""

    async def body() -> None:
        ttl = 0.3
        e = engine(ttl=ttl)
        epoch, _ = await e.publish("t", B, A_ID)
        assert (await e.recover("t", epoch, 0, None)).recovered
        deadline = time.monotonic() + TIMEOUT
        while (await e.recover("t", epoch, 0, None)).recovered:
            assert time.monotonic() < deadline, "never expired"
            await asyncio.sleep(0.05)
        assert (await e.recover("t", epoch, 1, None)) == (True, [], epoch, 1)
        assert (await e.recent("t", 10)).missed == []
        await e.close()

    asyncio.run(body())


# -- Only Redis ------------------------------------------------------------------


async def next_message(sub) -> dict:
    """The next published message (get_message answers None for the
    subscription's confirmation, and on a timeout)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        message = await sub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None and message["type"] == "message":
            return message
        assert time.monotonic() < deadline, "no message published"


def test_offsets_are_those_subscribers_see(redis_server) -> None:
    """One per publication, starting at 1, and the same in the published frame."""

    async def body() -> None:
        h = RedisHistory.from_url(redis_server.url, prefix="subs")
        sub = aioredis.from_url(redis_server.url).pubsub()
        await sub.subscribe("subs:room:x")
        offsets = []
        for i in range(50):
            payload = protocol.encode_relay(B, ConnectionId(A_ID), f"m{i}", 0.0)
            epoch, offset = await h.publish(
                "x", "subs:room:x", b"n1|relay|c|", Entry(0, payload, A_ID, B, None)
            )
            offsets.append(offset)
        assert offsets == list(range(1, 51))
        seen = []
        while len(seen) < 50:
            message = await next_message(sub)
            head, _, frame = message["data"].partition(b"|relay|c|")
            assert head == b"n1"
            seen.append(json.loads(frame))
        assert [m["offset"] for m in seen] == offsets
        assert [m["content"] for m in seen] == [f"m{i}" for i in range(50)]
        await sub.aclose()
        await h.aclose()

    asyncio.run(body())


def test_the_script_splices_exactly_as_python_does(redis_server) -> None:
    """The stored frame is byte for byte encode_relay(..., offset)."""

    async def body() -> None:
        h = RedisHistory.from_url(redis_server.url, prefix="splice")
        content = 'é "quoted" \\ \u202e 🎉 </script>'
        plain = protocol.encode_relay(M, ConnectionId(A_ID), content, 1.25)
        _, offset = await h.publish("s", "splice:room:s", b"", Entry(0, plain, A_ID, M, None))
        stored = (await h.recent("s", 1)).missed[0]
        assert stored.payload == protocol.encode_relay(M, ConnectionId(A_ID), content, 1.25, offset)
        assert stored.payload == protocol.with_offset(plain, offset)
        await h.aclose()

    asyncio.run(body())


def test_concurrent_publishers_get_distinct_consecutive_offsets(redis_server) -> None:
    """Two nodes publishing at once: offsets 1..N, each once; each node's own
    publications keep their order; subscribers see offsets in order."""

    async def body() -> None:
        nodes = [RedisHistory.from_url(redis_server.url, prefix="conc") for _ in range(2)]
        sub = aioredis.from_url(redis_server.url).pubsub()
        await sub.subscribe("conc:room:c")

        async def run(node: RedisHistory, name: str) -> list[int]:
            calls = [
                node.publish(
                    "c",
                    "conc:room:c",
                    b"",
                    Entry(
                        0,
                        protocol.encode_relay(B, ConnectionId(name), f"{name}{i}", 0.0),
                        name,
                        B,
                        None,
                    ),
                )
                for i in range(300)
            ]
            return [offset for _, offset in await asyncio.gather(*calls)]

        a, b = await asyncio.gather(
            run(nodes[0], "ws-1-aaaaaaaaa"), run(nodes[1], "ws-2-bbbbbbbbb")
        )
        assert sorted(a + b) == list(range(1, 601))
        assert a == sorted(a) and b == sorted(b)
        seen = []
        while len(seen) < 600:
            message = await next_message(sub)
            seen.append(json.loads(message["data"]))
        assert [m["offset"] for m in seen] == list(range(1, 601))
        for name in ("ws-1-aaaaaaaaa", "ws-2-bbbbbbbbb"):
            mine = [m["content"] for m in seen if m["connectionId"] == name]
            assert mine == [f"{name}{i}" for i in range(300)]
        await sub.aclose()
        for node in nodes:
            await node.aclose()

    asyncio.run(body())


def test_the_stream_is_capped_and_expires(redis_server) -> None:
    """XLEN never passes the history size; the keys carry their TTLs."""

    async def body() -> None:
        h = RedisHistory.from_url(redis_server.url, prefix="cap", size=5, ttl=30)
        for _ in range(20):
            await h.publish(
                "k", "cap:room:k", b"", Entry(0, b'{"type":"broadcast"}', A_ID, B, None)
            )
        meta, stream = h.keys("k")
        r = aioredis.from_url(redis_server.url)
        assert await r.xlen(stream) == 5
        assert 0 < await r.pttl(stream) <= 30_000
        assert 30_000 <= await r.pttl(meta) <= 3_600_000
        epoch, _ = await h.state("k")
        assert [e.offset for e in (await h.recover("k", epoch, 15, None)).missed] == [
            16,
            17,
            18,
            19,
            20,
        ]
        assert not (await h.recover("k", epoch, 14, None)).recovered
        await r.aclose()
        await h.aclose()

    asyncio.run(body())


def test_flushall_changes_the_epoch(own_redis) -> None:
    """Redis emptied: a new epoch, offsets from 1 again, the old position can't recover."""

    async def body() -> None:
        h = RedisHistory.from_url(own_redis.url, prefix="flush")
        entry = Entry(0, b'{"type":"broadcast"}', A_ID, B, None)
        for _ in range(3):
            old, _ = await h.publish("f", "flush:room:f", b"", entry)
        r = aioredis.from_url(own_redis.url)
        await r.flushall()
        new, offset = await h.publish("f", "flush:room:f", b"", entry)
        assert new != old and offset == 1
        assert not (await h.recover("f", old, 3, None)).recovered
        assert not (await h.recover("f", old, 0, None)).recovered
        # Only the meta lost (evicted): the stream left over is dropped too.
        await h.publish("f", "flush:room:f", b"", entry)
        await r.delete(h.keys("f")[0])
        newer, top = await h.state("f")
        assert newer != new and top == 0 and await h.epoch("f") == newer
        assert await r.exists(h.keys("f")[1]) == 0
        # A Redis that forgot its scripts (restart, SCRIPT FLUSH) is handled.
        await r.script_flush()
        assert (await h.publish("f", "flush:room:f", b"", entry))[1] == 1
        await r.aclose()
        await h.aclose()

    asyncio.run(body())


def test_keep_refreshes_the_epochs_of_rooms_with_members(redis_server, monkeypatch) -> None:
    """keep() pushes back the meta keys' expiry, in batches, and brings back
    no key that is gone: a lost epoch stays lost, the next use makes a new one."""
    monkeypatch.setattr("wshub.backplane.redis_history.KEEP_BATCH", 3)

    async def body() -> None:
        h = RedisHistory.from_url(redis_server.url, prefix="keep", ttl=1, meta_ttl=60)
        rooms = [f"k{i}" for i in range(7)]
        epochs = [await h.epoch(room) for room in rooms]
        r = aioredis.from_url(redis_server.url)
        for room in rooms:
            await r.pexpire(h.keys(room)[0], 5_000)
        await r.delete(h.keys("k6")[0])  # lost (evicted, say)
        assert await h.keep(rooms) == 6
        for room in rooms[:6]:
            assert 5_000 < await r.pttl(h.keys(room)[0]) <= 60_000
        assert await r.exists(h.keys("k6")[0]) == 0
        assert [await h.epoch(room) for room in rooms[:6]] == epochs[:6]
        assert await h.epoch("k6") != epochs[6]
        assert await h.keep([]) == 0
        assert h.keep_interval == 20.0
        await r.aclose()
        await h.aclose()

    asyncio.run(body())


def test_a_node_keeps_its_rooms_epochs_in_the_background(own_redis) -> None:
    """ClusterHistory.keep (the node's timer) refreshes in a task of its own;
    a refresh Redis does not answer is counted, and nothing else fails."""

    async def body() -> None:
        h = RedisHistory.from_url(own_redis.url, prefix="nodekeep", ttl=1, meta_ttl=60)
        shared = ClusterHistory(h, NodeId("n1"), lambda room: f"nodekeep:room:{room}")
        epoch = await h.epoch("a")
        meta = h.keys("a")[0]
        r = aioredis.from_url(own_redis.url)
        await r.pexpire(meta, 5_000)
        first = shared.keep(["a"])
        assert first is not None
        assert shared.keep(["a"]) is None  # the last one still runs: left out
        await first
        assert 5_000 < await r.pttl(meta) <= 60_000 and await h.epoch("a") == epoch
        await r.aclose()
        own_redis.stop()
        failing = shared.keep(["a"])
        assert failing is not None
        await failing  # the error is the task's own: counted, not raised
        assert shared.keep_failures == 1
        assert shared.figures()["history_keep_failures"] == 1
        assert shared.publish_failures == shared.join_failures == 0
        await shared.aclose()

    asyncio.run(body())
