"""What history costs, in-process: per append, per byte, and per Redis publication.

    .venv/bin/python bench/history_cost.py [--redis-url URL] [--quick]

Without --redis-url a redis-server is started on a free loopback port (the
binary must be on PATH). Figures:

1. encoding: encode_relay as it was (no offset parameter), with offset=None,
   with an offset; the with_offset() and replayed() splices.
2. memory history: next_offset + encode + append per publication, in one room
   and spread over 10,000 rooms with the memory bound evicting; against the
   encode alone.
3. memory per entry: tracemalloc over 100,000 entries of a typical chat frame,
   against the bytes the history accounts.
4. Redis over loopback, one subscriber draining the channel: the publication
   script against a plain PUBLISH of the same envelope, one at a time (round
   trip) and pipelined (RedisHistory's batches), with Redis' own CPU per
   publication (INFO cpu).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import socket
import subprocess
import sys
import time
import timeit
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import redis.asyncio as aioredis  # noqa: E402

from wshub import protocol  # noqa: E402
from wshub.backplane.redis_history import RedisHistory  # noqa: E402
from wshub.history import Entry, History  # noqa: E402
from wshub.ids import ConnectionId  # noqa: E402
from wshub.protocol import RelayKind, _escape_string, iso_timestamp  # noqa: E402

K = RelayKind.MESSAGE
SENDER = ConnectionId("ws-1764600000000-abcdefghi")
CONTENT = "hello there, a typical chat message of about sixty characters"
NOW = 1764600000.123
_HEADS = {kind: f'{{"type":"{kind.value}","connectionId":"' for kind in RelayKind}


def encode_relay_before(kind: RelayKind, sender: str, content: str, now: float) -> bytes:
    """encode_relay as it was before the offset parameter (the baseline)."""
    return (
        f'{_HEADS[kind]}{sender}","content":'
        f'{_escape_string(content)},"timestamp":"{iso_timestamp(now)}"}}'
    ).encode()


def best_ns(cases: dict[str, object], number: int, rounds: int) -> dict[str, float]:
    """Interleaved rounds, best of each, in this process's CPU time: the
    machine is shared and its wall clock says more about the neighbours."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():
            t = timeit.Timer(fn, timer=time.process_time).timeit(number)  # type: ignore[arg-type]
            best[name] = min(best[name], t / number * 1e9)
    return best


def encoding(quick: bool) -> None:
    base = protocol.encode_relay(K, SENDER, CONTENT, NOW)
    assert encode_relay_before(K, SENDER, CONTENT, NOW) == base
    with_off = protocol.encode_relay(K, SENDER, CONTENT, NOW, 123456)
    assert protocol.with_offset(base, 123456) == with_off
    cases = {
        "encode_relay before (no parameter)": lambda: encode_relay_before(K, SENDER, CONTENT, NOW),
        "encode_relay(offset=None)": lambda: protocol.encode_relay(K, SENDER, CONTENT, NOW),
        "encode_relay(offset=123456)": lambda: protocol.encode_relay(
            K, SENDER, CONTENT, NOW, 123456
        ),
        "with_offset(payload, 123456)": lambda: protocol.with_offset(base, 123456),
        "replayed(payload)": lambda: protocol.replayed(with_off),
    }
    print("\n1. encoding (ns per call, best of interleaved rounds)")
    for name, ns in best_ns(cases, 50_000 if quick else 200_000, 5 if quick else 15).items():
        print(f"   {name:38s} {ns:8.0f}")


def publish(h: History, room: str, now: float) -> None:
    offset = h.next_offset(room, now)
    payload = protocol.encode_relay(K, SENDER, CONTENT, now, offset)
    h.append(room, Entry(offset, payload, SENDER, K, None), now)


