"""The chat page at ``/`` as a person sees it (decisions.md 11), in real
headless Chromium: what stays on screen when the server goes away."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from .conftest import free_port, start_server
from .test_page import LOOSE, MS, browser, feed_item, open_page  # noqa: F401  (fixtures)

# Scrolled to the bottom: the newest item's bottom edge is inside the feed's box.
NEWEST_IN_VIEW = """() => {
  const feed = document.getElementById("feed");
  const last = feed.lastElementChild.getBoundingClientRect();
  return last.bottom <= feed.getBoundingClientRect().bottom + 1;
}"""


def test_the_newest_line_stays_in_view_when_the_server_goes_away(open_page) -> None:  # noqa: F811
    """A full feed, scrolled to the bottom; the server stops. The state becomes
    "could not connect, reconnecting in ... (attempt N)", which wraps the status
    line, and "Reconnect now" appears: the feed got shorter and, before, its
    newest line ("Disconnected (1001 ...)") slid below its bottom edge, out of
    view, while the person was reading at the bottom."""
    port = free_port()
    server = start_server("--port", str(port), *LOOSE)
    try:
        page = open_page(f"http://127.0.0.1:{port}/", viewport={"width": 820, "height": 640})
        peer = server.client()
        for i in range(15):
            peer.send({"type": "broadcast", "content": f"line {i}"})
        expect(feed_item(page, "broadcast")).to_have_count(15)
        page.wait_for_function(NEWEST_IN_VIEW, timeout=MS)
        peer.close()
        assert server.stop() == 0
        expect(page.locator("#state")).to_have_text(re.compile("could not connect"), timeout=MS * 2)
        expect(page.locator("#reconnect")).to_be_visible()
        expect(feed_item(page, "system", "Disconnected (1001")).to_have_count(1)
        page.wait_for_function(NEWEST_IN_VIEW, timeout=MS)
    finally:
        server.stop()


def test_the_page_loads_without_a_console_error(make_server, browser) -> None:  # noqa: F811
    """Opening the page logs no error in the browser's console: Chromium asked
    for /favicon.ico and logged "Failed to load resource: ... 404" there."""
    server = make_server(*LOOSE)
    context = browser.new_context()
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server.http_url + "/")
        expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=MS)
        page.get_by_role("button", name="Ping").click()  # a round trip: the page is settled
        expect(page.locator("#rtt")).to_have_text(re.compile("ms$"), timeout=MS)
        assert errors == []
    finally:
        context.close()
