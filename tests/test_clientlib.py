"""The browser client library ``wshub.js`` (decisions.md 17), in headless Chromium.

A test page and the module are served by a stdlib HTTP server in a thread; the page
creates clients and records every event they emit, and the tests read those records.
Against the real server (``wshub serve``) these tests check typed events for every
message and reconnects after kill -9 and after a drain; the exact recovery parameters,
duplicate offsets, and the close codes a server sends only in rare states are checked
against stub servers written with ``websockets`` that play the server's side of the
protocol (a fake at the seam). Recovery, tokens and clusters against real servers are
in tests/test_clientlib_servers.py, tests/test_page_library.py and
tests/test_auth_browser.py.

Every wait is a ``wait_for_function`` with an upper bound; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from playwright.sync_api import Browser, Page
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request
from websockets.typing import Subprotocol

import wshub

from .conftest import TIMEOUT, Server, start_server
from .test_page import CHROMIUM_ARGS, ID, browser, free_port  # noqa: F401  (browser: a fixture)

MS = TIMEOUT * 1000
MODULE = Path(wshub.__file__).parent / "static" / "wshub.js"
SECRET = "test-secret-of-the-client-library-tests"
EVENTS = (
    "connecting open close reconnecting recovered welcome user_joined user_left message "
    "broadcast user_info_response pong ping error refreshed"
).split()

PAGE = """<!doctype html><meta charset="utf-8"><title>wshub.js test</title>
<script type="module">
import * as lib from "/wshub.js";
window.lib = lib;
window.clients = {};
const EVENTS = EVENTS_JSON;
window.make = (name, url, options = {}) => {
  if (options.tokenUrl) {
    const from = options.tokenUrl;
    options.getToken = async () => (await fetch(from)).text();
    delete options.tokenUrl;
  }
  const c = new lib.WshubClient(url, options);
  const events = [];
  for (const type of EVENTS) c.on(type, (data) => events.push({ type, data, at: Date.now() }));
  window.clients[name] = { c, events };
  c.connect();
};
window.ready = true;
</script>""".replace("EVENTS_JSON", json.dumps(EVENTS))


def iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def mint(sub: str, ttl: float) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, SECRET, algorithm="HS256")


class PageServer:
    """The test page, the module and a token endpoint (a stand-in for an app's
    backend: ``/token?sub=S&ttl=T`` mints an HS256 token) over plain HTTP."""

    def __init__(self) -> None:
        module = MODULE.read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                url = urlsplit(self.path)
                if url.path == "/":
                    body, kind = PAGE.encode(), "text/html; charset=utf-8"
                elif url.path == "/wshub.js":
                    body, kind = module, "text/javascript; charset=utf-8"
                elif url.path == "/token":
                    q = parse_qs(url.query)
                    body = mint(q["sub"][0], float(q["ttl"][0])).encode()
                    kind = "text/plain"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


Handler = Callable[[ServerConnection, int], Awaitable[None]]
WSHUB = Subprotocol("wshub")


def pick_wshub(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Answer ``wshub`` when offered, as the real server does; never the token."""
    return WSHUB if WSHUB in offered else None


class Stub:
    """A WebSocket server scripted by the test: ``handler(ws, n)`` plays the
    n-th connection (from 1). It records each request's path and offered
    subprotocols, and answers ``wshub`` when offered, as the real server does."""

    def __init__(self, handler: Handler) -> None:
        self.paths: list[str] = []
        self.offers: list[list[str]] = []
        self.errors: list[BaseException] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._server: WsServer | None = None
        numbers: dict[ServerConnection, int] = {}

        def record(conn: ServerConnection, request: Request) -> None:
            self.paths.append(request.path)
            numbers[conn] = len(self.paths)
            offered = request.headers.get_all("Sec-WebSocket-Protocol")
            self.offers.append([p.strip() for h in offered for p in h.split(",")])

        async def run_one(ws: ServerConnection) -> None:
            n = numbers.pop(ws)
            try:
                await handler(ws, n)
            except Exception as exc:  # a failed check inside the stub fails the test
                self.errors.append(exc)
                raise

        async def main() -> None:
            self._server = await serve(
                run_one,
                "127.0.0.1",
                0,
                process_request=record,
                select_subprotocol=pick_wshub,
                ping_interval=None,
                compression=None,
            )
            started.set()
            await self._server.wait_closed()

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(main()))
        self.thread.start()
        assert started.wait(TIMEOUT)
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]
        self.url: str = f"ws://127.0.0.1:{self.port}/websocket"

    def query(self, n: int) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.paths[n - 1]).query)

    def close(self) -> None:
        assert self._server is not None
        self.loop.call_soon_threadsafe(self._server.close)
        self.thread.join(TIMEOUT)
        self.loop.close()
        assert not self.errors, self.errors


