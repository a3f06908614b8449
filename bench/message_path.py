"""The Python cost of one relayed message in a room, warm, without sockets.

A real Node, its hub and its connections, with transports that only count
what is written: a room of ``--members`` connections (10, as in the rooms
scenario), one of them the sender, fed ``--batch`` masked ``message`` frames
at a time (what the rooms scenario's sender has in flight), then the fan-out's
pass to the others. The CPU time per message (the thread's clock: a busy machine
that preempts the process does not count) is the median of many feeds; it
covers frame scanning, UTF-8, the rate limit, parsing and validating, the
relay's encoding, the history, queueing it and the pass (joining the frames,
one write per member); not the kernel's share (the sends: see
docs/rooms-perf.md).

    .venv/bin/python bench/message_path.py [--rounds 2000] [--history-size 0]

Direct sends are off here (no real socket); the writes go through the fake
transport's ``write()``, which costs about what one ``send_each`` entry does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from wshub.backplane.memory import MemoryBackplane
from wshub.bench.framing import encode_frame
from wshub.config import Config
from wshub.ids import NodeId
from wshub.node import Node

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class CountingTransport:
    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.writes += 1
        self.bytes += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def measure(rounds: int, batch: int, members: int, history_size: int | None) -> dict:
    loop = asyncio.get_running_loop()
    options: dict[str, object] = {
        "message_rate": 0,
        "ip_connect_rate": 0,
        "max_connections_per_ip": 0,
    }
    if history_size is not None:
        options["history_size"] = history_size
    node = Node(Config(**options), loop, backplane=MemoryBackplane(NodeId("bench")))  # type: ignore[arg-type]
    await node.backplane.start(node)
    conns = []
    transports = []
    for _ in range(members):
        transport = CountingTransport()
        conn = node.new_connection()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(UPGRADE.format(path="/websocket/r0").encode())
        conns.append(conn)
        transports.append(transport)
    for _ in range(3):
        await asyncio.sleep(0)
        node.fanout.flush()
    sender = conns[0]
    if sender.ws is None:
        raise SystemExit("the upgrade failed")
    content = b"~#1764112345678901234 s123 c0 " + b"x" * 70  # as wshub bench sends it
    frame = encode_frame(1, b'{"type":"message","content":"' + content + b'"}', mask_key=b"abcd")
    data = frame * batch
    fanout = node.fanout
    ins: list[int] = []
    passes: list[int] = []
    for _ in range(rounds):
        start = time.thread_time_ns()
        sender.data_received(data)
        middle = time.thread_time_ns()
        fanout.flush()
        end = time.thread_time_ns()
        ins.append(middle - start)
        passes.append(end - middle)
        await asyncio.sleep(0)
    written = sum(t.bytes for t in transports[1:])
    return {
        "in_us_per_message": statistics.median(ins) / batch / 1000,
        "pass_us_per_message": statistics.median(passes) / batch / 1000,
        "total_us_per_message": statistics.median(i + p for i, p in zip(ins, passes, strict=True))
        / batch
        / 1000,
        "frame_bytes": written / max(1, rounds * batch * (members - 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--history-size", type=int, default=None)
    a = ap.parse_args()
    r = asyncio.run(measure(a.rounds, a.batch, a.members, a.history_size))
    print(
        f"one message into a room of {a.members} (median of {a.rounds} feeds of {a.batch}): "
        f"in {r['in_us_per_message']:.2f} µs + pass {r['pass_us_per_message']:.2f} µs "
        f"= {r['total_us_per_message']:.2f} µs; {r['frame_bytes']:.0f} bytes per delivery"
    )


if __name__ == "__main__":
    main()
