"""Absolute-form request targets (RFC 9112 3.2.2: a server MUST accept them).

``GET http://host:port/websocket HTTP/1.1`` is what a client configured as if
the server were a proxy sends; every endpoint answers it as it answers the
origin form.
"""

from __future__ import annotations

import json

import pytest

from .conftest import Server
from .rawws import RawClient
from .test_endpoints import raw_request, status_of


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/", 200),
        ("/healthz", 200),
        ("/websocket", 426),
        ("/websocket/room", 426),
        ("/websocket/bad%20room", 400),
        ("/api/rooms", 404),  # no API keys configured: no /api/ at all
        ("/nowhere", 404),
    ],
)
def test_absolute_form_is_routed_like_origin_form(server: Server, path: str, status: int) -> None:
    authority = f"{server.host}:{server.port}"
    for target in (path, f"http://{authority}{path}", f"HTTP://{authority}{path}"):
        request = f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        assert status_of(raw_request(server, request.encode())) == status, target


def test_absolute_form_without_path_is_the_root(server: Server) -> None:
    authority = f"{server.host}:{server.port}"
    request = f"GET http://{authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    assert status_of(raw_request(server, request.encode())) == 200


@pytest.mark.parametrize(
    "target", ["ftp://h/websocket", "http:///websocket", "http://u@h/websocket", "*", "h:80"]
)
def test_other_forms_stay_refused(server: Server, target: str) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    assert status_of(raw_request(server, request.encode())) == 400


def test_absolute_form_upgrades_into_its_room(server: Server) -> None:
    """The upgrade, the room and the query string all come from the absolute target."""
    target = f"http://{server.host}:{server.port}/websocket/lobby?history=0"
    raw, status, _ = RawClient.open(server.host, server.port, path=target)
    try:
        assert status == 101
        opcode, payload, _ = raw.recv_frame()
        welcome = json.loads(payload)
        assert opcode == 1 and welcome["type"] == "welcome" and welcome["room"] == "lobby"
    finally:
        raw.close()


def test_absolute_form_keeps_the_origin_check(server: Server) -> None:
    """The page's own origin is accepted, another host's is not (decisions.md 7)."""
    own = f"{server.host}:{server.port}"
    for origin, expected in ((f"http://{own}", 101), ("http://evil.example", 403)):
        raw, status, _ = RawClient.open(
            server.host,
            server.port,
            path=f"http://{own}/websocket",
            headers={"Origin": origin},
        )
        raw.close()
        assert status == expected, origin