def memory_appends(quick: bool) -> None:
    n = 100_000 if quick else 400_000
    print(f"\n2. memory history, {n} publications (us of CPU per publication)")

    def run(label: str, make: object, rooms: int) -> None:
        h: History = make()  # type: ignore[operator]
        names = [f"room{i}" for i in range(rooms)]
        start = time.process_time()
        for i in range(n):
            publish(h, names[i % rooms], i * 1e-4)
        elapsed = time.process_time() - start
        print(
            f"   {label:52s} {elapsed / n * 1e6:6.2f}"
            f"   (held {sum(len(h.held(r)) for r in names)}, evicted {h.evicted},"
            f" accounted {h.bytes / 2**20:.1f} MiB)"
        )

    start = time.process_time()
    for i in range(n):
        protocol.encode_relay(K, SENDER, CONTENT, i * 1e-4, i)
    enc = (time.process_time() - start) / n * 1e6
    print(f"   {'encode alone (the floor)':52s} {enc:6.2f}")
    run("1 room, size 100", lambda: History(), 1)
    run("10,000 rooms, size 100, 64 MiB", lambda: History(), 10_000)
    run("10,000 rooms, size 100, 4 MiB (evicting)", lambda: History(memory=4 << 20), 10_000)


def memory_per_entry(quick: bool) -> None:
    n = 50_000 if quick else 100_000
    for rooms in (1, 1000):
        gc.collect()
        h = History(size=10**9, ttl=1e9, memory=1 << 40)
        names = [f"room{i}" for i in range(rooms)]
        for name in names:
            h.state(name, 0)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            publish(h, names[i % rooms], 0.0)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        payload = len(h.held(names[0])[0].payload)
        print(
            f"\n3. memory per entry ({n} entries in {rooms} room(s), {payload}-byte frames):"
            f" {used / n:.0f} B measured, {h.bytes / n:.0f} B accounted"
            f" ({used / n - payload:.0f} B besides the frame)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def redis_cost(url: str, quick: bool) -> None:
    n = 5_000 if quick else 20_000
    r = aioredis.from_url(url)
    await r.flushall()
    sub = aioredis.from_url(url).pubsub()
    channel = "bench:room:lobby"
    await sub.subscribe(channel)
    received = 0

    async def drain() -> None:
        nonlocal received
        while True:
            message = await sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message["type"] == "message":
                received += 1

    drainer = asyncio.create_task(drain())
    history = RedisHistory(r, prefix="bench")
    prefix = b"node-x|relay|" + SENDER.encode() + b"|"
    payload = protocol.encode_relay(K, SENDER, CONTENT, NOW)
    entry = Entry(0, payload, SENDER, K, None)
    envelope = prefix + protocol.with_offset(payload, 1)

    async def cpu() -> float:
        info = await r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def serial_script() -> None:
        for _ in range(n):
            await history.publish("lobby", channel, prefix, entry)

    async def serial_publish() -> None:
        for _ in range(n):
            await r.publish(channel, envelope)

    async def pipelined_script() -> None:
        for _ in range(n // 100):
            await asyncio.gather(
                *[history.submit("lobby", channel, prefix, entry) for _ in range(100)]
            )

    async def pipelined_publish() -> None:
        for _ in range(n // 100):
            pipe = r.pipeline(transaction=False)
            for _ in range(100):
                pipe.publish(channel, envelope)
            await pipe.execute()

    print(f"\n4. Redis over loopback ({n} publications each, one subscriber)")
    print(f"   {'us per publication:':34s} {'wall':>8s} {'client CPU':>11s} {'Redis CPU':>10s}")
    for label, fn in (
        ("PUBLISH, one at a time", serial_publish),
        ("history script, one at a time", serial_script),
        ("PUBLISH, pipelined x100", pipelined_publish),
        ("history script, pipelined x100", pipelined_script),
    ):
        await fn()  # warm up (and fill the stream to its cap)
        c0, t0, p0 = await cpu(), time.perf_counter(), time.process_time()
        await fn()
        elapsed, client = time.perf_counter() - t0, time.process_time() - p0
        used = await cpu() - c0
        print(
            f"   {label:34s} {elapsed / n * 1e6:8.1f} {client / n * 1e6:11.1f}"
            f" {used / n * 1e6:10.1f}"
        )
    meta, stream = history.keys("lobby")
    print(
        f"   stream length {await r.xlen(stream)}, memory of the stream"
        f" {await r.memory_usage(stream)} B, subscriber got {received}"
    )
    drainer.cancel()
    await sub.aclose()
    await r.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}")
    encoding(args.quick)
    memory_appends(args.quick)
    memory_per_entry(args.quick)
    url, proc = args.redis_url, None
    if not url:
        port = free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
    try:
        asyncio.run(redis_cost(url, args.quick))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
