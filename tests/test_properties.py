"""Property-based tests of client frames against a running server.

For random text and JSON sent by one client:

* the server never crashes and keeps serving (every example ends with a
  ping/pong round trip on the same connection, which also proves the
  connection was not closed: no text frame is a reason to close);
* an invalid frame never reaches another client, and a valid one reaches it
  exactly once, whole (checked with a sentinel that follows every frame);
* the expected outcome comes from a model written here, independently of
  :mod:`wshub.protocol`.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Client, Server
from .rawws import RawClient, encode_frame

JSON_WS = " \t\n\r"


def expected_relay(text: str) -> tuple[str, str] | None:
    """The model: (type, content) another client should receive, or None."""
    stripped = text.strip(JSON_WS)
    obj = None
    if stripped.startswith("{"):
        try:
            obj = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except (ValueError, RecursionError):
            obj = None
    kind = "message"
    if isinstance(obj, dict):
        kind = obj.get("type")
        if kind not in ("message", "broadcast"):  # the other types relay nothing
            return None
        content = obj.get("content")
        if not isinstance(content, str):
            return None
    else:
        content = text
    if not content.strip() or len(content) > 1000:
        return None
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in content):
        return None
    return kind, content


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

frames = st.one_of(
    st.text(max_size=1200),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=990, max_size=1010),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["message", "broadcast", "ping", "user_info", "pong", "welcome", "", "MESSAGE"]
            )
            | st.text(max_size=5)
        },
        optional={"content": json_values | st.text(max_size=1100)},
    ).map(lambda d: json.dumps(d, ensure_ascii=False)),
    st.builds(
        lambda s: '{"type":"message","content":"' + s + '"}',
        st.sampled_from(["\\ud800", "a\\udfff", "\\ud83d\\ude00", "\\u0000", "\\n"]),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=frames)
def test_random_frames_never_leak_or_close(pair: tuple[Client, Client], text: str) -> None:
    sender, observer = pair
    global _serial
    _serial += 1
    sentinel = f"sentinel-{_serial}"
    sender.send(text)
    # A broadcast comes back to the sender too: once it has, every reply to
    # the random frame (error, pong, user_info_response) is behind us, and
    # the connection is proven open and served.
    sender.send({"type": "broadcast", "content": sentinel})
    expected = expected_relay(text)
    relayed = []
    while True:
        got = observer.recv_type("message", "broadcast")
        if got["content"] == sentinel and got["type"] == "broadcast":
            break
        relayed.append((got["type"], got["content"]))
    assert relayed == ([] if expected is None else [expected]), f"for {text!r}"
    while True:
        got = sender.recv()
        assert got["type"] != "message", "a message came back to its sender"
        if got["type"] == "broadcast" and got["content"] == sentinel:
            break


_serial = 0


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_binary_is_refused_and_never_relayed(
    pair: tuple[Client, Client], data: bytes
) -> None:
    sender, observer = pair
    sender.ws.send(data)
    assert sender.recv_type("error")["code"] == "binary_not_supported"
    sender.send({"type": "message", "content": "sentinel"})
    assert observer.recv_type("message")["content"] == "sentinel"  # nothing before it


@pytest.fixture(scope="module")
def pair(server: Server) -> Iterator[tuple[Client, Client]]:
    """Two clients shared by every example (a server per example would be slow)."""
    sender, observer = server.client(), server.client()
    yield sender, observer
    sender.close()
    observer.close()


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=64))
def test_random_bytes_in_text_frames(
    server: Server, pair: tuple[Client, Client], payload: bytes
) -> None:
    """Invalid UTF-8 closes with 1007 and delivers nothing; valid UTF-8 is a
    text message like any other."""
    from .rawws import RawClient

    _, observer = pair
    global _serial
    _serial += 1
    raw, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    raw_id = json.loads(raw.recv_frame()[1])["connectionId"]
    raw.send_frame(0x1, payload)
    raw.send_text(json.dumps({"type": "broadcast", "content": f"sentinel-{_serial}"}))
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        assert raw.recv_close()[0] == 1007
        while True:  # nothing relayed before the connection is gone
            got = observer.recv_type("user_left", "message", "broadcast")
            assert got["type"] == "user_left", f"leaked {got} for {payload!r}"
            if got["connectionId"] == raw_id:
                break
        raw.close()
    else:
        expected = expected_relay(text)
        relayed = []
        while True:
            got = observer.recv_type("message", "broadcast")
            if got["content"] == f"sentinel-{_serial}":
                break
            relayed.append((got["type"], got["content"]))
        assert relayed == ([] if expected is None else [expected])
        raw.close()
        while observer.recv_type("user_left")["connectionId"] != raw_id:
            pass


# -- A stream of frames cut anywhere -------------------------------------------
#
# The connection parses the common frame (whole, final, masked text) itself
# and leaves every other frame to the frame library, tracking where frames
# end across reads. Whatever the cuts, every message must arrive once, in
# order, and every Ping must get its Pong, in order.

stream_items = st.lists(
    st.one_of(
        st.tuples(st.just("message"), st.text(alphabet="ab€😀", min_size=1, max_size=400)),
        st.tuples(st.just("ping"), st.binary(max_size=20)),
        st.tuples(st.just("pong"), st.binary(max_size=20)),
        # a message in 2 to 4 fragments, a Ping between the first two
        st.tuples(
            st.just("fragments"),
            st.text(alphabet="xy", min_size=4, max_size=300),
            st.integers(2, 4),
            st.binary(max_size=10),
        ),
    ),
    min_size=1,
    max_size=12,
)


def encode_stream(items: list[tuple], serial: int) -> tuple[bytes, list[str], list[bytes]]:
    """The bytes, the contents the observer must get, the Pongs the sender must get."""
    out = bytearray()
    contents: list[str] = []
    pongs: list[bytes] = []
    for n, item in enumerate(items):
        kind = item[0]
        if kind == "ping":
            out += encode_frame(0x9, item[1])
            pongs.append(item[1])
        elif kind == "pong":
            out += encode_frame(0xA, item[1])
        else:
            content = f"{serial}.{n} {item[1]}"
            payload = json.dumps({"type": "message", "content": content}).encode()
            contents.append(content)
            if kind == "message":
                out += encode_frame(0x1, payload)
                continue
            parts, ping = item[2], item[3]
            step = -(-len(payload) // parts)
            pieces = [payload[i : i + step] for i in range(0, len(payload), step)]
            for i, piece in enumerate(pieces):
                out += encode_frame(0x1 if i == 0 else 0x0, piece, fin=i == len(pieces) - 1)
                if i == 0:
                    out += encode_frame(0x9, ping)
                    pongs.append(ping)
    return bytes(out), contents, pongs


@pytest.fixture(scope="module")
def raw_pair(server: Server) -> Iterator[tuple[RawClient, Client]]:
    raw, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    observer = server.client()
    yield raw, observer
    raw.close()
    observer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=stream_items, cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_a_frame_stream_cut_anywhere(
    raw_pair: tuple[RawClient, Client], items: list[tuple], cuts: list[int]
) -> None:
    raw, observer = raw_pair
    global _serial
    _serial += 1
    data, contents, pongs = encode_stream(items, _serial)
    pos = 0
    for size in itertools.cycle(cuts):
        if pos >= len(data):
            break
        raw.send(data[pos : pos + size])
        pos += size
    got = [observer.recv_type("message")["content"] for _ in contents]
    assert got == contents
    seen: list[bytes] = []
    while len(seen) < len(pongs):
        opcode, payload, _ = raw.recv_frame()
        if opcode == 0xA:
            seen.append(payload)
        else:
            assert opcode in (0x1, 0x9), f"unexpected opcode {opcode}"
            if opcode == 0x1:
                assert json.loads(payload)["type"] in ("welcome", "user_joined", "user_left")
    assert seen == pongs
