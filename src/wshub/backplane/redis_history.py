"""Room history on Redis: offsets assigned cluster-wide, atomically with the
publication, so a client recovers on any node (decisions.md 13).

Keys (``{p}`` is ``--cluster-name``; ``{r.ROOM}`` is a hash tag, so the two
keys of a room share a Redis Cluster slot, the default room's included)::

    {p}:history:{r.ROOM}:meta    HASH epoch, top; PEXPIRE meta_ttl, refreshed on use
                                 and while a node has members in the room
    {p}:history:{r.ROOM}:stream  STREAM of the room's entries (fields o p s k x),
                                 MAXLEN = history size, PEXPIRE ttl after each
                                 append; entries older than the TTL are left
                                 to MAXLEN and the key's expiry, and skipped
                                 when read (their ids are Redis' time)

Theory of operation
-------------------
*Publishing* is one script (:data:`_PUBLISH`): take the room's epoch (creating
it, with an empty stream, when the meta key is gone), ``HINCRBY`` the top,
splice the offset into the payload exactly as :func:`wshub.protocol.with_offset`
does, ``XADD`` it (capped), and ``PUBLISH`` the envelope (the caller's prefix plus
that payload) on the room's channel. Redis runs scripts one at a time, so the
order of offsets is the order subscribers receive: one order per room for the
whole cluster. Publications from one node go out in one pipeline on one
connection, in the order :meth:`RedisHistory.publish` was called, so messages
from one sender keep their order.

*Epochs.* The epoch lives in the meta hash with the counter: they vanish
together (TTL, ``FLUSHALL``, eviction under ``maxmemory``), and the next use
sets a new random epoch, deletes any stream left over and starts the counter
again, so a client never recovers across the gap. A hub must treat an epoch
returned by :meth:`~RedisHistory.publish` other than the one its members were
welcomed with as a reset (its members' offsets went backwards): see
docs/protocol.md. A room with members but no publication for longer than
``meta_ttl`` has lost nothing, so its epoch must stay: each node refreshes the
meta keys of the rooms it has members in (:meth:`RedisHistory.keep`, pipelined,
every third of ``meta_ttl``). ``PEXPIRE`` on a key that is gone does nothing:
a lost epoch is not brought back, the next use makes a new one.

*Reading* is one script (:data:`_READ`) too, so ``epoch``, ``top`` and the
entries come from one instant. Because a room's entries are a contiguous run of
offsets ending at ``top``, the entries after ``OFFSET`` are the last
``top - OFFSET`` entries (``XREVRANGE ... COUNT``), and the recovery succeeds
exactly when that many fresh entries are held. Time is Redis' own (``TIME``):
one clock for the whole cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from ..history import Entry, Recovery, new_epoch, would_receive
from ..protocol import RelayKind
from .redisconn import redis_client

__all__ = ["RedisHistory", "StalePublication"]

_T = TypeVar("_T")

# Shared by both scripts: the room's epoch and top, creating the meta (and
# dropping any stream left from a lost epoch) when it is gone.
_META = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
else
  top = tonumber(redis.call('HGET', KEYS[1], 'top'))
end
"""

# A publication Redis only gets to after its deadline (ARGV[11], Unix ms on
# Redis' clock: it froze with our pipeline in its socket buffer) is not run:
# no offset taken, nothing recorded or published (at most once, never late).
_DEADLINE = """
local clock = redis.call('TIME')
if tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) > tonumber(ARGV[11]) then
  return {'', -1}
end
"""

# KEYS: meta, stream. ARGV: new epoch, meta ttl ms, ttl ms, size, channel,
# envelope prefix, payload without offset, sender, kind, exclude ('' = none),
# deadline. Returns {epoch, offset}, or {'', -1} past the deadline.
_PUBLISH = (
    _DEADLINE
    + _META
    + """
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local payload = string.sub(ARGV[7], 1, -2) .. ',"offset":' .. string.format('%d', offset) .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*',
           'o', offset, 'p', payload, 's', ARGV[8], 'k', ARGV[9], 'x', ARGV[10])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6] .. payload)
return {epoch, offset}
"""
)

