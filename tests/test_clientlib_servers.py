"""wshub.js against real ``wshub serve`` processes: drops, restarts, drains, a cluster.

Headless Chromium runs the test page of :mod:`tests.test_clientlib` (it records every
event of every client); the servers are real processes. A network drop is played by
:class:`DropProxy`, a TCP proxy between the page and the server that resets every
connection it carries (RST, no close frame: what a phone losing its network looks like
to both ends). A sender outside the browser keeps numbering messages into the room
while the page is cut off, so "nothing lost" is checked message by message.

Every wait is bounded (``wait_for_function`` / ``wait_until``); nothing sleeps to wait.
"""

# The fixtures imported from test_clientlib are parameters of the same name below.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import rjsmin
from playwright.sync_api import Page
from websockets.sync.client import connect

from .conftest import TIMEOUT, RedisServer, Server, start_server
from .test_clientlib import (  # noqa: F401  (browser, page, page_server: fixtures)
    MODULE,
    MS,
    PageServer,
    browser,
    events,
    make,
    offsets,
    page,
    page_server,
    state,
    wait_events,
)
from .test_page import free_port

OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")
FAST = {"base": 50, "cap": 400}  # reconnect quickly: the tests are about what comes back
LONG = MS * 4  # for waits that span a reconnect on a busy machine


class DropProxy:
    """A TCP proxy on a free port in front of one or more servers.

    Each new connection goes to the first of :attr:`targets` that accepts it (so a
    cluster can sit behind one address, as behind a load balancer); :attr:`routes`
    records which port each connection went to. :meth:`cut` resets every connection
    it carries at once.
    """

    def __init__(self, *targets: int) -> None:
        self.targets = list(targets)
        self.routes: list[int] = []
        self.loop = asyncio.new_event_loop()
        self._writers: list[asyncio.StreamWriter] = []  # carried now: cut() resets them
        self._every: list[asyncio.StreamWriter] = []  # ever made: all closed by close()
        self._server: asyncio.Server | None = None
        self.port = 0

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._every.append(writer)
            for port in list(self.targets):
                try:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    continue
                self.routes.append(port)
                self._every.append(up_writer)
                self._writers += [writer, up_writer]
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
                return
            writer.close()

        async def listen() -> None:
            self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(TIMEOUT)

    def url(self, room: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/websocket" + (f"/{room}" if room else "")

    def cut(self) -> None:
        """Reset every carried connection (SO_LINGER 0, then close: an RST both ways)."""
        done = threading.Event()

        def reset() -> None:
            for writer in self._writers:
                if writer.transport.is_closing():
                    continue  # its pair already ended
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            self._writers.clear()
            done.set()

        self.loop.call_soon_threadsafe(reset)
        assert done.wait(TIMEOUT)

    def close(self) -> None:
        self.cut()

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for writer in self._every:
                writer.transport.abort()
            await asyncio.sleep(0)  # the transports close their sockets on the next turn
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


class NumberedSender:
    """Sends ``message`` 1, 2, 3, ... into a room from outside the browser, straight
    to a server (not through the proxy), about every 10 ms, from :meth:`start` until
    :meth:`stop`."""

    def __init__(self, url: str) -> None:
        self.sent = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._ws = connect(url, open_timeout=TIMEOUT, legacy=True, max_queue=None)
        assert json.loads(self._ws.recv(timeout=TIMEOUT))["type"] == "welcome"
        self.thread = threading.Thread(target=self._run)

    def start(self) -> NumberedSender:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.01):  # pacing a steady sender, not a wait
                self._ws.send(json.dumps({"type": "message", "content": str(self.sent + 1)}))
                self.sent += 1
        except Exception as exc:  # a dead sender would make the loss check vacuous
            self.errors.append(exc)

    def stop(self) -> int:
        """Stop, and return how many were sent (every one taken: a ping answered)."""
        self._stop.set()
        self.thread.join(TIMEOUT)
        assert not self.errors, self.errors
        self._ws.send(json.dumps({"type": "ping"}))
        while json.loads(self._ws.recv(timeout=TIMEOUT))["type"] != "pong":
            pass
        self._ws.close()
        return self.sent


