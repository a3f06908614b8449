"""A cluster for real: several ``wshub serve`` processes on one redis-server."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import time

import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Client, RedisServer, Server, free_port
from .waiting import wait_until

_names = itertools.count()


def cluster(make_server, redis: RedisServer, n: int, *extra: str) -> list[Server]:
    name = f"t{next(_names)}"
    return [
        make_server(
            "--redis-url",
            redis.url,
            "--cluster-name",
            name,
            "--node-ttl",
            "1",
            "--ip-connect-rate",
            "0",
            "--max-connections-per-ip",
            "0",
            "--message-rate",
            "0",
            *extra,
        )
        for _ in range(n)
    ]


def wait_count(client: Client, server: Server, expected: int) -> None:
    server.wait_for(
        lambda: server.stats()["connections"]["cluster"] == expected, f"cluster count {expected}"
    )


def test_messages_and_counts_cross_nodes(make_server, redis_server) -> None:
    """message and broadcast reach every node; counts are cluster-wide."""
    a_srv, b_srv = cluster(make_server, redis_server, 2)
    a = a_srv.client()
    # B has no member in the room yet, so it hears none of its traffic; its
    # first member's welcome waits for the room's presence, read from Redis.
    b = b_srv.client()
    assert b.welcome["connectionCount"] == 2
    joined = a.recv_type("user_joined")
    assert joined["connectionId"] == b.id and joined["totalUsers"] == 2
    c = b_srv.client()
    assert a.recv_type("user_joined")["connectionId"] == c.id
    a_srv.wait_for(lambda: a_srv.stats()["connections"]["cluster"] == 3, "c's join on A")
    a.send({"type": "message", "content": "from a"})
    for client in (b, c):
        got = client.recv_type("message")
        assert got["content"] == "from a" and got["connectionId"] == a.id
    b.send({"type": "broadcast", "content": "from b"})
    for client in (a, b, c):
        assert client.recv_type("broadcast")["content"] == "from b"
    a.send({"type": "user_info"})
    assert a.recv_type("user_info_response")["connectionCount"] == 3
    stats = a_srv.stats()
    assert stats["connections"] == {**stats["connections"], "node": 1, "cluster": 3}
    assert a_srv.get("/readyz")[0] == 200
    c.close()
    assert a.recv_type("user_left")["connectionId"] == c.id
    a.roundtrip()  # no second user_left
    for client in (a, b):
        client.close()


def test_per_sender_order_across_nodes(make_server, redis_server) -> None:
    """Messages from one sender reach a client on another node in the order sent."""
    a_srv, b_srv = cluster(make_server, redis_server, 2)
    a = a_srv.client()
    b = b_srv.client()
    for i in range(300):
        a.send({"type": "message", "content": str(i)})
    got = [int(b.recv_type("message")["content"]) for _ in range(300)]
    assert got == list(range(300))
    a.close()
    b.close()


def test_kill_9_announces_left_exactly_once(make_server, redis_server) -> None:
    """A node killed with SIGKILL: each survivor's clients hear user_left once
    for each of its connections, within 2 x node TTL, and counts heal."""
    a_srv, b_srv, c_srv = cluster(make_server, redis_server, 3)
    a, b = a_srv.client(), b_srv.client()
    doomed = [c_srv.client() for _ in range(3)]
    doomed_ids = {d.id for d in doomed}
    wait_count(a, a_srv, 5)
    wait_count(b, b_srv, 5)
    start = time.monotonic()
    c_srv.proc.kill()
    c_srv.proc.wait()
    for client in (a, b):
        left = set()
        while left != doomed_ids:
            message = client.recv_type("user_left", timeout=2 * 1 + TIMEOUT)
            assert message["connectionId"] in doomed_ids - left, "announced twice"
            left.add(message["connectionId"])
    assert time.monotonic() - start < 2 * 1 + 1.5
    for client, srv in ((a, a_srv), (b, b_srv)):
        assert srv.stats()["connections"]["cluster"] == 2
        client.roundtrip()  # and nothing else was announced
    a.close()
    b.close()


def test_redis_outage_keeps_local_delivery_and_heals(make_server, own_redis) -> None:
    """Redis stopped mid-traffic: local delivery goes on, /readyz says why,
    failures are counted; after a restart the cluster heals without duplicates.
    (History off: with it on, a Redis restarted empty is a new epoch and the
    members are asked to reconnect: test_cluster_recovery.py.)"""
    a_srv, b_srv = cluster(make_server, own_redis, 2, "--history-size", "0")
    a1, a2 = a_srv.client(), a_srv.client()
    b1 = b_srv.client()
    wait_count(a1, a_srv, 3)
    own_redis.stop()
    a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 503, "readyz 503")
    status, _, body = a_srv.get("/readyz")
    assert b"backplane" in body and b"redis" in body
    a1.send({"type": "message", "content": "local during outage"})
    assert a2.recv_type("message")["content"] == "local during outage"
    assert a_srv.metric("wshub_backplane_forward_failures_total") >= 1
    assert a_srv.metric("wshub_backplane_up") == 0
    # A client leaves B during the outage: A can't hear it now.
    b2 = b_srv.client()
    b2.close()
    own_redis.start()
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.get("/readyz")[0] == 200, "readyz 200 again")
    wait_count(a1, a_srv, 3)
    a1.send({"type": "message", "content": "after healing"})
    assert b1.recv_type("message")["content"] == "after healing"
    assert a2.recv_type("message")["content"] == "after healing"
    b1.send({"type": "message", "content": "marker"})
    for client in (a1, a2):
        assert client.recv_type("message")["content"] == "marker"  # nothing twice before it
    for client in (a1, a2, b1):
        client.close()


def test_drained_node_announces_left_to_the_cluster(make_server, redis_server) -> None:
    """SIGTERM on one node: its clients get 1001, the rest hear user_left at once."""
    a_srv, b_srv = cluster(make_server, redis_server, 2)
    a = a_srv.client()
    leaving = [b_srv.client() for _ in range(2)]
    wait_count(a, a_srv, 3)
    b_srv.proc.send_signal(signal.SIGTERM)
    for client in leaving:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                client.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    ids = {a.recv_type("user_left")["connectionId"] for _ in leaving}
    assert ids == {c.id for c in leaving}
    assert b_srv.proc.wait(TIMEOUT) == 0
    assert a_srv.stats()["connections"]["cluster"] == 1
    a.close()


def test_workers_share_the_port_and_restart(redis_server) -> None:
    """--workers 2: two processes on one port, one hub; a killed worker is
    restarted and its clients are announced as gone."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wshub",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--redis-url",
            redis_server.url,
            "--cluster-name",
            f"w{next(_names)}",
            "--ip-connect-rate",
            "0",
            "--max-connections-per-ip",
            "0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all("listening on" in line for line in lines), lines
        server = Server(proc, "127.0.0.1", port, [])  # type: ignore[arg-type]
        clients = [server.client() for _ in range(12)]
        # Connections spread over both workers; every client sees the same hub.
        nodes = {server.stats()["nodeId"] for _ in range(20)}
        assert len(nodes) == 2
        clients[0].send({"type": "broadcast", "content": "all"})
        for client in clients:
            assert client.recv_type("broadcast")["content"] == "all"
        # Kill one worker (find it through /stats of the connections it serves).
        pids = _worker_pids(proc.pid)
        assert len(pids) == 2
        victim = pids[0]
        subprocess.run(["kill", "-9", str(victim)], check=True)
        survivors = []
        for client in clients:
            try:
                client.roundtrip()
                survivors.append(client)
            except (ConnectionClosed, TimeoutError):
                pass
        assert 0 < len(survivors) < len(clients)
        gone = len(clients) - len(survivors)
        watcher = survivors[0]
        announced = {
            # The supervisor sees the exit, reaps the node in Redis and publishes:
            # a few round trips through a new Redis connection, slower on a busy machine.
            watcher.recv_type("user_left", timeout=3 * TIMEOUT)["connectionId"]
            for _ in range(gone)
        }
        assert len(announced) == gone
        assert "listening on" in proc.stdout.readline()  # the replacement worker
        assert len(_worker_pids(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT * 3) == 0
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]


