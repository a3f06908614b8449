#!/usr/bin/env python3
"""What keeping the epochs of the rooms with members costs on Redis (issue 13):
one :meth:`RedisHistory.keep` over N rooms, the call a node makes every third
of ``--history-epoch-ttl`` (20 minutes by default).

    .venv/bin/python bench/history_keep_cost.py               # 10,000 rooms, 7 rounds
    .venv/bin/python bench/history_keep_cost.py --rooms 50000

Starts its own ``redis-server``, gives every room a meta key (as a join or a
publication would), then times ``keep`` over all of them: wall time, this
process' CPU, Redis' own CPU (``INFO cpu``, user + sys) and the longest the
event loop went without a pass meanwhile, next to the same watch over as long
with nothing to do (the machine's floor), medians of the rounds. Prints one Markdown table row.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import redis.asyncio as aioredis
from history_redis_cost import start_redis

from wshub.backplane import redis_history
from wshub.backplane.redis_history import KEEP_BATCH, RedisHistory


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class StallWatch:
    """The longest the loop went without a pass: what a node's other work
    (the fan-out, the p99) would wait for behind the refresh."""

    def __init__(self) -> None:
        self.running = True
        self.longest = 0.0

    async def run(self) -> None:
        while self.running:
            tick = time.perf_counter()
            await asyncio.sleep(0)
            self.longest = max(self.longest, time.perf_counter() - tick)

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


async def measure(url: str, rooms: int, rounds: int) -> dict[str, float]:
    history = RedisHistory.from_url(url, prefix="keepcost")
    client = aioredis.from_url(url)
    names = [f"room{i}" for i in range(rooms)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hset(history.keys(name)[0], mapping={"epoch": "e", "top": 0})
    await pipe.execute()
    walls, cpus, redis_cpus, stalls, floors = [], [], [], [], []
    for _ in range(rounds):
        before_redis = await redis_cpu(client)
        # The same watch over the same time with nothing else to do first:
        # the machine's own floor (a loaded, shared machine preempts us).
        watch = StallWatch()
        watcher = asyncio.create_task(watch.run())
        await asyncio.sleep(walls[-1] if walls else 1.0)
        floors.append(watch.take())
        wall, cpu = time.perf_counter(), time.process_time()
        refreshed = await history.keep(names)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        stalls.append(watch.take())
        watch.running = False
        await watcher
        redis_cpus.append(await redis_cpu(client) - before_redis)
        assert refreshed == rooms, refreshed
    await client.aclose()
    await history.aclose()
    return {
        "wall": statistics.median(walls),
        "cpu": statistics.median(cpus),
        "redis_cpu": statistics.median(redis_cpus),
        "stall": statistics.median(stalls),
        "floor": statistics.median(floors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=KEEP_BATCH, help="keys per pipeline")
    args = parser.parse_args()
    redis_history.KEEP_BATCH = args.batch
    proc, url = start_redis()
    try:
        figures = asyncio.run(measure(url, args.rooms, args.rounds))
    finally:
        proc.terminate()
        proc.wait()
    print(
        "| rooms | batch | wall ms | node CPU ms | Redis CPU ms | longest loop stall ms "
        "| idle floor ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.rooms:,} | {args.batch} | {figures['wall'] * 1000:.1f} | "
        f"{figures['cpu'] * 1000:.1f} | {figures['redis_cpu'] * 1000:.1f} | "
        f"{figures['stall'] * 1000:.1f} | {figures['floor'] * 1000:.1f} |"
    )


if __name__ == "__main__":
    main()
