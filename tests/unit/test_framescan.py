"""The frame scanner: whatever the cuts between reads, every frame comes out
once, in order, either parsed (the simple ones) or as bytes for the library."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wshub.framescan import FrameScanner, MalformedFrame

from ..rawws import chunked, encode_frame, xor

LIMIT = 1000


class Carry:
    """The caller's state between reads (on Connection, one slot)."""

    __slots__ = ("scan_carry",)

    def __init__(self) -> None:
        self.scan_carry: bytes | int = 0


def scan_once(data: bytes, fast) -> list:
    """One read of a fresh connection."""
    return list(FrameScanner(LIMIT).scan(data, Carry(), fast))


def parse_all(data: bytes) -> list[tuple[int, int, bool, bytes]]:
    """Reference parser for whole frames: (first byte, opcode, masked, payload)."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        key = None
        if b1 & 0x80:
            key = data[pos : pos + 4]
            pos += 4
        payload = data[pos : pos + n]
        if key is not None:
            payload = xor(payload, key)
        frames.append((b0, b0 & 0x0F, key is not None, payload))
        pos += n
    assert pos == len(data), "the reference parser needs whole frames"
    return frames


frame_specs = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([0x1, 0x2]),
            st.binary(max_size=300),
            st.just(True),
            st.just(0),
            st.just(True),
        ),  # simple
        st.tuples(
            st.sampled_from([0x1, 0x2]),
            st.binary(min_size=LIMIT - 2, max_size=LIMIT + 2),
            st.just(True),
            st.just(0),
            st.just(True),
        ),  # around the limit (126 lengths)
        st.tuples(
            st.sampled_from([0x9, 0xA, 0x8]),
            st.binary(max_size=125),
            st.just(True),
            st.just(0),
            st.just(True),
        ),  # control
        st.tuples(
            st.sampled_from([0x0, 0x1]),
            st.binary(max_size=50),
            st.booleans(),
            st.just(0),
            st.just(True),
        ),  # fragments
        st.tuples(
            st.just(0x1),
            st.binary(max_size=50),
            st.just(True),
            st.sampled_from([1, 2, 4]),
            st.just(True),
        ),  # reserved bits
        st.tuples(
            st.just(0x1), st.binary(max_size=50), st.just(True), st.just(0), st.just(False)
        ),  # unmasked
        st.tuples(
            st.just(0x2),
            st.binary(min_size=65536, max_size=65540),
            st.just(True),
            st.just(0),
            st.just(True),
        ),  # 127 lengths
    ),
    max_size=10,
)


def run(chunks: list[bytes], fast_when: list[bool]) -> tuple[list, bytes]:
    """Scan *chunks*; returns the frames in order, each one parsed either by
    the scanner or (from the library's bytes) by the reference parser."""
    scanner = FrameScanner(LIMIT)
    carry = Carry()
    asked = iter(fast_when * 100 + [True] * 1000)
    out: list = []
    library = bytearray()
    for chunk in chunks:
        for opcode, data in scanner.scan(chunk, carry, lambda: next(asked)):
            if opcode is None:
                library += data
                out.append(("library", len(library)))
            else:
                # the library has whole frames up to here
                out.append(("fast", opcode, data, bytes(library)))
    assert carry.scan_carry == 0
    return out, bytes(library)


@settings(max_examples=400, deadline=None)
@given(
    specs=frame_specs,
    sizes=st.lists(st.integers(1, 70000), min_size=1, max_size=8),
    fast_when=st.lists(st.booleans(), min_size=1, max_size=5),
)
def test_every_frame_once_in_order_whatever_the_cuts(specs, sizes, fast_when) -> None:
    frames = [
        encode_frame(op, payload, fin=fin, rsv=rsv, mask=masked)
        for op, payload, fin, rsv, masked in specs
    ]
    out, library = run(chunked(b"".join(frames), sizes), fast_when)
    # Rebuild the stream of frames: the library's bytes are whole frames
    # wherever a fast frame was taken in between.
    rebuilt: list[tuple[int, int, bool, bytes]] = []
    consumed = 0
    for item in out:
        if item[0] == "fast":
            _, opcode, payload, library_so_far = item
            rebuilt += parse_all(library_so_far[consumed:])
            consumed = len(library_so_far)
            rebuilt.append((0x80 | opcode, opcode, True, payload))
    rebuilt += parse_all(library[consumed:])
    assert rebuilt == parse_all(b"".join(frames))
    # Only simple frames within the limit are ever taken on the fast path.
    for item in out:
        if item[0] == "fast":
            assert item[1] in (1, 2) and len(item[2]) <= LIMIT


def test_a_simple_frame_is_parsed_and_the_rest_goes_to_the_library() -> None:
    text = encode_frame(0x1, b'{"type":"message","content":"hi"}')
    ping = encode_frame(0x9, b"p")
    scanner, carry = FrameScanner(LIMIT), Carry()
    got = list(scanner.scan(text + ping + text[:3], carry, lambda: True))
    assert got == [(1, b'{"type":"message","content":"hi"}'), (None, ping)]
    assert carry.scan_carry == text[:3]  # an incomplete header waits for the next read
    again = list(scanner.scan(text[3:], carry, lambda: True))
    assert again == [(1, b'{"type":"message","content":"hi"}')]
    assert carry.scan_carry == 0


def test_an_incomplete_frame_goes_to_the_library_from_its_first_byte() -> None:
    text = encode_frame(0x1, b"x" * 200)
    scanner, carry = FrameScanner(LIMIT), Carry()
    assert list(scanner.scan(text[:100], carry, lambda: True)) == [(None, text[:100])]
    assert carry.scan_carry == len(text) - 100
    rest = list(scanner.scan(text[100:] + text, carry, lambda: True))
    assert rest == [(None, text[100:]), (1, b"x" * 200)]
    assert carry.scan_carry == 0


def test_one_scanner_keeps_no_state_of_its_own_between_callers() -> None:
    # Every connection shares the scanner: what one read leaves is its own.
    text = encode_frame(0x1, b"y" * 50)
    scanner, a, b = FrameScanner(LIMIT), Carry(), Carry()
    assert list(scanner.scan(text[:1], a, lambda: True)) == []
    assert list(scanner.scan(text[:20], b, lambda: True)) == [(None, text[:20])]
    assert (a.scan_carry, b.scan_carry) == (text[:1], len(text) - 20)
    assert list(scanner.scan(text[1:], a, lambda: True)) == [(1, b"y" * 50)]
    assert list(scanner.scan(text[20:], b, lambda: True)) == [(None, text[20:])]
    assert (a.scan_carry, b.scan_carry) == (0, 0)


def test_when_the_caller_says_no_every_frame_goes_to_the_library() -> None:
    text = encode_frame(0x1, b"hello")
    assert scan_once(text * 2, lambda: False) == [(None, text)] * 2


def test_an_oversized_announcement_goes_to_the_library_at_once() -> None:
    # The library refuses it from the header (1009): no waiting for 2^63 bytes.
    head = bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 2**63 - 1) + b"abcd"
    assert scan_once(head + b"data", lambda: True) == [(None, head + b"data")]


