"""A frozen Redis wakes: what was queued for it meanwhile is given up, in
whichever order the node reads the two replies (the stalled batch's, the
check's). Sent, it ran as the other nodes resubscribed: they missed its
offset, and closed their clients 1012 at the next one
(tests/test_security.py::test_a_frozen_redis_delivers_nothing_late, now and
then in the whole-suite run).

The Redis side is a fake the test drives, so that the order of the two
replies, which no real run can choose, is the test's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wshub.backplane import redis_history
from wshub.backplane.redis_history import RedisHistory, StalePublication
from wshub.history import Entry
from wshub.protocol import RelayKind

ENTRY = Entry(0, b'{"type":"broadcast"}', "ws-1-aaaaaaaaa", RelayKind.BROADCAST, None)


class Script:
    sha = "fake-sha"


class FrozenRedis:
    """Answers at once until frozen; frozen, every call waits for the test."""

    def __init__(self) -> None:
        self.frozen = False
        self.top = 0
        self.runs: list[int] = []  # the size of each pipeline Redis ran
        self.waiting: list[tuple[str, asyncio.Future[None]]] = []

    def register_script(self, source: str) -> Script:
        return Script()

    async def _turn(self, what: str) -> None:
        if self.frozen:
            woken = asyncio.get_running_loop().create_future()
            self.waiting.append((what, woken))
            try:
                await woken
            except asyncio.CancelledError:  # the caller gave up on it (a timed-out check)
                self.waiting.remove((what, woken))
                raise

    async def ping(self) -> bool:
        await self._turn("ping")
        return True

    async def time(self) -> tuple[int, int]:
        await self._turn("time")
        now = asyncio.get_running_loop().time()
        return int(now), 0

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)

    async def aclose(self) -> None:
        pass

    def wake(self, what: str) -> None:
        """Answer the waiting call *what* (Redis woke and this reply came first)."""
        for i, (name, woken) in enumerate(self.waiting):
            if name == what:
                del self.waiting[i]
                woken.set_result(None)
                return
        raise AssertionError(f"nothing waits for {what}: {self.waiting}")


class Pipeline:
    def __init__(self, redis: FrozenRedis) -> None:
        self.redis = redis
        self.commands = 0

    def execute_command(self, *args: Any) -> None:
        self.commands += 1

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        redis = self.redis
        late = redis.frozen  # Redis gets to it after its deadline: the script does not run
        await redis._turn("pipeline")
        redis.runs.append(self.commands)
        if late:
            return [[b"", -1]] * self.commands
        results = []
        for _ in range(self.commands):
            redis.top += 1
            results.append([b"e1", redis.top])
        return results


async def until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)


def test_what_is_queued_while_a_batch_is_stalled_is_given_up_and_nothing_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch given up unanswered: what queues behind it is given up, and
    nothing is sent to Redis (not even a check) until it answers. Before, a
    check went out, and when Redis woke and the stalled batch's reply was
    read before the check's, the publication was sent and ran."""
    # A stall of a fifth of a second rather than of MAX_AGE: same logic, faster.
    monkeypatch.setattr(redis_history, "MAX_AGE", 0.2)
    monkeypatch.setattr(redis_history, "GIVE_UP_MARGIN", 0.05)

    async def body() -> None:
        redis = FrozenRedis()
        history = RedisHistory(redis, prefix="stall")
        assert (await history.publish("k", "stall:room:k", b"", ENTRY))[1] == 1
        redis.frozen = True
        first = history.submit("k", "stall:room:k", b"", ENTRY)  # in Redis' socket buffer
        with pytest.raises(StalePublication):
            await first  # given up at its deadline, unanswered
        during = history.submit("k", "stall:room:k", b"", ENTRY)
        await until(lambda: during.done() or "ping" in [what for what, _ in redis.waiting])
        redis.frozen = False
        # Redis wakes: the stalled batch's reply is read first, then any other.
        redis.wake("pipeline")
        await until(lambda: len(redis.runs) == 2)  # its reply was read
        if redis.waiting:
            redis.wake("ping")
        with pytest.raises(StalePublication):
            await during
        assert redis.runs == [1, 1], "nothing more was sent to Redis"
        # Queued once Redis answered: sent, and it follows on.
        assert (await history.publish("k", "stall:room:k", b"", ENTRY))[1] == 2

    asyncio.run(body())


def test_what_is_queued_behind_a_check_redis_did_not_answer_is_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frozen before anything was sent to it: the check of the connection
    goes unanswered instead. It is left to finish, and what queues until it
    does is given up (before, the next check went out, and what queued
    behind it was sent as soon as Redis woke)."""
    monkeypatch.setattr(redis_history, "MAX_AGE", 0.2)
    monkeypatch.setattr(redis_history, "IDLE_CHECK", -1.0)  # a check before every batch

    async def body() -> None:
        redis = FrozenRedis()
        history = RedisHistory(redis, prefix="stall")
        assert (await history.publish("k", "stall:room:k", b"", ENTRY))[1] == 1
        redis.frozen = True
        with pytest.raises(StalePublication):
            await history.submit("k", "stall:room:k", b"", ENTRY)  # its check timed out
        during = history.submit("k", "stall:room:k", b"", ENTRY)
        await until(lambda: during.done() or [what for what, _ in redis.waiting] == ["ping"])
        redis.frozen = False
        redis.wake("ping")  # Redis wakes and answers the check waiting
        with pytest.raises(StalePublication):
            await during
        await until(lambda: not history.stalled)
        assert (await history.publish("k", "stall:room:k", b"", ENTRY))[1] == 2
        assert redis.runs == [1, 1]

    asyncio.run(body())
