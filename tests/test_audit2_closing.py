"""A client that sends its Close and then more data (RFC 6455 5.5.1: it must
not, and the data is ignored): the server's Close and a FIN reach it, never a
reset (second audit pass)."""

from __future__ import annotations

import json
import struct

import pytest

from .conftest import TIMEOUT, Server
from .rawws import Closed, RawClient, encode_frame


def _open(server: Server) -> RawClient:
    client, status, _ = RawClient.open(server.host, server.port)
    assert status == 101
    assert json.loads(client.recv_frame()[1])["type"] == "welcome"
    return client


@pytest.mark.parametrize("after", [1, 50, 200], ids=["1 frame", "50 KB", "200 KB"])
@pytest.mark.parametrize("together", [True, False], ids=["one write", "two writes"])
def test_data_after_close_gets_the_close_and_a_fin_not_a_reset(
    server: Server, after: int, together: bool
) -> None:
    client = _open(server)
    watcher = server.client()
    try:
        close = encode_frame(0x8, struct.pack("!H", 1000) + b"bye")
        data = b"".join(encode_frame(0x1, b"x" * 1000) for _ in range(after))
        if together:
            client.send(close + data)
        else:
            client.send(close)
            client.send(data)
        frames = []
        client.sock.settimeout(TIMEOUT)
        try:
            while True:  # until EOF: a reset raises ConnectionResetError here
                frames.append(client.recv_frame()[:2])
        except Closed:
            pass
        assert frames and frames[-1][0] == 0x8, frames
        assert struct.unpack("!H", frames[-1][1][:2])[0] == 1000
        assert [op for op, _ in frames].count(0x8) == 1, frames
        # The data after the Close was ignored: the other client saw none of it.
        watcher.send({"type": "ping"})
        assert watcher.recv_type("pong", "message")["type"] == "pong"
    finally:
        client.close()
        watcher.close()