Stubs = Callable[[Handler], Stub]


@pytest.fixture(scope="module")
def page_server() -> Iterator[PageServer]:
    srv = PageServer()
    yield srv
    srv.close()


@pytest.fixture
def page(browser: Browser, page_server: PageServer) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context()
    context.set_default_timeout(MS)
    pg = context.new_page()
    pg.goto(page_server.origin + "/")
    pg.wait_for_function("() => window.ready === true")
    yield pg
    pg.evaluate("() => Object.values(clients).forEach(({ c }) => c.close())")
    context.close()


@pytest.fixture
def stubs() -> Iterator[Stubs]:
    """Stub servers, closed after the test. Ask for this fixture before `page`,
    so that the page (whose clients keep reconnecting) is closed first."""
    made: list[Stub] = []

    def make(handler: Handler) -> Stub:
        made.append(Stub(handler))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


# -- Talking to the page --------------------------------------------------------


def make(page: Page, name: str, url: str, **options: Any) -> None:
    page.evaluate("([n, u, o]) => make(n, u, o)", [name, url, options])


def events(page: Page, name: str, type_: str) -> list[Any]:
    found: list[Any] = page.evaluate(
        "([n, t]) => clients[n].events.filter((e) => e.type === t).map((e) => e.data)",
        [name, type_],
    )
    return found


def wait_events(
    page: Page, name: str, type_: str, count: int = 1, timeout: float = MS
) -> list[Any]:
    """Wait until *name* has emitted at least *count* events of *type_*; return them all."""
    page.wait_for_function(
        "([n, t, k]) => clients[n] && clients[n].events.filter((e) => e.type === t).length >= k",
        arg=[name, type_, count],
        timeout=timeout,
    )
    return events(page, name, type_)


def state(page: Page, name: str) -> str:
    return str(page.evaluate("(n) => clients[n].c.state", name))


def call(page: Page, name: str, method: str, *args: Any) -> Any:
    return page.evaluate(
        "async ([n, m, a]) => await clients[n].c[m](...a)", [name, method, list(args)]
    )


def offsets(page: Page, name: str) -> list[int]:
    found: list[int] = page.evaluate(
        "(n) => clients[n].events.filter((e) => e.type === 'message' || e.type === 'broadcast')"
        ".map((e) => e.data.offset)",
        name,
    )
    return found


def order(page: Page, name: str) -> list[str]:
    found: list[str] = page.evaluate("(n) => clients[n].events.map((e) => e.type)", name)
    return found


# -- Against the real server ------------------------------------------------------


