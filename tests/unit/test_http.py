"""wshub.http: request heads and the upgrade check, from bytes."""

from __future__ import annotations

import pytest

from wshub.http import (
    MAX_HEAD_SIZE,
    HttpError,
    check_upgrade,
    parse_request_head,
    response,
)

UPGRADE = (
    b"GET /websocket?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def test_incomplete_head_waits() -> None:
    assert parse_request_head(UPGRADE[:40]) is None


def test_upgrade_accept_key_from_rfc() -> None:
    parsed = parse_request_head(UPGRADE + b"\x81\x80")
    assert parsed is not None
    request, length = parsed
    assert length == len(UPGRADE)
    assert request.path == "/websocket"
    # RFC 6455 section 1.3's example.
    assert check_upgrade(request) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"A: b\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\nA: " + b"x" * MAX_HEAD_SIZE, 431),
        (b"GET / HTTP/2\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 400),
        (b"GET x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n", 400),
    ],
)
def test_bad_heads(data: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_request_head(data)
    assert info.value.status == status


def _upgrade_with(replace: bytes, by: bytes) -> int:
    parsed = parse_request_head(UPGRADE.replace(replace, by))
    assert parsed is not None
    with pytest.raises(HttpError) as info:
        check_upgrade(parsed[0])
    return info.value.status


def test_bad_upgrades() -> None:
    assert _upgrade_with(b"Upgrade: websocket", b"Upgrade: h2c") == 426
    assert _upgrade_with(b"Version: 13", b"Version: 8") == 426
    assert _upgrade_with(b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ=") == 400
    assert _upgrade_with(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!") == 400


def test_response_shape() -> None:
    data = response(404, "nope")
    assert data.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Content-Length: 4\r\n" in data and data.endswith(b"\r\n\r\nnope")
    assert response(200, "body", head_only=True).endswith(b"\r\n\r\n")


def test_absolute_form_becomes_origin_form_with_its_authority_as_host() -> None:
    """RFC 9112 3.2.2 and 3.3: the absolute form is accepted, and its authority
    is the target's host whatever the Host header says."""
    parsed = parse_request_head(b"GET http://a.example:81?x=1 HTTP/1.1\r\nHost: b\r\n\r\n")
    assert parsed is not None
    request, _ = parsed
    assert request.target == "/?x=1" and request.get("host") == "a.example:81"
