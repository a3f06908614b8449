"""backplane/redisconn.py against real sentinels: a client follows a
failover, and a primary demoted while alive is not kept."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from wshub.backplane.redisconn import redis_client, watch_failovers

from ..conftest import SCALE
from ..sentinels import SentinelGroup
from ..waiting import wait_until_async

FAILOVER = 60.0 * SCALE


@pytest.fixture
def sentinels():
    group = SentinelGroup("conn", timeout=FAILOVER)
    group.start()
    yield group
    group.stop()


def subscribed(group: SentinelGroup) -> bool:
    """Whether a client is subscribed on the first sentinel."""
    clients = group.ask(group.sentinel_ports[0], "CLIENT", "LIST")
    assert isinstance(clients, bytes)
    return any(b" sub=1 " in line for line in clients.splitlines())


def test_a_demoted_primary_is_left_for_the_promoted_replica(sentinels) -> None:
    """``SENTINEL FAILOVER``: the old primary stays up, as a replica. The
    client that was talking to it does not keep that connection: once the
    failover watch heard ``+switch-master`` its writes go to the promoted
    replica (after at most one ConnectionError), not to the old primary,
    which still accepts them for a moment before Sentinel demotes it."""
    target = f"redis+sentinel://{sentinels.sentinels}/{sentinels.name}"

    async def body() -> None:
        client = redis_client(target, socket_timeout=2.0, socket_connect_timeout=2.0)
        moved: list[bool] = []
        watch = asyncio.create_task(
            watch_failovers(target, lambda: moved.append(True), timeout=2.0, retry_after=0.1)
        )
        try:
            await client.set("k", "before")
            port = await client.config_get("port")
            assert int(port["port"]) == sentinels.primary_port
            # The watch listens to the first sentinel given.
            await wait_until_async(lambda: subscribed(sentinels), "the watch's subscription")
            sentinels.ask(sentinels.sentinel_ports[0], "SENTINEL", "FAILOVER", sentinels.name)
            await asyncio.to_thread(sentinels.wait_promoted)
            # Once the watch heard +switch-master, the client's connection to
            # the old primary (still up, soon a replica) is closed.
            await wait_until_async(lambda: bool(moved), "+switch-master", timeout=FAILOVER)
            failures = 0
            while True:
                try:
                    await client.set("k", "after")
                    break
                except RedisConnectionError:
                    failures += 1
                    assert failures <= 1, "more than one error after the failover"
            port = await client.config_get("port")
            assert int(port["port"]) == sentinels.replica_port
            assert sentinels.ask(sentinels.replica_port, "GET", "k") == b"after"
            # The old primary is alive and now a replica (that is the point).
            await wait_until_async(
                lambda: sentinels.ask(sentinels.primary_port, "ROLE")[0] == b"slave",  # type: ignore[index]
                "the old primary to become a replica",
                timeout=FAILOVER,
            )
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await client.aclose()

    asyncio.run(body())
