"""deploy/nginx.conf, run by Debian's nginx in front of a real wshub server.

The shipped file is used as it is, with only its listening port and upstream
address replaced. To tell apart, on one machine, the client, nginx and
wshub, the clients connect to nginx from their own loopback addresses
(127.0.0.2, 127.0.0.3: all of 127/8 is local on Linux) while nginx reaches
wshub from 127.0.0.1. So wshub's socket peer is always nginx (127.0.0.1) and
the address nginx forwards is the client's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .conftest import TIMEOUT, Server

NGINX = "/usr/sbin/nginx"
CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
CLIENT_A = "127.0.0.2"
CLIENT_B = "127.0.0.3"

MAIN_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/wshub.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def site_config(nginx_port: int, wshub_port: int) -> str:
    """deploy/nginx.conf with the test's ports; fails loudly if the file no
    longer has the lines this test replaces."""
    text = CONF.read_text()
    replacements = {
        "    listen 80;\n    listen [::]:80;\n": f"    listen 127.0.0.1:{nginx_port};\n",
        "server 127.0.0.1:8787;": f"server 127.0.0.1:{wshub_port};",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"deploy/nginx.conf no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    tmp: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket"

    def connect(self, source: str, **kwargs: object) -> ClientConnection:
        kwargs.setdefault("open_timeout", TIMEOUT)
        kwargs.setdefault("close_timeout", TIMEOUT)
        kwargs.setdefault("legacy", True)  # a connection held across calls, as in conftest
        return connect(self.ws_url, source_address=(source, 0), **kwargs)  # type: ignore[arg-type]

    def client(self, source: str, **kwargs: object) -> tuple[ClientConnection, dict]:
        ws = self.connect(source, **kwargs)
        welcome = json.loads(ws.recv(timeout=TIMEOUT))
        assert welcome["type"] == "welcome", welcome
        return ws, welcome

    def refused_status(self, source: str, **kwargs: object) -> int:
        with pytest.raises(InvalidStatus) as info:
            self.connect(source, **kwargs).close()
        return info.value.response.status_code

    def log(self) -> str:
        return (self.tmp / "error.log").read_text(errors="replace")


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[Callable[[Server], Nginx]]:
    """Start nginx with deploy/nginx.conf in front of a wshub server."""
    started: list[Nginx] = []

    def make(server: Server) -> Nginx:
        port = free_port()
        (tmp_path / "wshub.conf").write_text(site_config(port, server.port))
        user = "user root;" if os.geteuid() == 0 else ""
        (tmp_path / "nginx.conf").write_text(MAIN_CONF.format(tmp=tmp_path, user=user))
        check = subprocess.run(
            [
                NGINX,
                "-t",
                "-p",
                f"{tmp_path}/",
                "-e",
                f"{tmp_path}/error.log",
                "-c",
                f"{tmp_path}/nginx.conf",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                f"{tmp_path}/",
                "-e",
                f"{tmp_path}/error.log",
                "-c",
                f"{tmp_path}/nginx.conf",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        nginx = Nginx(proc, port, tmp_path)
        started.append(nginx)
        deadline = time.monotonic() + TIMEOUT
        while True:  # until nginx accepts connections (or has died)
            assert proc.poll() is None, "nginx exited:\n" + nginx.log()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "nginx did not listen:\n" + nginx.log()
                time.sleep(0.02)
        return nginx

    yield make
    for nginx in started:
        nginx.proc.send_signal(signal.SIGTERM)
        try:
            nginx.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            nginx.proc.kill()
            nginx.proc.wait()
            raise AssertionError("nginx did not stop") from None


def test_config_timeouts_outlast_the_heartbeat() -> None:
    """nginx must not drop a quiet WebSocket before wshub's own heartbeat
    would (default timeout 2 x 30 s + 10 s)."""
    text = CONF.read_text()
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        match = re.search(rf"^\s*{directive}\s+(\d+)s;", text, re.M)
        assert match, directive
        assert int(match.group(1)) > 2 * 30 + 10, directive


def test_chat_through_nginx(make_server: Callable[..., Server], make_nginx) -> None:
    """Upgrade, welcome, messages both ways and the page's own origin, all
    through the proxy."""
    server = make_server("--trusted-proxies", "127.0.0.1")
    nginx = make_nginx(server)
    a, welcome_a = nginx.client(CLIENT_A)
    # A browser on the page served through nginx: Origin and Host must match
    # as wshub sees them, port included.
    origin = f"http://127.0.0.1:{nginx.port}"
    b, welcome_b = nginx.client(CLIENT_B, origin=origin)
    assert welcome_b["connectionCount"] == 2
    assert json.loads(a.recv(timeout=TIMEOUT))["connectionId"] == welcome_b["connectionId"]

    a.send(json.dumps({"type": "message", "content": "through nginx"}))
    got = json.loads(b.recv(timeout=TIMEOUT))
    assert got["type"] == "message" and got["content"] == "through nginx"
    assert got["connectionId"] == welcome_a["connectionId"]
    b.send(json.dumps({"type": "broadcast", "content": "back"}))
    for ws in (a, b):
        assert json.loads(ws.recv(timeout=TIMEOUT))["content"] == "back"
    a.close()
    b.close()

    # The page and plain HTTP endpoints pass too.
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{nginx.port}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"<title>wshub" in answer


def test_terminal_client_through_nginx(make_server: Callable[..., Server], make_nginx) -> None:
    import sys

    server = make_server()
    nginx = make_nginx(server)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wshub",
            "client",
            f"127.0.0.1:{nginx.port}",
            "--json",
            "--wait",
            "0",
        ],
        input="/broadcast via the proxy\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert result.returncode == 0, result.stderr
    types = [json.loads(line)["type"] for line in result.stdout.splitlines()]
    assert types == ["welcome", "broadcast"]


def test_per_ip_limit_uses_forwarded_address_when_proxy_trusted(
    make_server: Callable[..., Server], make_nginx
) -> None:
    """nginx trusted: each client is limited by its own address."""
    server = make_server("--max-connections-per-ip", "1", "--trusted-proxies", "127.0.0.1")
    nginx = make_nginx(server)
    a, _ = nginx.client(CLIENT_A)
    b, _ = nginx.client(CLIENT_B)  # another address: its own allowance
    assert nginx.refused_status(CLIENT_A) == 429  # A's second connection
    # Writing the header yourself does not buy a new address: nginx appends
    # the peer it saw, and wshub reads from the right.
    assert (
        nginx.refused_status(CLIENT_A, additional_headers={"X-Forwarded-For": "198.51.100.7"})
        == 429
    )
    a.close()
    server.wait_for(lambda: server.stats()["connections"]["node"] == 1, "A to leave")
    again, _ = nginx.client(CLIENT_A)  # A's allowance is back
    again.close()
    b.close()


def test_per_ip_limit_uses_proxy_address_when_not_trusted(
    make_server: Callable[..., Server], make_nginx
) -> None:
    """nginx not trusted: X-Forwarded-For is ignored, every client counts as
    nginx's own address, so a second client is refused."""
    server = make_server("--max-connections-per-ip", "1")
    nginx = make_nginx(server)
    a, _ = nginx.client(CLIENT_A)
    assert nginx.refused_status(CLIENT_B) == 429
    a.close()
    server.wait_for(lambda: server.stats()["connections"]["node"] == 0, "A to leave")
    b, _ = nginx.client(CLIENT_B)
    b.close()
