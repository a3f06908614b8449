"""The mark a join's history read publishes behind itself (Redis only): once
a subscriber hears it, it has heard every publication the read saw."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from wshub.backplane.redis_history import RedisHistory
from wshub.history import Entry
from wshub.protocol import RelayKind

from ..conftest import TIMEOUT
from ..waiting import wait_until_async

A_ID = "ws-1-aaaaaaaaa"


@pytest.mark.parametrize("mode", ["state", "since", "recent", "none"])
def test_the_mark_follows_every_publication_the_read_saw(redis_server, mode: str) -> None:
    async def body() -> None:
        prefix = f"mark{mode}"
        channel = f"{prefix}:room:k"
        h = RedisHistory.from_url(redis_server.url, prefix=prefix, size=50, ttl=30)
        sub_client = aioredis.from_url(redis_server.url)
        sub = sub_client.pubsub()
        await sub.subscribe(channel)
        entry = Entry(0, b'{"type":"broadcast"}', A_ID, RelayKind.BROADCAST, None)
        # Publications in flight while the read runs: queued before it.
        futures = [h.submit("k", channel, b"", entry) for _ in range(30)]
        marker = None if mode == "none" else (channel, b"MARK")
        epoch, _ = await h.state("k")
        if mode == "since":
            recovery = await h.recover("k", epoch, 0, None, marker=marker)
            top = recovery.offset
        elif mode == "recent":
            top = (await h.recent("k", 5, marker=marker)).offset
        else:
            top = (await h.state("k", marker=marker))[1]
        await asyncio.gather(*futures)
        await h.submit("k", channel, b"", entry)  # one more after the read
        heard: list[bytes] = []
        async with asyncio.timeout(TIMEOUT):
            while len(heard) < 31 + (marker is not None):
                message = await sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    heard.append(message["data"])
        if marker is None:
            assert b"MARK" not in heard
        else:
            at = heard.index(b"MARK")
            before = [json.loads(m)["offset"] for m in heard[:at]]
            assert before == list(range(1, at + 1)) and max(before, default=0) >= top
            assert heard.count(b"MARK") == 1
        await sub.aclose()
        await sub_client.aclose()
        await h.aclose()

    asyncio.run(body())


def test_publications_redis_gets_to_late_are_not_run(own_redis) -> None:
    """Redis frozen (SIGSTOP) past MAX_AGE with publications waiting: they
    fail as stale and take no offset; the next one follows on."""
    import os
    import signal

    from wshub.backplane.redis_history import MAX_AGE, StalePublication

    async def body() -> None:
        h = RedisHistory.from_url(own_redis.url, prefix="late", size=50, ttl=30)
        entry = Entry(0, b'{"type":"broadcast"}', A_ID, RelayKind.BROADCAST, None)
        assert (await h.publish("k", "late:room:k", b"", entry))[1] == 1
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            first = h.submit("k", "late:room:k", b"", entry)  # in Redis' socket buffer
            await asyncio.sleep(0.05)
            queued = [h.submit("k", "late:room:k", b"", entry) for _ in range(5)]  # behind it
            await asyncio.sleep(MAX_AGE + 0.5)  # the freeze itself
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        assert all(isinstance(o, StalePublication) for o in outcomes), outcomes
        # Until Redis answered the batch it froze with, what is queued is
        # given up too (tests/test_flake_redis_stall.py).
        await wait_until_async(lambda: not h.stalled, "Redis answered the batch it froze with")
        assert (await h.publish("k", "late:room:k", b"", entry))[1] == 2
        await h.aclose()

    asyncio.run(body())
