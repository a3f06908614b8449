"""The cluster backplane on Redis (or Valkey): pub/sub plus leased presence.

Keys (``{p}`` is ``--cluster-name``, default ``wshub``)::

    {p}:events             pub/sub channel: every envelope of every node
    {p}:nodes              SET of node ids that registered presence
    {p}:node:{id}:alive    lease, expires after --node-ttl unless refreshed
    {p}:node:{id}:conns    SET of the node's open connection ids
    {p}:node:{id}:reaped   marker left by the survivor that reaped the node

Theory of operation
-------------------
*Publishing.* Envelopes queued during one loop pass go out in one pipeline on
one connection, in order, together with the presence updates (``SADD`` before
a ``joined`` is published, ``SREM`` before a ``left``). Redis delivers one
connection's publications in order, so messages from one sender reach every
recipient in the order sent. While Redis is unreachable nothing is queued:
envelopes are dropped and counted (delivery is at most once, never late).
The queue is bounded in bytes (:data:`PUBLISH_QUEUE_LIMIT`): past it, under a
slow Redis, envelopes are dropped and counted; and a batch that waited longer
than :data:`PUBLISH_MAX_AGE` for its turn (a Redis that froze, then came
back) is dropped and counted rather than delivered late. Presence updates in
it still go out (they are state, and the periodic resync reconciles them).

*Subscribing.* One pub/sub connection, rebuilt with jittered exponential
backoff after any error. On every (re)connect the node re-registers its
presence from its own registry, then reads every other node's presence and
corrects its view (:meth:`ViewKeeper.apply_snapshot`): joins and leaves missed
during an outage are announced then, once. A subscription can also go silent
without an error (a half-open TCP connection): every node publishes a probe to
itself every few seconds and rebuilds the subscription when it stops hearing
its own probes. An envelope that cannot be handled (malformed, or a bug in
handling it) is logged, counted and skipped; and the subscriber task itself is
restarted should it ever end while the node runs (issue 19.6).

*Presence.* Every ``ttl/3`` a node refreshes its lease and looks for nodes
whose lease expired. Reaping is one Lua script: the first survivor to run it
removes the dead node from ``{p}:nodes`` and takes its connection ids; every
other survivor gets nothing. The winner publishes a ``lost`` envelope and each
node announces ``user_left`` for those ids to its own clients, so each is
announced exactly once per client. A node that comes back after being reaped
(an outage longer than the TTL) finds the marker and closes its clients with
1012 so they reconnect as new connections, since their departure was already
announced.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..ids import ConnectionId, NodeId
from ..logs import LineLimiter, log_event
from . import BackplaneHandler, Envelope, EventKind, decode_envelope, encode_envelope
from .base import ViewKeeper

__all__ = ["RedisBackplane", "backoff_delays", "reap_node"]

log = logging.getLogger("wshub.backplane")

_REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return false end
local ids = redis.call('SMEMBERS', KEYS[3])
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[4], '1', 'EX', ARGV[2])
return ids
"""

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

# Publish a batch of envelopes unless Redis gets to it after the deadline
# (ARGV[1], Unix ms on Redis's clock): then none, and -1.
_PUBLISH = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then
  return -1
