"""Outside-tester attacks on the browser client library (decisions.md 17), in
real headless Chromium against a real ``wshub serve``.

An application's page usually lives on its own origin (``app.example``) and talks
to the hub on another (``hub.example``, allowed by ``--allowed-origins``). Such a
page loads the client from the hub, ``import ... from "https://hub.example/wshub.js"``,
and a browser fetches a module script from another origin in CORS mode: without
``Access-Control-Allow-Origin`` it refuses to run it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.sync_api import Browser

from .conftest import TIMEOUT, Server
from .test_page import browser  # noqa: F401  (a fixture)

MS = TIMEOUT * 1000

APP_PAGE = """<!doctype html><meta charset="utf-8"><title>an app on its own origin</title>
<script type="module">
import { WshubClient } from "HUB/wshub.js";
const c = new WshubClient("HUB/websocket", { room: "app" });
c.on("welcome", (w) => { window.welcome = w; });
c.connect();
</script>
<script>
// A module the browser refuses to fetch or run fires "error" on its script element.
window.addEventListener("error", (e) => { window.failed = String(e.message || e.type); }, true);
</script>
"""


class AppOrigin:
    """A stand-in for the application's own web server, on a port (an origin) of
    its own: it serves one page, which imports the library from the hub."""

    def __init__(self, origin: str, pages: dict[str, bytes]) -> None:
        self.origin = origin
        self._pages = pages

    def serve_page_of(self, hub: str) -> None:
        self._pages["/"] = APP_PAGE.replace("HUB", hub).encode()


@pytest.fixture
def app_origin() -> Iterator[AppOrigin]:
    pages: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    origin = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    yield AppOrigin(origin, pages)
    httpd.shutdown()
    httpd.server_close()


def test_a_page_on_another_origin_imports_wshub_js_from_the_hub(
    make_server: Callable[..., Server],
    app_origin: AppOrigin,
    browser: Browser,  # noqa: F811
) -> None:
    """The app's page (its own origin, allowed by --allowed-origins) imports
    /wshub.js from the hub and connects into a room through it."""
    server = make_server("--allowed-origins", app_origin.origin)
    app_origin.serve_page_of(server.http_url)
    context = browser.new_context()
    context.set_default_timeout(MS)
    try:
        page = context.new_page()
        page.goto(app_origin.origin + "/")
        page.wait_for_function("() => window.welcome !== undefined || window.failed !== undefined")
        assert page.evaluate("() => window.failed") is None
        assert page.evaluate("() => window.welcome.room") == "app"
    finally:
        context.close()