# KEYS: meta, stream. ARGV: new epoch, meta ttl ms, ttl ms, size, mode
# ('state', 'since' or 'recent'), client epoch, offset, count, marker channel
# ('' = none), marker message. Returns {epoch, top, recovered, entry
# fields...} oldest first. The marker is published after the read: once a
# subscriber hears it, it has heard every publication the read saw (Redis
# writes to a subscriber's socket in the order it runs commands), whatever
# the order in which the reply and the subscription reach the node.
_READ = (
    _META
    + """
local function read()
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local mode = ARGV[5]
if mode == 'state' then return {epoch, top, 0} end
local want
if mode == 'since' then
  if ARGV[6] ~= epoch then return {epoch, top, 0} end
  local offset = tonumber(ARGV[7])
  if offset > top then return {epoch, top, 0} end
  want = top - offset
  if want == 0 then return {epoch, top, 1} end
  if want > tonumber(ARGV[4]) then return {epoch, top, 0} end
else
  want = math.min(tonumber(ARGV[8]), tonumber(ARGV[4]))
  if want == 0 then return {epoch, top, 1} end
end
local t = redis.call('TIME')
local fresh = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3]) + 1
local items = redis.call('XREVRANGE', KEYS[2], '+', fresh, 'COUNT', want)
if mode == 'since' then
  if #items < want or tonumber(items[#items][2][2]) ~= top - want + 1 then
    return {epoch, top, 0}
  end
end
local out = {epoch, top, 1}
for i = #items, 1, -1 do out[#out + 1] = items[i][2] end
return out
end
local out = read()
if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
return out
"""
)

IDLE_CHECK = 0.2
"""Seconds idle after which the connection is checked before use."""
_CONNECTION_ERRORS = (ConnectionError, OSError, RedisConnectionError)

_KINDS = {kind.value.encode(): kind for kind in RelayKind}

MAX_AGE = 1.0
"""Seconds a publication may wait for Redis (on our side, then on Redis'
clock); older is dropped, never delivered late (as the backplane's
``PUBLISH_MAX_AGE``)."""
KEEP_BATCH = 100
"""Meta keys refreshed per pipeline by :meth:`RedisHistory.keep`. The cost is
the client's (redis-py builds and parses each command, ~55 us): 10,000 rooms
are ~0.56 s of CPU every third of ``meta_ttl`` and ~50 ms of Redis', and a
batch of 100 holds the loop ~6 ms, within a loaded machine's own stalls
(batches of 1,000 held it 75-130 ms: bench/history_keep_cost.py)."""
GIVE_UP_MARGIN = 0.25
"""Seconds past a batch's script deadline after which its caller hears that it
failed, though Redis has not answered (it froze): by then Redis will not run
it (the deadline is on Redis' clock, ours measured to well under a
millisecond), so the caller may serve it without an offset. Without this
bound a frozen Redis held each batch for the socket timeout (5 s), and the
batches behind it for a PING's as well."""
QUEUE_LIMIT = 16 * 1024 * 1024
"""Bytes of publications waiting for Redis; past it new ones fail at once."""

PRESENCE_WAIT = 0.25
"""Seconds a batch waits at most for the backplane to have run the presence
updates queued before it (see ``presence_ran``)."""


class StalePublication(Exception):
    """Redis did not take the publication in time: dropped, not recorded."""


# keys, arguments, the caller's future, when it was queued (loop time)
_Queued = tuple[list[str], list[Any], "asyncio.Future[tuple[str, int]]", float]