def test_a_length_with_its_top_bit_set_is_malformed_after_what_came_before() -> None:
    # RFC 6455 5.2: that bit MUST be 0 (1002, where the library would say 1009).
    ping = encode_frame(0x9, b"p")
    head = bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 2**63) + b"abcd"
    got: list[object] = []
    with pytest.raises(MalformedFrame):
        got.extend(FrameScanner(LIMIT).scan(ping + head + b"data", Carry(), lambda: True))
    assert got == [(None, ping)]


def test_the_limit_is_inclusive() -> None:
    at = encode_frame(0x2, b"a" * LIMIT)
    over = encode_frame(0x2, b"a" * (LIMIT + 1))
    got = scan_once(at + over, lambda: True)
    assert got == [(2, b"a" * LIMIT), (None, over)]


def test_frames_for_the_library_come_together_up_to_8_kib() -> None:
    ping = encode_frame(0x9, b"p")  # 7 bytes
    pieces = scan_once(ping * 3000, lambda: True)
    assert all(opcode is None for opcode, _ in pieces)
    assert b"".join(chunk for _, chunk in pieces) == ping * 3000
    assert [len(chunk) for _, chunk in pieces][:2] == [8197, 8197]  # 1171 pings each


def test_the_library_gets_what_came_before_the_caller_is_asked() -> None:
    # A fragmented message begins: the caller can only know that it must not
    # take the next text frame itself once the library has seen the first part.
    start = encode_frame(0x1, b"part", fin=False)
    text = encode_frame(0x1, b"whole")
    events: list[object] = []

    def fast() -> bool:
        events.append("asked")
        return False

    for item in FrameScanner(LIMIT).scan(start + text, Carry(), fast):
        events.append(item)
    assert events == [(None, start), "asked", (None, text)]
