"""The C ingest path (wshub._ingest) over real sockets: each batch of frames,
written in one piece so that one read holds many, gives the same frames to
every client with the C path as with the Python path (WSHUB_NO_C_INGEST=1),
and the outcomes the protocol prescribes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from .conftest import Server
from .rawws import RawClient, encode_frame

END = '{"type":"broadcast","content":"end"}'
# What differs between two servers' runs: ids, times, offsets, epochs.
_VARYING = re.compile(
    rb'("(?:connectionId|timestamp|epoch)":)"[^"]*"'
    rb'|("(?:offset|connectionCount|totalUsers|timestamp)":)\d+'
)


def relay(kind: str, inside: str) -> bytes:
    """A plain relay with *inside* as the JSON string's inside, as written."""
    return f'{{"type":"{kind}","content":"{inside}"}}'.encode("utf-8", "surrogatepass")


BATCH = [
    (1, relay("message", "hello")),
    (1, relay("message", "a" * 1000)),  # the limit: relayed
    (1, relay("message", "é" * 1001)),  # one character over: refused
    (1, relay("message", " \\t\\n ")),  # white space only: refused
    (1, relay("message", "\u3000\u2028")),  # Unicode white space only: refused
    (1, relay("message", "\\ud800")),  # a lone surrogate: refused
    (1, relay("message", 'a\\"b\\\\c\\/d\\n\\u00e9\\ud83d\\ude00\\u0001\\u007f\\u2028')),
    (1, relay("broadcast", "héllo ☃ 😀")),
    (9, b"mid-batch"),  # a control frame: the rest of the read on the Python path
    (1, relay("message", "after the ping")),
    (1, b'{"type":"ping"}'),
    (1, b'{"type":"message","content":"x","extra":1}'),  # full parse: relayed
    (1, b'{"type":"message","content":"x" }'),  # full parse: relayed
    (2, b"\x00\x01"),  # binary: refused
    (1, relay("message", "\\x")),  # not JSON: relayed as plain text
    (1, b'{"type":"nope","content":"x"}'),  # unknown type
    (1, relay("message", "last")),
]


def frames(batch: list[tuple[int, bytes]]) -> bytes:
    return b"".join(encode_frame(opcode, payload) for opcode, payload in batch)


def normalised(payload: bytes) -> bytes:
    return _VARYING.sub(lambda m: (m[1] + b'"_"') if m[1] else (m[2] + b"0"), payload)


def run(server: Server, batch: list[tuple[int, bytes]]) -> tuple[list[bytes], list[bytes]]:
    """Send *batch* in one write from a raw client; return what the sender and
    a listener in the same room received until the final broadcast."""
    listener, status, _ = RawClient.open(server.host, server.port, path="/websocket/ingest")
    sender, status2, _ = RawClient.open(server.host, server.port, path="/websocket/ingest")
    assert status == status2 == 101
    try:
        sender.send(frames([*batch, (1, END.encode())]))
        return read_until_end(sender), read_until_end(listener)
    finally:
        sender.close()
        listener.close()


def read_until_end(client: RawClient) -> list[bytes]:
    got: list[bytes] = []
    while True:
        opcode, payload, _ = client.recv_frame()
        if opcode == 0x8:
            got.append(b"close " + payload)
            return got
        if opcode == 0x1:
            kind = json.loads(payload)["type"]
            if kind == "user_left":  # the sender's, when the server closed it
                return got
            if kind in ("welcome", "user_joined"):
                continue
            if b'"content":"end"' in payload:
                return got
        got.append(normalised(payload) if opcode == 0x1 else bytes([opcode]) + payload)


@pytest.fixture
def two_servers(make_server: Callable[..., Server]) -> Callable[..., tuple[Server, Server]]:
    def make(*args: str) -> tuple[Server, Server]:
        base = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0")
        return make_server(*base, *args), make_server(*base, *args, env={"WSHUB_NO_C_INGEST": "1"})

    return make


def test_a_batch_is_the_python_path_s(two_servers: Callable[..., tuple[Server, Server]]) -> None:
    c_path, python_path = two_servers("--message-rate", "0")
    with_c = run(c_path, BATCH)
    assert with_c == run(python_path, BATCH)
    sent, heard = with_c
    contents = [json.loads(p)["content"] for p in heard if p.startswith(b'{"type":"message"')]
    assert contents == [
        "hello",
        "a" * 1000,
        'a"b\\c/d\né\U0001f600\x01\x7f\u2028',
        "after the ping",
        "x",
        "x",
        relay("message", "\\x").decode(),
        "last",
    ]
    errors = [json.loads(p)["code"] for p in sent if p.startswith(b'{"type":"error"')]
    assert errors == [
        "content_too_long",
        "empty_content",
        "empty_content",
        "invalid_content",
        "binary_not_supported",
        "unknown_type",
    ]
    # the envelope carries the content as encode_relay escapes it
    assert (
        normalised(
            b'{"type":"message","connectionId":"","content":"a\\"b\\\\c/d\\n\xc3\xa9'
            b'\xf0\x9f\x98\x80\\u0001\x7f\xe2\x80\xa8","timestamp":"","offset":0}'
        )
        in heard
    )
    assert sum(p.startswith(b'{"type":"pong"') for p in sent) == 1  # the text ping
    assert b"\x0amid-batch" in sent  # the control ping's pong, in its place


def test_rate_limit_in_a_batch(two_servers: Callable[..., tuple[Server, Server]]) -> None:
    """A burst of 3 within one read: the rest refused, then the connection
    closed after the refusals allowed, at the same frame on both paths."""
    c_path, python_path = two_servers(
        "--message-rate", "0.001", "--message-burst", "3", "--rate-limit-refusals", "2"
    )
    batch = [(1, relay("message", f"m{i}")) for i in range(8)]
    with_c = run(c_path, batch)
    assert with_c == run(python_path, batch)
    sent, heard = with_c
    assert [json.loads(p)["content"] for p in heard if p.startswith(b"{")] == ["m0", "m1", "m2"]
    assert sent[-1].startswith(b"close \x03\xf0")  # 1008, policy violation


def test_invalid_utf8_closes_after_what_came_before(
    two_servers: Callable[..., tuple[Server, Server]],
) -> None:
    c_path, python_path = two_servers("--message-rate", "0")
    batch = [
        (1, relay("message", "before")),
        (1, b'{"type":"message","content":"\xed\xa0\x80"}'),  # an encoded surrogate
        (1, relay("message", "never")),
    ]
    with_c = run(c_path, batch)
    assert with_c == run(python_path, batch)
    sent, heard = with_c
    assert sent[-1].startswith(b"close \x03\xef")  # 1007
    assert [json.loads(p)["content"] for p in heard if p.startswith(b"{")] == ["before"]
