"""The chat page at ``/`` (decisions.md 11), driven in a real browser.

Headless Chromium from Debian (``/usr/bin/chromium``, installed by
``scripts/install test``) is driven by Playwright for Python; Playwright's own
browser downloads are never used. Every wait is Playwright's ``expect`` or
``wait_for_*`` with an upper bound: nothing sleeps for a fixed time.

Run ``python -m tests.test_page --screenshot docs/screenshot.png`` from the
repository root to regenerate the README's screenshot.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, Page, WebSocket, expect, sync_playwright

from .conftest import TIMEOUT, Server, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MS = TIMEOUT * 1000
ID = re.compile(r"^ws-\d{13}-[a-z0-9]{9}$")
# Limits loose enough for a suite that opens many pages from one address.
LOOSE = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Open the chat page of a server in a fresh browser context; wait until
    it is connected. Every context is closed after the test."""
    contexts = []

    def open_(server: Server | str, **context_args: object) -> Page:
        url = server if isinstance(server, str) else server.http_url + "/"
        context = browser.new_context(**context_args)  # type: ignore[arg-type]
        context.set_default_timeout(MS)
        contexts.append(context)
        page = context.new_page()
        page.goto(url)
        expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=MS)
        expect(page.locator("#me")).to_have_text(ID, timeout=MS)
        return page

    yield open_
    for context in contexts:
        context.close()


def my_id(page: Page) -> str:
    return page.locator("#me").inner_text()


def feed_item(page: Page, kind: str, text: str | re.Pattern[str] | None = None):
    items = page.locator(f'#feed li[data-kind="{kind}"]')
    return items.filter(has_text=text) if text is not None else items


def send(page: Page, text: str, kind: str = "message") -> None:
    page.locator(f'input[name="kind"][value="{kind}"]').check()
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send").click()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_page_is_self_contained(make_server: Callable[..., Server]) -> None:
    """The page loads nothing from elsewhere: no external scripts, styles or
    images, and no HTML-parsing sinks for user content."""
    server = make_server()
    status, headers, body = server.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html, sink


def test_two_pages_chat(make_server: Callable[..., Server], open_page) -> None:
    """Ids, counts, the join/leave feed, messages and broadcasts with sender
    and time, user info and the round trip, between two real pages."""
    server = make_server(*LOOSE)
    a = open_page(server)
    a_id = my_id(a)
    expect(a.locator("#count")).to_have_text("1")

    b = open_page(server)
    b_id = my_id(b)
    assert a_id != b_id
    expect(b.locator("#count")).to_have_text("2")
    expect(a.locator("#count")).to_have_text("2")
    joined = feed_item(a, "join", b_id)
    expect(joined).to_have_count(1)
    expect(joined).to_contain_text("2 online")
    expect(feed_item(b, "join")).to_have_count(0)  # nobody announces you to yourself

    # A message goes to the other page only, shown as text, never as markup.
    markup = "hi <b>bold</b> <img src=x onerror=alert(1)> & ünïcødé 🎉"
    send(a, markup)
    received = feed_item(b, "message")
    expect(received).to_have_count(1)
    expect(received.locator(".content")).to_have_text(markup)
    expect(received.locator(".who")).to_have_text(a_id)
    expect(received.locator("time")).to_have_text(re.compile(r"\d{1,2}:\d{2}:\d{2}"))
    assert received.locator("b, img").count() == 0
    own = feed_item(a, "self")
    expect(own.locator(".content")).to_have_text(markup)
    expect(own).to_have_attribute("data-delivery", "sent")
    expect(a.get_by_label("Message", exact=True)).to_have_value("")

    # A broadcast reaches both pages, the sender included.
    send(b, "to all of you", kind="broadcast")
    for page, sender in ((a, b_id), (b, "you")):
        item = feed_item(page, "broadcast", "to all of you")
        expect(item).to_have_count(1)
        expect(item.locator(".who")).to_have_text(sender)
        expect(item.locator(".tag")).to_have_text("broadcast")
    expect(feed_item(a, "message")).to_have_count(0)  # a's own message did not come back

    # User info and the measured round trip.
    a.get_by_role("button", name="User info").click()
    expect(feed_item(a, "info")).to_contain_text(f"you are {a_id}; 2 online")
    a.get_by_role("button", name="Ping").click()
    expect(a.locator("#rtt")).to_have_text(re.compile(r"^\d+(\.\d)? ms$"))

    # Closing b: a sees it leave and the count drop.
    b.context.close()
    left = feed_item(a, "leave", b_id)
    expect(left).to_have_count(1)
    expect(left).to_contain_text("1 online")
    expect(a.locator("#count")).to_have_text("1")