def test_typed_events_for_every_message(
    page: Page, page_server: PageServer, make_server: Callable[..., Server]
) -> None:
    """Every server message comes out as an event of its type, with the
    connection-state events around them; send/broadcast/userInfo/ping/close work
    and sends are refused while not connected."""
    server: Server = make_server(
        "--allowed-origins", page_server.origin, "--heartbeat-interval", "0.3"
    )
    make(page, "a", server.ws_url)
    (welcome_a,) = wait_events(page, "a", "welcome")
    assert ID.match(welcome_a["connectionId"]) and welcome_a["connectionCount"] == 1
    assert order(page, "a")[:3] == ["connecting", "open", "welcome"]
    assert events(page, "a", "open") == [{"protocol": ""}]  # no token: no subprotocol offered
    assert events(page, "a", "recovered") == []  # a first connection has nothing to recover

    make(page, "b", server.ws_url)
    (welcome_b,) = wait_events(page, "b", "welcome")
    (joined,) = wait_events(page, "a", "user_joined")
    assert joined["connectionId"] == welcome_b["connectionId"] and joined["totalUsers"] == 2

    assert call(page, "a", "send", "hello <b>b</b>") is True
    (message,) = wait_events(page, "b", "message")
    assert message["content"] == "hello <b>b</b>"
    assert message["connectionId"] == welcome_a["connectionId"]

    assert call(page, "b", "broadcast", "to all") is True
    for name in ("a", "b"):
        (item,) = wait_events(page, name, "broadcast")
        assert item["content"] == "to all" and item["connectionId"] == welcome_b["connectionId"]
    assert events(page, "a", "message") == []  # a's own message did not come back

    info = call(page, "a", "userInfo")
    assert info["type"] == "user_info_response"
    assert info["connectionId"] == welcome_a["connectionId"] and info["connectionCount"] == 2
    assert wait_events(page, "a", "user_info_response") == [info]

    rtt = call(page, "a", "ping")
    assert isinstance(rtt, int | float) and 0 <= rtt < MS
    (pong,) = wait_events(page, "a", "pong")
    assert isinstance(pong["timestamp"], int)

    assert call(page, "a", "send", "   ") is True
    (error,) = wait_events(page, "a", "error")
    assert error["code"] == "empty_content"
    (ping,) = wait_events(page, "a", "ping")[:1]
    assert isinstance(ping["timestamp"], int)

    call(page, "b", "close")
    (closed,) = wait_events(page, "b", "close")
    assert closed["code"] == 1000 and closed["reconnect"] is False
    assert state(page, "b") == "stopped"
    (left,) = wait_events(page, "a", "user_left")
    assert left["connectionId"] == welcome_b["connectionId"] and left["totalUsers"] == 1
    # Refused while not connected: send and broadcast say false, the promises reject.
    assert call(page, "b", "send", "late") is False
    assert call(page, "b", "broadcast", "late") is False
    rejected = page.evaluate("() => clients.b.c.ping().then(() => 'resolved', (e) => e.message)")
    assert rejected == "wshub: not connected"
    assert events(page, "b", "reconnecting") == []


def test_reconnects_after_kill_and_a_late_restart(page: Page, page_server: PageServer) -> None:
    """kill -9: the client sees 1006, keeps trying with backoff while nothing
    listens, and comes back when a new server starts on the port after several
    failed attempts; it then reports recovered: false (this server has no history)."""
    port = free_port()
    args = ("--port", str(port), "--allowed-origins", page_server.origin)
    server = start_server(*args)
    try:
        make(page, "a", server.ws_url, base=100, cap=400)
        (first,) = wait_events(page, "a", "welcome")
        server.proc.kill()
        server.stop()
        closed = wait_events(page, "a", "close")[0]
        assert closed["code"] == 1006 and closed["reconnect"] is True
        assert call(page, "a", "send", "while away") is False
        # Three more attempts fail against the closed port before the restart.
        wait_events(page, "a", "close", 4, timeout=MS * 2)
        assert state(page, "a") in ("waiting", "connecting")
        server = start_server(*args)
        welcomes = wait_events(page, "a", "welcome", 2, timeout=MS * 2)
        assert welcomes[1]["connectionId"] != first["connectionId"]
        assert events(page, "a", "recovered") == [{"recovered": False, "missed": 0}]
        attempts = [e["attempt"] for e in events(page, "a", "reconnecting")]
        assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= 4
        # It is really back: a message from another client reaches it.
        other = server.client()
        other.send({"type": "message", "content": "welcome back"})
        (message,) = wait_events(page, "a", "message")
        assert message["content"] == "welcome back"
        other.close()
    finally:
        server.stop()


