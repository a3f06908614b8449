"""``--max-connections-per-user`` across a cluster (decisions.md 15): each
user's open connections counted on Redis, node by node.

Keys (``{p}`` is ``--cluster-name``), next to the backplane's own::

    {p}:node:{id}:users    HASH user (token sub) -> this node's open connections

A node adds one for a user with one Lua script that sums the user's field
over every node in ``{p}:nodes`` whose lease (``{p}:node:{id}:alive``) is
still there, plus its own, and increments its own field only when the sum is
under the limit: the check and the add are one step on Redis, so two nodes
admitting the same user at once cannot both take the last slot. A node killed
without a goodbye stops counting as soon as its lease expires, within
``--node-ttl``, whether or not a survivor has reaped it yet.

This node's counts are its own truth (``self.local``): Redis holds a mirror,
rewritten from it every ``--node-ttl``/3 (which also keeps the hash's expiry
ahead, and repairs it after a Redis restart or a lost decrement). While Redis
cannot be reached a connection is judged by this node's count alone, like the
backplane serving its local clients meanwhile.

What this module may not know: connections, tokens, rooms.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .backplane.redisconn import redis_client
from .ids import NodeId
from .logs import log_event

__all__ = ["ClusterUserCount"]

log = logging.getLogger("wshub")

# KEYS: the nodes set, this node's users hash. ARGV: this node's id, the user,
# the limit, the node key prefix ("{p}:node:"), the hash's expiry in ms.
# Returns 1 (counted) or 0 (the user is at the limit).
_ACQUIRE = """
local total = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. node .. ':alive') == 1 then
    total = total + tonumber(redis.call('HGET', ARGV[4] .. node .. ':users', ARGV[2]) or '0')
  end
end
if total >= tonumber(ARGV[3]) then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: this node's users hash. ARGV: the user.
_RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: this node's users hash. ARGV: the expiry in ms, then user, count pairs.
_REWRITE = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


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
        self._nodes_key = f"{prefix}:nodes"
        self._node_prefix = f"{prefix}:node:"
        self._users_key = f"{prefix}:node:{node_id}:users"
        # The mirror outlives a few missed rewrites, not a dead node for long.
        self._keep_ms = int(max(60.0, node_ttl * 10) * 1000)
        self._timeout = max(1.0, node_ttl / 6)
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        # Calls sent and not answered, and calls started so far: a rewrite is
        # sent when none is in flight, and sent again at once if one started
        # while it was (Redis may have run that one first, and the rewrite
        # would have erased it).
        self._in_flight = 0
        self._started = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False  # Redis unreachable: said once per outage in the log
        self._stopping = False

    # -- Lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._redis = redis = redis_client(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            health_check_interval=0,
        )
        for name, source in (
            ("acquire", _ACQUIRE),
            ("release", _RELEASE),
            ("rewrite", _REWRITE),
        ):
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
        try:
            await _bounded(redis.delete(self._users_key), self._timeout)
        except _ERRORS:
            pass  # it expires on its own, and this node's lease is gone
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
            self._spawn(self._release_remote(user), "wshub-user-release")

    async def _acquire(self, user: str, done: Callable[[bool], None]) -> None:
        self._in_flight += 1
        self._started += 1
        try:
            reply = await _bounded(
                self._scripts["acquire"](
                    keys=[self._nodes_key, self._users_key],
                    args=[self._node_id, user, self.limit, self._node_prefix, self._keep_ms],
                ),
                self._timeout,
            )
            counted = int(reply) == 1
            self._up()
        except _ERRORS as exc:
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
                self._scripts["release"](keys=[self._users_key], args=[user]), self._timeout
            )
        except _ERRORS as exc:
            self._set_down(exc)  # the next rewrite puts the mirror right
        finally:
            self._in_flight -= 1

    async def _keep_mirror(self) -> None:
        interval = self._node_ttl / 3
        again = False
        while not self._stopping:
            await asyncio.sleep(0.01 if again else interval)
            again = False
            if self._in_flight:
                continue  # its change is on Redis and not here yet: next time
            started = self._started
            args: list[object] = [self._keep_ms]
            for user, count in self.local.items():
                args += [user, count]
            try:
                await _bounded(
                    self._scripts["rewrite"](keys=[self._users_key], args=args), self._timeout
                )
                self._up()
            except _ERRORS as exc:
                self._set_down(exc)
                continue
            again = self._started != started

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
