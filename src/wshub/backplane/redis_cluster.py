"""The cluster backplane on a Redis Cluster: sharded pub/sub, one slot per room.

``--redis-url redis+cluster://HOST:PORT[,HOST:PORT...]`` (``rediss+cluster://``
for TLS) names seed nodes of a Redis Cluster (Redis 7: sharded pub/sub). The
design is :mod:`wshub.backplane.redis`'s (a channel per room, leased
presence, publish pipelines, a resync on every reconnect); what differs is
where each key lives, since a command, a script or a pipeline to one node
may only touch the slots that node holds.

Keys (``{p}`` is ``--cluster-name``; what is in braces is the hash tag, so
keys that share it share a slot, hence a shard)::

    {p}:room:{r.ROOM}          sharded channel (SSUBSCRIBE/SPUBLISH) of a room
    {p}:presence:{r.ROOM}      HASH connection id -> node id [TAB user id]
    {p}:history:{r.ROOM}:meta  the room's history (redis_history.py), so its
    {p}:history:{r.ROOM}:stream  script's SPUBLISH is on the keys' own slot
    {p}:node:{n.ID}:alive      lease
    {p}:node:{n.ID}:conns      HASH connection id -> room
    {p}:node:{n.ID}:reaped     marker: the node was reaped (claimed)
    {p}:node:{n.ID}:probe      sharded channel of the node's probes to itself
    {p}:node:{n.ID}:run        the random token of the process holding the id
    {p}:nodes                  SET of node ids (one key, on one shard)
    {p}:user:{u.USER}          a user's per-node connection counts
                               (usercount.py: one key, so its scripts are one slot)

What is atomic
--------------
*A room*: its channel, presence and history are one slot, so the history
script (offset, stream, SPUBLISH) is one step, as on one Redis; and the
``HSET`` of a join reaches the room's shard before the ``joined`` does, on
the same connection.

*Reaping* cannot be one script across a node's keys and its rooms' presence
(they are on other shards). It is a claim, then a clean-up: the claim
(:data:`_CLAIM`, on the dead node's shard) checks that the lease expired,
sets the ``reaped`` marker with ``SET NX`` and takes the node's connections,
in one step, so exactly one survivor wins it. The winner alone then removes
those connections from each room's presence (``HDEL``, idempotent: retried
until done should a shard refuse) and from ``{p}:nodes``, and publishes one
``lost`` per room: each client's departure is announced exactly once, in its
room only (decisions.md).

*Publishing*: a pipeline per loop pass as on one Redis, split by redis-py's
cluster pipeline into one batch per shard on one connection each, in order;
each run of envelopes is one script per slot (:data:`_SPUBLISH`), so the
envelopes of one room keep their order, and with them the presence updates.

Subscribing
-----------
:class:`ShardedPubSub` keeps one plain connection per primary holding a
subscribed room (``SSUBSCRIBE`` per slot), found from the cluster client's
slot map, read by a task each into one inbox; it looks to the backplane's
subscriber loop like redis-py's ``PubSub`` on one Redis. Any error on any
shard (a primary gone, a slot moved away: Redis then ends our subscription
with an unasked ``sunsubscribe``) ends the whole subscription, and the
subscriber does what it does on one Redis: reconnects with backoff (the slot
map read again), re-registers presence, subscribes every room and resyncs.
A cluster without replicas refuses every command while a primary is down
(``cluster-require-full-coverage``), so the backplane is down for that time
as it would be with one Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from ..ids import ConnectionId, NodeId
from ..rooms import RoomName
from . import Envelope, EventKind, encode_envelope
from .base import lost_payload
from .redis import _PUBLISH, Keys, RedisBackplane

__all__ = [
    "ClusterKeys",
    "RedisClusterBackplane",
    "ShardedPubSub",
    "cluster_client",
    "is_cluster_url",
    "parse_cluster_url",
    "reap_cluster_node",
    "seed_url",
]

log = logging.getLogger("wshub.backplane")

SCHEMES = ("redis+cluster://", "rediss+cluster://")

# KEYS: alive, conns, reaped (one node's, one slot); ARGV: marker TTL. The
# claim: false unless the lease expired and no one claimed the node yet;
# then the node's connections (id, room, id, room, ...), taken. A node with
# no connections on record gets no marker: its keys may be gone with a
# primary that restarted empty while the node lives (on one Redis, the set
# of nodes goes with them; here it is on another shard), and a marker would
# have it close its clients for nothing; there is nothing to announce anyway.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then return {} end
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[1]) then return false end
local pairs = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2])
return pairs
"""

