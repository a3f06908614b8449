"""Attacks on the HTTP edge (decisions.md 1) found by the outside-tester audit."""

from __future__ import annotations

import socket

import pytest

from .conftest import TIMEOUT, Server
from .test_endpoints import raw_request, status_of
from .waiting import wait_until


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/websocket", 426),  # no upgrade headers
        ("/websocket/lobby", 426),
        ("/websocket/", 400),  # not a room name
        ("/websocket/%41", 400),
        ("/nope", 404),
    ],
)
def test_head_refusal_has_no_body(server: Server, path: str, status: int) -> None:
    """A HEAD answer carries no body, refusals included (RFC 9110 9.3.2): a
    client or proxy reads the head, then takes any bytes after it for the
    start of the next response."""
    host = f"{server.host}:{server.port}"
    answer = raw_request(server, f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert status_of(answer) == status
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body == b"", answer
    # The head still says how long the GET answer's body would be.
    assert b"\r\nContent-Length: " in head


@pytest.mark.parametrize("path", ["/healthz", "/websocket"])
def test_bare_lf_request_is_refused_at_once(server: Server, path: str) -> None:
    """A head whose lines end with LF alone never ends by CRLF CRLF: it is
    answered 400 as soon as it shows, not left to the handshake deadline."""
    request = (
        f"GET {path} HTTP/1.1\nHost: {server.host}:{server.port}\nUpgrade: websocket\n"
        "Connection: Upgrade\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n"
        "Sec-WebSocket-Version: 13\n\n"
    )
    assert status_of(raw_request(server, request.encode())) == 400


def _healthz_answer(server: Server) -> str:
    """The status line of /healthz, or "reset" when the connection is reset."""
    try:
        answer = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    except ConnectionResetError:
        return "reset"
    return answer.split(b"\r\n", 1)[0].decode()


def test_a_request_refused_at_accept_gets_its_503_not_a_reset(make_server) -> None:
    """Past --max-handshakes a socket is answered 503 at accept, before its
    request is read. A health checker has sent its request by then: closing on
    those unread bytes reset the connection, and the reset overtook the 503."""
    srv = make_server("--max-handshakes", "1")
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT):  # holds the one slot
        wait_until(lambda: _healthz_answer(srv) != "HTTP/1.1 200 OK", "the slot to be taken")
        answers = {_healthz_answer(srv) for _ in range(20)}
    assert answers == {"HTTP/1.1 503 Service Unavailable"}
