"""What only the Redis backplane does: notice a silent subscription, back off."""

from __future__ import annotations

import asyncio

from wshub.backplane import Envelope, EventKind
from wshub.backplane.redis import RedisBackplane, backoff_delays
from wshub.ids import ConnectionId, NodeId
from wshub.rooms import RoomName

from ..conftest import TIMEOUT
from ..waiting import wait_until_async
from .test_contract import Recorder, subscribe


def test_backoff_is_jittered_exponential_and_capped() -> None:
    delays = backoff_delays(initial=0.1, factor=2, cap=1.0, rand=lambda: 1.0)
    assert [round(next(delays), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    low = backoff_delays(initial=0.1, factor=2, cap=1.0, rand=lambda: 0.0)
    assert round(next(low), 3) == 0.05


def test_a_silent_subscription_is_rebuilt(redis_server) -> None:
    """A subscription that stops hearing without any error (here: unsubscribed
    behind the node's back) is found by the self-probe and rebuilt."""

    async def body() -> None:
        recorders = [Recorder(), Recorder()]
        a, b = (
            RedisBackplane(
                redis_server.url, NodeId(name), node_ttl=3, prefix="silent", probe_interval=0.2
            )
            for name in ("a", "b")
        )
        await a.start(recorders[0])
        await b.start(recorders[1])
        await subscribe(b, recorders[1], "")
        await b._pubsub.unsubscribe()  # silent: no error, just no more messages
        await wait_until_async(
            lambda: b.silent_rebuilds > 0 and b.ready()[0],
            "the silent subscription to be rebuilt",
            3 * 0.2 + 1.0 + TIMEOUT,
        )
        a.publish(
            Envelope(NodeId("a"), EventKind.RELAY, RoomName(""), ConnectionId("ws-1"), b"again")
        )
        await recorders[1].until(lambda: recorders[1].relays() == [b"again"])
        await a.stop()
        await b.stop()

    asyncio.run(body())


def test_stop_ends_even_when_a_redis_await_swallows_the_cancellation(redis_server) -> None:
    """A client-library await that turns our cancellation into an error it
    handles (seen once: a node idled after SIGTERM with Redis gone) must not
    hold the shutdown: the loops stop on _stopping and the wait is bounded."""

    async def body() -> None:
        bp = RedisBackplane(redis_server.url, NodeId("swallow"), node_ttl=0.3, prefix="swallow")
        await bp.start(Recorder())
        entered = asyncio.Event()

        async def set_that_swallows(*args, **kwargs):
            entered.set()
            try:
                await asyncio.Event().wait()  # Redis never answers
            except asyncio.CancelledError:
                raise ConnectionError("connection lost") from None  # not a cancel any more

        bp._redis.set = set_that_swallows  # type: ignore[union-attr,method-assign]
        await asyncio.wait_for(entered.wait(), TIMEOUT)  # the lease loop is in it
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(bp.stop(), TIMEOUT)
        assert loop.time() - start < 3.5
        assert all(task.done() for task in bp._tasks)

    asyncio.run(body())