# As redis.py's publish script, on sharded channels of one slot (KEYS[1], one
# of the channels, routes it to that slot's shard).
_SPUBLISH = _PUBLISH.replace("'PUBLISH'", "'SPUBLISH'")

_ONE_SPUBLISH = "redis.call('SPUBLISH', KEYS[1], ARGV[1])"


def is_cluster_url(url: str) -> bool:
    return url.startswith(SCHEMES)


class ClusterAddress(NamedTuple):
    seeds: list[tuple[str, int]]
    tls: bool
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterAddress:
    """``redis+cluster://[user:password@]host:port[,host:port...]`` (pure).
    Raises ValueError on anything else."""
    if not is_cluster_url(url):
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    scheme, _, rest = url.partition("://")
    rest = rest.split("/", 1)[0]
    username = password = None
    if "@" in rest:
        credentials, _, rest = rest.rpartition("@")
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    seeds = []
    for item in rest.split(","):
        parts = urlsplit(f"//{item.strip()}")
        if not parts.hostname:
            raise ValueError(f"a seed node needs a host: {item!r}")
        seeds.append((parts.hostname, parts.port or 6379))
    return ClusterAddress(seeds, scheme.startswith("rediss"), username, password)


def seed_url(url: str) -> str:
    """A plain URL of the first seed node, for what needs only classic
    pub/sub (which a Redis Cluster carries to every node)."""
    address = parse_cluster_url(url)
    host, port = address.seeds[0]
    auth = ""
    if address.password is not None:
        auth = f"{address.username or ''}:{address.password}@"
    host = f"[{host}]" if ":" in host else host
    return f"{'rediss' if address.tls else 'redis'}://{auth}{host}:{port}/0"


def _connection_options(address: ClusterAddress, timeout: float) -> dict[str, Any]:
    return {
        "username": address.username,
        "password": address.password,
        "ssl": address.tls,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 0,
    }


def cluster_client(url: str, timeout: float) -> RedisCluster:
    """The client for commands: redis-py's, which maps slots to primaries
    and follows MOVED/ASK itself."""
    address = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.seeds],
        **_connection_options(address, timeout),
    )


def _tag(kind: str, name: str) -> str:
    return "{" + kind + "." + name + "}"


class ClusterKeys(Keys):
    """The key layout of the module docstring."""

    def room(self, room: str) -> str:
        return f"{self.room_prefix}{_tag('r', room)}"

    def presence(self, room: str) -> str:
        return f"{self.presence_prefix}{_tag('r', room)}"

    def _node(self, node: str) -> str:
        return f"{self.prefix}:node:{_tag('n', node)}"

    def probe(self, node: str) -> str:
        return f"{self._node(node)}:probe"

    def alive(self, node: str) -> str:
        return f"{self._node(node)}:alive"

    def conns(self, node: str) -> str:
        return f"{self._node(node)}:conns"

    def reaped(self, node: str) -> str:
        return f"{self._node(node)}:reaped"

    def run(self, node: str) -> str:
        return f"{self._node(node)}:run"


class SlotMoved(ConnectionError):
    """Redis ended a subscription we did not end (its slot moved)."""


def _name(channel: Any) -> str:
    return channel.decode() if isinstance(channel, bytes) else str(channel)


