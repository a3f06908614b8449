"""How a connection ends: the client reads our Close frame.

* A connection the server fails (1009, 1002, ...) while its client is still
  sending must not end in a TCP reset: closing a socket with unread input
  makes the kernel send RST, and the client's ``send`` then fails with
  ECONNRESET before it reads the Close frame.
"""

from __future__ import annotations

import time

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
