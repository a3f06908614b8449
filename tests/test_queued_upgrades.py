"""An upgrade request that came whole and waits for its loop pass is not
dropped by --handshake-timeout (commit 76c2649; decisions.md 18's pacing).

In a storm the node upgrades at most ``UPGRADES_PER_PASS`` sockets a loop pass
(16 while its fan-out is behind); the rest wait for later passes. Their
clients sent everything: the wait is the server's, and the handshake deadline
must not drop them meanwhile.

Why in-process. To fail on the old behaviour, a queued request must wait
longer than the deadline, and a request not queued must never: the server's
loop passes must be long, by a known amount. A ``wshub serve`` process cannot
be made to do that on cue (a real storm long enough to pass a deadline is
thousands of sockets, timed by a shared machine's load, and a tiny deadline
also drops, rightly, sockets whose request the loaded loop had not read yet).
So the test runs the real node (``Node``, ``Connection``, the gateway, the hub)
on a real uvloop loop and a real listening socket, with real client sockets,
and holds each loop pass for ``PASS`` seconds: a loop kept busy, as a long
fan-out pass keeps it. The fan-out is declared behind (``pace_upgrades``, the
node's own seam), so 16 upgrades go a pass and the last of ``SOCKETS`` waits
several passes, well past the deadline, while every request is read in the
pass after it was sent, well within it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import uvloop

from wshub import connection
from wshub.config import Config
from wshub.node import Node

from .conftest import TIMEOUT
from .waiting import wait_until_async

PASS = 0.1
"""Seconds each loop pass is held (a busy server)."""
DEADLINE = 0.35
"""--handshake-timeout: over three passes (a request is read one pass after its
accept), under the five passes the last upgrades wait."""
SOCKETS = 6 * connection.UPGRADES_PER_PASS_BEHIND


def _request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /websocket/queued HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _answer(sock: socket.socket, got: bytearray) -> bool:
    """Read what came (without blocking); True once the response head is in
    or the server closed the socket."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            got += data
    except BlockingIOError:
        return b"\r\n\r\n" in got


async def _storm() -> tuple[list[bytes], float]:
    loop = asyncio.get_running_loop()
    config = Config(
        port=0,
        handshake_timeout=DEADLINE,
        ip_connect_rate=0,
        max_connections_per_ip=0,
        max_handshakes=0,
        max_handshakes_per_ip=0,
        message_rate=0,
    )
    node = Node(config, loop)
    await node.start()
    server = await loop.create_server(node.new_connection, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    # Every socket accepted first (uvloop accepts one a loop pass), then every
    # request sent at once, while the loop waits: the next pass reads them all.
    socks = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(SOCKETS)]
    await wait_until_async(lambda: node.gateway.connecting == SOCKETS, "every socket accepted")
    for sock in socks:
        sock.sendall(_request())
        sock.setblocking(False)
    sent = time.monotonic()
    connection.pace_upgrades(lambda: True)  # the fan-out is behind: 16 a pass
    busy = True

    def hold_the_pass() -> None:
        if busy:
            time.sleep(PASS)
            loop.call_soon(hold_the_pass)

    loop.call_soon(hold_the_pass)
    answers = [bytearray() for _ in socks]
    try:
        await wait_until_async(
            lambda: all(_answer(s, got) for s, got in zip(socks, answers, strict=True)),
            "every socket's answer",
            timeout=4 * TIMEOUT,
        )
        took = time.monotonic() - sent
    finally:
        busy = False
        connection.pace_upgrades(lambda: False)  # as before any node (this one is gone)
        for sock in socks:
            sock.close()
        server.close()
        await wait_until_async(lambda: not node.connections, "the server to see them go")
        await node.drain(TIMEOUT)
    return [bytes(got) for got in answers], took


def test_a_whole_upgrade_request_waiting_for_its_pass_outlives_the_deadline() -> None:
    answers, took = uvloop.run(_storm())
    assert took > DEADLINE + PASS, f"the last upgrade came after {took:.2f} s: no wait to test"
    heads = [answer.split(b"\r\n", 1)[0] for answer in answers]
    dropped = sum(1 for head in heads if not head.startswith(b"HTTP/1.1 101"))
    assert dropped == 0, f"{dropped} of {SOCKETS} dropped: {set(heads)}"