class ShardedPubSub:
    """Sharded subscriptions over every primary, with the part of redis-py's
    ``PubSub`` interface the backplane uses (``subscribe``, ``unsubscribe``,
    ``get_message``, ``aclose``; ``subscribe`` acknowledgements and
    ``message`` s as it gives them)."""

    def __init__(
        self,
        cluster: RedisCluster,
        connect: Callable[[str, int], aioredis.Redis],
        *,
        remap: bool,
    ) -> None:
        self._cluster = cluster
        self._connect = connect
        self._remap = remap  # read the slot map again before the first SSUBSCRIBE
        self._mapped = False
        self._shards: dict[str, tuple[aioredis.Redis, Any]] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}  # one per shard connection
        self._channel_shard: dict[str, str] = {}
        self._leaving: set[str] = set()
        self._inbox: deque[dict[str, Any]] = deque()
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None
        self.moved = False  # it ended because a slot moved: the next one remaps

    async def _shard(self, node: ClusterNode) -> Any:
        held = self._shards.get(node.name)
        if held is not None:
            return held[1]
        client = self._connect(node.host, int(node.port))
        pubsub = client.pubsub()
        self._shards[node.name] = (client, pubsub)
        return pubsub

    async def subscribe(self, *channels: Any) -> None:
        if self._failure is not None:
            raise ConnectionError(f"a shard's subscription failed: {self._failure!r}")
        if not self._mapped:
            await self._cluster.initialize()  # the first time: reads the slot map
            if self._remap:
                # The last subscription ended as a slot moved: read the map
                # again (redis-py does it itself for commands on MOVED; a
                # remap on every reconnect would close connections that the
                # publisher is using).
                await self._cluster.nodes_manager.initialize()
            self._mapped = True
        by_shard: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        nodes: dict[str, ClusterNode] = {}
        for channel in channels:
            name = _name(channel)
            node = self._cluster.get_node_from_key(name)
            if node is None:
                raise ConnectionError(f"no primary holds the slot of {name}")
            nodes[node.name] = node
            by_shard[node.name][key_slot(name.encode())].append(name)
        for shard, slots in by_shard.items():
            pubsub = await self._shard(nodes[shard])
            for names in slots.values():  # SSUBSCRIBE takes channels of one slot
                self._leaving.difference_update(names)
                await pubsub.ssubscribe(*names)
                for name in names:
                    self._channel_shard[name] = shard
            if shard not in self._readers:  # after its first SSUBSCRIBE: a connection to read
                self._readers[shard] = asyncio.create_task(
                    self._read(pubsub), name=f"wshub-shard-{shard}"
                )

    async def unsubscribe(self, *channels: Any) -> None:
        by_shard: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for channel in channels:
            name = _name(channel)
            shard = self._channel_shard.pop(name, None)
            if shard is not None:
                by_shard[shard][key_slot(name.encode())].append(name)
        for shard, slots in by_shard.items():
            pubsub = self._shards[shard][1]
            for names in slots.values():
                self._leaving.update(names)
                await pubsub.sunsubscribe(*names)

    async def _read(self, pubsub: Any) -> None:
        inbox = self._inbox
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "smessage":
                    message["type"] = "message"
                elif kind == "ssubscribe":
                    message["type"] = "subscribe"
                elif kind == "sunsubscribe":
                    name = _name(message["channel"])
                    if name in self._leaving:
                        self._leaving.discard(name)
                        continue
                    raise SlotMoved(f"Redis ended the subscription of {name} (its slot moved)")
                else:
                    continue
                inbox.append(message)
                self._arrived.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.moved = isinstance(exc, SlotMoved) or "MOVED" in str(exc)
            self._failure = exc
            self._arrived.set()

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if not self._inbox and self._failure is None:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                pass
        if self._inbox:
            return self._inbox.popleft()
        if self._failure is not None:
            # Whatever ended a shard's reader (redis-py or uvloop errors too,
            # on a connection closed under it), the subscription is lost.
            raise ConnectionError(f"a shard's subscription failed: {self._failure!r}")
        return None

    async def aclose(self) -> None:
        readers = list(self._readers.values())
        self._readers.clear()
        for task in readers:
            task.cancel()
        if readers:
            await asyncio.wait(readers, timeout=1.0)
        shards, self._shards = list(self._shards.values()), {}
        for client, pubsub in shards:
            for closable in (pubsub, client):
                try:
                    await closable.aclose()
                except Exception:  # a dead shard's connection: nothing to close
                    pass


