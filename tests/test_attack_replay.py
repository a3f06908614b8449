"""Attacks on history replay (decisions.md 13, 18): what a join's replay may
hold of the node's memory.

A client that joins with ``?history=N`` or ``?since=`` is sent its welcome and
up to ``--history-size`` frames at once. Those were written straight to the
socket, outside the fan-out, so they were never counted toward the node's
``--send-buffer-total``: a client alone in its room, never reading, held its
whole replay uncounted for as long as it lived. Each test runs a real server
and attacks it over loopback sockets; with ``-s`` the figures quoted in
docs/reliability.md are printed on ``[figure]`` lines.
"""

from __future__ import annotations

import http.client
import json

import pytest

from .conftest import TIMEOUT, Server
from .loadtools import rss_kib
from .rawws import RawClient
from .waiting import wait_until

KEY = "attack-key"
OPEN = (
    "--ip-connect-rate",
    "0",
    "--max-connections-per-ip",
    "0",
    "--max-handshakes-per-ip",
    "0",
    "--message-rate",
    "0",
)
BIG = "\u0001" * 1000  # 1000 characters: ~6 KB per frame once JSON-escaped
TOTAL = 4 * 1024 * 1024


def figure(text: str) -> None:
    print(f"[figure] {text}")


def fill_history(srv: Server, rooms: list[str], content: str, n: int = 100) -> dict[str, str]:
    """*n* backend broadcasts of *content* into each room, on one kept-alive
    connection; returns each room's epoch."""
    api = http.client.HTTPConnection(srv.host, srv.port, timeout=TIMEOUT)
    body = {"content": content}
    epochs = {}
    for room in rooms:
        payload = json.dumps({**body, "room": room})
        for _ in range(n):
            api.request("POST", "/api/publish", payload, {"Authorization": f"Bearer {KEY}"})
            response = api.getresponse()
            assert response.status == 200
            epochs[room] = json.loads(response.read())["epoch"]
    api.close()
    return epochs


@pytest.mark.parametrize("join", ["history", "since"])
def test_replays_to_clients_that_never_read_count_toward_the_node_bound(
    make_server, join: str
) -> None:
    """40 clients, each alone in a room holding 100 frames of ~6 KB, join with
    ``?history=100`` (or recover all 100 with ``?since=EPOCH:0``) and never
    read (a 4 KiB receive window): ~22 MB of replay against a node bound of
    4 MiB. Before: nothing counted (gauge 0),
    nobody closed, server RSS +20 MiB. After: the biggest holders are closed
    1008 until the node is under its bound, and a client that reads, in
    another room, gets its whole replay and chats as before."""
    srv = make_server(*OPEN, "--api-keys", KEY, "--send-buffer-total", str(TOTAL))
    rooms = [f"r{i}" for i in range(40)]
    epochs = fill_history(srv, rooms, BIG)
    fill_history(srv, ["calm"], "hello", n=100)
    baseline = rss_kib(srv.proc.pid)

    attackers = []
    for room in rooms:
        query = "history=100" if join == "history" else f"since={epochs[room]}:0"
        client, status, _ = RawClient.open(
            srv.host, srv.port, path=f"/websocket/{room}?{query}", rcvbuf=4096
        )
        assert status == 101
        attackers.append(client)
    try:
        wait_until(
            lambda: srv.metric("wshub_slow_consumer_closes_total") >= 1,
            "the replays to count toward --send-buffer-total (some closed 1008)",
        )
        wait_until(
            lambda: srv.metric("wshub_send_buffered_bytes") <= TOTAL,
            "the node's unsent bytes to be under --send-buffer-total again",
        )
        grown = (rss_kib(srv.proc.pid) - baseline) / 1024
        closed = srv.metric("wshub_slow_consumer_closes_total")
        buffered = srv.metric("wshub_send_buffered_bytes")
        figure(
            f"40 non-readers with ?{join}= of 100 frames of 6 KB, --send-buffer-total 4 MiB: "
            f"{closed:.0f} closed 1008, {buffered / 1024:.0f} KiB counted, RSS +{grown:.1f} MiB"
        )
        assert srv.metric('wshub_closes_total{code="1008"}') == closed
        assert grown < TOTAL / 2**20 + 8, f"RSS grew {grown:.1f} MiB"

        # A client that reads, elsewhere, is not touched: its whole replay, then live traffic.
        ws = srv.connect("calm?history=100")
        welcome = json.loads(ws.recv(timeout=TIMEOUT))
        assert welcome["type"] == "welcome"
        replayed = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in range(100)]
        assert [m["offset"] for m in replayed] == list(range(1, 101))
        assert all(m["replayed"] is True and m["content"] == "hello" for m in replayed)
        other = srv.client("calm")
        other.send({"type": "message", "content": "after the attack"})
        message = json.loads(ws.recv(timeout=TIMEOUT))
        while message["type"] != "message":
            message = json.loads(ws.recv(timeout=TIMEOUT))
        assert message["content"] == "after the attack" and message["offset"] == 101
        other.close()
        ws.close()
    finally:
        for client in attackers:
            client.close()