def test_reconnects_after_a_drain(page: Page, page_server: PageServer) -> None:
    """SIGTERM drains with 1001: the client reconnects (default backoff: the
    first delay within 0.5 s) to the server that takes the port over."""
    port = free_port()
    args = ("--port", str(port), "--allowed-origins", page_server.origin)
    server = start_server(*args)
    try:
        make(page, "a", server.ws_url)
        wait_events(page, "a", "welcome")
        assert server.stop() == 0
        closed = wait_events(page, "a", "close")[0]
        assert closed == {"code": 1001, "reason": "server shutting down", "reconnect": True}
        delay = wait_events(page, "a", "reconnecting")[0]["delay"]
        assert 0 <= delay <= 500
        server = start_server(*args)
        wait_events(page, "a", "welcome", 2, timeout=MS * 3)
        assert state(page, "a") == "open"
    finally:
        server.stop()


# -- Against stub servers ------------------------------------------------------------


def welcome(n: int, **extra: Any) -> str:
    return json.dumps(
        {
            "type": "welcome",
            "connectionId": f"ws-1764600000000-conn{n:05d}",
            "timestamp": iso(time.time()),
            "connectionCount": 1,
            **extra,
        }
    )


REFUSALS = {4401: "unauthorized", 4403: "forbidden_room", 4429: "too_many_connections"}
STOPS = (1000, 4400, 4401, 4403, 4429, 4499)
RECONNECTS = (1001, 1008, 1011, 1012, 4000, 4399, 4500)


def test_close_codes_stop_or_reconnect(stubs: Stubs, page: Page) -> None:
    """1000 and 4400-4499 stop the client; every other code reconnects.
    Each client's URL names the code its first connection is closed with.
    (One client at a time: Chromium delays a page's WebSocket handshakes while
    many are pending.)"""

    async def handler(ws: ServerConnection, n: int) -> None:
        code = int(stub.query(n)["code"][0])
        first = [int(stub.query(i)["code"][0]) for i in range(1, n + 1)].count(code) == 1
        if code == 0:  # the reference client: closed again and again
            await ws.close(1012, "again")
        elif not first:
            await ws.send(welcome(n))
            await ws.wait_closed()
        elif code in REFUSALS:  # refused credentials: an error, no welcome
            await ws.send(json.dumps({"type": "error", "code": REFUSALS[code], "message": "no"}))
            await ws.close(code, REFUSALS[code])
        else:
            await ws.send(welcome(n))
            await ws.close(code, f"closing {code}")

    stub = stubs(handler)
    fast = {"base": 10, "cap": 10}
    for code in RECONNECTS:
        make(page, str(code), f"{stub.url}?code={code}", **fast)
        closed = wait_events(page, str(code), "close")[0]
        assert closed == {"code": code, "reason": f"closing {code}", "reconnect": True}
        wait_events(page, str(code), "welcome", 2)
        (recovered,) = events(page, str(code), "recovered")
        assert recovered == {"recovered": False, "missed": 0}
    for code in STOPS:
        make(page, str(code), f"{stub.url}?code={code}", **fast)
        (closed,) = wait_events(page, str(code), "close")
        reason = REFUSALS.get(code, f"closing {code}")
        assert closed == {"code": code, "reason": reason, "reconnect": False}, closed
        assert state(page, str(code)) == "stopped"
    for code, error in REFUSALS.items():
        assert [e["code"] for e in events(page, str(code), "error")] == [error]
        assert events(page, str(code), "welcome") == []
    # A stopped client would have been back within its 10 ms delay; let a
    # reference client with the same backoff be closed and reconnect ten times
    # (ten such delays at least), then count the stub's connections.
    make(page, "reference", f"{stub.url}?code=0", **fast)
    wait_events(page, "reference", "reconnecting", 10)
    for code in STOPS:
        assert sum(urlsplit(p).query == f"code={code}" for p in stub.paths) == 1, code
        assert events(page, str(code), "reconnecting") == []


