"""What only the Redis Cluster backplane does, on a real 3-primary cluster:
the supervisor's reap across shards, and a shard that closes the
subscription connections."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from wshub.backplane import Envelope, EventKind
from wshub.backplane.redis_cluster import ClusterKeys, RedisClusterBackplane, reap_cluster_node
from wshub.ids import ConnectionId, NodeId
from wshub.rooms import RoomName

from ..conftest import TIMEOUT
from ..waiting import wait_until_async
from .test_contract import Recorder, subscribe


def joined(node: str, conn: str, room: str) -> Envelope:
    return Envelope(NodeId(node), EventKind.JOINED, RoomName(room), ConnectionId(conn), b"j")


async def started(
    url: str, prefix: str, rooms: tuple[str, ...], *names: str, **options: float
) -> list[tuple[RedisClusterBackplane, Recorder]]:
    """Backplanes named *names*, started and subscribed to *rooms*."""
    made = []
    for name in names:
        bp, recorder = (
            RedisClusterBackplane(url, NodeId(name), prefix=prefix, **options),
            Recorder(),
        )
        await bp.start(recorder)
        await subscribe(bp, recorder, *rooms)
        made.append((bp, recorder))
    return made


def test_the_supervisors_reap_announces_a_dead_workers_rooms_on_every_shard_once(
    redis_cluster,
) -> None:
    """reap_cluster_node (what --workers runs when a worker dies): at once,
    without the lease running out, the survivor hears each dead connection
    lost in its own room; the rooms' presence (on their shards) no longer
    holds them; a second reap finds nothing."""

    async def body() -> None:
        rooms = [f"w{i}" for i in range(6)]
        keys = ClusterKeys("sup")
        (dead, _), (alive, ra) = await started(
            redis_cluster.url, "sup", tuple(rooms), "dead", "alive"
        )
        for i, room in enumerate(rooms):
            dead.publish(joined("dead", f"ws-{i}", room))
        await ra.until(lambda: sum(alive.remote_count(RoomName(r)) for r in rooms) == 6)
        await dead.crash()
        gone = await reap_cluster_node(redis_cluster.url, "dead", prefix="sup")
        assert sorted(gone) == sorted(f"ws-{i}" for i in range(6))
        await ra.until(lambda: len(ra.lost) == 6)
        assert sorted(ra.lost) == sorted((room, f"ws-{i}") for i, room in enumerate(rooms))
        client = alive._redis
        for room in rooms:
            assert await client.hgetall(keys.presence(room)) == {}
        assert await client.sismember(keys.nodes, "dead") == 0
        assert await reap_cluster_node(redis_cluster.url, "dead", prefix="sup") == []
        await alive.stop()

    asyncio.run(body())


def test_a_shard_closing_the_subscriptions_gets_them_rebuilt(redis_cluster) -> None:
    """One primary closes every pub/sub connection to it (``CLIENT KILL TYPE
    pubsub``, as a restart or a failover would): the nodes rebuild their
    subscriptions on every shard, resync, and hear the room again."""

    async def body() -> None:
        (a, _), (b, rec_b) = await started(
            redis_cluster.url, "moved", ("room",), "a", "b", probe_interval=0.2
        )
        channel = ClusterKeys("moved").room("room")
        node = b._redis.get_node_from_key(channel)
        # Close b's pub/sub connections on the room's primary from Redis' side.
        admin = aioredis.Redis(host=node.host, port=node.port)
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await admin.aclose()
        assert killed >= 1
        await wait_until_async(
            lambda: all(bp.reconnects > 0 and bp.ready()[0] for bp in (a, b)),
            "both subscriptions rebuilt",
            2 * TIMEOUT,
        )
        a.publish(
            Envelope(NodeId("a"), EventKind.RELAY, RoomName("room"), ConnectionId("ws-1"), b"again")
        )
        await rec_b.until(lambda: b"again" in rec_b.relays("room"))
        await a.stop()
        await b.stop()

    asyncio.run(body())


def test_a_live_node_whose_keys_went_with_a_restarted_primary_is_not_reaped(
    redis_cluster,
) -> None:
    """A node's lease and connections gone at once (its primary restarted
    empty) while it lives: a survivor's reap claims nothing and leaves no
    marker (which would have the node close its clients with 1012), and the
    node's connections are not announced lost."""

    async def body() -> None:
        keys = ClusterKeys("restarted")
        (a, _), (b, rb) = await started(redis_cluster.url, "restarted", ("r",), "a", "b")
        a.publish(joined("a", "ws-1", "r"))
        await rb.until(lambda: b.remote_count(RoomName("r")) == 1)
        client = b._redis
        await client.delete(keys.alive("a"), keys.conns("a"))  # as the empty restart does
        assert await b._reap("a", 60) is None
        assert await client.exists(keys.reaped("a")) == 0
        assert rb.lost == [] and b.remote_count(RoomName("r")) == 1
        # A node whose lease ran out with connections on record is claimed, once.
        await client.hset(keys.conns("a"), "ws-1", "r")
        assert await b._reap("a", 60) == {"r": ["ws-1"]}
        assert await b._reap("a", 60) is None
        await a.crash()
        await b.stop()

    asyncio.run(body())
