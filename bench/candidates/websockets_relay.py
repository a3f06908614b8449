#!/usr/bin/env python3
"""Minimal relay on the websockets library (asyncio server) and uvloop.

Any text frame a client sends is relayed verbatim to every other client with
``websockets.broadcast()``. Usage: python websockets_relay.py PORT
"""

import sys

import uvloop
import websockets
from websockets.asyncio.server import serve

CLIENTS: set = set()


async def handler(ws) -> None:
    CLIENTS.add(ws)
    try:
        async for msg in ws:
            websockets.broadcast([c for c in CLIENTS if c is not ws], msg)
    except websockets.ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(ws)


async def main(port: int) -> None:
    # no keepalive pings and no compression: a minimal relay
    async with serve(
        handler, "127.0.0.1", port, ping_interval=None, compression=None, backlog=4096
    ) as server:
        print(f"websockets {websockets.__version__} relay on 127.0.0.1:{port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
