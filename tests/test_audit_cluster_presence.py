"""Presence when Redis loses its data but the nodes do not lose their clients
(decisions.md 3 and 9: ``user_left`` exactly once per connection, when it
ends; the nodes re-register their presence): real ``wshub serve`` nodes on a
real redis-server, clients over real sockets.

Found by the cluster audit: a ``FLUSHALL`` left every node's registration
gone for good (its connection to Redis never dropped, so it never registered
again), and a Redis restarted empty let the first node back announce
``user_left`` for the clients of a node not back yet.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from wshub.backplane.presence import PresenceView

from .conftest import TIMEOUT, Client, RedisServer, Server
from .test_cluster import FAST_REAP, cluster
from .waiting import wait_until


def frames_until_pong(client: Client) -> list[dict]:
    """Everything the client gets before the answer to a ping of its own."""
    client.send({"type": "ping"})
    frames = []
    while (frame := client.recv())["type"] != "pong":
        frames.append(frame)
    return frames


def older_than_the_view_grace(since: float) -> None:
    # Not an event: a node's view keeps a connection that joined less than
    # this long ago whatever a snapshot says (it may have been read before the
    # join), so only an older connection can be announced as gone by mistake.
    grace = PresenceView().grace
    wait_until(lambda: time.monotonic() - since > grace, "the view's grace", timeout=grace + 1)


def registered(client: redis.Redis, prefix: str, srv: Server) -> bool:
    return client.sismember(f"{prefix}:nodes", srv.stats()["nodeId"]) == 1


def test_after_flushall_every_node_registers_again_and_no_one_is_announced_gone(
    make_server, redis_server: RedisServer
) -> None:
    a_srv, b_srv = cluster(make_server, redis_server, 2, "--history-size", "0", *FAST_REAP)
    prefix = a_srv.args[a_srv.args.index("--cluster-name") + 1]
    a, b = a_srv.client("room"), b_srv.client("room")
    assert a.recv_type("user_joined")["connectionId"] == b.id
    joined = time.monotonic()
    client = redis.Redis(port=redis_server.port)
    try:
        older_than_the_view_grace(joined)
        client.flushdb()
        wait_until(
            lambda: registered(client, prefix, a_srv) and registered(client, prefix, b_srv),
            "both nodes registered again",
        )
        assert client.hlen(f"{prefix}:presence:room") == 2
        for srv in (a_srv, b_srv):
            assert srv.stats()["connections"]["cluster"] == 2
        a.send({"type": "message", "content": "still here"})
        assert b.recv_type("message")["content"] == "still here"
        for watcher in (a, b):
            assert [f for f in frames_until_pong(watcher) if f["type"] != "ping"] == []
    finally:
        client.close()
    a.close()
    b.close()


def test_a_redis_restarted_empty_announces_no_one_gone_whose_node_is_not_back_yet(
    make_server, own_redis: RedisServer
) -> None:
    """B is stopped (SIGSTOP) across the restart, so A is back first for sure:
    B's client is still connected, A must not tell its clients it left."""
    a_srv, b_srv = cluster(make_server, own_redis, 2, "--history-size", "0", *FAST_REAP)
    a, b = a_srv.client(), b_srv.client()
    assert a.recv_type("user_joined")["connectionId"] == b.id
    older_than_the_view_grace(time.monotonic())
    b_srv.proc.send_signal(signal.SIGSTOP)
    try:
        own_redis.stop()
        a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 503, "A sees Redis down")
        own_redis.start()
        # /readyz is 200 once A registered again and read its rooms' presence.
        a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 200, "A back on Redis")
        assert [f for f in frames_until_pong(a) if f["type"] == "user_left"] == []
        assert a_srv.stats()["connections"]["cluster"] == 2
    finally:
        b_srv.proc.send_signal(signal.SIGCONT)
    b_srv.wait_for(lambda: b_srv.get("/readyz")[0] == 200, "B back on Redis")
    b.send({"type": "message", "content": "from b"})
    assert a.recv_type("message", timeout=TIMEOUT)["content"] == "from b"
    assert [json.dumps(f) for f in frames_until_pong(a) if f["type"] == "user_left"] == []
    a.close()
    b.close()


def test_a_node_stalled_past_the_ttl_asks_its_clients_to_reconnect(
    make_server, redis_server: RedisServer
) -> None:
    """A node frozen (SIGSTOP) for longer than the node TTL is reaped and its
    clients announced gone; when it runs again its Redis connection is still
    open, so only its lease refresh can tell it that it was reaped: its clients
    must come back as new connections, or the announcement would be false."""
    a_srv, b_srv = cluster(make_server, redis_server, 2, "--history-size", "0", *FAST_REAP)
    a, b = a_srv.client(), b_srv.client()
    assert a.recv_type("user_joined")["connectionId"] == b.id
    b_srv.proc.send_signal(signal.SIGSTOP)
    try:
        assert a.recv_type("user_left", timeout=3 + TIMEOUT)["connectionId"] == b.id
    finally:
        b_srv.proc.send_signal(signal.SIGCONT)
    closed = wait_closed(b)
    assert (closed.code, closed.reason) == (1012, "cluster rejoin: please reconnect")
    again = b_srv.client()
    assert a.recv_type("user_joined")["connectionId"] == again.id
    assert [f for f in frames_until_pong(a) if f["type"] != "ping"] == []
    a.close()
    again.close()


def wait_closed(client: Client) -> Close:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            client.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd


def test_a_node_restarted_under_its_node_id_announces_its_last_runs_clients_gone(
    make_server, redis_server: RedisServer
) -> None:
    """SIGKILL, then the same ``--node-id`` again before its lease expired (a
    container restarted in place): the clients of the killed run are gone, and
    the rest of the cluster hears it at the restart, not a node TTL later."""
    (a_srv,) = cluster(make_server, redis_server, 1, "--node-ttl", "30")
    b_srv = make_server(*a_srv.args, "--node-id", "b")
    a = a_srv.client()
    doomed = {b_srv.client().id for _ in range(2)}
    assert {a.recv_type("user_joined")["connectionId"] for _ in doomed} == doomed
    b_srv.proc.kill()
    b_srv.proc.wait()
    make_server(*b_srv.args)
    left = [a.recv_type("user_left")["connectionId"] for _ in doomed]
    assert sorted(left) == sorted(doomed)
    assert a_srv.stats()["connections"]["cluster"] == 1
    assert [f for f in frames_until_pong(a) if f["type"] != "ping"] == []
    a.close()


def test_after_leaves_on_two_nodes_at_once_the_last_total_told_is_the_count(
    make_server, redis_server: RedisServer
) -> None:
    """Each node framed its own leaves' ``user_left`` with its count and the
    other nodes passed that frame on as it came: after leaves on both nodes
    at once, the last ``totalUsers`` a client was told counted connections
    that had left on its own node meanwhile."""
    a_srv, b_srv = cluster(make_server, redis_server, 2)
    stay_a, stay_b = a_srv.client("room"), b_srv.client("room")
    leaving = [(a_srv if i % 2 else b_srv).client("room") for i in range(10)]
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.stats()["connections"]["cluster"] == 12, "all 12")
    threads = [threading.Thread(target=client.close) for client in leaving]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for stayer in (stay_a, stay_b):
        totals = [stayer.recv_type("user_left")["totalUsers"] for _ in leaving]
        assert totals[-1] == 2, totals
        stayer.send({"type": "user_info"})
        assert stayer.recv_type("user_info_response")["connectionCount"] == 2
    stay_a.close()
    stay_b.close()
