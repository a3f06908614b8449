#!/usr/bin/env python3
"""A trivial WebSocket server that floods pre-built frames: the load generator's ceiling.

It accepts the upgrade on any path, then sends every connection batches of
pre-built text frames (each holding the bench marker ``~#``), round-robin, at a
total rate (``--rate`` frames/s, 0 for as fast as the sockets take them). It never
reads past the handshake. It stops by itself after ``--duration`` seconds or
``--max-frames`` frames, whichever comes first.

    python bench/ceiling_server.py 9100 --rate 2000000 --batch 32 --duration 40
    PYTHONPATH=src python -m wshub.bench sink --protocol raw -n 1000 \
        --url ws://127.0.0.1:9100/ --probes 0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


class Conn(asyncio.Protocol):
    def __init__(self, srv: "Flood") -> None:
        self.srv = srv
        self.buf = b""
        self.tr = None
        self.open = False

    def connection_made(self, tr) -> None:
        self.tr = tr

    def data_received(self, data: bytes) -> None:
        if self.open:
            return  # pongs, closes: ignored
        self.buf += data
        i = self.buf.find(b"\r\n\r\n")
        if i < 0:
            return
        key = b""
        for line in self.buf[:i].split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"sec-websocket-key":
                key = v.strip()
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.tr.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n"
        )
        self.open = True
        self.srv.conns.append(self)

    def connection_lost(self, exc) -> None:
        self.open = False
        if self in self.srv.conns:
            self.srv.conns.remove(self)


class Flood:
    def __init__(self, args) -> None:
        self.args = args
        self.conns: list[Conn] = []
        msg = frame(b"~#0 s0 c0 " + b"x" * (args.size - 10))
        self.chunk = msg * args.batch
        self.sent = 0

    async def run(self) -> None:
        a = self.args
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Conn(self), a.host, a.port, backlog=4096)
        print(
            f"ceiling server on {a.host}:{a.port}, batch {a.batch}, rate {a.rate or 'max'}",
            flush=True,
        )
        t_end = time.monotonic() + a.duration
        t0 = None
        i = 0
        tick = 0.001
        while time.monotonic() < t_end and self.sent < a.max_frames:
            conns = self.conns
            if not conns:
                t0 = None
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            if t0 is None:
                t0, base = now, self.sent
            if a.rate > 0:
                budget = int(((now - t0) * a.rate - (self.sent - base)) / a.batch)
            else:
                budget = len(conns)
            budget = min(budget, 4 * len(conns))
            sent_batches = 0
            skipped = 0
            while sent_batches < budget and skipped < len(conns):
                c = conns[i % len(conns)]
                i += 1
                tr = c.tr
                if tr is None or tr.get_write_buffer_size() > 65536:
                    skipped += 1
                    continue
                tr.write(self.chunk)
                sent_batches += 1
            self.sent += sent_batches * a.batch
            await asyncio.sleep(tick if a.rate > 0 or sent_batches == 0 else 0)
        server.close()
        for c in list(self.conns):
            if c.tr is not None:
                c.tr.abort()
        print(f"ceiling server done: {self.sent} frames", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--batch", type=int, default=32, help="frames per write")
    p.add_argument(
        "--rate", type=float, default=0.0, help="total frames/s (0: as fast as possible)"
    )
    p.add_argument("--size", type=int, default=100, help="payload bytes per frame (< 126)")
    p.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument(
        "--max-frames", type=int, default=2_000_000_000, help="stop after this many frames"
    )
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(Flood(args).run())
    except ImportError:
        asyncio.run(Flood(args).run())


if __name__ == "__main__":
    main()
