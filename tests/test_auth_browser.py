"""Connect tokens from a real browser (headless Chromium) to a real
``wshub serve --auth required``: what decisions.md 15 says browsers can do.

The page and its token endpoint are those of tests/test_clientlib.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from playwright.sync_api import Page

from .conftest import Server
from .test_clientlib import (  # noqa: F401  (browser, page, page_server: fixtures)
    MS,
    SECRET,
    PageServer,
    browser,
    events,
    make,
    mint,
    page,
    page_server,
    wait_events,
)


def auth_server(make_server: Callable[..., Server], pages: PageServer) -> Server:
    return make_server(
        "--auth", "required", "--auth-secret", SECRET, "--allowed-origins", pages.origin,
        "--ip-connect-rate", "0", "--max-connections-per-ip", "0",
    )  # fmt: skip


def raw_socket(tab: Page, url: str, protocols: list[str]) -> dict[str, Any]:
    """A plain browser WebSocket: what it saw until its close."""
    seen: dict[str, Any] = tab.evaluate(
        """([url, protocols]) => new Promise((done) => {
          const ws = new WebSocket(url, protocols);
          const seen = { messages: [], protocol: null };
          ws.onopen = () => { seen.protocol = ws.protocol; };
          ws.onmessage = (e) => seen.messages.push(JSON.parse(e.data));
          ws.onclose = (e) => done({ ...seen, code: e.code, reason: e.reason });
        })""",
        [url, protocols],
    )
    return seen


def test_browser_token_user_id_and_refresh_on_a_real_server(
    page: Page,  # noqa: F811
    page_server: PageServer,  # noqa: F811
    make_server: Callable[..., Server],
) -> None:
    """wshub.js with getToken: the server answers the subprotocol ``wshub``,
    the welcome carries the user id, and the library's refresh before ``exp``
    keeps the connection open past the first token's expiry."""
    srv = auth_server(make_server, page_server)
    ttl = 8.0  # wshub.js refreshes a quarter of the lifetime before exp: 2 s of margin
    started = time.time()
    make(page, "a", srv.ws_url, tokenUrl=f"{page_server.origin}/token?sub=alice&ttl={ttl}")
    (welcome,) = wait_events(page, "a", "welcome")
    assert welcome["userId"] == "alice"
    assert events(page, "a", "open") == [{"protocol": "wshub"}]
    wait_events(page, "a", "refreshed", timeout=MS + ttl * 1000)
    # Past the first token's exp: still the same connection, never closed.
    page.wait_for_function(
        f"() => Date.now() / 1000 > {started + ttl + 0.5}", timeout=MS + ttl * 1000
    )
    assert events(page, "a", "close") == [] and len(events(page, "a", "welcome")) == 1
    assert srv.stats()["connections"]["node"] == 1


def test_browser_sees_why_a_token_was_refused(
    page: Page,  # noqa: F811
    page_server: PageServer,  # noqa: F811
    make_server: Callable[..., Server],
) -> None:
    """The upgrade completes so a browser learns why: one error, then 4401 (or
    4403), which a failed HTTP upgrade could never show it."""
    srv = auth_server(make_server, page_server)
    forged = mint("eve", 60)[:-4] + "AAAA"
    seen = raw_socket(page, srv.ws_url, ["wshub", "bearer." + forged])
    assert seen["protocol"] == "wshub"
    assert [m["code"] for m in seen["messages"]] == ["unauthorized"]
    assert (seen["code"], seen["reason"]) == (4401, "unauthorized")
    expired = raw_socket(page, srv.ws_url, ["wshub", "bearer." + mint("eve", -5)])
    assert [m["code"] for m in expired["messages"]] == ["token_expired"]
    assert (expired["code"], expired["reason"]) == (4401, "token expired")
    none = raw_socket(page, srv.ws_url, [])
    assert (none["code"], [m["code"] for m in none["messages"]]) == (4401, ["unauthorized"])
    assert srv.stats()["connections"]["node"] == 0
