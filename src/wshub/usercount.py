"""``--max-connections-per-user`` across a cluster (decisions.md 15): each
user's open connections counted on Redis, node by node.

Keys (``{p}`` is ``--cluster-name``), next to the backplane's own::

    {p}:user:{u.USER}    HASH node id -> "COUNT:DEADLINE" (that node's open
                         connections of USER, and until when they count)

One key per user, and nothing else read or written with it: the count and
the add are one script on one key, hence one slot, so the same layout and
the same scripts serve one Redis, Sentinel and a Redis Cluster (where a
script may only touch the keys of one slot; the braces are the hash tag).

A node adds one for a user with :data:`_ACQUIRE`: it sums the user's entries
of every node whose deadline has not passed, plus its own, and increments its
own entry only when the sum is under the limit: the check and the add are one
step on Redis, so two nodes admitting the same user at once cannot both take
the last slot. Each entry's deadline is ``--node-ttl`` past the time the
node last wrote it, on the clock of the Redis that holds the key (``TIME``
inside the script: the nodes' clocks play no part, and all of a user's
entries are on one server's clock), and a node rewrites its entries every
``--node-ttl``/3, as it renews its lease: a node killed without a goodbye
stops counting within ``--node-ttl``, like its lease, whether or not a
survivor has reaped it yet; its stale entries are dropped by the next
acquire that sees them, and the key expires once no node writes it.

This node's counts are its own truth (``self.local``): Redis holds a mirror,
rewritten from it every ``--node-ttl``/3 (which also moves the deadlines
on, and repairs the mirror after a Redis restart or a lost decrement).
While Redis cannot be reached a connection is judged by this node's count
alone, like the backplane serving its local clients meanwhile.

What this module may not know: connections, tokens, rooms.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from .backplane.redisconn import redis_client
from .ids import NodeId
from .logs import log_event

__all__ = ["ClusterUserCount", "user_key"]

log = logging.getLogger("wshub")

# What every script starts with: the time on the Redis that holds the key,
# in ms, and an entry's "COUNT:DEADLINE" taken apart.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function entry(value)
  local count, deadline = string.match(value, '^(%d+):(%d+)$')
  return tonumber(count), tonumber(deadline)
end
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: the user's key. ARGV: this node's id, the limit, an entry's life in
# ms (--node-ttl), the key's expiry in ms. Returns 1 (counted) or 0 (the user
# is at the limit). This node's own entry counts whatever its deadline (the
# node lives: it is asking); another node's counts until its deadline, then
# is dropped.
_ACQUIRE = (
    _COMMON
    + """
local total, own = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local count, deadline = entry(all[i + 1])
  if all[i] == ARGV[1] then own = count
  elseif deadline > now then total = total + count
  else redis.call('HDEL', KEYS[1], all[i]) end
end
if total + own >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', own + 1, now + tonumber(ARGV[3])))
keep(KEYS[1], tonumber(ARGV[4]))
return 1
"""
)

# KEYS: the user's key. ARGV: this node's id. One of its connections gone.
_RELEASE = (
    _COMMON
    + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local count, deadline = entry(value)
if count <= 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', count - 1, deadline))
end
return 1
"""
)

# KEYS: the user's key. ARGV: this node's id, its count of the user, an
# entry's life in ms, the key's expiry in ms, and "1" to write the count
# (the mirror rewritten: no call of this node is in flight) or "0" to keep
# the count on Redis if there is one and only move its deadline on (calls
# are in flight, whose changes this count may not show yet).
_KEEP = (
    _COMMON
    + """
local count = tonumber(ARGV[2])
if ARGV[5] == '0' then
  local value = redis.call('HGET', KEYS[1], ARGV[1])
  if value then count = entry(value) end
end
if count <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', count, now + tonumber(ARGV[3])))
keep(KEYS[1], tonumber(ARGV[4]))
return 1
"""
)

