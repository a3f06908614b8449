"""The frame scanner: whatever the cuts between reads, every frame comes out
once, in order, either parsed (the simple ones) or as bytes for the library."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from wshub.framescan import FrameScanner

from ..rawws import chunked, encode_frame, xor

LIMIT = 1000


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
    asked = iter(fast_when * 100 + [True] * 1000)
    out: list = []
    library = bytearray()
    for chunk in chunks:
        for opcode, data in scanner.scan(chunk, lambda: next(asked)):
            if opcode is None:
                library += data
                out.append(("library", len(library)))
            else:
                # the library has whole frames up to here
                out.append(("fast", opcode, data, bytes(library)))
    assert scanner.owes == 0 and scanner.head == b""
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
    scanner = FrameScanner(LIMIT)
    got = list(scanner.scan(text + ping + text[:3], lambda: True))
    assert got == [(1, b'{"type":"message","content":"hi"}'), (None, ping)]
    assert scanner.head == text[:3]  # an incomplete header waits for the next read
    assert list(scanner.scan(text[3:], lambda: True)) == [(1, b'{"type":"message","content":"hi"}')]


def test_an_incomplete_frame_goes_to_the_library_from_its_first_byte() -> None:
    text = encode_frame(0x1, b"x" * 200)
    scanner = FrameScanner(LIMIT)
    assert list(scanner.scan(text[:100], lambda: True)) == [(None, text[:100])]
    assert scanner.owes == len(text) - 100
    rest = list(scanner.scan(text[100:] + text, lambda: True))
    assert rest == [(None, text[100:]), (1, b"x" * 200)]


def test_when_the_caller_says_no_every_frame_goes_to_the_library() -> None:
    text = encode_frame(0x1, b"hello")
    assert list(FrameScanner(LIMIT).scan(text * 2, lambda: False)) == [(None, text)] * 2


def test_an_oversized_announcement_goes_to_the_library_at_once() -> None:
    # The library refuses it from the header (1009): no waiting for 2^63 bytes.
    head = bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 2**63) + b"abcd"
    scanner = FrameScanner(LIMIT)
    assert list(scanner.scan(head + b"data", lambda: True)) == [(None, head + b"data")]


def test_the_limit_is_inclusive() -> None:
    at = encode_frame(0x2, b"a" * LIMIT)
    over = encode_frame(0x2, b"a" * (LIMIT + 1))
    got = list(FrameScanner(LIMIT).scan(at + over, lambda: True))
    assert got == [(2, b"a" * LIMIT), (None, over)]


def test_frames_for_the_library_come_together_up_to_8_kib() -> None:
    ping = encode_frame(0x9, b"p")  # 7 bytes
    pieces = list(FrameScanner(LIMIT).scan(ping * 3000, lambda: True))
    assert all(opcode is None for opcode, _ in pieces)
    assert b"".join(chunk for _, chunk in pieces) == ping * 3000
    assert [len(chunk) for _, chunk in pieces][:2] == [8197, 8197]  # 1171 pings each


def test_the_library_gets_what_came_before_the_caller_is_asked() -> None:
    # A fragmented message begins: the caller can only know that it must not
    # take the next text frame itself once the library has seen the first part.
    start = encode_frame(0x1, b"part", fin=False)
    text = encode_frame(0x1, b"whole")
    events: list[object] = []
    scanner = FrameScanner(LIMIT)

    def fast() -> bool:
        events.append("asked")
        return False

    for item in scanner.scan(start + text, fast):
        events.append(item)
    assert events == [(None, start), "asked", (None, text)]
