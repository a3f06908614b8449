"""The frame budget and fragmented messages (decisions.md 8, 18; second audit
pass): every frame costs a token, continuations and control frames included;
a frame over the budget in the middle of a message refuses the whole message,
answered with one rate_limited at its end, and the stream stays in step."""

from __future__ import annotations

import json
from collections.abc import Callable

from .conftest import Server
from .rawws import RawClient, encode_frame
from .waiting import wait_until

TEXT, CONT, PING, PONG = 0x1, 0x0, 0x9, 0xA


def _fragments(*parts: bytes) -> bytes:
    """One text message in len(parts) frames."""
    frames = [
        encode_frame(TEXT if i == 0 else CONT, part, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    ]
    return b"".join(frames)


def _open(server: Server) -> RawClient:
    client, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    assert json.loads(client.recv_frame()[1])["type"] == "welcome"
    return client


def _next_json(client: RawClient, *types: str) -> dict:
    """The sender's next JSON frame of one of *types* (presence skipped)."""
    while True:
        opcode, payload, _ = client.recv_frame()
        if opcode != TEXT:
            continue
        message = json.loads(payload)
        if message["type"] in types:
            return message
        assert message["type"] in ("ping", "user_joined", "user_left"), message


def _limited(make_server: Callable[..., Server], burst: int, rate: str = "0.001") -> Server:
    return make_server(
        "--message-rate", rate, "--message-burst", str(burst), "--rate-limit-refusals", "0"
    )


def test_each_continuation_costs_a_token(make_server: Callable[..., Server]) -> None:
    """A message in three frames costs three tokens of five: two whole
    messages pass after it, the third is refused (it cost one token before,
    and all three passed)."""
    server = _limited(make_server, burst=5)
    sender = _open(server)
    watcher = server.client()
    try:
        sender.send(_fragments(b"a", b"b", b"c"))
        assert watcher.recv_type("message")["content"] == "abc"
        for n in (1, 2, 3):
            sender.send_text(f"m{n}")
        error = _next_json(sender, "error")
        assert error["code"] == "rate_limited", error
        assert [watcher.recv_type("message")["content"] for _ in range(2)] == ["m1", "m2"]
    finally:
        sender.close()
        watcher.close()


def test_a_ping_inside_a_fragmented_message_costs_a_token(
    make_server: Callable[..., Server],
) -> None:
    """First frame, Ping, last frame: three tokens of four; one whole message
    passes after it and the next is refused."""
    server = _limited(make_server, burst=4)
    sender = _open(server)
    watcher = server.client()
    try:
        message = _fragments(b"a", b"b")
        first_end = len(encode_frame(TEXT, b"a"))  # the same length, fin or not
        sender.send(message[:first_end] + encode_frame(PING, b"p") + message[first_end:])
        assert watcher.recv_type("message")["content"] == "ab"
        sender.send_text("m1")
        sender.send_text("m2")
        assert _next_json(sender, "error")["code"] == "rate_limited"
        assert watcher.recv_type("message")["content"] == "m1"
    finally:
        sender.close()
        watcher.close()


def test_a_refusal_mid_message_drops_it_whole_with_one_error(
    make_server: Callable[..., Server],
) -> None:
    """Five frames against a burst of three: the fourth is over the budget,
    so the message is dropped as a whole (no part of it reaches anyone), one
    rate_limited answers it, and the next message arrives intact."""
    server = _limited(make_server, burst=3, rate="5")
    sender = _open(server)
    watcher = server.client()
    try:
        sender.send(_fragments(b"a", b"b", b"c", b"d", b"e"))
        assert _next_json(sender, "error")["code"] == "rate_limited"

        refused = [0]

        def broadcast_passes() -> bool:
            # Until a token has come back: each refusal is answered, one each.
            sender.send_text(json.dumps({"type": "broadcast", "content": "after"}))
            answer = _next_json(sender, "error", "broadcast")
            if answer["type"] == "error":
                assert answer["code"] == "rate_limited", answer
                refused[0] += 1
                return False
            assert answer["content"] == "after"
            return True

        wait_until(broadcast_passes, "a token back", interval=0.1)
        # One refusal for the five-frame message, one per refused broadcast.
        assert server.metric("wshub_rate_limited_total") == 1 + refused[0]
        # The watcher's first relay is the broadcast: nothing of the dropped message.
        assert watcher.recv_type("message", "broadcast")["content"] == "after"
    finally:
        sender.close()
        watcher.close()
