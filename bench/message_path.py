"""The cost of one relayed message on its way in, warm, without sockets.

A real Node and Connection, a transport that only counts writes: the
connection is upgraded, then fed 32 masked ``message`` frames at a time (what
the sender of the fan-out scenario sends per pass), and the time per message
is the best of many feeds. It covers frame scanning, UTF-8, the rate limit,
parsing and validating, the relay's encoding and queueing it for the fan-out;
not the fan-out's writes (those are the kernel's: see docs/benchmarks.md).

    .venv/bin/python bench/message_path.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from wshub.bench.framing import encode_frame
from wshub.config import Config
from wshub.connection import Connection
from wshub.node import Node

UPGRADE = (
    b"GET /websocket HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class CountingTransport:
    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def measure(rounds: int, batch: int) -> float:
    loop = asyncio.get_running_loop()
    node = Node(Config(message_rate=0, ip_connect_rate=0, max_connections_per_ip=0), loop)
    conn = Connection(node)
    conn.connection_made(CountingTransport())  # type: ignore[arg-type]
    conn.data_received(UPGRADE)
    if conn.ws is None:
        raise SystemExit("the upgrade failed")
    content = b"~#1764112345678901234 s123 c0 " + b"x" * 70  # as wshub bench sends it
    frame = encode_frame(1, b'{"type":"message","content":"' + content + b'"}', mask_key=b"abcd")
    data = frame * batch
    fanout = node.fanout
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        conn.data_received(data)
        best = min(best, time.perf_counter_ns() - start)
        # Drop what was queued (a pass would write it) so that each feed starts alike.
        fanout.frames.clear()
        fanout.payloads.clear()
        fanout.excluded.clear()
    return best / batch / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    us = asyncio.run(measure(a.rounds, a.batch))
    print(f"one relayed message in, warm: {us:.2f} µs (best of {a.rounds} feeds of {a.batch})")


if __name__ == "__main__":
    main()
