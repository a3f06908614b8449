"""The cluster backplane on Redis (or Valkey): a channel per room, leased presence.

(On a Redis Cluster: :mod:`wshub.backplane.redis_cluster`, a subclass that
replaces the key layout, the connections and the reap; see "What the cluster
subclass replaces" below.)

Keys (``{p}`` is ``--cluster-name``, default ``wshub``)::

    {p}:room:{room}        pub/sub channel: the envelopes of one room ("" the default room)
    {p}:probe:{id}         pub/sub channel: a node's probes to itself
    {p}:nodes              SET of node ids that registered presence
    {p}:node:{id}:alive    lease, expires after --node-ttl unless refreshed
    {p}:node:{id}:conns    HASH connection id -> room, the node's open connections
    {p}:presence:{room}    HASH connection id -> node id, the room's connections
                           (node id TAB user id for an authenticated one)
    {p}:node:{id}:reaped   marker left by the survivor that reaped the node
    {p}:node:{id}:run      the random token of the process that holds the id,
                           expires with the lease

Theory of operation
-------------------
*Publishing.* Envelopes queued during one loop pass go out in one pipeline on
one connection, in order, together with the presence updates (``HSET`` before
a ``joined`` is published, ``HDEL`` before a ``left``). Redis delivers one
connection's publications in order, so messages from one sender reach every
recipient in the order sent, and every recipient of a room sees one order.
While Redis is unreachable nothing is queued: envelopes are dropped and
counted (delivery is at most once, never late). The queue is bounded in bytes
(:data:`PUBLISH_QUEUE_LIMIT`): past it, under a slow Redis, envelopes are
dropped and counted; and a batch that waited longer than
:data:`PUBLISH_MAX_AGE` for its turn (a Redis that froze, then came back) is
dropped and counted rather than delivered late. Presence updates in it still
go out (they are state, and the periodic resync reconciles them).

*Subscribing.* One pub/sub connection carries the channels of the rooms this
node has members in (decisions.md 12): a room's first local member subscribes
it, and the node drops it a short grace after the last one left. A new
subscription is ready once Redis acknowledged it and the room's presence was
read (``HGETALL {p}:presence:{room}``): publications after the
acknowledgement arrive as events, those before are in the snapshot, and the
view takes each connection once. The connection is rebuilt with jittered
exponential backoff after any error; on every (re)connect the node
re-registers its presence from its own registry, subscribes every room again
and corrects each room's view (:meth:`ViewKeeper.apply_snapshot`): joins and
leaves missed during an outage are announced then, once. A subscription can
also go silent without an error (a half-open TCP connection): every node
publishes a probe to itself every few seconds and rebuilds the subscription
when it stops hearing its own probes. An envelope that cannot be handled
(malformed, or a bug in handling it) is logged, counted and skipped; and the
subscriber task itself is restarted should it ever end while the node runs
(issue 19.6).

*Presence.* Every ``ttl/3`` a node refreshes its lease and looks for nodes
whose lease expired. Reaping is one Lua script: the first survivor to run it
removes the dead node from ``{p}:nodes``, takes its connections and their rooms
and removes them from the rooms' presence; every other survivor gets nothing.
The winner publishes one ``lost`` envelope on each of the dead node's rooms,
and each node with members there announces ``user_left`` for those ids to
them: exactly once per client, in that room only. A node that comes back after
being reaped (an outage longer than the TTL) finds the marker and closes its
clients with 1012 so they reconnect as new connections, since their departure
was already announced.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from ..ids import ConnectionId, NodeId
from ..logs import LineLimiter, log_event
from ..rooms import RoomName
from . import BackplaneHandler, Envelope, EventKind, NodeIdInUse, decode_envelope, encode_envelope
from .base import ViewKeeper, lost_payload
from .redisconn import (
    SENTINEL_SCHEME,
    describe_target,
    redact,
    redis_client,
    watch_failovers,
)

__all__ = ["RedisBackplane", "backoff_delays", "reap_node"]

log = logging.getLogger("wshub.backplane")

# KEYS: nodes, alive, conns, reaped; ARGV: node, marker TTL, presence key
# prefix. Returns the dead node's HGETALL (id, room, id, room, ...) or false.
_REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return false end
local pairs = redis.call('HGETALL', KEYS[3])
for i = 1, #pairs, 2 do redis.call('HDEL', ARGV[3] .. pairs[i + 1], pairs[i]) end
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[4], '1', 'EX', ARGV[2])
return pairs
"""
# KEYS: run; ARGV: this process's run token, lease ms. Holds the node id for
# this process for one more lease, unless another process took it meanwhile
# (returns that one's token).
_HOLD_RUN = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
_ID_IN_USE = "node id in use by another process"  # /readyz, once that is so
_SUBSCRIBE_TIMEOUT = 5.0  # seconds for Redis to acknowledge a subscription

# (RedisClusterException: a Redis Cluster's client, redis_cluster.py, raises
# it when no seed node answers; it is no RedisError.)
_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
# What a lost link can also look like from inside redis-py: its reconnect
# writing to a uvloop transport that closed under it raises RuntimeError
# ("unable to perform operation on <TCPTransport closed=True>"), seen in a
# Sentinel failover. The connection is gone either way: rebuild, no traceback.
_LINK_ERRORS = (*_ERRORS, RuntimeError)