class RedisClusterBackplane(RedisBackplane):
    """:class:`~wshub.backplane.redis.RedisBackplane` on a Redis Cluster."""

    _publish_source = _SPUBLISH

    def __init__(self, url: str, node_id: NodeId, **kwargs: Any) -> None:
        self.address = parse_cluster_url(url)
        super().__init__(url, node_id, **kwargs)
        self._timeout = 1.0
        self._claim: Any = None
        self._last_pubsub: ShardedPubSub | None = None
        # Reaped nodes whose presence clean-up a shard refused: retried first.
        self._cleanup: list[tuple[str, dict[RoomName, list[ConnectionId]]]] = []

    def _make_keys(self, prefix: str) -> Keys:
        return ClusterKeys(prefix)

    def _connect(self, timeout: float) -> Any:
        self._timeout = timeout
        client = cluster_client(self.url, timeout)
        self._claim = client.register_script(_CLAIM)
        return client

    def _shard_client(self, host: str, port: int) -> aioredis.Redis:
        # No retries inside redis-py: a shard's error must reach the
        # subscriber, whose reconnect resyncs (a silent resubscription would not).
        return aioredis.Redis(
            host=host,
            port=port,
            retry=Retry(NoBackoff(), 0),
            **_connection_options(self.address, self._timeout),
        )

    def _new_pubsub(self) -> Any:
        last = self._last_pubsub
        self._last_pubsub = ShardedPubSub(
            self._redis, self._shard_client, remap=last is not None and last.moved
        )
        return self._last_pubsub

    async def _probe_listeners(self) -> int:
        # A sharded channel's subscribers are known to the shard of its slot.
        channel = self.keys.probe(self.node_id)
        owner = self._redis.get_node_from_key(channel)
        client = self._shard_client(owner.host, owner.port)
        try:
            reply = await client.pubsub_shardnumsub(channel)
        finally:
            await client.aclose()
        return sum(int(n) for _, n in reply)

    # redis-py's cluster client can fail inside itself while a node's
    # connections are remade under a command (AttributeError on a writer
    # that is gone): for us, a lost connection like any other, not a bug of
    # ours that would end the publisher or log a traceback.
    _CLIENT_FAULTS = (AttributeError, TypeError)

    async def _register(self) -> None:
        try:
            await super()._register()
        except self._CLIENT_FAULTS as exc:
            raise ConnectionError(f"redis cluster client failed: {exc!r}") from exc

    async def _flush(self) -> None:
        try:
            await super()._flush()
        except self._CLIENT_FAULTS as exc:
            self._set_down(f"publish failed: redis cluster client failed: {exc!r}")
            self._rebuild = True

    def _atomic(self) -> Any:
        # Presence spans shards: no transaction across them. A registration
        # cut short is redone by the reconnect it causes.
        return self._redis.pipeline(transaction=False)

    def _add_publications(
        self, pipe: Any, pairs: list[tuple[str, bytes]], deadline: int
    ) -> list[int]:
        by_slot: dict[int, list[tuple[str, bytes]]] = {}
        for pair in pairs:
            by_slot.setdefault(key_slot(pair[0].encode()), []).append(pair)
        carried = []
        for group in by_slot.values():
            flat = [item for pair in group for item in pair]
            # (redis-py's cluster pipeline blocks its evalsha method, not the command.)
            pipe.execute_command("EVALSHA", self._publish_sha, 1, group[0][0], deadline, *flat)
            carried.append(len(group))
        return carried

    async def _reap(self, node: str, marker_ttl: int) -> dict[RoomName, list[ConnectionId]] | None:
        pending, self._cleanup = self._cleanup, []
        for index, (dead, rooms) in enumerate(pending):
            try:
                await remove_presence(self._redis, self.keys, dead, rooms)
            except Exception:
                self._cleanup += pending[index:]
                raise
        by_room = await claim(self._claim, self.keys, node, marker_ttl)
        if by_room is not None:
            try:
                await remove_presence(self._redis, self.keys, node, by_room)
            except Exception as exc:  # the claim is ours: announce now, clean up later
                log.warning("reaped node %s; its presence clean-up waits for Redis: %s", node, exc)
                self._cleanup.append((node, by_room))
        # A node without connections on record: out of the set, nothing to say.
        return by_room or None


async def claim(
    script: Any, keys: Keys, node: str, marker_ttl: int
) -> dict[RoomName, list[ConnectionId]] | None:
    """Claim *node* if its lease expired and no one else did (one step on its
    shard): its connections by room, or None when it lives or another has it."""
    pairs = await script(
        keys=[keys.alive(node), keys.conns(node), keys.reaped(node)], args=[marker_ttl]
    )
    if pairs is None:
        return None
    by_room: dict[RoomName, list[ConnectionId]] = defaultdict(list)
    for cid, room in zip(pairs[::2], pairs[1::2], strict=True):
        by_room[RoomName(room.decode())].append(ConnectionId(cid.decode()))
    return by_room


async def remove_presence(
    client: Any, keys: Keys, node: str, by_room: dict[RoomName, list[ConnectionId]]
) -> None:
    """A claimed node's connections out of their rooms' presence, and the node
    out of the set (idempotent: each room's HDEL on its own shard)."""
    pipe = client.pipeline(transaction=False)
    for room, ids in by_room.items():
        pipe.hdel(keys.presence(room), *ids)
    pipe.srem(keys.nodes, node)
    await pipe.execute()


async def reap_cluster_node(url: str, node_id: str, *, prefix: str = "wshub") -> list[str]:
    """:func:`wshub.backplane.redis.reap_node` on a Redis Cluster."""
    keys = ClusterKeys(prefix)
    client = cluster_client(url, 5.0)
    try:
        await client.delete(keys.alive(node_id))
        by_room = await claim(client.register_script(_CLAIM), keys, node_id, 60)
        if by_room is None:
            return []
        await remove_presence(client, keys, node_id, by_room)
        sender = NodeId(f"supervisor-{node_id}")
        for room, dead in by_room.items():
            envelope = Envelope(
                sender, EventKind.LOST, room, ConnectionId(node_id), lost_payload(dead)
            )
            await client.eval(_ONE_SPUBLISH, 1, keys.room(room), encode_envelope(envelope))
        return [cid for ids in by_room.values() for cid in ids]
    finally:
        await client.aclose()
