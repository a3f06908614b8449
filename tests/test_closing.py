"""How a connection ends: the client reads our Close frame, and only whole
frames keep a connection alive (decisions.md 6).

* A connection the server fails (1009, 1002, ...) while its client is still
  sending must not end in a TCP reset: closing a socket with unread input
  makes the kernel send RST, and the client's ``send`` then fails with
  ECONNRESET before it reads the Close frame.
* A client that trickles the bytes of a frame it never finishes is closed by
  the heartbeat like a silent one.
"""

from __future__ import annotations

import struct
import time

import pytest

from .conftest import TIMEOUT
from .rawws import encode_frame
from .test_bad_input import open_raw

OVER_LIMIT = 8 * 1024 * 1024
"""Far more than the kernel's buffers on both sides hold (a few MiB at most on
loopback), so the client is still sending when the server fails it."""


def test_an_over_limit_frame_still_being_sent_gets_1009_not_a_reset(make_server) -> None:
    srv = make_server("--ip-connect-rate", "0", "--max-connections-per-ip", "0")
    payload = b"x" * OVER_LIMIT
    for attempt in range(20):
        raw, _ = open_raw(srv)
        try:
            # Header first: the server fails the connection on the announced
            # length, while the 8 MiB of payload are still to come.
            raw.send(encode_frame(0x1, payload))
            code, reason = raw.recv_close()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise AssertionError(f"attempt {attempt}: {exc!r} before the Close frame") from None
        finally:
            raw.close()
        assert code == 1009, (attempt, code, reason)


@pytest.mark.parametrize(
    ("code", "first"),
    [
        (1002, encode_frame(0x1, b"x", rsv=1)),  # a reserved bit without an extension
        (1007, encode_frame(0x1, b"\xff", fin=False)),  # invalid UTF-8, caught per fragment
    ],
    ids=["1002", "1007"],
)
def test_a_failure_while_the_client_still_sends_gets_its_close_not_a_reset(
    make_server, code: int, first: bytes
) -> None:
    srv = make_server("--ip-connect-rate", "0", "--max-connections-per-ip", "0")
    # What follows the bad frame: continuations, 8 MiB in all.
    rest = encode_frame(0x0, b"y" * 60000, fin=False) * (OVER_LIMIT // 60000)
    for attempt in range(5):
        raw, _ = open_raw(srv)
        try:
            raw.send(first + rest)
            got, reason = raw.recv_close()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise AssertionError(f"attempt {attempt}: {exc!r} before the Close frame") from None
        finally:
            raw.close()
        assert got == code, (attempt, got, reason)


def test_a_client_that_keeps_sending_after_1009_is_dropped_at_the_close_timeout(
    make_server,
) -> None:
    """Its bytes are read and dropped, not kept; the socket goes at --close-timeout."""
    srv = make_server("--close-timeout", "1")
    raw, _ = open_raw(srv)
    raw.send(encode_frame(0x1, b"", length=OVER_LIMIT))
    assert raw.recv_close()[0] == 1009
    start = time.monotonic()
    chunk = b"y" * 65536
    raw.sock.settimeout(TIMEOUT)
    try:
        while time.monotonic() - start < 3 * TIMEOUT:
            raw.sock.sendall(chunk)
    except (ConnectionResetError, BrokenPipeError):
        elapsed = time.monotonic() - start
    else:
        raise AssertionError("the server kept reading a flood after its Close for 3 x TIMEOUT")
    finally:
        raw.close()
    assert 0.5 < elapsed < 1 + TIMEOUT, elapsed
    srv.wait_for(lambda: srv.stats()["connections"]["closing"] == 0, "the socket to be gone")


def test_a_flood_closed_1008_gets_its_close_and_a_prompt_tcp_close(make_server) -> None:
    """What it floods after our Close is dropped unparsed, so its answer to our
    Close is lost in it: a FIN after our Close ends the connection, long before
    --close-timeout, and without a reset."""
    srv = make_server(
        "--message-rate",
        "1",
        "--message-burst",
        "1",
        "--rate-limit-refusals",
        "2",
        "--close-timeout",
        str(3 * TIMEOUT),
    )
    raw, _ = open_raw(srv)
    frame = encode_frame(0x1, b'{"type":"message","content":"' + b"f" * 200 + b'"}')
    raw.send(frame * 4000)  # ~900 KB: most of it arrives after the 1008
    code, reason = raw.recv_close()
    assert code == 1008, (code, reason)
    start = time.monotonic()
    try:
        while raw.sock.recv(65536):  # the FIN that follows our Close
            pass
    finally:
        raw.close()
    assert time.monotonic() - start < TIMEOUT
    srv.wait_for(lambda: srv.stats()["connections"]["closing"] == 0, "the socket to be gone")


HEARTBEAT = ("--heartbeat-interval", "1", "--heartbeat-timeout", "3")


def test_a_client_trickling_an_unfinished_frame_gets_1011(make_server) -> None:
    """1 byte every 0.5 s of a frame it never finishes: not a sign of life."""
    srv = make_server(*HEARTBEAT)
    raw, _ = open_raw(srv)
    frame = encode_frame(0x1, b"x" * 1000)  # 1,006 bytes: 500 s at this pace
    raw.sock.settimeout(0.5)  # the pace of the trickle, and the wait for the Close
    start = time.monotonic()
    closed: tuple[int, str] | None = None
    try:
        for byte in frame:
            assert time.monotonic() - start < 3 + 2 * TIMEOUT, "never closed"
            raw.send(bytes((byte,)))
            try:
                opcode, payload, _ = raw.recv_frame()
            except TimeoutError:
                continue
            if opcode == 0x8:
                closed = struct.unpack("!H", payload[:2])[0], payload[2:].decode()
                break
    finally:
        raw.close()
    assert closed == (1011, "heartbeat timeout")
    assert time.monotonic() - start > 2.5  # the heartbeat's, not a failure of the frame


def test_a_client_that_only_answers_pings_with_pongs_stays_open(make_server) -> None:
    srv = make_server(*HEARTBEAT)
    raw, _ = open_raw(srv)
    deadline = time.monotonic() + 5
    pongs = 0
    try:
        raw.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                opcode, payload, _ = raw.recv_frame()
            except TimeoutError:
                continue
            assert opcode != 0x8, "closed although the client answered every Ping"
            if opcode == 0x9:
                raw.send_frame(0xA, payload)
                pongs += 1
    finally:
        raw.close()
    assert pongs >= 3


def test_a_frame_sent_in_pieces_within_the_timeout_keeps_the_client(make_server) -> None:
    """Parts of a frame that does complete: its completion is the sign of life."""
    srv = make_server(*HEARTBEAT)
    raw, _ = open_raw(srv)
    deadline = time.monotonic() + 5
    try:
        raw.sock.settimeout(0.25)
        while time.monotonic() < deadline:
            # A Pong in two halves, a read apart (the server parses each
            # half on its own): unsolicited Pongs are allowed (RFC 6455 5.5.3).
            frame = encode_frame(0xA, b"still here")
            raw.send(frame[:5])
            try:
                opcode, _, _ = raw.recv_frame()
                assert opcode != 0x8, "closed although its frames completed"
            except TimeoutError:
                pass
            raw.send(frame[5:])
    finally:
        raw.close()
