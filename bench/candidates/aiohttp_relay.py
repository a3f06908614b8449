#!/usr/bin/env python3
"""Minimal relay on aiohttp's web server and uvloop.

Any text frame a client sends is relayed verbatim to every other client, one
``await send_str()`` each. Usage: python aiohttp_relay.py PORT
"""

import sys

import aiohttp
import uvloop
from aiohttp import WSMsgType, web

CLIENTS: set = set()


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    CLIENTS.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                for c in list(CLIENTS):
                    if c is not ws and not c.closed:
                        try:
                            await c.send_str(msg.data)
                        except ConnectionError:
                            pass
    finally:
        CLIENTS.discard(ws)
    return ws


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", websocket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"aiohttp {aiohttp.__version__} relay on 127.0.0.1:{port}", flush=True)
    try:
        import asyncio

        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