@pytest.fixture
def proxies() -> Iterator[list[DropProxy]]:
    made: list[DropProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def contents(page: Page, name: str) -> list[int]:
    found: list[int] = page.evaluate(
        "(n) => clients[n].events.filter((e) => e.type === 'message')"
        ".map((e) => Number(e.data.content))",
        name,
    )
    return found


def wait_messages(page: Page, name: str, count: int, timeout: float = LONG) -> None:
    page.wait_for_function(
        "([n, k]) => clients[n].events.filter((e) => e.type === 'message').length >= k",
        arg=[name, count],
        timeout=timeout,
    )


# -- one node ---------------------------------------------------------------------


def test_network_drop_recovers_every_message(
    page: Page, page_server: PageServer, proxies: list[DropProxy]
) -> None:
    """While a sender keeps sending, the page's connection is reset three times by the
    proxy: each reconnect recovers (recovered: true, from the same epoch), and the page
    has every message 1..N exactly once, in order, none of them replayed twice."""
    server = start_server("--allowed-origins", page_server.origin, *OPEN)
    try:
        proxy = DropProxy(server.port)
        proxies.append(proxy)
        make(page, "a", proxy.url("drops"), **FAST)
        (first,) = wait_events(page, "a", "welcome")
        assert "epoch" in first  # history is on by default on one node
        sender = NumberedSender(f"{server.ws_url}/drops").start()
        for cut in (1, 2, 3):
            wait_messages(page, "a", 30 * cut)
            proxy.cut()
            closes = wait_events(page, "a", "close", cut)
            assert closes[-1]["code"] == 1006 and closes[-1]["reconnect"] is True
            wait_events(page, "a", "recovered", cut, timeout=LONG)
        wait_messages(page, "a", 100)
        sent = sender.stop()
        wait_messages(page, "a", sent)
        got = contents(page, "a")
        for n, content in enumerate(got, start=1):  # message by message
            assert content == n, f"message {n}: got {content} (around: {got[n - 3 : n + 2]})"
        assert len(got) == sent
        recovered = events(page, "a", "recovered")
        assert [r["recovered"] for r in recovered] == [True, True, True]
        welcomes = events(page, "a", "welcome")
        assert {w["epoch"] for w in welcomes} == {first["epoch"]}
        replayed = [m for m in events(page, "a", "message") if m.get("replayed")]
        assert len(replayed) == sum(r["missed"] for r in recovered)
        seen = offsets(page, "a")
        assert seen == sorted(set(seen))  # offsets strictly rising: no duplicate emitted
        assert len(proxy.routes) == 4  # the first connection and three reconnects
    finally:
        server.stop()


def test_restart_changes_the_epoch_and_reports_not_recovered(
    page: Page, page_server: PageServer
) -> None:
    """kill -9 and a new server on the port: the history is gone (a new epoch), so the
    reconnect reports recovered: false, the position moves into the new epoch, and
    messages of the new epoch arrive (its offsets restart, none dropped as old)."""
    port = free_port()
    args = ("--port", str(port), "--allowed-origins", page_server.origin, *OPEN)
    server = start_server(*args)
    try:
        make(page, "a", server.ws_url, **FAST)
        (first,) = wait_events(page, "a", "welcome")
        other = server.client()
        for n in range(1, 6):
            other.send({"type": "message", "content": str(n)})
        wait_messages(page, "a", 5)
        server.proc.kill()
        server.stop()
        closed = wait_events(page, "a", "close")[0]
        assert closed["code"] == 1006 and closed["reconnect"] is True
        server = start_server(*args)
        welcomes = wait_events(page, "a", "welcome", 2, timeout=LONG)
        assert welcomes[1]["epoch"] != first["epoch"]
        assert "recovered" in welcomes[1]  # it did ask (since=): the server said no
        assert events(page, "a", "recovered") == [{"recovered": False, "missed": 0}]
        assert page.evaluate("() => clients.a.c.position").startswith(welcomes[1]["epoch"] + ":")
        other = server.client()
        other.send({"type": "message", "content": "6"})  # offset 1 of the new epoch
        wait_messages(page, "a", 6)
        assert contents(page, "a") == [1, 2, 3, 4, 5, 6]
        other.close()
    finally:
        server.stop()


def test_drain_reconnects_and_says_whether_it_recovered(
    page: Page, page_server: PageServer
) -> None:
    """SIGTERM drains with 1001 (reconnect: true); the server that takes the port over
    is a new epoch, so the page is told recovered: false rather than left to assume."""
    port = free_port()
    args = ("--port", str(port), "--allowed-origins", page_server.origin, *OPEN)
    server = start_server(*args)
    try:
        make(page, "a", server.ws_url, **FAST)
        wait_events(page, "a", "welcome")
        assert server.stop() == 0
        closed = wait_events(page, "a", "close")[0]  # then failures, while the port is shut
        assert closed == {"code": 1001, "reason": "server shutting down", "reconnect": True}
        server = start_server(*args)
        wait_events(page, "a", "welcome", 2, timeout=LONG)
        assert events(page, "a", "recovered") == [{"recovered": False, "missed": 0}]
        assert state(page, "a") == "open"
    finally:
        server.stop()


# -- a cluster ----------------------------------------------------------------------


def cluster_node(page_server: PageServer, redis: RedisServer, name: str) -> Server:
    return start_server(
        "--redis-url",
        redis.url,
        "--cluster-name",
        name,
        "--node-ttl",
        "1",
        "--allowed-origins",
        page_server.origin,
        *OPEN,
    )


@pytest.mark.parametrize("how", ["kill", "drain"])
def test_a_lost_node_reconnects_through_another(
    page: Page,
    page_server: PageServer,
    redis_server: RedisServer,
    proxies: list[DropProxy],
    how: str,
) -> None:
    """Two nodes on Redis behind one address (the proxy). The page's node is killed
    (-9: 1006) or drained (1001); the page reconnects through the other node, and the
    sender's messages (sent to the other node all along) keep arriving, never twice.

    The history lives in Redis (decisions.md 13), so the other node recovers the
    page: recovered: true and every message, in order, as on one node."""
    name = f"page{time.monotonic_ns()}"
    a = cluster_node(page_server, redis_server, name)
    b = cluster_node(page_server, redis_server, name)
    try:
        proxy = DropProxy(a.port, b.port)
        proxies.append(proxy)
        make(page, "p", proxy.url("r"), **FAST)
        (first,) = wait_events(page, "p", "welcome")
        assert proxy.routes == [a.port]
        sender = NumberedSender(f"{b.ws_url}/r")
        wait_events(page, "p", "user_joined")  # the sender, seen through Redis
        sender.start()
        wait_messages(page, "p", 30)
        proxy.targets = [b.port]
        if how == "kill":
            a.proc.kill()
            a.stop()
        else:
            assert a.stop() == 0
        closed = wait_events(page, "p", "close")[0]
        assert closed["code"] == (1006 if how == "kill" else 1001)
        assert closed["reconnect"] is True
        (rec,) = wait_events(page, "p", "recovered", timeout=LONG)
        assert proxy.routes == [a.port, b.port]
        welcomes = events(page, "p", "welcome")
        assert welcomes[1]["connectionId"] != first["connectionId"]
        at_reconnect = len(contents(page, "p"))
        wait_messages(page, "p", at_reconnect + 30)  # live traffic through the other node
        sent = sender.stop()
        got = contents(page, "p")
        assert got == sorted(set(got)) and got[-1] <= sent  # in order, never twice
        assert "epoch" in first  # history is on in a cluster too
        assert rec["recovered"] is True
        wait_messages(page, "p", sent)
        assert contents(page, "p") == list(range(1, sent + 1))
    finally:
        b.stop()
        a.stop()


# -- size ------------------------------------------------------------------------------


def test_library_is_under_5_kib_minified_and_gzipped(page: Page) -> None:
    """Minified (rjsmin: comments and white space) and gzipped (-9) the library is
    under 5 KiB; the minified text still runs (imported in Chromium: full-jitter
    backoff and the stop codes answer as the source does)."""
    source = MODULE.read_text()
    minified = rjsmin.jsmin(source)
    size = len(gzip.compress(minified.encode(), 9))
    print(f"wshub.js: {len(source)} bytes, {len(minified)} minified, {size} minified+gzipped")
    assert size < 5 * 1024
    answers = page.evaluate(
        """async (code) => {
          const url = URL.createObjectURL(new Blob([code], { type: "text/javascript" }));
          const m = await import(url);
          return [m.backoff(3, 500, 20000, () => 0.5), m.stopsOn(4429), m.stopsOn(1001),
                  typeof m.WshubClient];
        }""",
        minified,
    )
    assert answers == [2000, True, False, "function"]


def test_a_fixed_token_that_cannot_be_sent_stops_instead_of_connecting_without_it(
    page: Page, page_server: PageServer
) -> None:
    """A fixed token with a space cannot be a subprotocol (the browser throws): the
    client stops (reconnect: false) rather than connect anonymously; nothing reached the
    server (a real one, --auth off, which would have taken an anonymous connection)."""
    server = start_server("--allowed-origins", page_server.origin, *OPEN)
    try:
        make(page, "a", server.ws_url, token="not a token")
        (closed,) = wait_events(page, "a", "close")
        assert closed["code"] == 1006 and closed["reconnect"] is False
        assert state(page, "a") == "stopped"
        assert events(page, "a", "reconnecting") == [] and events(page, "a", "welcome") == []
        assert server.stats()["connections"]["node"] == 0
    finally:
        server.stop()