def test_counter_and_too_long_error(make_server: Callable[..., Server], open_page) -> None:
    """The counter counts code points like the server; 1001 characters come
    back as a readable error, 1000 emoji go through."""
    server = make_server(*LOOSE)
    a = open_page(server)
    b = open_page(server)
    box = a.get_by_label("Message", exact=True)
    counter = a.locator("#counter")

    box.fill("😀" * 1000)  # 2000 UTF-16 units, 1000 code points
    expect(counter).to_have_text("1000 / 1000")
    expect(counter).not_to_have_attribute("data-over", "")
    a.get_by_role("button", name="Send").click()
    expect(feed_item(b, "message").locator(".content")).to_have_text("😀" * 1000)
    expect(feed_item(a, "self")).to_have_attribute("data-delivery", "sent")

    box.fill("x" * 1001)
    expect(counter).to_have_text("1001 / 1000 (1 too many)")
    expect(counter).to_have_attribute("data-over", "")
    a.get_by_role("button", name="Send").click()
    expect(a.get_by_role("alert")).to_have_text(
        "Not sent: the message is longer than 1000 characters."
    )
    error = feed_item(a, "error")
    expect(error).to_have_count(1)
    expect(error.locator(".tag")).to_have_text("content_too_long")
    refused = feed_item(a, "self").nth(1)
    expect(refused).to_have_attribute("data-delivery", "refused")
    expect(refused.locator(".delivery")).to_have_text("not sent")

    # Nothing of it reached b: the next message is the only other one it sees.
    send(a, "after the error")
    expect(feed_item(b, "message").last.locator(".content")).to_have_text("after the error")
    expect(feed_item(b, "message")).to_have_count(2)
    assert server.stats()["messages"]["FAILED"] == 1


def test_answers_server_ping_with_pong(make_server: Callable[..., Server], open_page) -> None:
    """The page answers the server's JSON ping with {"type":"pong"}."""
    server = make_server(*LOOSE, "--heartbeat-interval", "0.2")
    page = open_page(server)
    with page.expect_event("websocket") as info:
        page.reload()
    ws: WebSocket = info.value
    with ws.expect_event(
        "framesent",
        predicate=lambda payload: json.loads(payload) == {"type": "pong"},
        timeout=MS,
    ):
        pass
    expect(page.locator("#state")).to_have_attribute("data-state", "open")


def test_keyboard_only(make_server: Callable[..., Server], open_page) -> None:
    """Tab order: feed, message box, kind, Send, User info, Ping; Enter sends,
    arrow keys choose broadcast."""
    server = make_server(*LOOSE)
    a = open_page(server)
    b = open_page(server)
    kb = a.keyboard

    def focused() -> str:
        return a.evaluate(
            "() => { const e = document.activeElement; return e.id || (e.name + ':' + e.value); }"
        )

    order = []
    for _ in range(6):
        kb.press("Tab")
        order.append(focused())
    assert order == ["feed", "text", "kind:message", "send", "info", "ping"]

    a.locator("#text").focus()
    kb.type("typed, then Enter")
    kb.press("Enter")
    expect(feed_item(b, "message").locator(".content")).to_have_text("typed, then Enter")
    assert focused() == "text"

    kb.press("Shift+Enter")  # a new line, not a send
    expect(a.locator("#text")).to_have_value("\n")
    kb.press("Backspace")
    kb.press("Tab")
    kb.press("ArrowRight")  # the radio group: message -> broadcast
    assert focused() == "kind:broadcast"
    kb.press("Shift+Tab")
    kb.type("shouted")
    kb.press("Enter")
    expect(feed_item(b, "broadcast").locator(".content")).to_have_text("shouted")
    expect(feed_item(a, "broadcast").locator(".who")).to_have_text("you")


def test_phone_sized_screen(make_server: Callable[..., Server], open_page) -> None:
    """At 360x640 nothing scrolls sideways and the controls fit on screen."""
    server = make_server(*LOOSE)
    page = open_page(server, viewport={"width": 360, "height": 640}, is_mobile=True, has_touch=True)
    send_long = "a-very-long-word-" * 30
    other = open_page(server)
    send(other, send_long)
    expect(feed_item(page, "message")).to_have_count(1)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 360, width
    for selector in ("#text", "#send", "#info", "#ping", "#feed", "#count"):
        box = page.locator(selector).bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, (selector, box)
        assert box["y"] >= 0 and box["y"] + box["height"] <= 640, (selector, box)
    assert page.locator("#send").bounding_box()["height"] >= 40  # a finger-sized target


