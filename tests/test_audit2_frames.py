"""Frame headers the audit's second pass sent (RFC 6455 5.2), over a raw socket."""

from __future__ import annotations

import json
import os
import struct

import pytest

from .conftest import Server
from .rawws import RawClient, encode_frame


def _open(server: Server) -> RawClient:
    client, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    opcode, payload, _ = client.recv_frame()
    assert opcode == 0x1 and json.loads(payload)["type"] == "welcome"
    return client


def _header64(length: int) -> bytes:
    """A masked final text frame's header announcing *length* in 64 bits."""
    return bytes((0x81, 0x80 | 127)) + struct.pack("!Q", length) + os.urandom(4)


@pytest.mark.parametrize("length", [1 << 63, (1 << 63) + 5, (1 << 64) - 1])
def test_length_with_its_top_bit_set_is_a_protocol_error(server: Server, length: int) -> None:
    """RFC 6455 5.2: the most significant bit of a 64-bit length MUST be 0.
    Such a header is malformed, not a frame too big: 1002, not 1009."""
    client = _open(server)
    try:
        client.send(_header64(length))
        code, reason = client.recv_close()
        assert code == 1002, (code, reason)
    finally:
        client.close()


def test_frames_before_the_malformed_header_are_answered_first(server: Server) -> None:
    """What came before the bad header in the same read is handled in order."""
    client = _open(server)
    try:
        ping = encode_frame(0x1, b'{"type":"ping"}')
        client.send(ping + encode_frame(0x9, b"p") + _header64(1 << 63))
        # The JSON pong leaves with the fan-out's pass, the Pong at once:
        # both come before the Close, in either order.
        answers = [client.recv_frame()[:2] for _ in range(2)]
        assert (0xA, b"p") in answers
        assert any(op == 0x1 and json.loads(data)["type"] == "pong" for op, data in answers)
        assert client.recv_close()[0] == 1002
    finally:
        client.close()


def test_a_large_length_without_the_top_bit_is_still_too_big(server: Server) -> None:
    """The boundary: 2**63 - 1 is a length, only over the limit: 1009."""
    client = _open(server)
    try:
        client.send(_header64((1 << 63) - 1))
        assert client.recv_close()[0] == 1009
    finally:
        client.close()