# Publish a batch of envelopes, given as channel and envelope pairs after the
# deadline, unless Redis gets to it after the deadline (ARGV[1], Unix ms on
# Redis's clock): then none, and -1.
_PUBLISH = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then
  return -1
end
for i = 2, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
return (#ARGV - 1) / 2
"""

PUBLISH_QUEUE_LIMIT = 16 * 1024 * 1024
"""Bytes of envelopes waiting for Redis; past it new ones are dropped, counted."""
PUBLISH_MAX_AGE = 1.0
"""Seconds an envelope may wait for its pipeline; older is dropped, not sent late."""
_STOP_TIMEOUT = 3.0  # seconds for the background tasks to end once cancelled
_MAX_BACKOFF = 5.0  # seconds: the longest wait between two reconnects


async def _within(coro: Any, timeout: float) -> Any:
    """Await *coro* for at most *timeout* seconds, then abandon it.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that
    lands in the same loop pass as its inner await completing (CPython
    gh-86296, fixed by the 3.12 rewrite), and redis-py awaits every command it
    writes through ``wait_for(..., socket_timeout)``
    (``Connection.send_packed_command``). The write of a command usually
    completes at once, so a cancel sent to a task inside redis-py on shutdown
    can vanish there; the task then goes on (its read, redis-py's retries with
    backoff), and a ``wait_for`` around it, which waits for its cancelled
    inner task to finish, waits for all that: the node that idled after
    SIGTERM with Redis dying at the same moment. ``asyncio.wait`` never waits
    for a cancelled task and never absorbs our own cancellation."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"abandoned after {timeout} s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # an abandoned task's error is expected: not "never retrieved"


def backoff_delays(
    initial: float = 0.1,
    factor: float = 2.0,
    cap: float = _MAX_BACKOFF,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Reconnect delays: exponential with full jitter, capped (pure)."""
    delay = initial
    while True:
        yield delay * (0.5 + rand() / 2)
        delay = min(cap, delay * factor)


class Keys:
    def __init__(self, prefix: str) -> None:
        self.nodes = f"{prefix}:nodes"
        self.prefix = prefix
        self.presence_prefix = f"{prefix}:presence:"
        self.room_prefix = f"{prefix}:room:"

    def room(self, room: str) -> str:
        """The pub/sub channel of *room*."""
        return self.room_prefix + room

    def presence(self, room: str) -> str:
        return self.presence_prefix + room

    def probe(self, node: str) -> str:
        return f"{self.prefix}:probe:{node}"

    def alive(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:alive"

    def conns(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:conns"

    def reaped(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:reaped"

    def run(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:run"


class RedisBackplane(ViewKeeper):
    def __init__(
        self,
        url: str,
        node_id: NodeId,
        *,
        node_ttl: float = 30.0,
        prefix: str = "wshub",
        probe_interval: float | None = None,
        on_rejoined_after_reap: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(node_id, time.monotonic)
        self.url = url
        self.node_ttl = node_ttl
        self.keys = self._make_keys(prefix)
        self.probe_interval = probe_interval or max(0.2, min(5.0, node_ttl / 6))
        self.on_rejoined_after_reap = on_rejoined_after_reap
        # aioredis.Redis here; a RedisCluster client in the cluster subclass.
        self._redis: Any = None
        self._up = False
        self._reason = "connecting to Redis"
        # ("publish", (channel, envelope)), ("join", (connection id, room, user id
        # or None)), ("leave", (connection id, room)).
        self._queue: list[tuple[str, tuple[Any, ...]]] = []
        self._queued_bytes = 0
        self._queued_since = 0.0  # when the oldest queued envelope was queued
        self._publish_sha = ""
        self._clock_offset_ms = 0.0  # Redis's clock minus ours, measured at each connect
        self._wake = asyncio.Event()
        # Envelopes and presence updates queued so far, and how many of them
        # Redis has run (or the node gave up): the history publishes on a
        # connection of its own and waits on these (:meth:`ran_so_far`).
        self._ops_queued = 0
        self._ops_done = 0
        self._ops_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._primary_moved = asyncio.Event()  # a sentinel announced a failover
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._rebuild = False
        self._reap_script: Any = None
        self._pubsub: Any = None
        # Rooms subscribed (or being subscribed), and those whose subscription
        # is not acknowledged and read yet (the handler hears on_room_ready).
        self._rooms: set[RoomName] = set()
        self._unready: set[RoomName] = set()
        self._changes: list[tuple[bool, RoomName]] = []  # (subscribe?, room) to send
        self._changed = asyncio.Event()
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._nodes = 1
        self._cause = ""  # the last reason Redis was down, for the log only
        # Nodes of our views found missing from {p}:nodes, and since when.
        self._missing_since: dict[NodeId, float] = {}
        self._registered = False  # once in this run (see _announce_previous_run)
        # Names this process in {p}:node:{id}:run, to tell it from another
        # process started under the same --node-id (see _claim_node_id).
        self._run_token = secrets.token_hex(8)
        self._hold_script: Any = None
        self._id_lost = False  # another process has our node id: this backplane is done
        # Figures for /metrics.
        self.published = 0
        self.forward_failures = 0
        self.reconnects = 0
        self.silent_rebuilds = 0
        self.malformed = 0
        self.stale_dropped = 0
        self.overflow_dropped = 0
        self.subscriber_restarts = 0
        self._bad_envelope_lines = LineLimiter(rate=1.0, burst=5.0)

    # -- Lifecycle ------------------------------------------------------------

    async def start(self, handler: BackplaneHandler) -> None:
        self.handler = handler
        timeout = max(1.0, self.node_ttl / 6)
        self._redis = self._connect(timeout)
        self._reap_script = self._redis.register_script(self._reap_source)
        self._hold_script = self._redis.register_script(_HOLD_RUN)
        connected = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._supervise(connected), name="wshub-redis-subscriber"),
            asyncio.create_task(self._subscriptions(), name="wshub-redis-subscriptions"),
            asyncio.create_task(self._publisher(), name="wshub-redis-publisher"),
            asyncio.create_task(self._lease(), name="wshub-redis-lease"),
            asyncio.create_task(self._prober(), name="wshub-redis-probe"),
        ]
        if self.url.startswith(SENTINEL_SCHEME):
            watch = watch_failovers(self.url, self._on_primary_moved, timeout=timeout)
            self._tasks.append(asyncio.create_task(watch, name="wshub-redis-sentinel-watch"))
        # Serve at once either way; wait briefly so that a node that can reach
        # Redis starts with correct counts.
        try:
            await asyncio.wait_for(asyncio.shield(connected), timeout)
        except NodeIdInUse:
            await self._close_connections()
            raise
        except TimeoutError:
            # The cause at warning: the later attempts are logged at info, and
            # a wrong password looks like any outage from /readyz (issue 19.9).
            log.warning(
                "redis not reachable yet at start (%s); serving local clients meanwhile",
                self._cause or f"no answer within {timeout:.1f} s",
            )

    # -- What the cluster subclass (redis_cluster.py) replaces --------------------

    _reap_source = _REAP
    _publish_source = _PUBLISH

    def _make_keys(self, prefix: str) -> Keys:
        return Keys(prefix)

    def _connect(self, timeout: float) -> Any:
        """The client for commands (the connection setup of one Redis, or of
        the primary that Sentinel names)."""
        return redis_client(
            self.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
        )

    def _new_pubsub(self) -> Any:
        """A subscription connection (redis-py's PubSub is untyped)."""
        return self._redis.pubsub()

    def _atomic(self) -> Any:
        """A pipeline for the (re-)registration and withdrawal of presence:
        one transaction on one Redis."""
        return self._redis.pipeline(transaction=True)

    def _add_publications(
        self, pipe: Any, pairs: list[tuple[str, bytes]], deadline: int
    ) -> list[int]:
        """Queue one run of envelopes on *pipe*; returns how many envelopes
        each queued command carries (one command here)."""
        flat = [item for pair in pairs for item in pair]
        pipe.evalsha(self._publish_sha, 0, deadline, *flat)
        return [len(pairs)]

    async def _reap(self, node: str, marker_ttl: int) -> dict[RoomName, list[ConnectionId]] | None:
        return await reap(self._reap_script, self.keys, node, marker_ttl)

    async def stop(self) -> None:
        """Flush queued envelopes and withdraw our presence, within a few seconds."""
        self._stopping = True
        redis = self._redis
        if redis is not None and self._up:
            try:
                await _within(self._flush(), 2.0)
                await _within(self._withdraw(), 2.0)
            except _ERRORS as exc:
                log.warning("could not withdraw presence from redis: %s", exc)
        await self._close_connections()
        self._ran(self._ops_queued)  # nothing waits on a stopped backplane
        self.handler = None

    async def _withdraw(self) -> None:
        assert self._redis is not None
        keys = self.keys
        mine = await self._redis.hgetall(keys.conns(self.node_id))
        pipe = self._atomic()
        pipe.srem(keys.nodes, self.node_id)
        for cid, room in mine.items():
            pipe.hdel(keys.presence(_text(room)), cid)
        pipe.delete(keys.conns(self.node_id), keys.alive(self.node_id))
        await pipe.execute()

    async def _close_connections(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: an await inside the client library that turns our
            # cancellation into an error it handles must not hold the
            # shutdown (the loops also stop on _stopping).
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_TIMEOUT)
            if pending:
                log.warning(
                    "backplane tasks still running after cancel: %s",
                    ", ".join(sorted(task.get_name() for task in pending)),
                )
        # The subscriber closes its pub/sub connection on the way out, unless
        # it was cancelled while doing so: close it here as well (idempotent).
        for closable in (self._pubsub, self._redis):
            if closable is not None:
                try:
                    await _within(closable.aclose(), 2.0)
                except _LINK_ERRORS:
                    pass

    async def crash(self) -> None:
        """Vanish without a goodbye, as under ``kill -9`` (for tests): our
        presence stays in Redis until a survivor reaps it."""
        self._stopping = True
        await self._close_connections()
        self.handler = None

    # -- State ------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        return self._up, ("redis connected" if self._up else self._reason)

    def _set_up(self) -> None:
        if not self._up:
            log_event(log, logging.WARNING, "backplane_up", url=describe_target(self.url))
        self._up = True
        self._reason = "redis connected"

    def _set_down(self, reason: str) -> None:
        reason = redact(reason, self.url)
        if self._up:
            log_event(log, logging.WARNING, "backplane_down", reason=reason)
        else:
            log_event(log, logging.INFO, "backplane_still_down", reason=reason)
        self._up = False
        self._cause = reason
        # Public (/readyz, /stats): a fixed phrase. Redis error text
        # (addresses, auth failures, bytes from whatever answered) goes to the
        # log (issue 19.9).
        self._reason = _ID_IN_USE if self._id_lost else "redis unreachable"
        # Rooms waiting for their subscription serve their local members
        # meanwhile; the reconnect's resync brings their views up to date.
        self._rooms_ready(set(self._unready))

    def _rooms_ready(self, rooms: set[RoomName]) -> None:
        rooms &= self._unready
        self._unready -= rooms
        handler = self.handler
        if handler is not None:
            for room in rooms:
                handler.on_room_ready(room)

    def metrics(self) -> dict[str, float]:
        return {
            "up": 1 if self._up else 0,
            "nodes": self._nodes,
            "received": self.received,
            "published": self.published,
            "forward_failures": self.forward_failures,
            "reconnects": self.reconnects,
            "silent_rebuilds": self.silent_rebuilds,
            "malformed": self.malformed,
            "stale_dropped": self.stale_dropped,
            "overflow_dropped": self.overflow_dropped,
            "subscriber_restarts": self.subscriber_restarts,
            "subscriptions": len(self._rooms),
        }

    # -- Rooms ------------------------------------------------------------------

    def subscribe(self, room: RoomName) -> bool:
        self.open_view(room)
        self._rooms.add(room)
        if not self._up:
            return True  # served locally; the reconnect subscribes it with the rest
        self._unready.add(room)
        self._changes.append((True, room))
        self._changed.set()
        return False

    def unsubscribe(self, room: RoomName) -> None:
        self.close_view(room)
        self._rooms.discard(room)
        self._unready.discard(room)
        if self._up:
            self._changes.append((False, room))
            self._changed.set()

    async def _subscriptions(self) -> None:
        """Send the subscription changes of the pub/sub connection, then read
        the presence of each room that was subscribed."""
        while not self._stopping:
            await self._changed.wait()
            self._changed.clear()
            changes, self._changes = self._changes, []
            pubsub = self._pubsub
            if not self._up or pubsub is None:
                continue  # the (re)connect subscribes every room in _rooms
            # The last word on each room wins (a room left and entered again).
            final = {room: subscribe for subscribe, room in changes}
            joining = sorted(r for r, sub in final.items() if sub and r in self._rooms)
            leaving = sorted(r for r, sub in final.items() if not sub and r not in self._rooms)
            try:
                if leaving:
                    await pubsub.unsubscribe(*(self.keys.room(r) for r in leaving))
                if joining:
                    await self._subscribe_rooms(pubsub, joining)
            except asyncio.CancelledError:
                raise
            except _LINK_ERRORS as exc:
                self._set_down(f"subscribe failed: {exc}")
                self._rebuild = True

    async def _subscribe_rooms(self, pubsub: Any, rooms: list[RoomName]) -> None:
        loop = asyncio.get_running_loop()
        channels = [self.keys.room(r) for r in rooms]
        acks = [self._acks.setdefault(ch, loop.create_future()) for ch in channels]
        await pubsub.subscribe(*channels)
        await _within(asyncio.gather(*acks), _SUBSCRIBE_TIMEOUT)
        await self._read_rooms(rooms, initial=True)
        self._rooms_ready(set(rooms))

    async def _read_rooms(self, rooms: list[RoomName], *, initial: bool) -> None:
        """Correct the views of *rooms* from their presence in Redis."""
        assert self._redis is not None
        if not rooms:
            return
        pipe = self._redis.pipeline(transaction=False)
        for room in rooms:
            pipe.hgetall(self.keys.presence(room))
        if not initial:
            pipe.smembers(self.keys.nodes)
        results = await pipe.execute()
        unsure = set() if initial else self._unregistered({NodeId(_text(n)) for n in results.pop()})
        for room, found in zip(rooms, results, strict=True):
            snapshot: dict[NodeId, set[ConnectionId]] = defaultdict(set)
            users: dict[ConnectionId, str] = {}
            for cid, value in found.items():
                conn = ConnectionId(cid.decode())
                node, tab, user = value.decode().partition("\t")
                snapshot[NodeId(node)].add(conn)
                if tab:
                    users[conn] = user
            self.apply_snapshot(room, snapshot, users=users, initial=initial, unsure=unsure)

    def _unregistered(self, registered: set[NodeId]) -> set[NodeId]:
        """The nodes of our views that are not in ``{p}:nodes`` and may yet
        register again: their presence is missing from the snapshot only
        because Redis came back empty (restarted, flushed) and they have not
        reconnected yet, so a resync must not announce their connections as
        gone. A node that stays out of the set for longer than any live node
        takes to register again left without a word we heard (stopped, or
        killed during the outage): from then on its connections are removed."""
        now = self.clock()
        known = {node for view in self.views.values() for node in view.nodes}
        missing = known - registered
        since = self._missing_since
        for node in list(since):
            if node not in missing:
                del since[node]
        # Under a node TTL, so that the resync after the one that first missed
        # a node (they come every TTL) removes what it left behind.
        patience = max(0.9 * self.node_ttl, 2 * _MAX_BACKOFF)
        return {node for node in missing if now - since.setdefault(node, now) < patience}

    # -- Publishing -------------------------------------------------------------

    def publish_relays(
        self, room: RoomName, sender: ConnectionId, payloads: Sequence[bytes]
    ) -> None:
        # Each on its own: whether a peer listens is Redis's to know.
        for payload in payloads:
            self.publish(Envelope(self.node_id, EventKind.RELAY, room, sender, payload))

    def publish(self, envelope: Envelope) -> None:
        kind = envelope.kind
        if not self._up:
            # At most once: what can't be forwarded now is dropped and counted,
            # never delivered late.
            if kind is not EventKind.PROBE:
                self.forward_failures += 1
            return
        data = encode_envelope(envelope)
        if self._queued_bytes + len(data) > PUBLISH_QUEUE_LIMIT:
            # Redis is slower than our traffic: drop (at most once) rather
            # than grow without bound. Presence is reconciled by the resync.
            self.forward_failures += 1
            self.overflow_dropped += 1
            return
        if not self._queue:
            self._queued_since = time.monotonic()
        self._queued_bytes += len(data)
        if kind is EventKind.JOINED:
            join = (envelope.connection_id, envelope.room, envelope.user_id)
            self._queue.append(("join", join))
        elif kind is EventKind.LEFT:
            self._queue.append(("leave", (envelope.connection_id, envelope.room)))
        keys = self.keys
        channel = keys.probe(self.node_id) if kind is EventKind.PROBE else keys.room(envelope.room)
        self._queue.append(("publish", (channel, data)))
        self._ops_queued += 1
        self._wake.set()

    def ran_so_far(self) -> asyncio.Future[None] | None:
        """Done once Redis ran everything queued so far (None: nothing is on
        its way). A member's messages go through the history's script on
        another connection: published after this, they follow its
        ``user_joined`` on every node, as on one node (decisions.md 9)."""
        if self._ops_done >= self._ops_queued:
            return None
        future = asyncio.get_running_loop().create_future()
        self._ops_waiters.append((self._ops_queued, future))
        return future

    def _ran(self, upto: int) -> None:
        self._ops_done = max(self._ops_done, upto)
        waiting, self._ops_waiters = self._ops_waiters, []
        for mark, future in waiting:
            if mark <= self._ops_done or self._stopping:
                if not future.done():
                    future.set_result(None)
            else:
                self._ops_waiters.append((mark, future))

    async def _publisher(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        try:
            await self._flush_queue()
        finally:
            # Run, given up or failed: nothing more to wait for (ran_so_far).
            self._ran(self._ops_queued if not self._queue else self._ops_done)

    async def _flush_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            self._queued_bytes = 0
            upto = self._ops_queued  # the whole queue is in this batch
            # Queued before the last pipeline stalled: too late to be worth
            # delivering (at most once, never late).
            stale = time.monotonic() - self._queued_since > PUBLISH_MAX_AGE
            # And a batch that Redis itself only gets to late (it froze with
            # our pipeline in its socket buffer) is dropped there: the script
            # compares this deadline with Redis's own clock (issue 19, (a)).
            deadline = int((time.time() + PUBLISH_MAX_AGE) * 1000 + self._clock_offset_ms)
            commands = _group_publications(batch, stale)
            dropped = sum(1 for op, _ in batch if op == "publish") if stale else 0
            self.forward_failures += dropped
            self.stale_dropped += dropped
            assert self._redis is not None
            pipe = self._redis.pipeline(transaction=False)
            keys = self.keys
            conns_key = keys.conns(self.node_id)
            # How many envelopes each pipeline command carries (0: presence).
            carried: list[int] = []
            for op, arg in commands:
                if op == "publish":
                    carried += self._add_publications(pipe, arg, deadline)
                elif op == "join":
                    cid, room, user = arg
                    pipe.hset(conns_key, cid, room)
                    pipe.hset(keys.presence(room), cid, presence_value(self.node_id, user))
                    carried += (0, 0)
                else:
                    cid, room = arg
                    pipe.hdel(conns_key, cid)
                    pipe.hdel(keys.presence(room), cid)
                    carried += (0, 0)
            publications = sum(carried)
            try:
                results = await pipe.execute()
            except _LINK_ERRORS as exc:
                self.forward_failures += publications
                self._set_down(f"publish failed: {exc}")
                self._rebuild = True
                self._ran(upto)
                continue
            self._ran(upto)
            late = sum(n for n, result in zip(carried, results, strict=True) if n and result == -1)
            self.published += publications - late
            self.forward_failures += late
            self.stale_dropped += late

    # -- Subscribing ------------------------------------------------------------

    async def _subscriber(self, connected: asyncio.Future[None]) -> None:
        delays = backoff_delays()
        probe_channel = self.keys.probe(self.node_id).encode()
        while not self._stopping:
            assert self._redis is not None
            pubsub = self._new_pubsub()
            self._pubsub = pubsub
            try:
                if not self._registered:
                    # Before our own subscription: any listener is another process.
                    await self._claim_node_id()
                rooms = sorted(self._rooms)
                waiting = set(self._unready)
                await pubsub.subscribe(probe_channel, *(self.keys.room(r) for r in rooms))
                await self._register()
                await self._resync(rooms)
                self._rebuild = False
                self.last_probe_heard = self.clock()
                self._set_up()
                self._rooms_ready(waiting)
                if not connected.done():
                    connected.set_result(None)
                delays = backoff_delays()
                # _stopping too: a cancel swallowed inside redis-py (see
                # _within) must still end this loop within a second.
                while not self._rebuild and not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_pubsub(message)
                self._set_down("subscription rebuilt")
            except asyncio.CancelledError:
                raise
            except NodeIdInUse as exc:
                self._lose_node_id(exc)
                if not connected.done():
                    connected.set_exception(exc)
                    connected.exception()  # retrieved: start() raises it
            except _LINK_ERRORS as exc:
                self._set_down(str(exc) or type(exc).__name__)
            finally:
                self._pubsub = None
                for ack in self._acks.values():
                    if not ack.done():
                        ack.set_exception(ConnectionError("subscription connection closed"))
                        ack.exception()  # retrieved: the waiter, if any, sees it too
                self._acks.clear()
                try:
                    await _within(pubsub.aclose(), 1.0)
                except _LINK_ERRORS:
                    pass
            if self._stopping:
                return
            self.reconnects += 1
            await self._backoff(next(delays))

    def _on_primary_moved(self) -> None:
        """The sentinels promoted another primary: reconnect now rather than
        at the end of the backoff, and rebuild a subscription that may still
        be open to the old one (a primary demoted while we could reach it)."""
        self._rebuild = True
        self._primary_moved.set()

    async def _backoff(self, delay: float) -> None:
        """Sleep *delay* seconds, or less if a sentinel announces a failover."""
        try:
            await asyncio.wait_for(self._primary_moved.wait(), delay)
        except TimeoutError:
            pass
        self._primary_moved.clear()

    def _on_pubsub(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "message":
            self._handle(message["data"], message.get("channel"))
        elif kind == "subscribe":
            channel = message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else str(channel)
            ack = self._acks.pop(name, None)
            if ack is not None and not ack.done():
                ack.set_result(None)

    def _handle(self, data: Any, channel: Any) -> None:
        """One message from a channel. Whatever goes wrong with it (bad
        bytes, or a bug in handling it) costs that message only: logged
        (rate limited), counted, skipped; the subscription goes on."""
        try:
            self.receive(decode_envelope(data))
        except Exception as exc:
            self.malformed += 1
            suppressed = self._bad_envelope_lines.allow("bad", time.monotonic())
            if suppressed is not None:
                log_event(
                    log,
                    logging.WARNING,
                    "backplane_bad_envelope",
                    channel=_text(channel) if isinstance(channel, bytes | str) else "?",
                    error=f"{type(exc).__name__}: {exc}",
                    head=repr(bytes(data[:64])) if isinstance(data, bytes) else type(data).__name__,
                    **({"suppressed": suppressed} if suppressed else {}),
                )

    async def _supervise(self, connected: asyncio.Future[None]) -> None:
        """Run the subscriber; should it ever end while the node runs (a bug:
        it is a loop that handles its own errors), log it and start it again."""
        delays = backoff_delays(initial=0.5)
        while not self._stopping:
            try:
                await self._subscriber(connected)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backplane subscriber failed")
            if self._stopping:
                return
            self.subscriber_restarts += 1
            self._set_down("subscriber ended unexpectedly: restarting it")
            log_event(log, logging.ERROR, "backplane_subscriber_restart")
            await asyncio.sleep(next(delays))

    async def _register(self) -> None:
        """(Re-)register this node's presence from its own registry."""
        assert self._redis is not None and self.handler is not None
        keys = self.keys
        node = self.node_id
        await self._hold_node_id()
        was_reaped = await self._redis.exists(keys.reaped(node))
        if was_reaped:
            log.warning("this node was reaped during an outage: its clients must reconnect")
            await self._redis.delete(keys.reaped(node))
            if self.on_rejoined_after_reap is not None:
                self.on_rejoined_after_reap()
        self._publish_sha = await self._redis.script_load(self._publish_source)
        before = time.time()
        seconds, micros = await self._redis.time()
        after = time.time()
        self._clock_offset_ms = seconds * 1000 + micros / 1000 - (before + after) * 500
        presence = list(self.handler.local_presence())
        stale = await self._redis.hgetall(keys.conns(node))
        if not self._registered and not presence and stale:
            await self._announce_previous_run(stale)
        self._registered = True
        pipe = self._atomic()
        pipe.sadd(keys.nodes, node)
        pipe.set(keys.alive(node), "1", px=int(self.node_ttl * 1000))
        for cid, room in stale.items():
            pipe.hdel(keys.presence(_text(room)), cid)
        pipe.delete(keys.conns(node))
        for room, cid, user in presence:
            pipe.hset(keys.conns(node), cid, room)
            pipe.hset(keys.presence(room), cid, presence_value(node, user))
        await pipe.execute()

    async def _claim_node_id(self) -> None:
        """At this run's first connection: refuse a ``--node-id`` that a live
        process already runs under (an operator who copied a config), which
        would overwrite its presence and announce its clients gone. A live
        node listens on its probe channel and holds its lease; a killed one
        does neither for long (the kernel closes its connections at once, the
        lease runs out within the node TTL), so a node restarted under its id
        after a crash takes it over (and announces its last run's clients
        gone, :meth:`_announce_previous_run`)."""
        assert self._redis is not None
        keys = self.keys
        node = self.node_id
        # The lease first: on a Redis Cluster, the first command also reads
        # the slot map that finding the probe channel's shard needs.
        held = await self._redis.exists(keys.alive(node))
        listeners = await self._probe_listeners() if held else 0
        if listeners:
            raise NodeIdInUse(
                f"node id {node!r} is in use by another live node (its lease is held and "
                f"{listeners} connection(s) listen on its probe channel): "
                "give each node its own --node-id"
            )
        await self._redis.set(keys.run(node), self._run_token, px=int(self.node_ttl * 1000))

    async def _probe_listeners(self) -> int:
        """How many connections listen on this node id's probe channel."""
        assert self._redis is not None
        channel = self.keys.probe(self.node_id)
        return sum(int(n) for _, n in await self._redis.pubsub_numsub(channel))

    async def _hold_node_id(self) -> None:
        """Hold the node id for one more lease, unless another process took
        it meanwhile (started while this one could not reach Redis, or at the
        same instant as this one): then :class:`NodeIdInUse`."""
        holder = await self._hold_script(
            keys=[self.keys.run(self.node_id)],
            args=[self._run_token, int(self.node_ttl * 1000)],
        )
        if holder is not None:
            raise NodeIdInUse(
                f"node id {self.node_id!r} was taken by another process "
                f"(run {_text(holder)!r}, this one is {self._run_token!r}): "
                "give each node its own --node-id"
            )

    def _lose_node_id(self, exc: NodeIdInUse) -> None:
        """Another process has this node id: write nothing more under it
        (its presence is the other's now) and close this node's clients, if
        it has any yet, with 1012 so that they reconnect elsewhere (the other
        process announced them gone when it registered, or never heard of
        them). /readyz says so until the process is stopped. (At start, with
        no client yet, :meth:`start` raises it: the node refuses to start.)"""
        log_event(log, logging.ERROR, "node_id_in_use", node=self.node_id, detail=str(exc))
        self._stopping = True
        self._id_lost = True
        self._set_down(str(exc))
        if self.on_rejoined_after_reap is not None:
            self.on_rejoined_after_reap()

    async def _announce_previous_run(self, stale: dict[Any, Any]) -> None:
        """A node restarted under the same ``--node-id`` before its lease
        expired finds the connections of its last run on record: gone with
        that process, they are announced as a reaped node's would be, now
        rather than at the others' next resync. (Only while this run has no
        connection of its own: a ``lost`` notice takes every connection the
        others hold for this node id.)"""
        by_room: dict[RoomName, list[ConnectionId]] = defaultdict(list)
        for cid, room in stale.items():
            by_room[RoomName(_text(room))].append(ConnectionId(_text(cid)))
        log.warning(
            "%d connections of this node id's last run still on record: announcing them as gone",
            len(stale),
        )
        node = self.node_id
        pairs = [
            (
                self.keys.room(room),
                encode_envelope(
                    Envelope(node, EventKind.LOST, room, ConnectionId(node), lost_payload(dead))
                ),
            )
            for room, dead in by_room.items()
        ]
        deadline = int((time.time() + PUBLISH_MAX_AGE) * 1000 + self._clock_offset_ms)
        pipe = self._redis.pipeline(transaction=False)
        self._add_publications(pipe, pairs, deadline)
        await pipe.execute()

    async def _resync(self, rooms: list[RoomName] | None = None) -> None:
        """Correct every subscribed room's view, and count the nodes."""
        assert self._redis is not None
        self._nodes = max(1, await self._redis.scard(self.keys.nodes))
        await self._read_rooms(sorted(self._rooms) if rooms is None else rooms, initial=False)

    # -- Leases, reaping and probes ---------------------------------------------

    async def _lease(self) -> None:
        interval = self.node_ttl / 3
        ticks = 0
        while not self._stopping:
            await asyncio.sleep(interval)
            if not self._up:
                continue
            ticks += 1
            try:
                await self._refresh_and_reap()
                if ticks % 3 == 0:
                    await self._resync()
            except NodeIdInUse as exc:
                self._lose_node_id(exc)
                self._rebuild = True
                return
            except _ERRORS as exc:
                self._set_down(f"lease refresh failed: {exc}")
                self._rebuild = True

    async def _refresh_and_reap(self) -> None:
        assert self._redis is not None
        keys = self.keys
        await self._redis.set(keys.alive(self.node_id), "1", px=int(self.node_ttl * 1000))
        await self._hold_node_id()
        nodes = [_text(n) for n in await self._redis.smembers(keys.nodes)]
        if self.node_id not in nodes and not self._stopping:
            # Redis lost our registration without our connection dropping
            # (FLUSHALL, or a survivor reaped us while we were stalled past
            # the TTL): register again, as after a reconnect. (Not while we
            # withdraw it on the way out.)
            log.warning("this node's presence is gone from redis: registering again")
            await self._register()
            await self._resync()
        reaped = 0
        for node in nodes:
            if node == self.node_id:
                continue
            by_room = await self._reap(node, int(max(60, self.node_ttl * 10)))
            if by_room is None:
                continue
            reaped += 1
            log.warning(
                "reaped node %s: %d connections", node, sum(len(i) for i in by_room.values())
            )
            for room, dead in by_room.items():
                self.apply_lost(room, NodeId(node), dead)
                self.publish(
                    Envelope(
                        self.node_id, EventKind.LOST, room, ConnectionId(node), lost_payload(dead)
                    )
                )
        # /stats backplane.nodes and wshub_cluster_nodes at every refresh, not
        # only at each resync: a node that joined or was reaped shows within
        # a third of the TTL (this node counted once, registered again or not).
        self._nodes = max(1, len(set(nodes) | {self.node_id}) - reaped)

    async def _prober(self) -> None:
        """Publish to ourselves; a subscription that stops hearing is rebuilt."""
        while not self._stopping:
            await asyncio.sleep(self.probe_interval)
            if not self._up:
                continue
            self.publish(
                Envelope(self.node_id, EventKind.PROBE, RoomName(""), ConnectionId(""), b"")
            )
            if self.clock() - self.last_probe_heard > 3 * self.probe_interval + 1.0:
                self.silent_rebuilds += 1
                self._set_down("subscription went silent (self-probe not heard): rebuilding")
                self._rebuild = True


def _group_publications(
    batch: list[tuple[str, tuple[Any, ...]]], stale: bool
) -> list[tuple[str, Any]]:
    """The batch as pipeline commands: each run of envelopes between presence
    updates becomes one ("publish", [(channel, envelope), ...]); without the
    envelopes when *stale*. Presence updates keep their place (the HSET
    before its joined...)."""
    commands: list[tuple[str, Any]] = []
    for op, arg in batch:
        if op != "publish":
            commands.append((op, arg))
        elif not stale:
            if commands and commands[-1][0] == "publish":
                commands[-1][1].append(arg)
            else:
                commands.append(("publish", [arg]))
    return commands


async def reap(
    script: Any, keys: Keys, node: str, marker_ttl: int
) -> dict[RoomName, list[ConnectionId]] | None:
    """Reap *node* if its lease expired and no one else did: its connections
    by room, or None."""
    pairs = await script(
        keys=[keys.nodes, keys.alive(node), keys.conns(node), keys.reaped(node)],
        args=[node, marker_ttl, keys.presence_prefix],
    )
    if pairs is None:
        return None
    by_room: dict[RoomName, list[ConnectionId]] = defaultdict(list)
    for cid, room in zip(pairs[::2], pairs[1::2], strict=True):
        by_room[RoomName(room.decode())].append(ConnectionId(cid.decode()))
    return by_room


async def reap_node(url: str, node_id: str, *, prefix: str = "wshub") -> list[str]:
    """Reap *node_id* now (a supervisor whose worker died): expire its lease,
    take its connections and tell the survivors, room by room. Returns the
    reaped ids."""
    keys = Keys(prefix)
    redis = redis_client(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        await redis.delete(keys.alive(node_id))
        by_room = await reap(redis.register_script(_REAP), keys, node_id, 60)
        if by_room is None:
            return []
        sender = NodeId(f"supervisor-{node_id}")
        for room, dead in by_room.items():
            envelope = Envelope(
                sender, EventKind.LOST, room, ConnectionId(node_id), lost_payload(dead)
            )
            await redis.publish(keys.room(room), encode_envelope(envelope))
        return [cid for ids in by_room.values() for cid in ids]
    finally:
        await redis.aclose()


def presence_value(node: str, user: str | None) -> str:
    """A ``{p}:presence:{room}`` value: the node, and the user id when there
    is one (after a tab: node ids hold none, a user id may hold anything)."""
    return node if user is None else f"{node}\t{user}"


def _text(value: bytes | str) -> str:
    """A value read from Redis (bytes, as the client is not decoding)."""
    return value.decode() if isinstance(value, bytes) else value
