"""Outgoing WebSocket frames, built once and written to many.

A server frame is never masked (RFC 6455 section 5.1), so a frame carrying a
given payload is the same bytes for every recipient: the fan-out builds it once
and hands the same ``bytes`` object to each connection's transport.

With permessage-deflate (RFC 7692) wshub always negotiates
``server_no_context_takeover``: each message is compressed on its own, so one
compressed frame is valid for every recipient that negotiated the same window
size (:class:`Deflate`). Incoming frames are parsed by the ``websockets``
library's sans-I/O layer (see :mod:`wshub.connection`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Final, overload

from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.headers import build_extension, parse_extension

__all__ = [
    "Deflate",
    "TextPayloads",
    "is_text_frame",
    "negotiate_deflate",
    "ping_frame",
    "text_frame",
    "text_payload",
]

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_PING: Final = 0x9
FIN: Final = 0x80
RSV1: Final = 0x40

COMPRESS_MIN_SIZE: Final = 256
"""Payloads shorter than this go uncompressed even when deflate is on: for
small JSON messages the deflate header and CPU cost more than they save."""


def frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """One unmasked, final frame carrying *payload*."""
    first = FIN | (RSV1 if rsv1 else 0) | opcode
    length = len(payload)
    if length < 126:
        header = bytes((first, length))
    elif length < 65536:
        header = bytes((first, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + length.to_bytes(8, "big")
    return header + payload


_HEAD16: Final = struct.Struct("!BBH").pack


def text_frame(payload: bytes) -> bytes:
    # Once per relayed message: the two common sizes without frame()'s
    # general header (a relay of 100 bytes of content is ~220 bytes).
    length = len(payload)
    if length < 126:
        return bytes((FIN | OP_TEXT, length)) + payload
    if length < 65536:
        return _HEAD16(FIN | OP_TEXT, 126, length) + payload
    return frame(OP_TEXT, payload)


def is_text_frame(frame: bytes) -> bool:
    """Whether *frame* is a whole uncompressed text frame (:func:`text_frame`'s),
    not a control frame: the shared frames that compression applies to."""
    return frame[0] == FIN | OP_TEXT


def text_payload(frame: bytes) -> bytes:
    """The payload of a :func:`text_frame` (server frames are not masked).
    The fan-out keeps a relay as its frame alone and takes the payload back
    only for what needs it: a compressing member, a peer node."""
    length = frame[1]
    if length < 126:
        return frame[2:]
    return frame[4:] if length == 126 else frame[10:]


class TextPayloads(Sequence[bytes]):
    """The payloads of a list of :func:`text_frame` frames, each taken out
    when asked for (``Backplane.publish_relays`` of a lone node asks for
    none)."""

    __slots__ = ("_frames",)

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [text_payload(frame) for frame in self._frames[index]]
        return text_payload(self._frames[index])

    def __iter__(self) -> Iterator[bytes]:
        return map(text_payload, self._frames)


def ping_frame(payload: bytes = b"") -> bytes:
    return frame(OP_PING, payload)


class Deflate:
    """Compresses outgoing messages for connections that negotiated
    permessage-deflate with one server window size."""

    __slots__ = ("wbits",)

    def __init__(self, wbits: int) -> None:
        self.wbits = wbits

    def text_frame(self, payload: bytes) -> bytes:
        return self.frame(OP_TEXT, payload)

    def frame(self, opcode: int, payload: bytes) -> bytes:
        if len(payload) < COMPRESS_MIN_SIZE:
            return frame(opcode, payload)
        compressor = zlib.compressobj(wbits=-self.wbits)
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        # RFC 7692 7.2.1: remove the 4 octets 0x00 0x00 0xff 0xff at the tail.
        return frame(opcode, data[:-4], rsv1=True)


_DEFLATES = {bits: Deflate(bits) for bits in range(9, 16)}

_FACTORY: Final = ServerPerMessageDeflateFactory(
    # Per-message compression lets one compressed frame serve every recipient.
    server_no_context_takeover=True,
    # A client compressing with context takeover would make us keep a
    # decompressor (tens of KiB) per connection for its whole life.
    client_no_context_takeover=True,
)


def negotiate_deflate(
    offers: list[str],
) -> tuple[str, PerMessageDeflate, Deflate] | None:
    """Accept the first permessage-deflate offer we can honour.

    Returns the ``Sec-WebSocket-Extensions`` response value, the extension
    that decodes incoming frames, and the :class:`Deflate` for outgoing ones;
    None when there is no acceptable offer (the connection goes uncompressed).

    Raises:
        ValueError: the header is malformed.
    """
    for header in offers:
        for name, params in parse_extension(header):
            if name != "permessage-deflate":
                continue
            try:
                response_params, extension = _FACTORY.process_request_params(params, [])
            except Exception:  # NegotiationError and friends: try the next offer
                continue
            value = build_extension([(name, response_params)])
            return value, extension, _DEFLATES[extension.local_max_window_bits]
    return None
