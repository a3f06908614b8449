"""A connection without compression holds no frame-library state while idle
(connection.py, ``_IdleLibrary``): the library is set up by the first frame
that needs it and let go once it holds nothing between frames. Every frame
that goes through the library must still behave after each such round trip,
on one connection: Pings answered with their payload, fragmented messages
assembled (a Ping between fragments included), protocol errors refused with
the close code RFC 6455 names, the closing handshake answered.
"""

from __future__ import annotations

import json
import struct

from .conftest import Server
from .rawws import RawClient, encode_frame

TEXT, CONT, CLOSE, PING, PONG = 0x1, 0x0, 0x8, 0x9, 0xA


def _open(server: Server, room: str) -> RawClient:
    raw, status, _ = RawClient.open(server.host, server.port, path=f"/websocket/{room}")
    assert status == 101
    opcode, payload, _ = raw.recv_frame()
    assert opcode == TEXT and json.loads(payload)["type"] == "welcome"
    return raw


def _pong(raw: RawClient, payload: bytes) -> None:
    """Ping with *payload*; skip data frames until its Pong."""
    raw.send(encode_frame(PING, payload))
    _await_pong(raw, payload)


def _await_pong(raw: RawClient, payload: bytes) -> None:
    while True:
        opcode, got, _ = raw.recv_frame()
        if opcode == PONG:
            assert got == payload
            return
        assert opcode == TEXT, (opcode, got)


def _message(content: str) -> bytes:
    return json.dumps({"type": "message", "content": content}).encode()


def test_library_frames_work_before_and_after_it_goes_idle(server: Server) -> None:
    room = "idle-library"
    b = server.client(room)
    raw = _open(server, room)
    try:
        _pong(raw, b"first")
        # a fragmented message, after the library was let go once
        body = _message("in three parts")
        raw.send(encode_frame(TEXT, body[:10], fin=False))
        raw.send(encode_frame(CONT, body[10:20], fin=False))
        raw.send(encode_frame(CONT, body[20:], fin=True))
        assert b.recv_type("message")["content"] == "in three parts"
        _pong(raw, b"second")
        # a Ping between the fragments: answered, the message still whole
        body = _message("around a ping")
        raw.send(encode_frame(TEXT, body[:7], fin=False) + encode_frame(PING, b"mid"))
        raw.send(encode_frame(CONT, body[7:], fin=True))
        _await_pong(raw, b"mid")
        assert b.recv_type("message")["content"] == "around a ping"
        # the fast path after all that, and the library once more
        raw.send(encode_frame(TEXT, _message("plain")))
        assert b.recv_type("message")["content"] == "plain"
        _pong(raw, b"third")
        raw.send(encode_frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
        assert raw.recv_close()[0] == 1000
        assert raw.wait_closed() >= 0
    finally:
        raw.close()
        b.close()


def test_protocol_errors_are_caught_after_the_library_went_idle(server: Server) -> None:
    raw = _open(server, "idle-library-errors")
    try:
        _pong(raw, b"set up, then let go")
        # a continuation frame with no message begun: 1002 (RFC 6455 5.4)
        raw.send(encode_frame(CONT, b"stray", fin=True))
        assert raw.recv_close()[0] == 1002
    finally:
        raw.close()
    raw = _open(server, "idle-library-errors")
    try:
        _pong(raw, b"again")
        # a reserved opcode: 1002 as well
        raw.send(encode_frame(0x3, b"reserved"))
        assert raw.recv_close()[0] == 1002
    finally:
        raw.close()
