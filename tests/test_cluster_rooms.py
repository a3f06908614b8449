"""Rooms in a cluster (decisions.md 12): one backplane channel per room.

Several ``wshub serve`` processes on one redis-server: a room's traffic,
counts and departures reach the nodes with members in it, and only them.
"""

from __future__ import annotations

import time

from .conftest import TIMEOUT, Client, Server
from .test_cluster import FAST_REAP, cluster


def received(srv: Server) -> float:
    return srv.metric("wshub_backplane_received_total")


def test_a_room_spans_nodes_and_stays_apart(make_server, redis_server) -> None:
    """Members of a room on two nodes see one hub: counts, presence, messages;
    the other rooms and the default room on those nodes see none of it."""
    a_srv, b_srv = cluster(make_server, redis_server, 2)
    x = a_srv.client("r1")
    seed = a_srv.client()
    y = b_srv.client("r1")  # its welcome counts x, read from the room's presence
    assert y.welcome["connectionCount"] == 2 and y.welcome["room"] == "r1"
    joined = x.recv_type("user_joined")
    assert joined["connectionId"] == y.id and joined["totalUsers"] == 2
    z = b_srv.client("r2")
    assert z.welcome["connectionCount"] == 1
    x.send({"type": "message", "content": "r1 from a"})
    got = y.recv_type("message")
    assert got["content"] == "r1 from a" and got["connectionId"] == x.id
    y.send({"type": "broadcast", "content": "r1 from b"})
    for client in (x, y):
        assert client.recv_type("broadcast")["content"] == "r1 from b"
    z.send({"type": "user_info"})
    info = z.recv_type("user_info_response")
    assert info["room"] == "r2" and info["connectionCount"] == 1
    y.close()
    left = x.recv_type("user_left")
    assert left["connectionId"] == y.id and left["totalUsers"] == 1
    for client in (seed, z, x):  # nothing else reached them
        client.send({"type": "ping"})
        assert client.recv()["type"] == "pong"
    for client in (x, seed, z):
        client.close()


def test_a_node_without_members_in_a_room_receives_none_of_its_traffic(
    make_server, redis_server
) -> None:
    """A room on nodes A and C costs nothing on node B: B's count of envelopes
    received over Redis moves only for the room it has a member in."""
    a_srv, b_srv, c_srv = cluster(make_server, redis_server, 3)
    talker, listener = a_srv.client("busy"), c_srv.client("busy")
    quiet_a, quiet_b = a_srv.client("quiet"), b_srv.client("quiet")
    talker.recv_type("user_joined")
    quiet_a.recv_type("user_joined")
    before_b, before_c = received(b_srv), received(c_srv)
    for i in range(50):
        talker.send({"type": "message", "content": f"m{i}"})
    got = [listener.recv_type("message")["content"] for _ in range(50)]
    assert got == [f"m{i}" for i in range(50)]
    # One message in B's room, sent after the others by the same node: once
    # B has it, the busy room's traffic had its chance to arrive too.
    quiet_a.send({"type": "message", "content": "for b"})
    assert quiet_b.recv_type("message")["content"] == "for b"
    b_srv.wait_for(lambda: received(b_srv) >= before_b + 1, "B's counter to move")
    assert received(b_srv) == before_b + 1
    assert received(c_srv) == before_c + 50
    for client in (talker, listener, quiet_a, quiet_b):
        client.close()


def test_a_killed_nodes_departures_are_announced_per_room_once(make_server, redis_server) -> None:
    """kill -9 of a node with members in three rooms: each survivor's member
    hears user_left once for each doomed connection of its own room, and of no
    other room; counts heal."""
    a_srv, b_srv, c_srv = cluster(make_server, redis_server, 3, *FAST_REAP)
    a1, a2, b1 = a_srv.client("r1"), a_srv.client("r2"), b_srv.client("r1")
    doomed = {
        "r1": [c_srv.client("r1") for _ in range(2)],
        "r2": [c_srv.client("r2")],
        "r3": [c_srv.client("r3")],
    }
    for watcher, srv, total in ((a1, a_srv, 4), (b1, b_srv, 4), (a2, a_srv, 2)):
        srv.wait_for(lambda w=watcher, n=total: count(w) == n, "the room's count")
    start = time.monotonic()
    c_srv.proc.kill()
    c_srv.proc.wait()
    for watcher, room in ((a1, "r1"), (b1, "r1"), (a2, "r2")):
        expected = {d.id for d in doomed[room]}
        left: set[str] = set()
        while left != expected:
            message = watcher.recv_type("user_left", timeout=2 * 1 + TIMEOUT)
            assert message["connectionId"] in expected - left, (
                room,
                "announced twice or elsewhere",
            )
            left.add(message["connectionId"])
    assert time.monotonic() - start < 2 * 1 + 1.5
    assert count(a1) == 2 and count(b1) == 2 and count(a2) == 1
    for client in (a1, a2, b1):
        client.roundtrip()  # and nothing else was announced
        client.close()


def count(client: Client) -> int:
    """The room's count, as the client's node tells it."""
    client.send({"type": "user_info"})
    return int(client.recv_type("user_info_response")["connectionCount"])


def test_rooms_are_subscribed_again_after_a_redis_restart(make_server, own_redis) -> None:
    """After Redis comes back, a room's members on two nodes hear each other
    again. (History off: with it on, see test_cluster_recovery.py.)"""
    a_srv, b_srv = cluster(make_server, own_redis, 2, "--history-size", "0", *FAST_REAP)
    x, y = a_srv.client("room"), b_srv.client("room")
    x.recv_type("user_joined")
    own_redis.stop()
    a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 503, "readyz 503")
    own_redis.start()
    for srv in (a_srv, b_srv):
        # Each node must have seen the outage itself before its readiness
        # means anything: on a loaded machine /readyz may still say 200 from
        # before the node noticed, and a message sent then is lost (the node
        # is not subscribed to the new Redis yet; at most once).
        srv.wait_for(
            lambda srv=srv: (
                (srv.metric("wshub_backplane_reconnects_total") or 0) >= 1
                and srv.get("/readyz")[0] == 200
            ),
            "a reconnect, then readyz 200 again",
        )
    # The presence both nodes registered again: each counts the other's member.
    a_srv.wait_for(lambda: count(x) == 2, "x's count")
    b_srv.wait_for(lambda: count(y) == 2, "y's count")
    heard_after_restart(x, y, "after the restart")
    heard_after_restart(y, x, "and back")
    x.close()
    y.close()


def heard_after_restart(sender: Client, receiver: Client, text: str) -> None:
    """*receiver*, on the other node, hears the very first message *sender*
    sends once both nodes are subscribed again: nothing sent after the
    recovery is lost."""
    sender.send({"type": "message", "content": text})
    assert receiver.recv_type("message")["content"] == text
