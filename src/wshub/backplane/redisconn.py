"""Where every Redis connection of a node goes: one URL, or the primary that
Redis Sentinel names.

A node's Redis is given as a *target* string. ``redis://``, ``rediss://`` and
``unix://`` are plain URLs (``--redis-url``). ``redis+sentinel://H:P,H:P/NAME``
is what ``--redis-sentinels H:P,H:P --redis-master NAME`` becomes
(``Config.redis_target``): the sentinels to ask, and the name of the primary
they monitor. Every client wshub makes (the backplane's publish and pub/sub
connections, the history scripts, the per-user counts, the API's control
channel, the supervisor's reaper) comes from :func:`redis_client`, so each one
follows a failover the same way.

Behind Sentinel, redis-py's ``SentinelConnectionPool`` asks the sentinels for
the current primary each time it opens a connection (the first sentinel that
answers and sees the primary up, neither subjectively nor objectively down),
so a connection rebuilt after an error goes to whichever primary the
sentinels name then. A connection still open to a primary that was demoted
(the sentinels promoted a replica while we could still reach the old one)
fails its next write with ``READONLY``: redis-py's ``SentinelManagedConnection``
turns that into a ``ConnectionError`` after dropping the connection, and the
callers' ordinary reconnect (backoff, presence re-registered, views resynced)
then asks the sentinels again. While no primary is named (the old one is
down and no replica is promoted yet) a connect raises ``MasterNotFoundError``,
a ``ConnectionError`` like any other outage.

redis-py asks the sentinels only when it opens a connection: one kept open
to the old primary would go on being used (a graceful failover promotes the
replica before it demotes the old primary; a partition may hide the old one
from the sentinels for good). So :func:`watch_failovers` (run by the
backplane, one per node) listens to a sentinel's ``+switch-master`` events
and then closes every connection of every client of that target in the
process (:func:`forget_primary`); the backplane also reconnects at once
rather than at the end of its backoff.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from ..config import REDIS_SENTINEL_SCHEME, split_host_port

__all__ = [
    "SENTINEL_SCHEME",
    "describe_target",
    "forget_primary",
    "parse_sentinel_target",
    "redis_client",
    "watch_failovers",
]

log = logging.getLogger("wshub.backplane")

SENTINEL_SCHEME = REDIS_SENTINEL_SCHEME


def parse_sentinel_target(target: str) -> tuple[list[tuple[str, int]], str]:
    """The sentinels' addresses and the primary's name in a sentinel target
    (pure; ValueError if it is not one)."""
    if not target.startswith(SENTINEL_SCHEME):
        raise ValueError(f"not a sentinel target: {target!r}")
    hosts, sep, master = target[len(SENTINEL_SCHEME) :].rpartition("/")
    if not sep or not hosts or not master:
        raise ValueError(f"expected {SENTINEL_SCHEME}HOST:PORT,.../NAME")
    return [split_host_port(item) for item in hosts.split(",")], master


def describe_target(target: str) -> str:
    """The target without a password, for logs."""
    if target.startswith(SENTINEL_SCHEME) or "@" not in target:
        return target
    scheme, _, rest = target.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redact(text: str, target: str) -> str:
    """*text* (an error from redis-py) with the password of *target* masked,
    whether it appears as written in the URL or decoded: redis-py's own
    messages do not carry it, but a log line must not depend on that."""
    password = urlsplit(target).password if "@" in target else None
    if not password:
        return text
    for form in {password, unquote(password)}:
        text = text.replace(form, "***")
    return text


class _SentinelRedis(aioredis.Redis):
    """A client of the primary that also closes its sentinel clients."""

    sentinels: Sentinel | None = None
    target = ""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels is not None:
                sentinels, self.sentinels = self.sentinels, None
                await sentinels.aclose()


# Every client of a sentinel target this process made and still holds: on a
# failover each one's connections are closed (forget_primary).
_clients: weakref.WeakSet[_SentinelRedis] = weakref.WeakSet()


async def forget_primary(target: str) -> int:
    """Close every connection of this process's clients of *target*, idle or
    in use (a pub/sub connection fails, and its owner rebuilds it): the next
    command of each asks the sentinels for the primary again. Returns how many
    clients. Why: redis-py asks the sentinels only when it opens a connection,
    so a connection kept open to the old primary goes on writing there until
    that one is demoted, which Sentinel does only after promoting the replica
    (and never, while a partition hides it)."""
    clients = [client for client in list(_clients) if client.target == target]
    for client in clients:
        try:
            await client.connection_pool.disconnect(inuse_connections=True)
        except (RedisError, OSError):
            pass  # closing a broken connection may fail too: it is closed
    return len(clients)


def redis_client(target: str, **kwargs: Any) -> aioredis.Redis:
    """A client for *target*; *kwargs* are redis-py's connection options
    (``socket_timeout``, ``socket_connect_timeout``, ...), applied to the
    sentinels' connections too. No I/O until the first command.

    A connection Redis closed while it sat idle in the pool (a restart, an
    idle timeout) must not cost the publication that next takes it: the pool
    checks each idle connection as it hands it out (one that read EOF is
    made again before anything is written). redis-py 8.1 skips that check
    whenever "maintenance notifications" are on, and its default turns them
    on ("auto") for every RESP3 connection over TCP (redis-py issue 4252,
    fixed after 8.1.0 by PR 4260): the next pipeline was written to the dead
    connection, failed, and its publications were dropped. wshub has no use
    for those notifications (a Redis Enterprise feature), so they are off.

    And redis-py never resends a command of this client (explicit, though
    ``from_url`` pools default to it; ``Redis(host=...)`` does not): a
    pipeline that failed while its reply was read may have run, and a
    publication sent again would arrive twice. redis-py 8.1's ``Redis()``
    default sent a one-PUBLISH pipeline 11 times to a server that read it
    and closed the connection. What may be sent again is the callers'
    decision (their reconnect loops)."""
    if target.startswith(SENTINEL_SCHEME):
        sentinels, master = parse_sentinel_target(target)
        # No retries inside redis-py, of a question to a sentinel or of a
        # connect to the primary: the next sentinel is asked at once, and the
        # callers' own reconnect loops have the backoff (with redis-py's
        # default retries, two unreachable sentinels took 8.5 s to fail a
        # connect, longer than a client's handshake may wait; and a connect
        # during a failover slept through its backoff after the replica was
        # already promoted).
        no_retry = Retry(NoBackoff(), 0)
        asking = {key: value for key, value in kwargs.items() if key.startswith("socket_")}
        manager = Sentinel(  # type: ignore[no-untyped-call]  # redis-py: untyped
            sentinels, sentinel_kwargs={**asking, "retry": no_retry}, retry=no_retry, **kwargs
        )
        client: _SentinelRedis = manager.master_for(master, redis_class=_SentinelRedis)
        client.sentinels = manager
        client.target = target
        _clients.add(client)
        return client
    return aioredis.from_url(
        target,
        retry=Retry(NoBackoff(), 0),
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **kwargs,
    )


async def watch_failovers(
    target: str, on_switch: Callable[[], None], *, timeout: float, retry_after: float = 1.0
) -> None:
    """Until cancelled: whenever a sentinel of *target* announces that the
    primary it names moved (``+switch-master``), close this process's
    connections to the old one (:func:`forget_primary`), then call
    *on_switch*. One sentinel is listened to at a time; when it can't be
    reached, or its connection fails, the next one, *retry_after* seconds
    later."""
    sentinels, master = parse_sentinel_target(target)
    turn = 0
    while True:
        host, port = sentinels[turn % len(sentinels)]
        turn += 1
        client = aioredis.Redis(
            host=host, port=port, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        pubsub: Any = client.pubsub()  # redis-py's PubSub is untyped
        try:
            await pubsub.subscribe("+switch-master")
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                data = message["data"]
                # "<name> <old ip> <old port> <new ip> <new port>"
                words = (data.decode() if isinstance(data, bytes) else str(data)).split()
                if words and words[0] == master:
                    log.warning("sentinel %s:%d: primary %s moved: %s", host, port, master, data)
                    await forget_primary(target)
                    on_switch()
        except asyncio.CancelledError:
            raise
        except (TimeoutError, RedisError, OSError) as exc:
            log.info("sentinel %s:%d not listened to: %s", host, port, type(exc).__name__)
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except (RedisError, OSError, RuntimeError):
                pass
        await asyncio.sleep(retry_after)