class RedisHistory:
    """The history of every room of a cluster, kept in Redis.

    Offsets and epochs are the cluster's: every node reads and writes the same
    keys. :meth:`publish` replaces the room's plain ``PUBLISH`` when history is
    on. Errors of the connection (``RedisError``, ``OSError``) reach the
    caller: delivery stays at most once.
    """

    def __init__(
        self,
        redis: Any,
        *,
        sharded: bool = False,
        prefix: str = "wshub",
        size: int = 100,
        ttl: float = 120.0,
        meta_ttl: float = 3600.0,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        if size < 1:
            raise ValueError("RedisHistory needs a history size of at least 1 (0 is off)")
        self.redis = redis
        self.prefix = prefix
        self.size = size
        self.ttl_ms = max(1, int(ttl * 1000))
        self.meta_ttl_ms = max(self.ttl_ms, int(meta_ttl * 1000))
        self._epochs = epochs
        # On a Redis Cluster (*redis* its client) channels are sharded.
        publish, read = _PUBLISH, _READ
        if sharded:
            publish, read = (s.replace("'PUBLISH'", "'SPUBLISH'") for s in (publish, read))
        self._publish_source = publish
        self._publish = redis.register_script(publish)
        self._read = redis.register_script(read)
        self._queue: list[_Queued] = []
        self._queued_bytes = 0
        self._clock_offset_ms: float | None = None  # Redis' clock minus ours
        self._flusher: asyncio.Task[None] | None = None
        # The backplane's "everything queued so far has run" (None: nothing
        # on its way); set by the node when the backplane is on Redis.
        self.presence_ran: Callable[[], asyncio.Future[None] | None] | None = None
        # A batch, or the check before one, given up unanswered (Redis froze
        # with it in its socket): until Redis answers it, nothing more is
        # sent (see _flush).
        self._stalled: asyncio.Future[Any] | None = None
        # Loop time at which Redis answered it: what was queued before came
        # during the stall and is given up as the rest of it was.
        self._stall_ended = float("-inf")
        self._last_used = float("-inf")
        self.published = 0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisHistory:
        from .redis_cluster import cluster_client, is_cluster_url

        if is_cluster_url(url):
            # The room's channel is a sharded one, on its keys' slot.
            return cls(cluster_client(url, 5.0), sharded=True, **kwargs)
        return cls(redis_client(url, socket_timeout=5, socket_connect_timeout=5), **kwargs)

    async def answered(self) -> None:
        """Until every publication queued so far is answered or given up
        (their futures done, so their done callbacks are scheduled)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def aclose(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._stalled is not None:
            self._stalled.cancel()
        await self.redis.aclose()

    def keys(self, room: str) -> list[str]:
        base = f"{self.prefix}:history:{{r.{room}}}"
        return [f"{base}:meta", f"{base}:stream"]

    # -- Publication ------------------------------------------------------------

    async def publish(
        self, room: str, channel: str, prefix: bytes, entry: Entry
    ) -> tuple[str, int]:
        """Append *entry* to the room's history and publish ``prefix`` plus
        its payload on *channel*, atomically; returns ``(epoch, offset)``.

        ``entry.payload`` is the frame *without* an offset (``entry.offset``
        is ignored): the script splices in the offset it assigns, the bytes
        :func:`~wshub.protocol.with_offset` gives.
        """
        return await self.submit(room, channel, prefix, entry)

    def submit(
        self, room: str, channel: str, prefix: bytes, entry: Entry
    ) -> asyncio.Future[tuple[str, int]]:
        """:meth:`publish` without a coroutine: queue it now and return the
        future of its ``(epoch, offset)``. For a hub's hot path (no task per
        message); whoever drops the future must still read its exception."""
        args = [
            self._epochs(),
            self.meta_ttl_ms,
            self.ttl_ms,
            self.size,
            channel,
            prefix,
            entry.payload,
            entry.sender,
            entry.kind.value,
            entry.exclude or "",
        ]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[str, int]] = loop.create_future()
        size = len(entry.payload) + len(prefix)
        if self._queued_bytes + size > QUEUE_LIMIT:
            future.set_exception(StalePublication("too much waiting for Redis"))
            return future
        self._queued_bytes += size
        self._queue.append((self.keys(room), args, future, loop.time()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="wshub-history-publisher")
        return future

    @property
    def stalled(self) -> bool:
        """Redis has not been heard from since it failed to answer in time (a
        batch given up unanswered, or a check of the connection): what is
        queued meanwhile will be given up (see :meth:`_flush`)."""
        return self._stalled is not None

    def pending(self) -> bool:
        """Publications are queued or on their way and not answered yet."""
        return bool(self._queue) or (self._flusher is not None and not self._flusher.done())

    async def _flush(self) -> None:
        # One batch at a time, in call order, on one connection: a sender's
        # messages keep their order.
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.stalled:
                # Redis has not answered what was given up before (a batch,
                # or the check before one): sent now, this would run when
                # Redis wakes, inside its own deadline, after its members
                # here were served without it (late for the other nodes, and
                # a gap for any node whose subscription came back meanwhile).
                # Given up at once instead: served here.
                self._give_up(self._take(), StalePublication("Redis still stalled"))
                continue
            try:
                # Before the batch is taken: a check that stalls (a frozen
                # Redis) leaves what queued meanwhile to the age check below,
                # and is given up once the oldest is too old to be sent.
                now = loop.time()
                if now - self._last_used <= IDLE_CHECK and self._clock_offset_ms is not None:
                    self._last_used = now  # in use: nothing to check (no timer either)
                else:
                    waited = now - self._queue[0][3]
                    await self._or_stall(self._fresh(), max(0.05, MAX_AGE - waited), "Redis froze")
            except Exception as exc:
                self._give_up(self._take(), exc)
                continue
            batch = self._take()
            presence = self.presence_ran() if self.presence_ran is not None else None
            if presence is not None:
                # The user_joined of each sender in the batch was queued on the
                # backplane before its messages: Redis runs it first, so that
                # no node sees a message from someone it was not told of yet.
                # Bounded: a backplane that stalls holds no message for long.
                await asyncio.wait([presence], timeout=PRESENCE_WAIT)
            if batch[0][3] < self._stall_ended:
                # Queued before Redis answered what was given up: it came
                # during the stall, and goes as the rest of it did (served
                # here), whichever of the two replies (the stalled one, the
                # check's) this loop read first.
                during = sum(1 for queued in batch if queued[3] < self._stall_ended)
                self._give_up(batch[:during], StalePublication("queued while Redis stalled"))
                batch = batch[during:]
                if not batch:
                    continue
            # A batch that waited behind a stalled pipeline longer than
            # MAX_AGE goes as a whole, like the backplane's: what was sent
            # during a stall is dropped together, not let through in part.
            if loop.time() - batch[0][3] > MAX_AGE:
                for _, _, future, _ in batch:
                    if not future.done():
                        future.set_exception(StalePublication("waited too long for Redis"))
                continue
            try:
                # A batch Redis has not answered once its deadline passed will
                # never run (the script checks it): give it up then.
                results = await self._or_stall(
                    self._run(batch), MAX_AGE + GIVE_UP_MARGIN, "no answer by the deadline"
                )
            except Exception as exc:  # every caller hears why its publication failed
                for _, _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future, _), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                elif int(result[1]) < 0:
                    future.set_exception(StalePublication("Redis got to it too late"))
                else:
                    future.set_result((result[0].decode(), int(result[1])))
                    self.published += 1

    def _take(self) -> list[_Queued]:
        batch, self._queue = self._queue, []
        self._queued_bytes = 0
        return batch

    @staticmethod
    def _give_up(batch: Sequence[_Queued], exc: BaseException) -> None:
        for _, _, future, _ in batch:
            if not future.done():
                future.set_exception(exc)

    async def _or_stall(self, coro: Coroutine[Any, Any, _T], timeout: float, why: str) -> _T:
        """*coro*'s result, or :class:`StalePublication` after *timeout*
        seconds; then it is left to finish (not cancelled: cancelled, its
        reply would be lost with its connection), and until it does, Redis is
        :attr:`stalled`: its answer, or its connection's failure, says when
        Redis is back."""
        running = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait((running,), timeout=timeout)
        if not done:
            running.add_done_callback(_retrieve)
            running.add_done_callback(self._stall_over)
            self._stalled = running
            raise StalePublication(why)
        return running.result()

    def _stall_over(self, _: asyncio.Future[Any]) -> None:
        self._stalled = None
        self._stall_ended = asyncio.get_running_loop().time()

    async def _fresh(self) -> None:
        """A connection idle for a while is checked with a PING first (and
        made again once if it died, say Redis restarted meanwhile), so that
        the publication does not fail on it: a publication is never resent,
        as it may have run."""
        now = asyncio.get_running_loop().time()
        if now - self._last_used > IDLE_CHECK:
            try:
                await self.redis.ping()
            except _CONNECTION_ERRORS:
                await self._reconnect()
                await self.redis.ping()
        if self._clock_offset_ms is None:
            before = time.time()
            seconds, micros = await self.redis.time()
            after = time.time()
            self._clock_offset_ms = seconds * 1000 + micros / 1000 - (before + after) * 500
        self._last_used = now

    async def _reconnect(self) -> None:
        # Every idle connection of the pool went with the one found dead (a
        # cluster client has a pool per node and remakes them itself).
        pool = getattr(self.redis, "connection_pool", None)
        if pool is not None:
            await pool.disconnect(inuse_connections=False)
        self._clock_offset_ms = None  # maybe another Redis now: measured again

    async def _run(self, batch: Sequence[_Queued]) -> list[Any]:
        assert self._clock_offset_ms is not None, "measured by _fresh()"
        deadline = int((time.time() + MAX_AGE) * 1000 + self._clock_offset_ms)
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            sha = self._publish.sha
            for keys, args, _, _ in batch:
                # The command, not the method: redis-py's cluster pipeline
                # blocks the method (the command routes by its keys' slot).
                pipe.execute_command("EVALSHA", sha, 2, *keys, *args, deadline)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                # A restarted Redis forgot the script; it ran for none of them.
                self._publish.sha = await self.redis.script_load(self._publish_source)
                continue
            return results
        raise AssertionError("unreachable")

    # -- Rooms with members -----------------------------------------------------

    @property
    def keep_interval(self) -> float:
        """Seconds between two :meth:`keep` calls: a third of ``meta_ttl``, so
        that a refresh that is late, or one that fails, still comes in time."""
        return self.meta_ttl_ms / 3000

    async def keep(self, rooms: Iterable[str]) -> int:
        """Push back the expiry of the meta keys of *rooms* (rooms with members
        on this node) by ``meta_ttl``: an idle room with members keeps its epoch.
        A key already gone stays gone (that history was lost). Returns how many
        keys were refreshed."""
        names = list(rooms)
        refreshed = 0
        for start in range(0, len(names), KEEP_BATCH):
            await self._fresh()
            pipe = self.redis.pipeline(transaction=False)
            for room in names[start : start + KEEP_BATCH]:
                pipe.pexpire(self.keys(room)[0], self.meta_ttl_ms)
            refreshed += sum(1 for done in await pipe.execute() if done)
        return refreshed

    # -- Join -------------------------------------------------------------------

    async def _call(
        self,
        room: str,
        mode: str,
        epoch: str,
        offset: int,
        count: int,
        marker: tuple[str, bytes] | None = None,
    ) -> list[Any]:
        args: list[str | int | bytes] = [self._epochs(), self.meta_ttl_ms, self.ttl_ms, self.size]
        args += [mode, epoch, offset, count]
        args += [marker[0], marker[1]] if marker is not None else ["", ""]
        await self._fresh()
        try:
            reply: list[Any] = await self._read(keys=self.keys(room), args=args)
        except _CONNECTION_ERRORS:
            # A read may run twice (a second marker is harmless): try once more.
            await self._reconnect()
            reply = await self._read(keys=self.keys(room), args=args)
        return reply

    async def state(self, room: str, *, marker: tuple[str, bytes] | None = None) -> tuple[str, int]:
        """The room's ``(epoch, top offset)`` for a ``welcome``. *marker* is
        ``(channel, message)`` to publish right after the read (see
        :data:`_READ`); :meth:`recover` and :meth:`recent` take one too."""
        reply = await self._call(room, "state", "", 0, 0, marker)
        return reply[0].decode(), int(reply[1])

    async def epoch(self, room: str) -> str:
        """The room's epoch (set now if the room had none)."""
        return (await self.state(room))[0]

    async def recover(
        self,
        room: str,
        epoch: str,
        offset: int,
        previous: str | None,
        *,
        marker: tuple[str, bytes] | None = None,
    ) -> Recovery:
        """As :meth:`wshub.history.History.recover`, for the whole cluster."""
        reply = await self._call(room, "since", epoch, offset, 0, marker)
        recovery = _recovery(reply)
        if previous is None:
            return recovery
        return recovery._replace(missed=[e for e in recovery.missed if would_receive(e, previous)])

    async def recent(
        self, room: str, count: int, *, marker: tuple[str, bytes] | None = None
    ) -> Recovery:
        """As :meth:`wshub.history.History.recent`."""
        return _recovery(await self._call(room, "recent", "", 0, max(0, count), marker))


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Fetch a stalled batch's outcome so that asyncio does not log it as
    never retrieved (its callers heard already: given up)."""
    if not future.cancelled():
        future.exception()


def _recovery(reply: list[Any]) -> Recovery:
    entries = []
    for fields in reply[3:]:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        exclude = values[b"x"].decode()
        entries.append(
            Entry(
                int(values[b"o"]),
                values[b"p"],
                values[b"s"].decode(),
                _KINDS[values[b"k"]],
                exclude or None,
            )
        )
    return Recovery(bool(int(reply[2])), entries, reply[0].decode(), int(reply[1]))
