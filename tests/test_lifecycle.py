"""Heartbeat, rate limits, slow consumers, compression and shutdown, for real."""

from __future__ import annotations

import json
import signal
import time

import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Server
from .rawws import RawClient


def open_raw(server: Server, **kwargs: object) -> tuple[RawClient, str]:
    raw, status, _ = RawClient.open(server.host, server.port, **kwargs)  # type: ignore[arg-type]
    assert status == 101
    opcode, payload, _ = raw.recv_frame()
    welcome = json.loads(payload)
    assert opcode == 0x1 and welcome["type"] == "welcome"
    return raw, welcome["connectionId"]


def test_heartbeat_sends_json_ping_and_protocol_ping(make_server) -> None:
    """Every interval: a JSON ping with integer ms and a protocol Ping frame."""
    srv = make_server("--heartbeat-interval", "0.2", "--heartbeat-timeout", "5")
    raw, _ = open_raw(srv)
    seen: dict[str, object] = {}
    while len(seen) < 2:
        opcode, payload, _ = raw.recv_frame()
        if opcode == 0x1:
            message = json.loads(payload)
            assert message["type"] == "ping" and isinstance(message["timestamp"], int)
            seen["json"] = message
        elif opcode == 0x9:
            seen["protocol"] = payload
    raw.close()


def test_heartbeat_timeout_closes_1011_and_announces_left(make_server) -> None:
    """A client silent past --heartbeat-timeout is closed with 1011, once."""
    srv = make_server("--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.6")
    watcher = srv.client()  # the sync client answers protocol Pings: stays alive
    raw, raw_id = open_raw(srv)
    start = time.monotonic()
    code, reason = raw.recv_close()  # never answers anything
    elapsed = time.monotonic() - start
    assert (code, reason) == (1011, "heartbeat timeout")
    assert 0.5 < elapsed < 0.6 + TIMEOUT / 2
    assert watcher.recv_type("user_left")["connectionId"] == raw_id
    # The watcher is still there, alive thanks to its Pong replies.
    watcher.roundtrip()
    assert srv.stats()["connections"]["node"] == 1
    raw.close()
    watcher.close()


def test_any_frame_is_a_sign_of_life(make_server) -> None:
    """A client that only sends JSON pongs (or anything) is not timed out."""
    srv = make_server("--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.6")
    raw, _ = open_raw(srv)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        opcode, payload, _ = raw.recv_frame()
        if opcode == 0x1 and json.loads(payload)["type"] == "ping":
            raw.send_text('{"type":"pong"}')
        assert opcode != 0x8, "closed although the client answered"
    raw.close()


def test_rate_limit_refuses_then_closes_1008(make_server) -> None:
    """Over the bucket: error rate_limited and nothing relayed; persisting: 1008."""
    srv = make_server(
        "--message-rate",
        "1",
        "--message-burst",
        "3",
        "--rate-limit-refusals",
        "4",
        "--rate-limit-window",
        "60",
    )
    a = srv.client()
    b = srv.client()
    for i in range(3):
        a.send({"type": "message", "content": f"m{i}"})
    for i in range(3):
        assert b.recv_type("message")["content"] == f"m{i}"
    a.send({"type": "message", "content": "over"})
    assert a.recv_type("error")["code"] == "rate_limited"
    for _ in range(3):
        a.send({"type": "message", "content": "over"})
    with pytest.raises(ConnectionClosed) as info:
        while True:
            message = a.recv()
            assert message["type"] == "error" and message["code"] == "rate_limited"
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert b.recv_type("user_left")["connectionId"] == a.id  # "over" was never relayed
    assert srv.metric("wshub_rate_limited_total") == 4
    b.close()