def test_workers_without_redis_are_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wshub", "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert re.search(r"--workers.*--redis-url", result.stderr)


def test_unreachable_redis_at_start_still_serves(make_server) -> None:
    """A node whose Redis is down at start serves its own clients and says so."""
    srv = make_server("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--node-ttl", "1")
    a, b = srv.client(), srv.client()
    a.send({"type": "message", "content": "still here"})
    assert b.recv_type("message")["content"] == "still here"
    assert srv.get("/readyz")[0] == 503
    a.close()
    b.close()


def test_the_node_count_follows_each_lease_refresh(make_server, redis_server) -> None:
    """/stats backplane.nodes and wshub_cluster_nodes are set at every lease
    refresh (every TTL/3), not only at each resync (every TTL): with a TTL of
    9 s, a node that joins is counted by the first one within one refresh."""
    name = f"t{next(_names)}"
    args = ("--redis-url", redis_server.url, "--cluster-name", name, "--node-ttl", "9")
    first = make_server(*args)
    first.wait_for(lambda: first.stats()["backplane"]["ready"], "the first node up")
    assert first.stats()["backplane"]["nodes"] == 1
    second = make_server(*args)
    joined = time.monotonic()
    wait_until(lambda: first.stats()["backplane"]["nodes"] == 2, "the second counted", 3 + 1.5)
    assert first.metric("wshub_cluster_nodes") == 2
    print(f"\n[figure] the second node counted {time.monotonic() - joined:.1f} s after it listened")
    second.proc.send_signal(signal.SIGTERM)
    second.proc.wait(TIMEOUT)
    wait_until(lambda: first.stats()["backplane"]["nodes"] == 1, "the second gone", 3 + 1.5)


def test_a_wrong_redis_password_is_logged_at_warning_without_it(make_server, own_redis) -> None:
    """A Redis that refuses the node's password: at --log-level warning the
    start line says why (an auth failure), not only that Redis is not
    reachable, and the password is in no line."""
    import redis

    redis.Redis(port=own_redis.port).config_set("requirepass", "right-one")
    url = f"redis://:wr%21ng-secret@127.0.0.1:{own_redis.port}/0"
    srv = make_server("--redis-url", url, "--log-level", "warning")

    def start_lines() -> list[str]:
        return [line for line in srv.stderr_lines if "not reachable yet at start" in line]

    wait_until(lambda: bool(start_lines()), "the start warning")
    start = start_lines()
    print("\n[figure]", start[0])
    assert re.search(r"(?i)WRONGPASS|invalid username-password|auth", start[0]), start[0]
    log = "".join(srv.stderr_lines)
    assert "wr%21ng-secret" not in log and "wr!ng-secret" not in log
