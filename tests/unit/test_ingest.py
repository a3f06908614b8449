"""wshub._ingest against the Python path it short-cuts: the same frames, the
same relays, the same bytes out (src/wshub/_ingest.c)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wshub import _ingest, ingest, protocol
from wshub.framescan import FrameScanner
from wshub.protocol import Relay, RelayKind

LIMIT = 1 << 20
KEY = b"\x9a\x01\xfe\x37"


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return header + payload
    return header + KEY + bytes(b ^ KEY[i & 3] for i, b in enumerate(payload))


def python_relay(payload: bytes) -> tuple[RelayKind, bytes] | None:
    """What the Python path makes of a text frame's payload when it is a
    plain relay it accepts: its kind and the content as the envelope writes
    it; None for anything else."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    result = protocol._plain_relay(text)
    if type(result) is not Relay:
        return None
    return result.kind, protocol._escape_string(result.content)[1:-1].encode()


def c_item(payload: bytes) -> tuple[int, bytes]:
    data = frame(1, payload)
    stop, items = _ingest.scan(data, LIMIT)
    assert stop == len(data) and len(items) == 1 and items[0][2] == len(data)
    return items[0][0], items[0][1]


def check_same(payload: bytes) -> None:
    code, body = c_item(payload)
    expected = python_relay(payload)
    if expected is None:
        assert code == _ingest.TEXT and body == payload
    else:
        assert ingest.KINDS[code] is expected[0] and body == expected[1]
        # and the envelope is encode_relay's, byte for byte
        relay = protocol.parse_client_text(payload.decode())
        assert type(relay) is Relay
        for offset in (None, 7):
            assert protocol.encode_plain_relay(
                relay.kind, protocol.ConnectionId("ws-1"), body, 1.25, offset
            ) == protocol.encode_relay(
                relay.kind, protocol.ConnectionId("ws-1"), relay.content, 1.25, offset
            )
            assert protocol.encode_plain_relay(
                relay.kind, protocol.ConnectionId("ws-1"), body, 1.25, offset, 'u"1'
            ) == protocol.encode_relay_from_user(
                relay.kind, protocol.ConnectionId("ws-1"), 'u"1', relay.content, 1.25, offset
            )


def test_constants_are_the_protocol_s() -> None:
    assert _ingest.MAX_CONTENT_CHARS == protocol.MAX_CONTENT_CHARS
    assert (_ingest.TEXT, _ingest.BINARY) == (ingest.TEXT, ingest.BINARY)
    assert (_ingest.MESSAGE, _ingest.BROADCAST) == (ingest.MESSAGE, ingest.BROADCAST)
    assert ingest.KINDS[_ingest.MESSAGE] is RelayKind.MESSAGE
    assert ingest.KINDS[_ingest.BROADCAST] is RelayKind.BROADCAST


