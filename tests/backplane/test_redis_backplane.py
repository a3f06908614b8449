"""What only the Redis backplane does: notice a silent subscription, back off."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from wshub.backplane import Envelope, EventKind
from wshub.backplane.redis import RedisBackplane, backoff_delays
from wshub.ids import ConnectionId, NodeId
from wshub.rooms import RoomName

from ..conftest import TIMEOUT, start_server
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


def test_within_abandons_an_await_that_swallowed_its_cancellation() -> None:
    """What Python 3.11's wait_for does to its caller (CPython gh-86296), an
    await inside redis-py may do to ours: the cancel vanishes and the await
    goes on. asyncio.wait_for around it then waits for it to finish; the
    backplane's _within gives up at its deadline."""
    from wshub.backplane.redis import _within

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # as if it had been lost in a wait_for race
        await asyncio.sleep(1.0)  # redis-py goes on: a read, a retry

    async def body() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await _within(swallows_once(), 0.1)
        except TimeoutError:
            pass
        else:
            raise AssertionError("no TimeoutError")
        assert loop.time() - start < 0.5
        start = loop.time()
        try:  # the contrast, so the test proves what it says
            await asyncio.wait_for(swallows_once(), 0.1)
        except TimeoutError:
            pass
        assert loop.time() - start >= 1.0

    asyncio.run(body())


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_sigterm_while_redis_dies_exits_within_the_drain_timeout(own_redis, how: str) -> None:
    """Redis killed (or frozen: alive, silent) and SIGTERM in the same instant:
    the node closes its clients with 1001 and exits within --drain-timeout,
    without the fallback exit (no "drain overran")."""
    drain = 3.0
    srv = start_server("--redis-url", own_redis.url, "--drain-timeout", str(drain))
    client = srv.client()
    client.roundtrip()
    assert own_redis.proc is not None
    start = time.monotonic()
    own_redis.proc.send_signal(getattr(signal, how))
    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(timeout=drain + 5)
    finally:
        if how == "SIGSTOP":
            own_redis.proc.send_signal(signal.SIGCONT)
    elapsed = time.monotonic() - start
    srv.stop()
    assert code == 0
    assert elapsed < drain, f"exited after {elapsed:.2f} s"
    assert not [line for line in srv.stderr_lines if "overran" in line or "Traceback" in line]
    with pytest.raises(ConnectionClosed) as closed:
        client.ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_a_resync_names_the_user_of_a_connection_it_finds(redis_server) -> None:
    """A connection whose join event this node missed (written to the room's
    presence while it was not listening) is announced by the next resync with
    its user id; an anonymous one without."""

    async def body() -> None:
        recorder = Recorder()
        backplane = RedisBackplane(
            redis_server.url, NodeId("b"), node_ttl=0.6, prefix="resyncusers", probe_interval=0.2
        )
        await backplane.start(recorder)
        await subscribe(backplane, recorder, "")
        client = aioredis.from_url(redis_server.url)
        try:
            await client.hset("resyncusers:presence:", "ws-8", "a")
            await client.hset("resyncusers:presence:", "ws-9", "a\tal\tice")
        finally:
            await client.aclose()
        await recorder.until(lambda: len(recorder.found) == 2, timeout=5 + TIMEOUT)
        assert sorted(recorder.found) == [("", "ws-8"), ("", "ws-9")]
        assert recorder.users == {"ws-9": "al\tice"}
        await backplane.stop()

    asyncio.run(body())
