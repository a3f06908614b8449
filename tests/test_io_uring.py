"""--io-uring: the fan-out's direct sends through io_uring or send(2), end to end.

A server with many plain-socket clients in one room, each path in turn
(``auto``, ``off``, and ``auto`` where io_uring cannot be set up, forced by
the server's WSHUB_TEST_IO_URING_SETUP_FAILS): every client gets every
broadcast once and in order; a client whose socket is full (it does not
read, with a tiny receive window) gets every byte later, in order, from its
transport; a client that vanished with a RST between two broadcasts costs
nobody else a frame. /stats and /metrics say which path ran.
"""

from __future__ import annotations

import json
import socket
import struct

import pytest

from .conftest import Client, Server
from .rawws import RawClient

READERS = 70  # more than one chunk of the C call (64), and runs of >= 4 sends
BROADCASTS = 300  # ~300 KB: more than a stalled reader's socket holds (< 1 MiB)
CONTENT = "x" * 990  # with its number, just under the 1000 characters allowed


def open_reader(srv: Server, rcvbuf: int | None = None) -> RawClient:
    raw, status, _ = RawClient.open(srv.host, srv.port, rcvbuf=rcvbuf)
    assert status == 101
    opcode, payload, _ = raw.recv_frame()
    assert json.loads(payload)["type"] == "welcome"
    return raw


def broadcasts(raw: RawClient, count: int) -> list[str]:
    """The contents of the next *count* broadcasts, skipping presence and pings."""
    got: list[str] = []
    while len(got) < count:
        opcode, payload, _ = raw.recv_frame()
        assert opcode == 0x1, opcode
        message = json.loads(payload)
        if message["type"] == "broadcast":
            got.append(message["content"])
        else:
            assert message["type"] in ("user_joined", "user_left", "ping"), message
    return got


@pytest.mark.parametrize(
    "mode, setup_fails, path",
    [("auto", False, "io_uring"), ("off", False, "send"), ("auto", True, "send")],
    ids=["auto", "off", "auto-setup-fails"],
)
def test_every_client_gets_every_byte_in_order_on_each_path(
    make_server, mode: str, setup_fails: bool, path: str
) -> None:
    env = {"WSHUB_TEST_IO_URING_SETUP_FAILS": "1"} if setup_fails else {}
    srv = make_server(
        "--io-uring",
        mode,
        "--ip-connect-rate",
        "0",
        "--max-connections-per-ip",
        "0",
        "--message-rate",
        "0",
        env=env,
    )
    assert srv.stats()["sendPath"] == path
    assert srv.metric("wshub_direct_send_io_uring") == (1 if path == "io_uring" else 0)

    sender = srv.client()
    opened: list[RawClient] = []
    try:
        check_every_byte(srv, sender, opened, path)
    finally:
        for raw in opened:
            raw.close()
        sender.close()


def check_every_byte(srv: Server, sender: Client, opened: list[RawClient], path: str) -> None:
    def reader(rcvbuf: int | None = None) -> RawClient:
        opened.append(open_reader(srv, rcvbuf))
        return opened[-1]

    readers = [reader() for _ in range(READERS)]
    stalled = reader(rcvbuf=4096)  # never reads until the end
    vanishing = reader()
    srv.wait_for(lambda: srv.stats()["connections"]["open"] == READERS + 3, "every client admitted")
    before = srv.metric("wshub_direct_sends_total")

    expected = [f"{i:03d}{CONTENT}" for i in range(BROADCASTS)]
    half = BROADCASTS // 2
    for content in expected[:half]:
        sender.send({"type": "broadcast", "content": content})
    # A RST, no closing handshake: the server may still be sending to it.
    vanishing.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    vanishing.close()
    for content in expected[half:]:
        sender.send({"type": "broadcast", "content": content})

    # The stalled reader's transport holds what its socket could not take.
    srv.wait_for(lambda: srv.metric("wshub_send_buffered_bytes") > 0, "a full socket")
    for raw in readers:
        assert broadcasts(raw, BROADCASTS) == expected
    assert [sender.recv_type("broadcast")["content"] for _ in expected] == expected
    # Its socket took a few of them; its transport kept the rest for it.
    assert broadcasts(stalled, BROADCASTS) == expected

    # One write per pass carries all of its frames: at least a pass to each.
    assert srv.metric("wshub_direct_sends_total") - before >= READERS
    assert srv.stats()["sendPath"] == path


def test_direct_send_off_reports_the_transport_path(make_server) -> None:
    srv = make_server("--direct-send", "off")
    assert srv.stats()["sendPath"] == "transport"
    assert srv.metric("wshub_direct_send_io_uring") == 0
