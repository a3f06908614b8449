"""Where client frames end: the fast path for the common frame.

Nearly every frame a hub receives is a whole, final, masked text frame of a
few hundred bytes. The ``websockets`` library parses frames with generator
coroutines, which costs several microseconds per frame; here such a frame
costs a header check and one C call to unmask it.

:class:`FrameScanner` splits a client's byte stream into

* ``(opcode, payload)`` for a *simple* frame: FIN set, no reserved bits, text
  or binary, masked, within the size limit, and complete: the caller handles
  it itself;
* ``(None, chunk)`` for everything else, to be fed to the library as it is:
  control frames, fragments, reserved bits, unmasked or oversized frames, and
  any frame still incomplete at the end of the data (from its first byte);
  consecutive whole frames of these come together, up to 8 KiB.

The library therefore always receives a stream that starts at a frame boundary
and keeps enforcing every rule of RFC 6455 on what it gets; the scanner only
tracks where frames end across reads: an incomplete header is kept (at most 13
bytes), and the bytes the library still needs to finish the frame it is in are
counted, so they go to it without a look.

That state is the caller's (:class:`Carrier`: one slot of the connection), and
one scanner serves every connection with the same limit: a scanner object per
connection was 56 bytes of every idle one (docs/memory.md). The two never
both hold something (a read that ends inside a frame's payload leaves no
header behind), so one field says which: the header's bytes, or the count
owed, or ``0`` for nothing.

The caller says, before each frame, whether the fast path is allowed at all
(``fast``): not inside a fragmented message (a text frame there is a protocol
error the library must see), and not once the connection is closing. Pure: no
I/O; the caller's state is only read through ``fast`` and its carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

try:  # what websockets.frames uses: the C version when it is built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

__all__ = ["Carrier", "FrameScanner", "MalformedFrame"]

_RUN = 8192
"""Whole frames bound for the library are handed over together up to this many
bytes: one call per frame would cost a flood of 1-byte fragments 2.3 times the
CPU; a bound keeps what one library step allocates small."""


class MalformedFrame(Exception):
    """A frame header breaks a rule of RFC 6455 the library does not check.

    Raised by :meth:`FrameScanner.scan` after it has yielded everything
    before that frame; the caller fails the connection with 1002."""


class Carrier(Protocol):
    """Where a caller keeps what one read leaves for the next."""

    # An incomplete header from the previous read (bytes, never empty), or
    # the bytes of the current frame that belong to the library (an int > 0),
    # or 0: nothing.
    scan_carry: bytes | int


class FrameScanner:
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        self.limit = limit  # the largest payload taken on the fast path

    def scan(
        self, data: bytes, carrier: Carrier, fast: Callable[[], bool]
    ) -> Iterator[tuple[int, bytes] | tuple[None, bytes]]:
        carry = carrier.scan_carry
        if carry:
            carrier.scan_carry = 0
            if isinstance(carry, int):  # owed to the library
                if len(data) <= carry:
                    carrier.scan_carry = carry - len(data)
                    yield None, data
                    return
                yield None, data[:carry]
                data = data[carry:]
            else:  # an incomplete header
                data = carry + data
        limit = self.limit
        pos = 0
        end = len(data)
        run = -1  # where a run of whole frames bound for the library starts
        while pos < end:
            if end - pos < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            header = 6 if b1 & 0x80 else 2  # with the mask key, if any
            if length == 126:
                header += 2
                if end - pos >= 4:
                    length = (data[pos + 2] << 8) | data[pos + 3]
            elif length == 127:
                header += 8
                if end - pos >= 10:
                    length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    if length >> 63:
                        # RFC 6455 5.2: the most significant bit MUST be 0.
                        # Such a length is no size at all, so the library's
                        # "too big" (1009) would name the wrong fault: 1002.
                        if run >= 0:
                            yield None, data[run:pos]
                        raise MalformedFrame("payload length with its most significant bit set")
            if end - pos < header:
                break
            size = header + length
            if end - pos < size:  # incomplete: the library assembles it
                carrier.scan_carry = size - (end - pos)
                yield None, data[pos if run < 0 else run :]
                return
            if (
                (b0 == 0x81 or b0 == 0x82)  # FIN, no RSV bits, text or binary
                and b1 & 0x80  # masked
                and length <= limit
            ):
                if run >= 0:
                    # The library must see what came before, first: it may
                    # change the caller's answer (a fragmented message began).
                    yield None, data[run:pos]
                    run = -1
                if fast():
                    start = pos + header
                    yield b0 & 0x0F, apply_mask(data[start : pos + size], data[start - 4 : start])
                    pos += size
                    continue
            if run < 0:
                run = pos
            pos += size
            if pos - run >= _RUN:
                yield None, data[run:pos]
                run = -1
        if run >= 0:
            yield None, data[run:pos]
        if pos < end:
            carrier.scan_carry = data[pos:]  # an incomplete header
