"""Client-side WebSocket framing for the load generator (RFC 6455), kept minimal.

Pure functions and small stateful parsers, no I/O, so they can be tested alone:

- ``encode_frame`` builds a client frame (clients must mask, RFC 6455 5.3);
- ``parse_header`` decodes one frame header from a buffer;
- ``FrameParser`` turns a stream of chunks into whole frames (probe connections);
- ``HeaderCounter`` counts frames by walking headers only, skipping payloads;
- ``MarkerCounter`` counts occurrences of a 2-byte marker over chunk boundaries,
  which is what the bulk of the connections use: one ``bytes.count`` per chunk.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_pack_h = struct.Struct("!H").pack
_pack_q = struct.Struct("!Q").pack
_unpack_h = struct.Struct("!H").unpack_from
_unpack_q = struct.Struct("!Q").unpack_from


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (masking is its own inverse)."""
    n = len(payload)
    if n == 0:
        return b""
    if len(key) != 4:
        raise ValueError("mask key must be 4 bytes")
    reps = key * (n // 4 + 1)
    x = int.from_bytes(payload, "little") ^ int.from_bytes(reps[:n], "little")
    return x.to_bytes(n, "little")


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask_key: bytes | None = None
) -> bytes:
    """Encode one client-to-server frame, masked (a random key unless given)."""
    if mask_key is None:
        mask_key = os.urandom(4)
    b0 = (0x80 if fin else 0) | (opcode & 0x0F)
    n = len(payload)
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + _pack_h(n)
    else:
        head = bytes((b0, 0x80 | 127)) + _pack_q(n)
    return head + mask_key + mask(payload, mask_key)


def encode_server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """Encode an unmasked (server-to-client) frame: used by the ceiling server and tests."""
    b0 = (0x80 if fin else 0) | (opcode & 0x0F)
    n = len(payload)
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return bytes((b0, 126)) + _pack_h(n) + payload
    return bytes((b0, 127)) + _pack_q(n) + payload


def parse_header(buf, pos: int = 0):
    """Decode the frame header at ``buf[pos:]``.

    Returns ``(fin, opcode, masked, mask_key, payload_len, header_len)`` or ``None``
    when the header is not complete yet.
    """
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    masked = bool(b1 & 0x80)
    n = b1 & 0x7F
    hl = 2
    if n == 126:
        if avail < 4:
            return None
        (n,) = _unpack_h(buf, pos + 2)
        hl = 4
    elif n == 127:
        if avail < 10:
            return None
        (n,) = _unpack_q(buf, pos + 2)
        hl = 10
    key = None
    if masked:
        if avail < hl + 4:
            return None
        key = bytes(buf[pos + hl : pos + hl + 4])
        hl += 4
    return bool(b0 & 0x80), b0 & 0x0F, masked, key, n, hl


class FrameParser:
    """Reassemble whole frames from a stream of chunks.

    ``feed(chunk)`` returns a list of ``(opcode, payload)``; fragmented messages are
    joined and reported with the opcode of their first frame; control frames pass
    through as they come.
    """

    __slots__ = ("_buf", "_frag_op", "_frag")

    def __init__(self) -> None:
        self._buf = b""
        self._frag_op = None
        self._frag: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while True:
            h = parse_header(buf, pos)
            if h is None:
                break
            fin, op, masked, key, n, hl = h
            if end - pos < hl + n:
                break
            payload = buf[pos + hl : pos + hl + n]
            if masked:
                payload = mask(payload, key)
            pos += hl + n
            if op >= 0x8:
                out.append((op, payload))
            elif op == OP_CONT:
                self._frag.append(payload)
                if fin and self._frag_op is not None:
                    out.append((self._frag_op, b"".join(self._frag)))
                    self._frag_op = None
                    self._frag = []
            elif fin:
                out.append((op, payload))
            else:
                self._frag_op = op
                self._frag = [payload]
        self._buf = buf[pos:]
        return out


class HeaderCounter:
    """Count complete data frames (text/binary/final continuation) by walking headers.

    Payload bytes are skipped without being looked at, across chunk boundaries.
    """

    __slots__ = ("count", "_skip", "_partial")

    def __init__(self) -> None:
        self.count = 0
        self._skip = 0  # payload bytes still to skip from earlier chunks
        self._partial = b""  # an incomplete header carried over

    def feed(self, data: bytes) -> int:
        n = 0
        if self._partial:
            data = self._partial + data
            self._partial = b""
        end = len(data)
        pos = self._skip
        while pos < end:
            if end - pos < 2:
                self._partial = data[pos:]
                pos = end
                break
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            if ln < 126:
                hl = 2
            elif ln == 126:
                if end - pos < 4:
                    self._partial = data[pos:]
                    pos = end
                    break
                (ln,) = _unpack_h(data, pos + 2)
                hl = 4
            else:
                if end - pos < 10:
                    self._partial = data[pos:]
                    pos = end
                    break
                (ln,) = _unpack_q(data, pos + 2)
                hl = 10
            if data[pos + 1] & 0x80:
                hl += 4
                if end - pos < hl:
                    self._partial = data[pos:]
                    pos = end
                    break
            # a data frame counts once it is final (b0 & 0x80) and not a control frame
            if b0 & 0x88 == 0x80:
                n += 1
            pos += hl + ln
        self._skip = pos - end
        self.count += n
        return n


class MarkerCounter:
    """Count a 2-byte marker in a stream of chunks, including one split over two chunks.

    The marker must not overlap itself (its two bytes differ), and must occur once
    per counted message. One C-level ``bytes.count`` per chunk.
    """

    __slots__ = ("count", "marker", "_m0", "_m1", "_last")

    def __init__(self, marker: bytes = b"~#") -> None:
        if len(marker) != 2 or marker[0] == marker[1]:
            raise ValueError("marker must be 2 distinct bytes")
        self.count = 0
        self.marker = marker
        self._m0 = marker[0]
        self._m1 = marker[1]
        self._last = -1

    def feed(self, data) -> int:
        if not data:
            return 0
        n = data.count(self.marker)
        if self._last == self._m0 and data[0] == self._m1:
            n += 1
        self._last = data[-1]
        self.count += n
        return n


def make_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value the server must answer for ``key``."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def handshake_request(host: str, port: int, path: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()


def check_handshake_response(head: bytes, key: bytes) -> None:
    """Raise ``ValueError`` unless ``head`` (up to the blank line) is a valid 101."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise ValueError(f"handshake refused: {lines[0].decode(errors='replace')}")
    want = accept_for(key)
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != want:
                raise ValueError("bad Sec-WebSocket-Accept")
            return
    raise ValueError("no Sec-WebSocket-Accept in the 101 response")