def test_reconnects_after_server_restart(open_page) -> None:
    """The server goes away: the page shows it is waiting to reconnect (with
    backoff) and comes back by itself, with a new id, when the server does."""
    port = free_port()
    server = start_server("--port", str(port), *LOOSE)
    try:
        page = open_page(f"http://127.0.0.1:{port}/")
        first_id = my_id(page)
        assert server.stop() == 0

        state = page.locator("#state")
        expect(state).to_have_attribute("data-state", re.compile("waiting|connecting"))
        expect(state).to_have_text(re.compile(r"reconnecting in \d+\.\d s \(attempt \d+\)"))
        expect(
            feed_item(page, "system", "Disconnected (1001 server shutting down).")
        ).to_have_count(1)
        expect(page.get_by_role("button", name="Send")).to_be_disabled()
        expect(page.locator("#count")).to_have_text("–")
        # At least one attempt failed against the closed port before the restart.
        expect(state).to_have_text(re.compile(r"could not connect, reconnecting"))

        server = start_server("--port", str(port), *LOOSE)
        expect(state).to_have_attribute("data-state", "open", timeout=MS * 3)
        expect(page.locator("#me")).to_have_text(ID)
        second_id = my_id(page)
        assert second_id != first_id
        expect(feed_item(page, "system", f"Reconnected as {second_id}.")).to_have_count(1)
        expect(page.locator("#count")).to_have_text("1")
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        send(page, "back again")
        expect(feed_item(page, "self").last).to_have_attribute("data-delivery", "sent")
    finally:
        server.stop()


def take_screenshot(path: str) -> None:
    """Three people chatting, seen by one of them."""
    server = start_server(*LOOSE)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pages = []
            for _ in range(3):
                context = browser.new_context(
                    viewport={"width": 820, "height": 640}, device_scale_factor=1
                )
                context.set_default_timeout(MS)
                page = context.new_page()
                page.goto(server.http_url + "/")
                expect(page.locator("#state")).to_have_attribute("data-state", "open")
                pages.append(page)
            me, ana, bo = pages
            send(ana, "Hi all! Is the deploy done?")
            send(bo, "Yes, the new nodes are up.", kind="broadcast")
            send(me, "Great, thanks!")
            send(ana, "I'll watch the dashboards.")
            me.get_by_role("button", name="User info").click()
            me.get_by_role("button", name="Ping").click()
            expect(me.locator("#rtt")).to_have_text(re.compile(r"ms$"))
            expect(feed_item(me, "message")).to_have_count(2)
            expect(feed_item(me, "info")).to_have_count(1)
            me.locator("#text").fill("Typing a reply…")
            me.locator("#text").focus()
            me.screenshot(path=path)
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--screenshot":
        sys.exit("usage: python -m tests.test_page --screenshot PATH")
    take_screenshot(sys.argv[2])
    print(f"wrote {sys.argv[2]}")


def test_pages_in_rooms_talk_only_within_their_room(
    make_server: Callable[..., Server], open_page
) -> None:
    """/?room=NAME joins room NAME: two pages in it chat, a page in the
    default room sees none of it, and the header names the room."""
    server = make_server(*LOOSE)
    lobby = open_page(server)
    a = open_page(server.http_url + "/?room=blue")
    expect(a.locator("#room")).to_have_text("blue")
    expect(a.locator("#count")).to_have_text("1")
    b = open_page(server.http_url + "/?room=blue")
    expect(b.locator("#count")).to_have_text("2")
    expect(feed_item(a, "join", my_id(b))).to_have_count(1)
    send(a, "only for blue")
    expect(feed_item(b, "message", "only for blue")).to_have_count(1)
    expect(lobby.locator("#room")).to_have_text("(default)")
    expect(lobby.locator("#count")).to_have_text("1")
    lobby.get_by_role("button", name="User info").click()
    expect(feed_item(lobby, "info")).to_have_count(1)  # its own reply came; nothing else
    assert feed_item(lobby, "message").count() == 0 and feed_item(lobby, "join").count() == 0


def test_a_page_with_an_invalid_room_name_says_so(
    make_server: Callable[..., Server], browser: Browser
) -> None:
    """A name the server would refuse is not tried: the page says why."""
    server = make_server(*LOOSE)
    context = browser.new_context()
    context.set_default_timeout(MS)
    try:
        page = context.new_page()
        page.goto(server.http_url + "/?room=no%20spaces")
        expect(page.locator("#state")).to_have_text("invalid room name")
        expect(feed_item(page, "system", "not valid")).to_have_count(1)
    finally:
        context.close()