def test_backoff_has_full_jitter(stubs: Stubs, page: Page) -> None:
    """100 reconnect delays, each after a connection the stub closes at once
    (1011, too short-lived to reset the backoff): each delay within
    [0, min(cap, base * 2^attempt)), spread over the whole range (not "half plus
    jitter"), with a mean near half the ceiling. The defaults (0.5 s doubling)
    against a port where nothing listens. (Not 100 failures against that port:
    Chromium itself slows a page's handshakes after repeated failures.)"""

    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.close(1011, "at once")

    stub = stubs(handler)
    base, cap = 10, 80
    make(page, "fast", stub.url, base=base, cap=cap)
    make(page, "defaults", f"ws://127.0.0.1:{free_port()}/websocket")
    delays = wait_events(page, "fast", "reconnecting", 100, timeout=MS * 6)[:100]
    assert [d["attempt"] for d in delays] == list(range(1, 101))  # never reset: never stable
    ceilings = [min(cap, base * 2 ** (d["attempt"] - 1)) for d in delays]
    for d, ceiling in zip(delays, ceilings, strict=True):
        assert 0 <= d["delay"] < ceiling, (d, ceiling)
    capped = [d["delay"] / cap for d, c in zip(delays, ceilings, strict=True) if c == cap]
    assert len(capped) >= 95
    assert len(set(capped)) == len(capped)  # not all equal
    assert min(capped) < 0.1 and max(capped) > 0.9
    assert 0.35 < sum(capped) / len(capped) < 0.65
    quarters = [sum(q / 4 <= x < (q + 1) / 4 for x in capped) for q in range(4)]
    assert min(quarters) >= 8, quarters  # the lower half is used too: full, not equal, jitter

    first = wait_events(page, "defaults", "reconnecting", 3, timeout=MS * 2)[:3]
    for d, ceiling in zip(first, (500, 1000, 2000), strict=True):
        assert 0 <= d["delay"] < ceiling, (d, ceiling)
    fn = page.evaluate("() => [0, 3, 5, 6, 12].map((a) => lib.backoff(a, 500, 20000, () => 1))")
    assert fn == [500, 4000, 16000, 20000, 20000]


