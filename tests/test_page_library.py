"""The chat page at ``/`` on wshub.js (decisions.md 17), in headless Chromium.

What the page adds on the library: one inline module script (the library and the page
script) admitted by its hash alone; recovered/missed shown after a reconnect; the room
and token fields; ``?token=`` offered as the bearer subprotocol, never in a URL; user
ids on messages; a stop on 4401/4403/4429 that waits for the user. Against real
servers where the branch can show it, and against a stub that serves the real page and
plays decisions.md 15 for what a real server would not do on cue (a token expiring
at a given moment, 4403 then 4429 in a row).

Every wait is Playwright's ``expect`` or a bounded poll; nothing sleeps.
"""

# The fixtures imported below are parameters of the same name.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from wshub import http
from wshub.page import build_page

from .conftest import TIMEOUT, Server, start_server
from .test_clientlib import SECRET, iso, mint, pick_wshub
from .test_clientlib_servers import DropProxy, proxies  # noqa: F401  (proxies: a fixture)
from .test_page import LOOSE, MS, browser, feed_item, free_port, my_id, open_page, send  # noqa: F401  (fixtures)
from .waiting import wait_until

STATIC = resources.files("wshub").joinpath("static")
LIBRARY = STATIC.joinpath("wshub.js").read_bytes()


def served_page() -> bytes:
    return build_page(STATIC.joinpath("index.html").read_bytes(), LIBRARY)


# -- the CSP --------------------------------------------------------------------------