_KEEP_SHA = hashlib.sha1(_KEEP.encode()).hexdigest()

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
# redis-py's cluster client can fail inside itself on a connection that a
# cancelled call (abandoned by _bounded) left half made: AttributeError on a
# writer that is gone, uvloop's RuntimeError on a closed transport (seen with
# 12 connects at once on a loaded machine). For us a lost answer like any
# other: the connect is judged by this node's count, never left unanswered.
_FAULTS = (RedisError, OSError, asyncio.TimeoutError, AttributeError, TypeError, RuntimeError)


async def _bounded(coro: Any, timeout: float) -> Any:
    """Await *coro* for at most *timeout* seconds. Not ``asyncio.wait_for``,
    for the reasons in :func:`wshub.backplane.redis._within` (Python 3.11
    can swallow a cancellation inside redis-py); and the abandoned call's
    error is always retrieved, so that a Redis dying at shutdown logs no
    "exception was never retrieved"."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise TimeoutError(f"abandoned after {timeout} s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def user_key(prefix: str, user: str) -> str:
    """The key of *user*'s counts (pure). The user id is the hash tag: on a
    Redis Cluster every script of this module touches this one key, so one
    slot (a ``}`` in the id ends the tag early: still one key, one slot)."""
    return f"{prefix}:user:{{u.{user}}}"


class ClusterUserCount:
    """This node's share of every user's connections, checked against the
    whole cluster's on Redis."""

    def __init__(
        self,
        url: str,
        node_id: NodeId,
        *,
        limit: int,
        node_ttl: float,
        prefix: str = "wshub",
    ) -> None:
        self.limit = limit
        self.local: dict[str, int] = {}
        self._url = url
        self._node_ttl = node_ttl
        self._node_id = node_id
        self._prefix = prefix
        self._life_ms = int(node_ttl * 1000)  # an entry's, as the node's lease
        # The key outlives a few missed rewrites, not its last node for long.
        self._keep_ms = int(max(60.0, node_ttl * 10) * 1000)
        self._timeout = max(1.0, node_ttl / 6)
        self._redis: Any = None  # redis.asyncio.Redis, or RedisCluster
        self._scripts: dict[str, Any] = {}
        self._keep_loaded = False  # _KEEP is on Redis (as far as we know)
        # Calls sent and not answered, and calls started so far: the mirror is
        # rewritten when none is in flight, and again at once if one started
        # while it was (Redis may have run that one first, and the rewrite
        # would have erased it); otherwise only its deadlines move on.
        self._in_flight = 0
        self._started = 0
        # Users whose entry on Redis this node may have changed since the last
        # rewrite, among them those it no longer counts (their entry goes then).
        self._touched: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False  # Redis unreachable: said once per outage in the log
        self._stopping = False

    # -- Lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        from .backplane.redis_cluster import cluster_client, is_cluster_url

        # One key per script, so a Redis Cluster's client serves as is.
        redis: Any
        if is_cluster_url(self._url):
            redis = cluster_client(self._url, self._timeout)
        else:
            redis = redis_client(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                health_check_interval=0,
            )
        self._redis = redis
        if is_cluster_url(self._url):
            try:  # the slot map now, not under the first connects' timeouts
                await _bounded(redis.initialize(), self._timeout * 3)
            except _FAULTS as exc:
                self._set_down(exc)  # the first call reads it then
        for name, source in (("acquire", _ACQUIRE), ("release", _RELEASE)):
            self._scripts[name] = redis.register_script(source)
        self._spawn(self._keep_mirror(), "wshub-user-count")

    async def stop(self) -> None:
        """Withdraw this node's counts (its connections are closed by now)."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3.0)
        redis = self._redis
        if redis is None:
            return
        users = self._touched | set(self.local)
        if users:
            pipe = redis.pipeline(transaction=False)
            for user in users:
                pipe.hdel(user_key(self._prefix, user), self._node_id)
            try:
                await _bounded(pipe.execute(), self._timeout)
            except _FAULTS:
                pass  # they stop counting at their deadline, within --node-ttl
        try:
            await _bounded(redis.aclose(), 2.0)
        except (*_ERRORS, RuntimeError):
            pass

    # -- Counting -------------------------------------------------------------------

    def acquire(self, user: str, done: Callable[[bool], None]) -> None:
        """Count one more connection of *user* if the cluster holds fewer than
        the limit; *done* hears whether it was counted (later, on the loop)."""
        self._spawn(self._acquire(user, done), "wshub-user-acquire")

    def release(self, user: str) -> None:
        """One connection counted by :meth:`acquire` is gone."""
        count = self.local.get(user, 0) - 1
        if count > 0:
            self.local[user] = count
        else:
            self.local.pop(user, None)
        if self._redis is not None and not self._stopping:
            self._touched.add(user)
            self._spawn(self._release_remote(user), "wshub-user-release")

    async def _acquire(self, user: str, done: Callable[[bool], None]) -> None:
        self._in_flight += 1
        self._started += 1
        self._touched.add(user)
        try:
            reply = await _bounded(
                self._scripts["acquire"](
                    keys=[user_key(self._prefix, user)],
                    args=[self._node_id, self.limit, self._life_ms, self._keep_ms],
                ),
                self._timeout,
            )
            counted = int(reply) == 1
            self._up()
        except _FAULTS as exc:
            # Unknown elsewhere: this node's own count decides meanwhile.
            self._set_down(exc)
            counted = self.local.get(user, 0) < self.limit
        finally:
            self._in_flight -= 1
        if counted:
            self.local[user] = self.local.get(user, 0) + 1
        done(counted)

    async def _release_remote(self, user: str) -> None:
        self._in_flight += 1
        self._started += 1
        try:
            await _bounded(
                self._scripts["release"](keys=[user_key(self._prefix, user)], args=[self._node_id]),
                self._timeout,
            )
        except _FAULTS as exc:
            self._set_down(exc)  # the next rewrite puts the mirror right
        finally:
            self._in_flight -= 1

    async def _keep_mirror(self) -> None:
        interval = self._node_ttl / 3
        again = False
        while not self._stopping:
            await asyncio.sleep(0.01 if again else interval)
            again = False
            exact = not self._in_flight
            started = self._started
            counts = dict(self.local)
            touched = set(self._touched)
            if exact:
                counts.update((user, 0) for user in touched if user not in counts)
            if not counts:
                continue
            try:
                await _bounded(self._write(counts, exact), self._timeout)
                self._up()
            except _FAULTS as exc:
                self._set_down(exc)
                continue
            if exact:
                self._touched -= touched
                again = self._started != started

    async def _write(self, counts: dict[str, int], exact: bool) -> None:
        """One :data:`_KEEP` per user, in one pipeline (split per shard on a
        Redis Cluster); the script loaded first, and again where Redis lost it
        (a restart, a failover)."""
        for attempt in (0, 1):
            if not self._keep_loaded:
                await self._redis.script_load(_KEEP)  # on every primary of a cluster
                self._keep_loaded = True
            pipe = self._redis.pipeline(transaction=False)
            for user, count in counts.items():
                # (A cluster pipeline refuses evalsha's method, not the command.)
                pipe.execute_command(
                    "EVALSHA",
                    _KEEP_SHA,
                    1,
                    user_key(self._prefix, user),
                    self._node_id,
                    count,
                    self._life_ms,
                    self._keep_ms,
                    1 if exact else 0,
                )
            try:
                results = await pipe.execute(raise_on_error=False)
            except NoScriptError:
                results = [NoScriptError()]
            if any(isinstance(result, NoScriptError) for result in results):
                self._keep_loaded = False
                if attempt == 0:
                    continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _up(self) -> None:
        if self._down:
            self._down = False
            log_event(log, logging.WARNING, "user_count_up")

    def _set_down(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log_event(
                log,
                logging.WARNING,
                "user_count_down",
                detail=f"per-user counts on this node only until Redis answers: {exc!r}"[:200],
            )
