"""backplane/redisconn.py against real sentinels: a client follows a
failover, and a primary demoted while alive is not kept."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from wshub.backplane.redisconn import redis_client, watch_failovers

from ..conftest import SCALE, TIMEOUT, RedisServer
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


def test_a_pooled_connection_redis_closed_is_made_again_before_a_publication(
    own_redis: RedisServer,
) -> None:
    """Redis restarted under an idle pooled connection: the next publication
    goes out on a new connection and reaches a subscriber of the new Redis,
    at the first try: the pool's check of the idle connection as it hands it
    out, not a retry (redis-py resends nothing for these clients). Fails on
    redis-py 8.1 with its default maintenance notifications (issue 4252)."""

    async def body() -> None:
        client = redis_client(own_redis.url, socket_timeout=5, socket_connect_timeout=5)
        try:
            await client.ping()  # one connection, idle in the pool from now on
            # In a thread: the loop runs meanwhile, as a node's does, and
            # reads the old Redis's close of that connection.
            await asyncio.to_thread(own_redis.stop)
            await asyncio.to_thread(own_redis.start)
            listener = redis.Redis(port=own_redis.port)
            pubsub = listener.pubsub()
            pubsub.subscribe("after")
            assert pubsub.get_message(timeout=TIMEOUT)["type"] == "subscribe"
            pipe = client.pipeline(transaction=False)
            pipe.publish("after", "first")
            assert await pipe.execute() == [1]  # one subscriber heard it
            message = pubsub.get_message(timeout=TIMEOUT)
            assert message is not None and message["data"] == b"first"
            pubsub.close()
            listener.close()
        finally:
            await client.aclose()

    asyncio.run(body())


def test_a_pipeline_that_may_have_run_is_never_resent() -> None:
    """A server that reads a pipeline and closes the connection without a
    reply (it may have run it) gets it once: the caller hears the
    ConnectionError and decides (redis-py's own default for a client made
    with Redis(...) resends it 10 more times)."""

    async def body() -> None:
        received: list[bytes] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                if b"PUBLISH" in data:
                    received.append(data)
                    break  # as if it ran, and the connection broke before the reply
                writer.write(b"+OK\r\n" * data.count(b"*"))  # the handshake's commands
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = redis_client(f"redis://127.0.0.1:{port}/0", protocol=2, socket_timeout=TIMEOUT)
        try:
            pipe = client.pipeline(transaction=False)
            pipe.publish("room", "once")
            with pytest.raises(RedisConnectionError):
                await pipe.execute()
            assert len(received) == 1
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(body())