def test_recovery_parameters_and_duplicates(stubs: Stubs, page: Page) -> None:
    """The stub plays decisions.md 13: the first connection asks for history,
    each reconnect carries since=EPOCH:OFFSET and previous=OLD_ID from what the
    client saw last; replays overlap live traffic and repeat offsets, and the
    client emits each offset of an epoch once, in order, reporting recovered
    and missed after each reconnect's welcome."""

    def frame(offset: int, kind: str = "message", replayed: bool = False) -> str:
        body: dict[str, Any] = {
            "type": kind,
            "connectionId": "ws-1764600000500-bob000002",
            "content": f"#{offset}",
            "timestamp": iso(time.time()),
            "offset": offset,
        }
        if replayed:
            body["replayed"] = True
        return json.dumps(body)

    async def handler(ws: ServerConnection, n: int) -> None:
        q = stub.query(n)
        if n == 1:
            assert q == {"history": ["3"]}, q
            await ws.send(welcome(n, epoch="e1", offset=10))
            for o in (8, 9, 10):
                await ws.send(frame(o, replayed=True))
            for o, kind in ((11, "message"), (12, "broadcast"), (12, "broadcast"), (11, "message")):
                await ws.send(frame(o, kind))
            await ws.send(frame(13))
            await (await ws.ping())  # everything above has arrived before the drop
            ws.transport.abort()  # a network drop: no close frame
        elif n == 2:
            assert q == {"since": ["e1:13"], "previous": ["ws-1764600000000-conn00001"]}, q
            await ws.send(welcome(n, epoch="e1", offset=15, recovered=True, missed=2))
            for o in (12, 13, 14, 15):
                await ws.send(frame(o, replayed=True))
            await ws.send(frame(15))
            await ws.send(frame(16, "broadcast"))
            await ws.close(1012, "restart")
        elif n == 3:
            assert q == {"since": ["e1:16"], "previous": ["ws-1764600000000-conn00002"]}, q
            # The history is lost: a new epoch whose offsets start again.
            await ws.send(welcome(n, epoch="e2", offset=3, recovered=False, missed=0))
            for o in (4, 2, 4, 5):
                await ws.send(frame(o))
            await ws.close(4000, "kicked")
        elif n == 4:
            assert q == {"since": ["e2:5"], "previous": ["ws-1764600000000-conn00003"]}, q
            await ws.send(welcome(n, epoch="e2", offset=5, recovered=True, missed=0))
            await ws.send(frame(6))
            await ws.wait_closed()
        else:
            # A client that starts from a stored position (the `since` option).
            assert q == {"since": ["e2:6"]}, q
            await ws.send(welcome(n, epoch="e2", offset=6, recovered=True, missed=0))
            await ws.send(frame(6, replayed=True))
            await ws.send(frame(7))
            await ws.wait_closed()

    stub = stubs(handler)
    make(page, "a", stub.url, history=3, base=10, cap=40)
    wait_events(page, "a", "welcome", 4)
    page.wait_for_function("() => clients.a.c.position === 'e2:6'")
    assert offsets(page, "a") == [8, 9, 10, 11, 12, 13, 14, 15, 16, 4, 5, 6]
    replayed = [m.get("replayed", False) for m in events(page, "a", "message")]
    assert replayed[:3] == [True, True, True] and replayed[3] is False
    assert events(page, "a", "recovered") == [
        {"recovered": True, "missed": 2},
        {"recovered": False, "missed": 0},
        {"recovered": True, "missed": 0},
    ]
    # Each reconnect's recovered event follows its welcome, before any replayed frame.
    kinds = [t for t in order(page, "a") if t in ("welcome", "recovered", "message")]
    assert kinds[kinds.index("recovered") - 1 : kinds.index("recovered") + 2] == [
        "welcome",
        "recovered",
        "message",
    ]
    assert [c["code"] for c in events(page, "a", "close")] == [1006, 1012, 4000]

    make(page, "resumed", stub.url, since="e2:6")
    wait_events(page, "resumed", "message")
    page.wait_for_function("() => clients.resumed.c.position === 'e2:7'")
    assert offsets(page, "resumed") == [7]
    assert events(page, "resumed", "recovered") == [{"recovered": True, "missed": 0}]


def test_token_by_subprotocol_and_refresh(
    stubs: Stubs, page: Page, page_server: PageServer
) -> None:
    """The token goes as the subprotocols ["wshub", "bearer." + token]; the client
    refreshes it before exp by the server's clock (the stub's runs 3 s ahead),
    tries again after a refused refresh, and reconnects with the newest token."""
    skew = 3.0
    ttl = 8.0
    seen: dict[str, Any] = {}

    def claims(token: str) -> dict[str, Any]:
        return jwt.decode(token, SECRET, algorithms=["HS256"])

    async def refresh(ws: ServerConnection) -> tuple[str, float]:
        raw = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT + ttl))
        assert raw["type"] == "refresh", raw
        return raw["token"], time.time() + skew

    async def handler(ws: ServerConnection, n: int) -> None:
        offer = stub.offers[n - 1]
        assert offer[0] == "wshub" and len(offer) == 2 and offer[1].startswith("bearer."), offer
        token = offer[1].removeprefix("bearer.")
        assert ws.subprotocol == "wshub"
        if n > 1:
            seen["reconnect_exp"] = claims(token)["exp"]
            await ws.send(welcome(n))
            await ws.wait_closed()
            return
        current = claims(token)
        await ws.send(json.dumps({**json.loads(welcome(n)), "timestamp": iso(time.time() + skew)}))
        # First refresh: before exp by the server's clock, for the same sub, later exp.
        new, at = await refresh(ws)
        assert at < current["exp"], (at, current["exp"])
        fresh = claims(new)
        assert fresh["sub"] == current["sub"] and fresh["exp"] > current["exp"]
        await ws.send(json.dumps({"type": "refreshed", "expiresAt": iso(fresh["exp"])}))
        current = fresh
        # Second: refused; the client tries again before exp.
        _, at = await refresh(ws)
        assert at < current["exp"]
        await ws.send(json.dumps({"type": "error", "code": "unauthorized", "message": "no"}))
        new, at = await refresh(ws)
        assert at < current["exp"], (at, current["exp"])
        fresh = claims(new)
        await ws.send(json.dumps({"type": "refreshed", "expiresAt": iso(fresh["exp"])}))
        seen["last_exp"] = fresh["exp"]
        await ws.close(1012, "restart")

    stub = stubs(handler)
    token_url = f"{page_server.origin}/token?sub=alice&ttl={ttl}"
    make(page, "a", stub.url, tokenUrl=token_url, base=10, cap=10)
    wait_events(page, "a", "welcome", 2, timeout=MS + 3 * ttl * 1000)
    assert events(page, "a", "open")[0] == {"protocol": "wshub"}
    assert len(events(page, "a", "refreshed")) == 2
    assert [e["code"] for e in events(page, "a", "error")] == ["unauthorized"]
    # The reconnect offered the refreshed token or a newer one, never the first.
    assert seen["reconnect_exp"] >= seen["last_exp"]