# Characters where the two paths could part: JSON's own, white space of every
# kind str.strip() knows, controls, the edges of each UTF-8 length, surrogates.
EDGE = st.sampled_from(
    [chr(c) for c in range(0x30) if c not in (0x22, 0x5C)]
    + ['"', "\\", "/", "\x7f", "\x80", "\x85", "\xa0", "\u07ff", "\u0800", "\u1680", "\u2000"]
    + ["\u200a", "\u200b", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\ufeff", "\uffff"]
    + ["\U00010000", "\U0010ffff", "\ud800", "\udbff", "\udc00", "\udfff", "é", "x"]
)
CONTENT = st.lists(st.one_of(EDGE, st.characters()), max_size=40).map("".join) | st.text(
    alphabet=st.sampled_from("ab \t"), min_size=995, max_size=1005
)


def escaped_forms(content: str) -> st.SearchStrategy[str]:
    """*content* as a JSON string's inside, each character raw, short-escaped
    or \\u-escaped (in either case of hex)."""

    def one(ch: str) -> st.SearchStrategy[str]:
        forms = [json.dumps(ch, ensure_ascii=False)[1:-1], json.dumps(ch)[1:-1]]
        if len(ch) == 1 and ord(ch) < 0x10000:
            forms += [f"\\u{ord(ch):04x}", f"\\u{ord(ch):04X}", ch]
        return st.sampled_from(forms)

    return st.tuples(*(one(ch) for ch in content)).map("".join)


@given(
    st.sampled_from(["message", "broadcast", "messages", "Message", "ping"]),
    CONTENT.flatmap(escaped_forms),
    st.sampled_from(["", " ", "x", '"', "}", "\\", '"}']),
)
@example("message", "\\ud83d\\ude00", "")
@example("message", "\\ud83d", "")
@example("message", "\\ude00\\ud83d", "")
@example("broadcast", "a\\u00", "")
@example("message", "a\\x", "")
@example("message", "\\u0000\\u001f\\u0022\\u005c", "")
def test_a_relay_is_the_python_path_s(kind: str, inside: str, after: str) -> None:
    """Any JSON-ish relay text: the C path takes exactly the relays the
    Python path accepts, and gives the content the envelope would write."""
    text = f'{{"type":"{kind}","content":"{inside}"{after}}}'
    check_same(text.encode("utf-8", "surrogatepass"))


@given(st.binary(max_size=80), st.sampled_from([b"", b'{"type":"message","content":"']))
@example(b"\xed\xa0\x80", b'{"type":"message","content":"')  # an encoded surrogate
@example(b"\xc0\xaf", b'{"type":"message","content":"')  # overlong
@example(b"\xf4\x90\x80\x80", b'{"type":"message","content":"')  # past U+10FFFF
@example(b"\xe0\x9f\xbf", b'{"type":"message","content":"')  # overlong, 3 bytes
@example(b"\xf0\x8f\xbf\xbf", b'{"type":"message","content":"')  # overlong, 4 bytes
@example(b"\xe2\x82", b'{"type":"message","content":"')  # truncated
def test_arbitrary_bytes_are_the_python_path_s(body: bytes, head: bytes) -> None:
    check_same(head + body + b'"}')
    check_same(head + body)


def test_every_code_point_raw() -> None:
    """Each code point as a one-character content, raw UTF-8: taken exactly
    when it is not white space for str.strip() and not a control (a raw one is
    not JSON). One read of many frames: also the frame walk at scale."""
    head = b'{"type":"message","content":"'
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(points), 50_000):
        chunk = points[start : start + 50_000]
        data = b"".join(frame(1, head + chr(c).encode() + b'"}', masked=True) for c in chunk)
        stop, items = _ingest.scan(data, LIMIT)
        assert stop == len(data)
        for c, (code, body, _) in zip(chunk, items, strict=True):
            taken = code == _ingest.MESSAGE
            valid_raw = c >= 0x20 and c not in (0x22, 0x5C)  # a raw '"' or '\\' is not
            assert taken == (valid_raw and not chr(c).isspace()), hex(c)
            if taken:
                assert body == protocol._escape_string(chr(c))[1:-1].encode()


def test_every_byte_at_every_place_of_a_word() -> None:
    """The content is checked eight bytes at a time while they are printable
    ASCII: each byte value at each of the places of two words and a tail,
    among letters and among spaces, judged as the Python path judges it."""
    head = b'{"type":"message","content":"'
    for filler in (b"a", b" "):
        for place in range(19):
            for value in range(256):
                content = bytearray(filler * 19)
                content[place] = value
                check_same(head + bytes(content) + b'"}')


def test_content_length_limit_in_characters() -> None:
    for n, taken in ((1000, True), (1001, False)):
        for ch in ("a", "é", "\U0001f600", "\\/", '\\"', "\\u00e9", "\\ud83d\\ude00"):
            code, _ = c_item(b'{"type":"message","content":"' + (ch * n).encode() + b'"}')
            assert (code == _ingest.MESSAGE) is taken, (ch, n)
            check_same(b'{"type":"message","content":"' + (ch * n).encode() + b'"}')


# -- The frame walk: the frames framescan hands over, no others ---------------

