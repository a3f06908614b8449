#!/usr/bin/env python3
"""Minimal relay on picows and uvloop.

Any text frame a client sends is relayed verbatim to every other client, one
``transport.send()`` each. Usage: python picows_relay.py PORT
"""

import sys

import picows
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

CLIENTS: set = set()


class Relay(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        CLIENTS.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CLIENTS.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            for c in CLIENTS:
                if c is not transport:
                    c.send(WSMsgType.TEXT, payload)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()


async def main(port: int) -> None:
    # defaults kept, including read_buffer_init_size (16 KiB per connection)
    server = await ws_create_server(lambda _req: Relay(), "127.0.0.1", port, backlog=4096)
    print(f"picows {picows.__version__} relay on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
