"""The HTTP head, second audit pass: Host (RFC 9112 3.2), the asterisk form
(RFC 9112 3.2.4), and the upgrade's own headers (RFC 6455 4.2.1, 4.4)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from .conftest import TIMEOUT, Server

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
V13 = "Sec-WebSocket-Version: 13\r\n"
# Every kind of endpoint: the upgrade, the probes, the JSON, the page.
ENDPOINTS = [("/websocket", UPGRADE + V13), ("/healthz", ""), ("/stats", ""), ("/", "")]


def _status(server: Server, head: str) -> int:
    """The status the server answers *head* with (a 101 is not waited out)."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode("latin-1"))
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {answer!r}"
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(("path", "extra"), ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
@pytest.mark.parametrize(
    "hosts",
    [
        ["a b"],  # a space
        [""],  # empty: an http URI's host is never empty (RFC 9110 4.2.1)
        ["a\tb"],
        ["user@host"],  # userinfo is not part of Host
        ["a/b"],
        ["h\xe9"],  # not ASCII
        ["[::1"],  # an unclosed IP literal
        [],  # missing
        ["{h}", "{h}"],  # two, even the same
    ],
    ids=["space", "empty", "tab", "userinfo", "slash", "latin1", "bracket", "missing", "two"],
)
def test_a_bad_host_is_400_on_every_endpoint(
    server: Server, path: str, extra: str, hosts: list[str]
) -> None:
    """RFC 9112 3.2: a server MUST answer 400 to a request with no Host, more
    than one, or an invalid one."""
    here = f"{server.host}:{server.port}"
    lines = "".join(f"Host: {host.format(h=here)}\r\n" for host in hosts)
    assert _status(server, f"GET {path} HTTP/1.1\r\n{lines}{extra}\r\n") == 400


@pytest.mark.parametrize(("path", "extra"), ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
def test_a_bad_host_is_400_in_http_1_0_too(server: Server, path: str, extra: str) -> None:
    """HTTP/1.0 may leave Host out, but one it sends must be valid."""
    assert _status(server, f"GET {path} HTTP/1.0\r\nHost: a b\r\n{extra}\r\n") in (400,)
    if not extra:
        assert _status(server, f"GET {path} HTTP/1.0\r\n\r\n") == 200


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1:{port}", "[::1]:{port}", "example.com:", "a-b.c_d~e%41"]
)
def test_valid_hosts_are_served(server: Server, host: str) -> None:
    head = f"GET /healthz HTTP/1.1\r\nHost: {host.format(port=server.port)}\r\n\r\n"
    assert _status(server, head) == 200


@pytest.mark.parametrize(("path", "extra"), ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
def test_absolute_form(server: Server, path: str, extra: str) -> None:
    """The authority of an absolute-form target wins over Host (RFC 9112
    3.2.2), but the request still needs one valid Host, and the authority
    must be a valid host itself."""
    here = f"{server.host}:{server.port}"
    ok = 101 if extra else 200
    assert _status(server, f"GET http://{here}{path} HTTP/1.1\r\nHost: other\r\n{extra}\r\n") == ok
    assert _status(server, f"GET http://{here}{path} HTTP/1.1\r\n{extra}\r\n") == 400
    assert _status(server, f"GET http://{here}{path} HTTP/1.1\r\nHost: a b\r\n{extra}\r\n") == 400
    for authority in ("a%2", "u@" + here, ":80", "[::1"):
        head = f"GET http://{authority}{path} HTTP/1.1\r\nHost: {here}\r\n{extra}\r\n"
        assert _status(server, head) == 400, authority


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_options_asterisk_is_404(server: Server, version: str) -> None:
    """OPTIONS * (RFC 9112 3.2.4) is a valid request for the server as a whole,
    which has no route: 404, as decisions.md 1 says of anything else (it was
    400, a malformed target). OPTIONS on an endpoint stays 405 with Allow, on
    an unknown path 404; the asterisk with any other method is malformed."""
    here = f"Host: {server.host}:{server.port}\r\n"
    assert _status(server, f"OPTIONS * {version}\r\n{here}\r\n") == 404
    assert _status(server, f"OPTIONS /healthz {version}\r\n{here}\r\n") == 405
    assert _status(server, f"OPTIONS /nope {version}\r\n{here}\r\n") == 404
    for method in ("GET", "HEAD", "POST"):
        assert _status(server, f"{method} * {version}\r\n{here}\r\n") == 400


def _upgrade(
    host: str, *, connection: str = "Upgrade", upgrade: str = "websocket", key: str = KEY
) -> str:
    return (
        f"GET /websocket HTTP/1.1\r\nHost: {host}\r\nUpgrade: {upgrade}\r\n"
        f"Connection: {connection}\r\nSec-WebSocket-Key: {key}\r\n{V13}"
    )


@pytest.mark.parametrize(
    ("name", "make", "status"),
    [
        # RFC 6455 4.2.1: the tokens are case-insensitive, Connection a list.
        ("Connection list", lambda h: _upgrade(h, connection="keep-alive, Upgrade"), 101),
        ("Upgrade: WebSocket", lambda h: _upgrade(h, upgrade="WebSocket"), 101),
        ("Upgrade list", lambda h: _upgrade(h, upgrade="h2c, websocket"), 101),
        ("Connection without upgrade", lambda h: _upgrade(h, connection="keep-alive"), 426),
        # The key: base64 of 16 bytes, nothing else (4.2.1 item 5).
        ("key not base64", lambda h: _upgrade(h, key="!" * 24), 400),
        ("key of 17 bytes", lambda h: _upgrade(h, key="A" * 23 + "="), 400),
        ("key of 15 bytes", lambda h: _upgrade(h, key="A" * 20), 400),
        # RFC 9112 5.2: obs-fold is refused (400) rather than unfolded.
        ("obs-fold", lambda h: _upgrade(h) + "X-A: a\r\n b\r\n", 400),
        ("obs-fold tab", lambda h: _upgrade(h) + "X-A: a\r\n\tb\r\n", 400),
        # RFC 9112 5.1: no white space between a field name and its colon.
        ("space before colon", lambda h: _upgrade(h) + "X-A : b\r\n", 400),
        ("bare CR in a value", lambda h: _upgrade(h) + "X-A: a\rb\r\n", 400),
        ("NUL in a value", lambda h: _upgrade(h) + "X-A: a\x00b\r\n", 400),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_upgrade_heads_against_rfc_6455_4_2_1(
    server: Server, name: str, make: Callable[[str], str], status: int
) -> None:
    assert _status(server, make(f"{server.host}:{server.port}") + "\r\n") == status, name


def test_version_8_is_426_naming_13(server: Server) -> None:
    """RFC 6455 4.4: an unsupported version is answered with the versions the
    server speaks, in Sec-WebSocket-Version."""
    host = f"{server.host}:{server.port}"
    head = _upgrade(host).replace(V13, "Sec-WebSocket-Version: 8\r\n") + "\r\n"
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk
            answer += chunk
    lines = answer.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 426")
    assert b"sec-websocket-version: 13" in lines
    assert b"upgrade: websocket" in lines


@pytest.mark.parametrize("target", ["/websocket#x", "/healthz#x", "/healthz?x#y", "/#"])
def test_a_fragment_in_the_target_is_400(server: Server, target: str) -> None:
    """RFC 9112 3.2: a request target has no fragment ("#" is in neither its
    path nor its query, RFC 3986 3.3-3.5); it was 404, 400 or 200 depending
    on where the "#" fell."""
    head = f"GET {target} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n\r\n"
    assert _status(server, head) == 400
