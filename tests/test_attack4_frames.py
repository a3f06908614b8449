"""Attack round 4: frame-level edges that held, pinned (docs/reliability.md 9).

Against the module's hub of tests/test_bad_input.py (two watchers that must
hear nothing they should not, memory and descriptors back to their baseline).
"""

from __future__ import annotations

import json
import os
import struct

from .rawws import encode_frame, xor
from .test_bad_input import Guard, expect_close, guard, hub, open_raw  # noqa: F401 (fixtures)


def _long_form(payload: bytes, width: int) -> bytes:
    """A masked text frame whose length sits in the 16-bit (*width* 2) or
    64-bit (*width* 8) field although it would fit the 7-bit one."""
    key = os.urandom(4)
    marker, packed = (
        (126, struct.pack("!H", len(payload)))
        if width == 2
        else (
            127,
            struct.pack("!Q", len(payload)),
        )
    )
    return bytes((0x81, 0x80 | marker)) + packed + key + xor(payload, key)


def test_a_length_not_in_its_shortest_form_is_accepted(guard: Guard) -> None:  # noqa: F811
    """RFC 6455 5.2 asks the sender for the minimal length encoding and names no
    failure for a receiver; browsers, Autobahn and the websockets library
    accept a longer one, and so does wshub: a ping with its 15-byte length in
    the 16-bit and in the 64-bit field is answered twice, the connection open."""
    raw, _ = open_raw(guard.server)
    ping = json.dumps({"type": "ping"}).encode()
    raw.send(_long_form(ping, 2) + _long_form(ping, 8))
    for _ in range(2):
        opcode, payload, _ = raw.recv_frame()
        assert opcode == 0x1 and json.loads(payload)["type"] == "pong"
    raw.send_frame(0x8, struct.pack("!H", 1000))
    expect_close(raw, 1000)


def test_a_close_inside_a_fragmented_message_drops_the_message(guard: Guard) -> None:  # noqa: F811
    """A Close between the fragments of a text message (control frames may
    come between fragments, RFC 6455 5.4) is answered 1000 and ends the
    connection; the unfinished message reaches no one (the guard's watchers
    hear nothing relayed, and its user_left once)."""
    raw, raw_id = open_raw(guard.server)
    guard.bad_ids.append(raw_id)
    raw.send(
        encode_frame(0x1, b"never ", fin=False)
        + encode_frame(0x0, b"finished", fin=False)
        + encode_frame(0x8, struct.pack("!H", 1000))
    )
    expect_close(raw, 1000)