def test_static_token_room_and_pings(stubs: Stubs, page: Page) -> None:
    """A fixed `token` is offered as is; `room` adds /ROOM to the path, and a
    room name the server would refuse is refused at once. The server's JSON ping
    is answered with a pong, unless `answerPings: false`."""
    answers: list[Any] = []

    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.send(welcome(n, room="lobby"))
        await ws.send(json.dumps({"type": "ping", "timestamp": int(time.time() * 1000)}))
        answers.append(json.loads(await ws.recv()))
        if answers[-1] == {"type": "ping"}:
            await ws.send(json.dumps({"type": "pong", "timestamp": 1}))
        await ws.wait_closed()

    stub = stubs(handler)
    token = mint("bob", 3600)
    make(page, "a", stub.url, token=token, room="lobby")
    wait_events(page, "a", "ping")
    page.wait_for_function("() => clients.a.c.state === 'open'")
    assert stub.offers == [["wshub", "bearer." + token]]
    assert urlsplit(stub.paths[0]).path == "/websocket/lobby"
    make(page, "quiet", stub.url, answerPings=False)
    wait_events(page, "quiet", "ping")
    assert call(page, "quiet", "ping") >= 0  # the first frame it sent is its own ping
    assert sorted(answers, key=str) == [{"type": "ping"}, {"type": "pong"}]
    assert stub.offers[1] == []  # no token: no subprotocol
    refused = page.evaluate(
        "() => { try { new lib.WshubClient('ws://x/websocket', { room: 'a b' }); }"
        " catch (e) { return e.name; } }"
    )
    assert refused == "TypeError"
    assert re.match(r"^ws://", page.evaluate("() => new lib.WshubClient('/websocket').url"))


# -- Against the real server: what it serves now ------------------------------------


def test_served_at_wshub_js(make_server: Callable[..., Server]) -> None:
    """GET /wshub.js serves the module: JavaScript, the same bytes as the file."""
    server = make_server()
    status, headers, body = server.get("/wshub.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body == MODULE.read_bytes()


def test_room_option(page: Page, page_server: PageServer, make_server) -> None:
    """room: NAME joins /websocket/NAME on a real server: the welcome names it, other
    rooms' traffic never arrives."""
    server = make_server("--allowed-origins", page_server.origin)
    make(page, "a", server.ws_url, room="lobby")
    (w,) = wait_events(page, "a", "welcome")
    assert w["room"] == "lobby"
    make(page, "b", server.ws_url, room="other")
    wait_events(page, "b", "welcome")
    call(page, "b", "broadcast", "not for lobby")
    wait_events(page, "b", "broadcast")
    assert call(page, "a", "ping") >= 0
    assert events(page, "a", "broadcast") == [] and events(page, "a", "user_joined") == []
