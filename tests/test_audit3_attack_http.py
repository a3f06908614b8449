"""The upgrade's HTTP head, third audit pass: header fields a broken client
or an attacker repeats. Every such request gets its answer (bad input gets
its status, never a dropped socket), and the server logs no traceback for it
(the fixture checks)."""

from __future__ import annotations

import socket

import pytest

from .conftest import TIMEOUT, Server

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _answer(server: Server, head: str) -> bytes:
    """The server's whole answer to *head*, up to its close (or the status line
    of a 101, which is not waited out)."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode("latin-1"))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "upgrades",
    [
        ["websocket", "websocket"],
        ["h2c", "websocket"],
        ["websocket", "h2c"],
    ],
    ids=["same", "h2c-first", "h2c-last"],
)
def test_a_repeated_upgrade_field_is_one_list(server: Server, upgrades: list[str]) -> None:
    """Two Upgrade fields are one list (RFC 9110 5.3: Upgrade is a list, and
    its lines combine), so the upgrade goes as with ``Upgrade: h2c,
    websocket``: 101. On main the second line raised "duplicate upgrade
    header" out of the upgrade pacing (connection.py), before the gateway saw
    the request: the socket was dropped with no status and a traceback was
    logged, for every such request."""
    lines = "".join(f"Upgrade: {value}\r\n" for value in upgrades)
    head = (
        f"GET /websocket HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n{lines}"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = _answer(server, head)
    assert answer.startswith(b"HTTP/1.1 101 "), answer


def test_a_repeated_upgrade_field_on_a_probe_is_answered(server: Server) -> None:
    """The same on an endpoint that is no upgrade: /healthz answers 200
    (on main: dropped without a status, a traceback logged)."""
    head = (
        f"GET /healthz HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        "Upgrade: websocket\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n"
    )
    answer = _answer(server, head)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
