"""docs/dashboard.md, run as written: its hub command's options, its feeder
(the Python block, as a real process) and its page (the HTML block, in real
headless Chromium). Only the addresses are changed, to free ports.

What it shows: the page gets the backend's samples through the API and
``--api-listen``, filters on ``connectionId`` ``metrics``, counts its viewers,
and a second page joining mid-stream gets the last sample from the history
at once.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from .conftest import TIMEOUT, Server, free_port
from .test_page import CHROMIUM, CHROMIUM_ARGS

DOC = Path(__file__).resolve().parent.parent / "docs" / "dashboard.md"
KEY = "dashboard-key-0123456789abcdef"
MS = TIMEOUT * 1000


def block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"no {language} block in {DOC}"
    return match.group(1)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_the_dashboard_page_as_documented(make_server, browser: Browser, tmp_path) -> None:
    api_port, page_port = free_port(), free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    # The hub of section 1, its options as the page says (ports changed).
    assert "--api-listen 127.0.0.1:8788 --allowed-origins http://127.0.0.1:8000" in DOC.read_text()
    hub: Server = make_server(
        "--api-keys", KEY, "--api-listen", f"127.0.0.1:{api_port}", "--allowed-origins", page_origin
    )
    # Section 3's page, served by a plain static server as the doc says.
    html = block("html").replace("ws://127.0.0.1:8787", f"ws://127.0.0.1:{hub.port}")
    (tmp_path / "dashboard.html").write_text(html)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    static = http.server.ThreadingHTTPServer(("127.0.0.1", page_port), handler)
    threading.Thread(target=static.serve_forever, daemon=True).start()
    # Section 2's feeder, a real process.
    feeder_code = block("python").replace("http://127.0.0.1:8788", f"http://127.0.0.1:{api_port}")
    (tmp_path / "feeder.py").write_text(feeder_code)
    feeder = subprocess.Popen(
        [sys.executable, str(tmp_path / "feeder.py")],
        env={**os.environ, "WSHUB_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    contexts = []
    try:
        first = browser.new_context()
        contexts.append(first)
        page = first.new_page()
        page.set_default_timeout(MS)
        frames: list[str] = []
        page.on(
            "websocket",
            lambda ws: ws.on("framereceived", lambda data: frames.append(str(data))),
        )
        page.goto(page_origin + "/dashboard.html")
        expect(page.locator("#load")).to_have_text(re.compile(r"^\d+\.\d\d$"), timeout=MS)
        expect(page.locator("#load5")).to_have_text(re.compile(r"^\d+\.\d\d$"), timeout=MS)
        expect(page.locator("#viewers")).to_have_text("1", timeout=MS)
        expect(page.locator("#state")).to_have_text(re.compile(r"^updated \d+ s ago$"), timeout=MS)
        # A second viewer: counted on the first page; its value shows before the
        # next tick could have come, from ?history=1.
        second = browser.new_context()
        contexts.append(second)
        late = second.new_page()
        late.set_default_timeout(MS)
        late.goto(page_origin + "/dashboard.html")
        expect(page.locator("#viewers")).to_have_text("2", timeout=MS)
        expect(late.locator("#load")).to_have_text(re.compile(r"^\d+\.\d\d$"), timeout=MS)
        # A client that broadcasts a fake sample under its own id is ignored.
        client = hub.client("dashboard")
        client.send({"type": "broadcast", "content": '{"load1": 99.99, "load5": 99.99, "t": 0}'})
        # Its own broadcast back (the feeder's samples may come first: skipped)
        # says the hub has relayed it to every member.
        while client.recv_type("broadcast")["connectionId"] != client.id:
            pass
        # The page got the fake (Playwright sees its frames; its callbacks run
        # while Playwright waits), and still shows the backend's value.
        for _ in range(int(TIMEOUT * 20)):
            if any("99.99" in frame and '"connectionId":"ws-' in frame for frame in frames):
                break
            page.wait_for_timeout(50)
        else:
            raise AssertionError("the page never received the client's broadcast")
        expect(page.locator("#load")).not_to_have_text("99.99")
        client.close()
    finally:
        for context in contexts:
            context.close()
        feeder.terminate()
        output, _ = feeder.communicate(timeout=TIMEOUT)
        static.shutdown()
        static.server_close()
    assert "refused" not in output and "unreachable" not in output, output