end
for i = 2, #ARGV do redis.call('PUBLISH', KEYS[1], ARGV[i]) end
return #ARGV - 1
"""

PUBLISH_QUEUE_LIMIT = 16 * 1024 * 1024
"""Bytes of envelopes waiting for Redis; past it new ones are dropped, counted."""
PUBLISH_MAX_AGE = 1.0
"""Seconds an envelope may wait for its pipeline; older is dropped, not sent late."""
_STOP_TIMEOUT = 3.0  # seconds for the background tasks to end once cancelled


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
    cap: float = 5.0,
    rand: Callable[[], float] = random.random,
) -> Any:
    """Reconnect delays: exponential with full jitter, capped (pure)."""
    delay = initial
    while True:
        yield delay * (0.5 + rand() / 2)
        delay = min(cap, delay * factor)


class Keys:
    def __init__(self, prefix: str) -> None:
        self.events = f"{prefix}:events"
        self.nodes = f"{prefix}:nodes"
        self.prefix = prefix

    def alive(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:alive"

    def conns(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:conns"

    def reaped(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:reaped"


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
        self.keys = Keys(prefix)
        self.probe_interval = probe_interval or max(0.2, min(5.0, node_ttl / 6))
        self.on_rejoined_after_reap = on_rejoined_after_reap
        self._redis: aioredis.Redis | None = None
        self._up = False
        self._reason = "connecting to Redis"
        self._queue: list[tuple[str, Any]] = []
        self._queued_bytes = 0
        self._queued_since = 0.0  # when the oldest queued envelope was queued
        self._publish_sha = ""
        self._clock_offset_ms = 0.0  # Redis's clock minus ours, measured at each connect
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._rebuild = False
        self._reap_script: Any = None
        self._pubsub: Any = None
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
        self._redis = aioredis.from_url(
            self.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
        )
        self._reap_script = self._redis.register_script(_REAP)
        connected = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._supervise(connected), name="wshub-redis-subscriber"),
            asyncio.create_task(self._publisher(), name="wshub-redis-publisher"),
            asyncio.create_task(self._lease(), name="wshub-redis-lease"),
            asyncio.create_task(self._prober(), name="wshub-redis-probe"),
        ]
        # Serve at once either way; wait briefly so that a node that can reach
        # Redis starts with correct counts.
        try:
            await asyncio.wait_for(asyncio.shield(connected), timeout)
        except TimeoutError:
            log.warning("redis not reachable yet at start; serving local clients meanwhile")

    async def stop(self) -> None:
        """Flush queued envelopes and withdraw our presence, within a few seconds."""
        self._stopping = True
        redis = self._redis
        if redis is not None and self._up:
            try:
                await _within(self._flush(), 2.0)
                pipe = redis.pipeline(transaction=True)
                pipe.srem(self.keys.nodes, self.node_id)
                pipe.delete(self.keys.conns(self.node_id), self.keys.alive(self.node_id))
                await _within(pipe.execute(), 2.0)
            except _ERRORS as exc:
                log.warning("could not withdraw presence from redis: %s", exc)
        await self._close_connections()
        self.handler = None

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
                except (*_ERRORS, RuntimeError):
                    pass

    async def crash(self) -> None:
        """Vanish without a goodbye, as under ``kill -9`` (for tests): our
        presence stays in Redis until a survivor reaps it."""
        self._stopping = True
        await self._close_connections()
        self.handler = None

    # -- State ------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        # Public (/readyz, /stats): fixed phrases only. Redis error text
        # (addresses, auth failures, bytes from whatever answered) goes to the
        # log (issue 19.9).
        return self._up, ("redis connected" if self._up else self._reason)

    def _set_up(self) -> None:
        if not self._up:
            log_event(log, logging.WARNING, "backplane_up", url=_redacted(self.url))
        self._up = True
        self._reason = "redis connected"

    def _set_down(self, reason: str) -> None:
        if self._up:
            log_event(log, logging.WARNING, "backplane_down", reason=reason)
        else:
            log_event(log, logging.INFO, "backplane_still_down", reason=reason)
        self._up = False
        self._reason = "redis unreachable"

    def metrics(self) -> dict[str, float]:
        return {
            "up": 1 if self._up else 0,
            "nodes": len(self.view.nodes) + 1,
            "received": self.received,
            "published": self.published,
            "forward_failures": self.forward_failures,
            "reconnects": self.reconnects,
            "silent_rebuilds": self.silent_rebuilds,
            "malformed": self.malformed,
            "stale_dropped": self.stale_dropped,
            "overflow_dropped": self.overflow_dropped,
            "subscriber_restarts": self.subscriber_restarts,
        }

    # -- Publishing -------------------------------------------------------------

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
            self._queue.append(("sadd", envelope.connection_id))
        elif kind is EventKind.LEFT:
            self._queue.append(("srem", envelope.connection_id))
        self._queue.append(("publish", data))
        self._wake.set()

    async def _publisher(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            self._queued_bytes = 0
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
            conns_key = self.keys.conns(self.node_id)
            publications = 0
            for op, arg in commands:
                if op == "publish":
                    pipe.evalsha(self._publish_sha, 1, self.keys.events, deadline, *arg)
                    publications += len(arg)
                elif op == "sadd":
                    pipe.sadd(conns_key, arg)
                else:
                    pipe.srem(conns_key, arg)
            try:
                results = await pipe.execute()
            except _ERRORS as exc:
                self.forward_failures += publications
                self._set_down(f"publish failed: {exc}")
                self._rebuild = True
                continue
            late = sum(
                len(arg)
                for (op, arg), result in zip(commands, results, strict=True)
                if op == "publish" and result == -1
            )
            self.published += publications - late
            self.forward_failures += late
            self.stale_dropped += late

    # -- Subscribing ------------------------------------------------------------

    async def _subscriber(self, connected: asyncio.Future[None]) -> None:
        delays = backoff_delays()
        while not self._stopping:
            assert self._redis is not None
            pubsub = self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.events)
                await self._register()
                await self._resync()
                self._rebuild = False
                self.last_probe_heard = self.clock()
                self._set_up()
                if not connected.done():
                    connected.set_result(None)
                delays = backoff_delays()
                # _stopping too: a cancel swallowed inside redis-py (see
                # _within) must still end this loop within a second.
                while not self._rebuild and not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._handle(message["data"])
                self._set_down("subscription rebuilt")
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                self._set_down(str(exc) or type(exc).__name__)
            finally:
                try:
                    await _within(pubsub.aclose(), 1.0)
                except _ERRORS:
                    pass
            if self._stopping:
                return
            self.reconnects += 1
            await asyncio.sleep(next(delays))

    def _handle(self, data: Any) -> None:
        """One message from the channel. Whatever goes wrong with it (bad
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
                    channel=self.keys.events,
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
        was_reaped = await self._redis.exists(keys.reaped(node))
        if was_reaped:
            log.warning("this node was reaped during an outage: its clients must reconnect")
            await self._redis.delete(keys.reaped(node))
            if self.on_rejoined_after_reap is not None:
                self.on_rejoined_after_reap()
        self._publish_sha = await self._redis.script_load(_PUBLISH)
        before = time.time()
        seconds, micros = await self._redis.time()
        after = time.time()
        self._clock_offset_ms = seconds * 1000 + micros / 1000 - (before + after) * 500
        ids = list(self.handler.local_connection_ids())
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(keys.nodes, node)
        pipe.set(keys.alive(node), "1", px=int(self.node_ttl * 1000))
        pipe.delete(keys.conns(node))
        if ids:
            pipe.sadd(keys.conns(node), *ids)
        await pipe.execute()

    async def _resync(self) -> None:
        assert self._redis is not None
        nodes = [n.decode() for n in await self._redis.smembers(self.keys.nodes)]
        others = [n for n in nodes if n != self.node_id]
        pipe = self._redis.pipeline(transaction=False)
        for node in others:
            pipe.smembers(self.keys.conns(node))
        results = await pipe.execute() if others else []
        snapshot = {
            NodeId(node): {ConnectionId(i.decode()) for i in ids}
            for node, ids in zip(others, results, strict=True)
        }
        self.apply_snapshot(snapshot)

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
            except _ERRORS as exc:
                self._set_down(f"lease refresh failed: {exc}")
                self._rebuild = True

    async def _refresh_and_reap(self) -> None:
        assert self._redis is not None
        keys = self.keys
        await self._redis.set(keys.alive(self.node_id), "1", px=int(self.node_ttl * 1000))
        nodes = [n.decode() for n in await self._redis.smembers(keys.nodes)]
        for node in nodes:
            if node == self.node_id:
                continue
            ids = await self._reap_script(
                keys=[keys.nodes, keys.alive(node), keys.conns(node), keys.reaped(node)],
                args=[node, int(max(60, self.node_ttl * 10))],
            )
            if ids is None:
                continue
            dead = [ConnectionId(i.decode()) for i in ids]
            log.warning("reaped node %s: %d connections", node, len(dead))
            self.apply_lost(NodeId(node), dead)
            self.publish(
                Envelope(self.node_id, EventKind.LOST, ConnectionId(node), "\n".join(dead).encode())
            )

    async def _prober(self) -> None:
        """Publish to ourselves; a subscription that stops hearing is rebuilt."""
        while not self._stopping:
            await asyncio.sleep(self.probe_interval)
            if not self._up:
                continue
            self.publish(Envelope(self.node_id, EventKind.PROBE, ConnectionId(""), b""))
            if self.clock() - self.last_probe_heard > 3 * self.probe_interval + 1.0:
                self.silent_rebuilds += 1
                self._set_down("subscription went silent (self-probe not heard): rebuilding")
                self._rebuild = True


def _group_publications(batch: list[tuple[str, Any]], stale: bool) -> list[tuple[str, Any]]:
    """The batch as pipeline commands: each run of envelopes between presence
    updates becomes one ("publish", [envelopes]); without the envelopes when
    *stale*. Presence updates keep their place (SADD before its joined...)."""
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


async def reap_node(url: str, node_id: str, *, prefix: str = "wshub") -> list[str]:
    """Reap *node_id* now (a supervisor whose worker died): expire its lease,
    take its connections and tell the survivors. Returns the reaped ids."""
    keys = Keys(prefix)
    redis = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        await redis.delete(keys.alive(node_id))
        ids = await redis.register_script(_REAP)(
            keys=[keys.nodes, keys.alive(node_id), keys.conns(node_id), keys.reaped(node_id)],
            args=[node_id, 60],
        )
        if ids is None:
            return []
        dead = [i.decode() for i in ids]
        envelope = Envelope(
            NodeId(f"supervisor-{node_id}"),
            EventKind.LOST,
            ConnectionId(node_id),
            "\n".join(dead).encode(),
        )
        await redis.publish(keys.events, encode_envelope(envelope))
        return dead
    finally:
        await redis.aclose()


def _redacted(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
