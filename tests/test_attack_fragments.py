"""Attacks with fragmented messages (decisions.md 8, 18): what the frames of
a message cost.

A message is bounded at ``--max-message-frames`` frames (4,096 by default),
and the rate limit charged its first frame only. So a client that sends
messages of 4,096 frames at 19 a second, inside the message budget, made the
server parse ~78,000 frames a second: 38-45 % of a core for one client (three
such clients took the whole core). Every frame costs a token now, continuations
too (decisions.md 8; the audit-proto round's change, 04fd84b): this is the
attack as a CPU flood, to keep it closed. Each test runs a real server over loopback sockets; with
``-s`` the figures quoted in docs/reliability.md are printed on ``[figure]``
lines.
"""

from __future__ import annotations

import os
import threading
import time

from .conftest import TIMEOUT
from .rawws import RawClient, encode_frame


def figure(text: str) -> None:
    print(f"[figure] {text}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fragmented(frames: int, last: bytes = b"x") -> bytes:
    """One text message of *frames* frames: all empty but the last."""
    return (
        encode_frame(0x1, b"", fin=False)
        + encode_frame(0x0, b"", fin=False) * (frames - 2)
        + encode_frame(0x0, last, fin=True)
    )


def test_messages_of_many_frames_inside_the_message_budget_are_limited(make_server) -> None:
    """Messages of 4,096 frames (the frame bound) at 19 a second, under the
    default 20/s of messages. Before: every one delivered, never refused, the
    server at 38-45 % of a core. After: none delivered (a message in more
    frames than the burst never passes), ``rate_limited`` for each, then 1008
    within a second."""
    srv = make_server()
    watcher = srv.client()
    client, status, _ = RawClient.open(srv.host, srv.port)
    assert status == 101
    client.recv_frame()  # the welcome
    message = fragmented(4096)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 3 * TIMEOUT:
            try:
                client.send(message)
            except OSError:
                return  # closed by the server
            sent[0] += 1
            # Paced inside the message budget: 19 messages a second.
            stop.wait(max(0.0, started + sent[0] / 19 - time.monotonic()))

    cpu_before = cpu_seconds(srv.proc.pid)
    started = time.monotonic()
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    errors = 0
    try:
        while True:
            opcode, payload, _ = client.recv_frame()
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
                break
            if b'"rate_limited"' in payload:
                errors += 1
    finally:
        stop.set()
        sender.join(TIMEOUT)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(srv.proc.pid) - cpu_before
    delivered = 0
    while True:
        got = watcher.recv_type("message", "user_left")
        if got["type"] == "user_left":
            break
        assert got["content"] == "x"
        delivered += 1
    figure(
        f"4,096-frame messages at 19/s: closed {code} after {elapsed:.2f} s, {sent[0]} sent, "
        f"{delivered} delivered, {errors} rate_limited; server CPU {cpu:.2f} s"
    )
    assert code == 1008
    assert delivered == 0
    assert errors >= 1
    assert elapsed < 2 * TIMEOUT
    client.close()
    watcher.close()