def directives(csp: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for part in csp.split(";"):
        name, *values = part.split()
        found[name] = values
    return found


def test_the_csp_admits_the_one_page_script_and_nothing_else(
    make_server: Callable[..., Server], open_page
) -> None:
    """GET / holds wshub.js verbatim in its one (module) script; script-src is exactly
    that script's hash: no 'self', no URL, nothing unsafe. In Chromium the page runs
    with no violation, while a script from /wshub.js or an inline one added to the page
    later is refused."""
    server = make_server(*LOOSE)
    status, headers, body = server.get("/")
    assert status == 200
    assert body.count(LIBRARY.rstrip(b"\n")) == 1
    scripts = re.findall(rb"<script([^>]*)>(.*?)</script>", body, re.DOTALL)
    assert [attributes for attributes, _ in scripts] == [b' type="module"']
    digest = base64.b64encode(hashlib.sha256(scripts[0][1]).digest()).decode()
    csp = directives(headers["Content-Security-Policy"])
    assert csp["script-src"] == [f"'sha256-{digest}'"]
    assert csp["default-src"] == ["'none'"] and csp["connect-src"] == ["'self'"]
    assert not re.search(rb"\bimport\s*(\(|[\w{*])", scripts[0][1])  # no import to admit

    page: Page = open_page(server)
    page.evaluate(
        """() => {
          window.violations = [];
          document.addEventListener("securitypolicyviolation",
            (e) => violations.push(e.violatedDirective + " " + e.blockedURI));
          window.ran = [];
          const external = document.createElement("script");
          external.src = "/wshub.js";
          external.type = "module";
          document.body.append(external);
          const inline = document.createElement("script");
          inline.textContent = "window.ran.push('inline')";
          document.body.append(inline);
        }"""
    )
    page.wait_for_function("() => violations.length >= 2")
    violations = page.evaluate("() => violations")
    assert any(v.startswith("script-src") and v.endswith("/wshub.js") for v in violations)
    assert any(v.startswith("script-src") and v.endswith("inline") for v in violations)
    assert page.evaluate("() => ran") == []
    expect(page.locator("#state")).to_have_attribute("data-state", "open")


def test_the_page_cannot_be_built_around_a_library_that_ends_its_script() -> None:
    """page.build_page refuses a library that would close the inline script early (or
    open the parser's escaped states), and a template without its one marker."""
    template = STATIC.joinpath("index.html").read_bytes()
    for bad in (b"x = '</script>';", b"x = '</SCRIPT ';", b"// <!-- a", b"s = '<script>';"):
        with pytest.raises(ValueError, match="cannot be inlined"):
            build_page(template, bad)
    with pytest.raises(ValueError, match="marker"):
        build_page(b'<script type="module"></script>', LIBRARY)
    assert http.page_headers(served_page()) == http.page_headers(served_page())


# -- recovery, on a real server ----------------------------------------------------------


def test_the_page_shows_recovery_after_a_drop_and_a_gap_after_a_restart(
    open_page, proxies: list[DropProxy]
) -> None:
    """Through a proxy that resets the connection: the page reconnects by itself, says
    what was recovered (data-recovered="true", "Recovered N messages" or "Nothing was
    missed") and shows every message once, in order. After a kill -9 and a restart
    (a new epoch) it says messages may be missing (data-recovered="false")."""
    port = free_port()
    args = ("--port", str(port), *LOOSE, "--message-rate", "0")
    server = start_server(*args)
    try:
        proxy = DropProxy(port)
        proxies.append(proxy)
        page = open_page(f"http://127.0.0.1:{proxy.port}/")
        other = server.client()
        for n in range(1, 4):
            other.send({"type": "message", "content": f"m{n}"})
        expect(feed_item(page, "message")).to_have_count(3)
        proxy.cut()
        for n in range(4, 8):  # sent while the page is cut off, or just back
            other.send({"type": "message", "content": f"m{n}"})
        recovery = feed_item(page, "recovery")
        expect(recovery).to_have_count(1, timeout=MS * 3)
        expect(recovery).to_have_attribute("data-recovered", "true")
        missed = int(recovery.get_attribute("data-missed") or "-1")
        assert 0 <= missed <= 4
        expected = "Nothing was missed" if missed == 0 else f"Recovered {missed} message"
        expect(recovery).to_contain_text(expected)
        expect(feed_item(page, "message")).to_have_count(7)
        shown = feed_item(page, "message").locator(".content").all_inner_texts()
        assert shown == [f"m{n}" for n in range(1, 8)]
        expect(page.locator("#state")).to_have_attribute("data-state", "open")
        other.close()

        server.proc.kill()
        server.stop()
        server = start_server(*args)
        expect(recovery).to_have_count(2, timeout=MS * 3)
        expect(recovery.nth(1)).to_have_attribute("data-recovered", "false")
        expect(recovery.nth(1)).to_have_text(re.compile("may be missing"))
        expect(page.locator("#state")).to_have_attribute("data-state", "open")
    finally:
        server.stop()


# -- the room field ------------------------------------------------------------------------


def test_the_room_field_moves_the_page_to_another_room(
    make_server: Callable[..., Server], open_page
) -> None:
    """Typing a room and Join: the page leaves the default room (its members see it go),
    joins the new one (its members see it come and hear it), the header and the
    address bar name it; an invalid name is refused on the page."""
    server = make_server(*LOOSE)
    lobby = server.client()
    green = server.client("green")
    page = open_page(server)
    first = my_id(page)
    assert lobby.recv_type("user_joined")["connectionId"] == first
    page.get_by_text("Room and token").click()
    page.get_by_label("Room", exact=True).fill("green")
    page.get_by_role("button", name="Join").click()
    expect(page.locator("#room")).to_have_text("green")
    expect(page.locator("#state")).to_have_attribute("data-state", "open")
    expect(page.locator("#me")).not_to_have_text(first)
    assert lobby.recv_type("user_left")["connectionId"] == first
    assert green.recv_type("user_joined")["connectionId"] == my_id(page)
    assert parse_qs(urlsplit(page.url).query) == {"room": ["green"]}
    send(page, "hello green")
    assert green.recv_type("message")["content"] == "hello green"
    expect(feed_item(page, "system", "Disconnected")).to_have_count(0)  # a move, not a drop

    page.get_by_label("Room", exact=True).fill("no spaces")
    page.get_by_role("button", name="Join").click()
    expect(page.locator("#state")).to_have_text("invalid room name")
    assert green.recv_type("user_left")["connectionId"]
    for c in (lobby, green):
        c.close()


# -- tokens, against a stub that serves the page ---------------------------------------------


Play = Callable[[ServerConnection, int], Awaitable[None]]


class PageStub:
    """Serves the real page (with its real CSP) at ``/`` and plays the server's side of
    ``/websocket`` with ``play(ws, n)`` for the n-th connection; records each upgrade's
    path and offered subprotocols."""

    def __init__(self, play: Play) -> None:
        self.paths: list[str] = []
        self.offers: list[list[str]] = []
        self.errors: list[BaseException] = []
        self.loop = asyncio.new_event_loop()
        self._server: WsServer | None = None
        numbers: dict[ServerConnection, int] = {}
        html = served_page()

        def route(conn: ServerConnection, request: Request) -> Response | None:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                headers = Headers(http.page_headers(html))
                headers["Content-Type"] = "text/html; charset=utf-8"
                headers["Content-Length"] = str(len(html))
                return Response(200, "OK", headers, html)
            self.paths.append(request.path)
            numbers[conn] = len(self.paths)
            offered = request.headers.get_all("Sec-WebSocket-Protocol")
            self.offers.append([p.strip() for h in offered for p in h.split(",")])
            return None

        async def run_one(ws: ServerConnection) -> None:
            try:
                await play(ws, numbers.pop(ws))
            except Exception as exc:  # a failed check inside the stub fails the test
                self.errors.append(exc)
                raise

        async def listen() -> None:
            self._server = await serve(
                run_one,
                "127.0.0.1",
                0,
                process_request=route,
                select_subprotocol=pick_wshub,
                ping_interval=None,
                compression=None,
            )

        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(TIMEOUT)
        assert self._server is not None
        self.origin = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()
        assert not self.errors, self.errors


def frame(type_: str, **fields: Any) -> str:
    return json.dumps({"type": type_, "timestamp": iso(time.time()), **fields})


def conn_id(n: int) -> str:
    return f"ws-1764600000000-conn{n:05d}"


async def answer_one_ping(ws: ServerConnection) -> None:
    """Wait for the page's first ping (sent after the welcome) and answer it."""
    while json.loads(await ws.recv())["type"] != "ping":
        pass
    await ws.send(frame("pong"))


REFUSED = {1: (4401, "token expired", "token_expired"), 2: (4403, "forbidden", "forbidden_room")}
REFUSED[3] = (4429, "too many connections", "too_many_connections")


async def play_tokens(ws: ServerConnection, n: int) -> None:
    """1: alice welcomed, bob joins and speaks, then the token expires (4401);
    2: welcomed again, then refused the room (4403); 3: one connection too many (4429)."""
    await ws.send(
        frame("welcome", connectionId=conn_id(n), connectionCount=1, room="blue", userId="alice")
    )
    await answer_one_ping(ws)
    if n == 1:
        bob = conn_id(99)
        await ws.send(frame("user_joined", connectionId=bob, userId="bob", totalUsers=2))
        await ws.send(frame("message", connectionId=bob, userId="bob", content="hi alice"))
        await ws.send(frame("broadcast", connectionId=conn_id(98), content="no token here"))
    code, reason, error = REFUSED[n]
    await ws.send(frame("error", code=error, message=reason))
    await ws.close(code, reason)


@pytest.fixture
def token_stub() -> Iterator[PageStub]:
    stub = PageStub(play_tokens)
    yield stub
    stub.close()


def test_tokens_user_ids_and_refusals_on_the_page(token_stub: PageStub, browser: Browser) -> None:
    """/?token=T offers ["wshub", "bearer.T"] (the URL of the socket and the address
    bar carry no token); the welcome's userId is shown, and other users are named by
    theirs. 4401 stops: "closed", the settings opened, no retry until the user acts; a
    new token typed and Join offers that token; 4403 and 4429 stop the same way, and
    "Reconnect now" is the only way back."""
    context = browser.new_context()
    context.set_default_timeout(MS)
    try:
        page = context.new_page()
        token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
        page.goto(f"{token_stub.origin}/?room=blue&token={token}")
        assert parse_qs(urlsplit(page.url).query) == {"room": ["blue"]}  # token taken out
        state = page.locator("#state")
        expect(state).to_have_text("closed (4401 token expired)")
        assert token_stub.offers[0] == ["wshub", f"bearer.{token}"]
        assert token_stub.paths[0] == "/websocket/blue"  # no token, no query at all
        expect(page.locator("#user")).to_have_text("alice")
        message = feed_item(page, "message", "hi alice")
        expect(message.locator(".who")).to_have_text("bob")
        expect(message.locator(".who")).to_have_attribute("title", f"bob ({conn_id(99)})")
        expect(feed_item(page, "join").locator(".who")).to_have_text("bob")
        anonymous = feed_item(page, "broadcast", "no token here").locator(".who")
        expect(anonymous).to_have_text(conn_id(98))
        expect(page.locator("#notice")).to_have_text(re.compile("token has expired"))
        expect(page.locator("#settings")).to_have_attribute("open", "")
        expect(page.get_by_role("button", name="Reconnect now")).to_be_visible()
        expect(page.get_by_role("button", name="Send")).to_be_disabled()

        page.get_by_label("Token", exact=True).fill("new.token.here")
        page.get_by_role("button", name="Join").click()
        expect(state).to_have_text("closed (4403 forbidden)")
        assert token_stub.offers[1] == ["wshub", "bearer.new.token.here"]
        expect(feed_item(page, "error", "forbidden")).to_have_count(1)

        page.get_by_role("button", name="Reconnect now").click()
        expect(state).to_have_text("closed (4429 too many connections)")
        expect(page.locator("#notice")).to_have_text(re.compile("too many connections"))
        assert token_stub.offers[2] == ["wshub", "bearer.new.token.here"]
        # Every connection came from a user's action: none from a retry on its own.
        wait_until(lambda: len(token_stub.paths) == 3, "three connections")
        expect(state).to_have_attribute("data-state", "closed")
        assert len(token_stub.paths) == 3
    finally:
        context.close()


# -- tokens, against a real server (--auth required) ------------------------------------------


def test_the_page_with_tokens_on_a_real_server(
    make_server: Callable[..., Server], open_page, browser: Browser
) -> None:
    """wshub serve --auth required: /?token= pages are welcomed as their token's user
    and name each other by user id; an expired token stops the page with 4401 (no
    retry, the settings opened) until a valid token typed in the field and Join."""
    server = make_server(*LOOSE, "--auth", "required", "--auth-secret", SECRET)
    alice = open_page(f"{server.http_url}/?token={mint('alice', 60)}")
    assert "token" not in urlsplit(alice.url).query
    expect(alice.locator("#user")).to_have_text("alice")
    bob = open_page(f"{server.http_url}/?token={mint('bob', 60)}")
    expect(bob.locator("#user")).to_have_text("bob")
    joined = feed_item(alice, "join").locator(".who")
    expect(joined).to_have_text("bob")
    expect(joined).to_have_attribute("title", f"bob ({my_id(bob)})")
    send(bob, "hi from bob")
    expect(feed_item(alice, "message", "hi from bob").locator(".who")).to_have_text("bob")
    send(alice, "to all", kind="broadcast")
    expect(feed_item(bob, "broadcast", "to all").locator(".who")).to_have_text("alice")

    context = browser.new_context()
    context.set_default_timeout(MS)
    try:
        late = context.new_page()
        late.goto(f"{server.http_url}/?token={mint('carol', -10)}")
        expect(late.locator("#state")).to_have_text("closed (4401 token expired)")
        expect(feed_item(late, "error", "expired")).to_have_count(1)
        expect(late.locator("#settings")).to_have_attribute("open", "")
        assert server.stats()["connections"]["node"] == 2  # the refused one is not counted
        late.get_by_label("Token", exact=True).fill(mint("carol", 60))
        late.get_by_role("button", name="Join").click()
        expect(late.locator("#state")).to_have_attribute("data-state", "open")
        expect(late.locator("#user")).to_have_text("carol")
        expect(feed_item(alice, "join", "carol")).to_have_count(1)
    finally:
        context.close()
