"""The pure parts of the load generator's client framing (wshub.bench.framing)."""

import os

import pytest

from wshub.bench.framing import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameParser,
    HeaderCounter,
    MarkerCounter,
    accept_for,
    check_handshake_response,
    encode_frame,
    encode_server_frame,
    mask,
    parse_header,
)

from .rawws import chunked

# --------------------------------------------------------------------- masking


def test_mask_is_xor_with_repeated_key():
    key = b"\x01\x02\x03\x04"
    assert mask(b"\x00\x00\x00\x00\x00", key) == b"\x01\x02\x03\x04\x01"
    assert mask(b"", key) == b""


def test_mask_is_its_own_inverse():
    key = os.urandom(4)
    for n in (1, 3, 4, 5, 125, 126, 1000, 70000):
        data = os.urandom(n)
        masked = mask(data, key)
        assert len(masked) == n
        assert mask(masked, key) == data


def test_mask_keeps_leading_zero_bytes():
    # an int-based XOR must not drop zero bytes at either end
    key = b"abcd"
    data = b"abcd" + b"\x00" * 4 + b"abcd"
    assert mask(data, key) == b"\x00" * 4 + b"abcd" + b"\x00" * 4


def test_mask_rejects_bad_key():
    with pytest.raises(ValueError):
        mask(b"abc", b"xy")


# --------------------------------------------------------------------- encoding


def test_client_frame_known_bytes():
    # RFC 6455 5.7: a masked "Hello" text frame
    key = bytes((0x37, 0xFA, 0x21, 0x3D))
    frame = encode_frame(OP_TEXT, b"Hello", mask_key=key)
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")


@pytest.mark.parametrize("n,hl", [(0, 6), (125, 6), (126, 8), (65535, 8), (65536, 14)])
def test_client_frame_lengths_and_header(n, hl):
    payload = os.urandom(n)
    frame = encode_frame(OP_TEXT, payload, mask_key=b"kkkk")
    assert len(frame) == hl + n
    fin, op, masked, key, ln, got_hl = parse_header(frame)
    assert (fin, op, masked, key, ln, got_hl) == (True, OP_TEXT, True, b"kkkk", n, hl)
    assert mask(frame[hl:], key) == payload


def test_client_frames_are_always_masked_with_a_fresh_key():
    a = encode_frame(OP_TEXT, b"same")
    b = encode_frame(OP_TEXT, b"same")
    assert a[1] & 0x80 and b[1] & 0x80
    assert parse_header(a)[3] != parse_header(b)[3] or a == b  # random keys (equal only by chance)


def test_non_final_frame_and_opcode_bits():
    f = encode_frame(OP_TEXT, b"x", fin=False, mask_key=b"\0\0\0\0")
    assert f[0] == 0x01
    f = encode_frame(OP_PING, b"", mask_key=b"\0\0\0\0")
    assert f[0] == 0x89 and f[1] == 0x80


@pytest.mark.parametrize("n,hl", [(5, 2), (126, 4), (70000, 10)])
def test_server_frame_header(n, hl):
    frame = encode_server_frame(OP_TEXT, b"a" * n)
    assert parse_header(frame) == (True, OP_TEXT, False, None, n, hl)


def test_parse_header_incomplete_returns_none():
    frame = encode_server_frame(OP_TEXT, b"a" * 300)  # 4-byte header
    assert parse_header(frame[:1]) is None
    assert parse_header(frame[:3]) is None
    assert parse_header(frame[:4]) is not None
    big = encode_server_frame(OP_TEXT, b"a" * 70000)
    assert parse_header(big[:9]) is None
    masked = encode_frame(OP_TEXT, b"hi", mask_key=b"abcd")
    assert parse_header(masked[:5]) is None
    assert parse_header(masked, 0)[3] == b"abcd"


# --------------------------------------------------------------------- parsing and counting


def stream_of(messages):
    return b"".join(encode_server_frame(OP_TEXT, m) for m in messages)


MESSAGES = [b"~#%d s%d c0 " % (1000 + i, i) + b"x" * (i * 37 % 300) for i in range(200)]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [64], [1000], [10**7], [1, 4096, 3]])
def test_frame_parser_over_any_chunking(sizes):
    p = FrameParser()
    got = []
    for chunk in chunked(stream_of(MESSAGES), sizes):
        got.extend(p.feed(chunk))
    assert got == [(OP_TEXT, m) for m in MESSAGES]


def test_frame_parser_joins_fragments_and_passes_control_frames():
    data = (
        encode_server_frame(OP_TEXT, b"hel", fin=False)
        + encode_server_frame(OP_PING, b"p")
        + encode_server_frame(OP_CONT, b"lo")
        + encode_server_frame(OP_CLOSE, b"\x03\xe8")
    )
    assert FrameParser().feed(data) == [
        (OP_PING, b"p"),
        (OP_TEXT, b"hello"),
        (OP_CLOSE, b"\x03\xe8"),
    ]


def test_frame_parser_unmasks_client_frames():
    data = encode_frame(OP_TEXT, b"masked text", mask_key=b"\x10\x20\x30\x40")
    assert FrameParser().feed(data) == [(OP_TEXT, b"masked text")]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [5], [127], [3000], [10**7]])
def test_header_counter_over_any_chunking(sizes):
    data = stream_of(MESSAGES) + encode_server_frame(OP_PING, b"not counted")
    data += stream_of([b"y" * 70000])  # a frame with an 8-byte length
    c = HeaderCounter()
    total = sum(c.feed(chunk) for chunk in chunked(data, sizes))
    assert total == c.count == len(MESSAGES) + 1


def test_header_counter_counts_only_final_frames():
    data = encode_server_frame(OP_TEXT, b"a", fin=False) + encode_server_frame(OP_CONT, b"b")
    c = HeaderCounter()
    assert c.feed(data) == 1


@pytest.mark.parametrize("sizes", [[1], [2], [3], [2, 1], [101], [102], [10**7]])
def test_marker_counter_over_chunk_boundaries(sizes):
    data = stream_of(MESSAGES)
    c = MarkerCounter(b"~#")
    total = sum(c.feed(chunk) for chunk in chunked(data, sizes))
    assert total == c.count == len(MESSAGES)


def test_marker_counter_split_exactly_between_chunks():
    c = MarkerCounter(b"~#")
    assert c.feed(b"abc~") == 0
    assert c.feed(b"#def") == 1
    assert c.feed(b"#") == 0  # a lone second byte is not a marker
    assert c.feed(b"") == 0
    assert c.count == 1


def test_marker_counter_ignores_messages_without_marker():
    c = MarkerCounter()
    data = stream_of([b'{"type":"ping","timestamp":1}', b"~#1 s0", b"#~", b"~"])
    assert c.feed(data) == 1


def test_marker_counter_rejects_self_overlapping_marker():
    with pytest.raises(ValueError):
        MarkerCounter(b"aa")
    with pytest.raises(ValueError):
        MarkerCounter(b"abc")


# --------------------------------------------------------------------- handshake


def test_accept_value_from_rfc_example():
    assert accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_response_checks():
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    ok = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    )
    check_handshake_response(ok, key)
    with pytest.raises(ValueError):
        check_handshake_response(ok.replace(b"xOo=", b"xOx="), key)
    with pytest.raises(ValueError):
        check_handshake_response(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0", key)
    with pytest.raises(ValueError):
        check_handshake_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket", key)