FRAMES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300), st.just(True), st.just(True)),
        st.tuples(
            st.sampled_from([0, 1, 2, 8, 9, 10, 3]),
            st.binary(max_size=130),
            st.booleans(),
            st.booleans(),
        ),
        st.tuples(
            st.just(1),
            st.sampled_from(
                [b'{"type":"message","content":"hi"}', b'{"type":"broadcast","content":"x"}']
            ),
            st.just(True),
            st.just(True),
        ),
    ),
    max_size=8,
)


class _Carry:
    scan_carry: bytes | int = 0


@given(FRAMES, st.integers(0, 20), st.sampled_from([100, 125, 126, 65536]))
def test_the_walk_stops_where_framescan_leaves_its_fast_path(
    frames: list[tuple[int, bytes, bool, bool]], cut: int, limit: int
) -> None:
    data = b"".join(frame(op, body, fin=fin, masked=m) for op, body, fin, m in frames)
    data = data[: max(0, len(data) - cut)]
    stop, items = _ingest.scan(data, limit)
    fast: list[tuple[int, bytes]] = []
    for opcode, chunk in FrameScanner(limit).scan(data, _Carry(), lambda: True):
        if opcode is None:
            break
        fast.append((opcode, chunk))
    assert len(items) == len(fast)
    assert stop == (items[-1][2] if items else 0)
    for (code, body, _), (opcode, payload) in zip(items, fast, strict=True):
        assert (opcode == 2) is (code == _ingest.BINARY)
        if ingest.KINDS[code] is None:
            assert body == payload
        else:
            assert python_relay(payload) == (ingest.KINDS[code], body)
    # the rest starts at a frame boundary: what framescan does with it is as before
    rest = list(FrameScanner(limit).scan(data[stop:], _Carry(), lambda: True))
    assert not rest or rest[0][0] is None


@given(FRAMES, st.integers(0, 20))
def test_runs_are_the_relays_in_a_row(
    frames: list[tuple[int, bytes, bool, bool]], cut: int
) -> None:
    """scan(data, limit, True): the items of scan(data, limit), each run of
    relays in a row as one (RUN, kinds, contents, ends) item."""
    data = b"".join(frame(op, body, fin=fin, masked=m) for op, body, fin, m in frames)
    data = data[: max(0, len(data) - cut)]
    stop, items = _ingest.scan(data, LIMIT)
    run_stop, runs = _ingest.scan(data, LIMIT, True)
    assert run_stop == stop
    expanded: list[tuple[int, bytes, int]] = []
    previous_was_run = False
    for item in runs:
        if item[0] == _ingest.RUN:
            _, kinds, contents, ends = item
            assert kinds and not previous_was_run  # runs are whole: never two in a row
            assert len(kinds) == len(contents) == len(ends) // 8
            for i, (code, content) in enumerate(zip(kinds, contents, strict=True)):
                end = int.from_bytes(ends[8 * i : 8 * i + 8], "little")
                expanded.append((code, content, end))
            previous_was_run = True
        else:
            assert item[0] < _ingest.MESSAGE
            expanded.append(item)  # type: ignore[arg-type]
            previous_was_run = False
    assert expanded == items


def test_no_c_ingest_env_turns_it_off() -> None:
    """WSHUB_NO_C_INGEST=1: the Python path, as without a compiler."""
    code = "from wshub import ingest; print(ingest.scan is None)"
    for env, off in (({"WSHUB_NO_C_INGEST": "1"}, "True"), ({}, "False")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={k: v for k, v in __import__("os").environ.items() if k != "WSHUB_NO_C_INGEST"}
            | env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == off


def test_without_the_extension_the_python_path_serves() -> None:
    """Built without a compiler (wshub._ingest missing): ingest.scan is None,
    so connections read through framescan alone (the path the
    WSHUB_NO_C_INGEST=1 servers of tests/test_ingest.py serve on)."""
    code = """
import sys
sys.modules["wshub._ingest"] = None  # as if never built: its import fails
from wshub import ingest
assert ingest.scan is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("limit", [0, 5])
def test_a_frame_over_the_limit_is_left(limit: int) -> None:
    data = frame(1, b'{"type":"message","content":"hi"}')
    assert _ingest.scan(data, limit) == (0, [])
