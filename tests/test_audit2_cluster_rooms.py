"""Cluster rooms at the edges an operator or an attacker reaches (decisions.md
9 and 12): real ``wshub serve`` nodes on a real redis-server, clients over
real sockets. Not covered by tests/test_cluster*.py before: a room emptied on
one node and joined again within the unsubscribe grace, and a node killed
while it holds hundreds of connections in dozens of rooms.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from wshub.node import ROOM_GRACE

from .conftest import TIMEOUT, Client, RedisServer
from .test_cluster import FAST_REAP, cluster
from .test_cluster_rooms import count
from .waiting import wait_until


def quiet(client: Client) -> list[dict]:
    """What *client* got before the answer to a ping of its own, pings aside."""
    client.send({"type": "ping"})
    frames = []
    while (frame := client.recv())["type"] != "pong":
        if frame["type"] != "ping":
            frames.append(frame)
    return frames


def past_the_grace(emptied: float) -> None:
    # Not an event: the grace is a timer on the node, and nothing says it ran.
    wait_until(
        lambda: time.monotonic() - emptied > ROOM_GRACE + 0.5, "the grace", timeout=ROOM_GRACE + 2
    )


def test_a_room_emptied_and_joined_again_within_the_grace_keeps_its_cluster_view(
    make_server, redis_server: RedisServer
) -> None:
    """The last member on node A leaves; a new one comes within the grace (the
    node kept the room's subscription) and another after the grace ran out
    (the node subscribed again): each time the newcomer is counted with the
    room's members on B, B's member hears each join and leave once, and the
    traffic from B reaches the newcomer."""
    a_srv, b_srv = cluster(make_server, redis_server, 2, "--history-size", "0")
    far = b_srv.client("g")
    for round_ in ("within the grace", "after the grace"):
        first = a_srv.client("g")
        assert far.recv_type("user_joined")["connectionId"] == first.id
        first.close()
        assert far.recv_type("user_left")["connectionId"] == first.id
        emptied = time.monotonic()
        if round_ == "after the grace":
            past_the_grace(emptied)
        again = a_srv.client("g")
        assert again.welcome["connectionCount"] == 2, round_
        assert far.recv_type("user_joined")["connectionId"] == again.id
        # Past the grace of the first emptying: the node did not drop the room
        # under its new member.
        past_the_grace(emptied)
        far.send({"type": "broadcast", "content": round_})
        assert again.recv_type("broadcast")["content"] == round_
        assert far.recv_type("broadcast")["content"] == round_  # its own comes back
        assert count(again) == 2 and count(far) == 2
        again.close()
        assert far.recv_type("user_left")["connectionId"] == again.id
    assert [f for f in quiet(far) if f["type"] in ("user_joined", "user_left")] == []
    far.close()


def test_a_node_killed_with_500_connections_in_50_rooms_tells_each_room_its_own(
    make_server, redis_server: RedisServer
) -> None:
    a_srv, c_srv = cluster(make_server, redis_server, 2, "--history-size", "0", *FAST_REAP)
    rooms = [f"k{i}" for i in range(50)]
    watchers = {room: a_srv.client(room) for room in rooms}
    with ThreadPoolExecutor(8) as pool:
        doomed_clients = list(pool.map(lambda i: c_srv.client(rooms[i % 50]), range(500)))
    doomed: dict[str, set[str]] = {room: set() for room in rooms}
    for i, client in enumerate(doomed_clients):
        doomed[rooms[i % 50]].add(client.id)
    a_srv.wait_for(lambda: a_srv.stats()["connections"]["cluster"] == 550, "550 in the cluster")
    for room, watcher in watchers.items():
        joined = {watcher.recv_type("user_joined")["connectionId"] for _ in range(10)}
        assert joined == doomed[room]
    c_srv.proc.kill()
    c_srv.proc.wait()
    for room, watcher in watchers.items():
        left = [watcher.recv_type("user_left", timeout=2 + TIMEOUT) for _ in range(10)]
        assert sorted(f["connectionId"] for f in left) == sorted(doomed[room]), room
        assert left[-1]["totalUsers"] == 1
    for room, watcher in watchers.items():
        assert [f for f in quiet(watcher) if f["type"] == "user_left"] == [], room
        assert count(watcher) == 1
    assert a_srv.stats()["connections"]["cluster"] == 50
    for client in doomed_clients:
        client.close()  # their node is gone: only the client side to free
    for watcher in watchers.values():
        watcher.close()
