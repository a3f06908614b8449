"""The join query of a room over a real socket (decisions.md 1, 13, 19): a
query string is ignored except for since, history and previous, however many
other parameters it holds; those three are read wherever they stand in it."""

from __future__ import annotations

import json

from .conftest import Server
from .rawws import RawClient

OTHERS = "&".join(f"utm_{i}=x" for i in range(150))  # a long tracking query, ~1.5 KB


def open_status(server: Server, path: str) -> tuple[RawClient, int, bytes]:
    return RawClient.open(server.host, server.port, path=path)


def test_many_other_parameters_are_ignored(server: Server) -> None:
    """150 parameters none of which is named in decisions.md 13 or 15: the
    upgrade goes through, as with one (a 400 "too many query parameters"
    before)."""
    client, status, head = open_status(server, f"/websocket/utm?{OTHERS}")
    try:
        assert status == 101, head
        welcome = json.loads(client.recv_frame()[1])
        assert welcome["type"] == "welcome" and welcome["room"] == "utm"
    finally:
        client.close()


def test_the_named_parameters_count_after_many_others(server: Server) -> None:
    """since after 150 other parameters is read: recovered at the top; a bad
    one there is still a 400."""
    first = server.client("utm-since")
    epoch, top = first.welcome["epoch"], first.welcome["offset"]
    client, status, head = open_status(server, f"/websocket/utm-since?{OTHERS}&since={epoch}:{top}")
    try:
        assert status == 101, head
        welcome = json.loads(client.recv_frame()[1])
        assert welcome["recovered"] is True and welcome["missed"] == 0
    finally:
        client.close()
        first.close()
    client, status, head = open_status(server, f"/websocket/utm-since?{OTHERS}&since=bad")
    client.close()
    assert status == 400, head