def test_slow_consumer_is_closed_and_others_get_everything(make_server) -> None:
    """A client that never reads is closed with 1008 once its buffer overflows;
    the others receive every message in order, and memory stays bounded."""
    srv = make_server(
        "--send-buffer-limit", "65536", "--close-timeout", "0.5", "--message-rate", "0"
    )
    sender = srv.client()
    reader = srv.client()
    stalled, stalled_id = open_raw(srv, rcvbuf=4096)
    content = "x" * 900
    count = 2000  # ~1.9 MB per recipient: past 64 KiB plus what the kernel buffers
    received: list[int] = []

    def read_up_to(sent: int) -> None:
        while len(received) < sent:
            message = reader.recv_type("message", "user_left")
            if message["type"] == "user_left":
                assert message["connectionId"] == stalled_id
                continue
            received.append(int(message["content"][:4]))

    for i in range(count):
        sender.send({"type": "message", "content": f"{i:04d}{content}"})
        if i % 50 == 49:
            sender.roundtrip()  # keep our own send side flowing
            # The reader keeps up, in steps of ~47 KB: under the 64 KiB limit
            # even with nothing in the kernel's buffers, so that a busy machine
            # slowing this process's reader thread cannot make it the slow one.
            read_up_to(i + 1)
    read_up_to(count)
    assert received == list(range(count))
    srv.wait_for(lambda: srv.metric("wshub_slow_consumer_closes_total") == 1, "slow close")
    srv.wait_for(lambda: srv.stats()["connections"]["closing"] == 0, "socket dropped")
    assert srv.stats()["connections"]["node"] == 2
    stalled.close()
    sender.close()
    reader.close()


def test_compression_negotiated_and_delivered(make_server) -> None:
    """With --compression on, clients negotiate permessage-deflate and large
    messages arrive intact (compressed once, for every recipient)."""
    srv = make_server("--compression", "on")
    a = srv.client()
    b = srv.client(compression=None)  # one without compression in the same fan-out
    c = srv.client()
    assert a.ws.response.headers.get("Sec-WebSocket-Extensions", "").startswith(
        "permessage-deflate"
    )
    assert "Sec-WebSocket-Extensions" not in b.ws.response.headers
    big = "compress me " * 80
    a.send({"type": "broadcast", "content": big})
    for client in (a, b, c):
        assert client.recv_type("broadcast")["content"] == big
    c.send({"type": "message", "content": "small"})
    assert a.recv_type("message")["content"] == "small"
    for client in (a, b, c):
        client.close()


@pytest.mark.parametrize("direct_send", ["on", "off"])
def test_compressed_recipients_are_sent_directly(make_server, direct_send: str) -> None:
    """Clients with permessage-deflate get the compressed copy from the same
    direct-send call as each other (one per window size), or, with
    --direct-send off, through their transports; the bytes are the same."""
    srv = make_server("--compression", "on", "--direct-send", direct_send)
    a = srv.client()
    c = srv.client()
    assert a.recv_type("user_joined")["connectionId"] == c.id  # presence settled
    before = srv.metric("wshub_direct_sends_total")
    big = "compress me " * 80
    a.send({"type": "broadcast", "content": big})
    for client in (a, c):
        assert client.recv_type("broadcast")["content"] == big
    sent = srv.metric("wshub_direct_sends_total") - before
    assert sent == (2 if direct_send == "on" else 0)
    a.close()
    c.close()


def test_compressed_frame_is_rsv1(make_server) -> None:
    """A large server frame to a deflate client is compressed (RSV1 set) and
    decompresses to the message; a small one goes uncompressed."""
    import zlib

    srv = make_server("--compression", "on")
    raw, status, head = RawClient.open(
        srv.host, srv.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"}
    )
    assert status == 101 and b"server_no_context_takeover" in head
    opcode, payload, rsv1 = raw.recv_frame()  # welcome: small, plain
    assert not rsv1 and json.loads(payload)["type"] == "welcome"
    sender = srv.client()
    sender.send({"type": "broadcast", "content": "z" * 500})
    while True:
        opcode, payload, rsv1 = raw.recv_frame()
        if rsv1:
            break
    text = zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")
    assert json.loads(text)["content"] == "z" * 500
    raw.close()
    sender.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_closes_clients_1001_within_drain_timeout(make_server, sig) -> None:
    """SIGTERM/SIGINT: stop accepting, close every client with 1001, exit in time."""
    srv = make_server("--drain-timeout", "1")
    clients = [srv.client() for _ in range(5)]
    raw, _ = open_raw(srv)  # one that never answers the Close
    start = time.monotonic()
    srv.proc.send_signal(sig)
    for client in clients:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                client.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert raw.recv_close()[0] == 1001
    assert srv.proc.wait(timeout=TIMEOUT) == 0
    assert time.monotonic() - start < 1 + 1
    raw.close()
