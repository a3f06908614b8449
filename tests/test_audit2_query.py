"""since / history values over a real socket (decisions.md 13, 19): an INTEGER
has one spelling (JSON's: no sign, no leading zero, no white space); anything
else is 400 before the upgrade. A large one parses: past the history, it
recovers nothing (recovered: false), and history= is capped."""

from __future__ import annotations

import json

import pytest

from .conftest import Server
from .rawws import RawClient

BAD = [
    "since=e:01",
    "since=e:00",
    "since=e:+1",
    "since=e:%2B1",
    "since=e:%201",
    "since=e:1%20",
    "since=e:1&since=e:1",
    "since=e:1&since=e:2",
    "history=01",
    "history=00",
    "history=+1",
    "history=%2B1",
    "history=%201",
    "history=1%20",
    "history=1&history=1",
    "history=1&history=2",
]


@pytest.mark.parametrize("query", BAD)
def test_a_value_that_is_not_an_integer_is_400_before_the_upgrade(
    server: Server, query: str
) -> None:
    client, status, head = RawClient.open(server.host, server.port, path=f"/websocket?{query}")
    client.close()
    assert status == 400, head


@pytest.mark.parametrize(
    ("query", "recovered"),
    [
        ("since=e:0", False),  # an unknown epoch: recovered false, not 400
        ("since=e:9223372036854775807", False),  # 2**63 - 1: a number, past the history
        ("history=0", None),
        ("history=9223372036854775807", None),  # capped at the history size
        ("since=e:9223372036854775808", False),  # 2**63: an integer all the same
        ("since=e:99999999999999999999999", False),
        ("history=9223372036854775808", None),
        ("history=99999999999999999999999", None),
    ],
)
def test_the_edges_that_parse_are_upgraded(
    server: Server, query: str, recovered: bool | None
) -> None:
    client, status, head = RawClient.open(server.host, server.port, path=f"/websocket?{query}")
    try:
        assert status == 101, head
        welcome = json.loads(client.recv_frame()[1])
        assert welcome["type"] == "welcome"
        assert welcome.get("recovered") is recovered
    finally:
        client.close()
