"""A cluster for real: several ``wshub serve`` processes on one redis-server."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

import pytest
import redis as redis_client
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Client, RedisServer, Server, free_port
from .waiting import wait_until

_names = itertools.count()

STEADY_LEASE = ("--node-ttl", "6")
"""cluster()'s lease unless a test asks for another: a live node is reaped
only when its event loop stalls for 4 s (two of its refreshes, each a third
of the TTL, missed), not 0.67 s as at 1 s, which a loaded machine can stall a
process for. Its self-probe (every TTL / 6) goes silent only after 4 s too."""

FAST_REAP = ("--node-ttl", "1")
"""For a test that waits for a node to be reaped (killed, frozen) or for its
registration to be refreshed (a Redis restarted or flushed): within 1.33 s."""


def cluster(make_server, redis: RedisServer, n: int, *extra: str) -> list[Server]:
    """n nodes of one new cluster; *extra* comes last, so it may override
    any of these (FAST_REAP, another --node-ttl)."""
    name = f"t{next(_names)}"
    return [
        make_server(
            "--redis-url",
            redis.url,
            "--cluster-name",
            name,
            *STEADY_LEASE,
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
    a_srv, b_srv, c_srv = cluster(make_server, redis_server, 3, *FAST_REAP)
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
    a_srv, b_srv = cluster(make_server, own_redis, 2, "--history-size", "0", *FAST_REAP)
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


class Supervised:
    """``wshub serve --workers 2`` with *args*, its output read as it comes:
    a pipe nobody reads fills (64 KiB) and blocks whichever process writes to
    it next, the supervisor in the middle of reaping a worker as likely as
    any; and what it and its workers logged is what a failure shows
    (:meth:`explaining`)."""

    def __init__(self, port: int, *args: str) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wshub", "serve", "--workers", "2", "--port", str(port)]
            + ["--log-level", "warning", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def server(self) -> Server:
        return Server(self.proc, "127.0.0.1", self.port, [])  # type: ignore[arg-type]

    def wait_listening(self, workers: int) -> None:
        """Until *workers* workers in all (restarted ones too) said they listen."""
        wait_until(
            lambda: sum("listening on" in line for line in self.out) >= workers,
            f"{workers} workers listening",
            3 * TIMEOUT,
        )

    def log(self) -> str:
        return "".join(self.err)

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """A failure inside says what the supervisor and its workers logged."""
        try:
            yield
        except (AssertionError, TimeoutError, ConnectionClosed) as exc:
            raise AssertionError(f"{exc!r}; the supervisor's log:\n{self.log()}") from exc

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT * 3)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for pump in self._pumps:
                pump.join(TIMEOUT)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def departures_until_pong(client: Client) -> list[dict]:
    """The ``user_left`` frames *client* gets before the answer to a ping
    (a roundtrip that skipped them would lose a departure announced early);
    ConnectionClosed when its connection is gone (its worker was killed). A
    TimeoutError is no evidence either way: it fails the test."""
    client.send({"type": "ping"})
    left = []
    while (frame := client.recv())["type"] != "pong":
        if frame["type"] == "user_left":
            left.append(frame)
    return left


def spread(
    server: Server, redis: RedisServer, prefix: str, pids: list[int], room: str | None = None
) -> list[Client]:
    """At least 12 clients of *server* (in *room*), each on record in Redis,
    with some on every worker of *pids*: the kernel hashes each connection to
    a worker, and 1 start in 2,048 would put 12 on one."""
    clients = [server.client(room) for _ in range(12)]
    while True:
        # Each join reaches Redis on its own: wait for all of them.
        wait_until(
            lambda: sum(len(held_by_node(redis, prefix, p)[1]) for p in pids) == len(clients),
            "every connection on record in Redis",
        )
        if all(held_by_node(redis, prefix, pid)[1] for pid in pids):
            return clients
        clients.append(server.client(room))


def held_by_node(redis: RedisServer, prefix: str, pid: int) -> tuple[str, set[str]]:
    """The node id of worker *pid* and the connections Redis has on record for it."""
    with open(f"/proc/{pid}/cmdline") as cmdline:
        argv = cmdline.read().split("\0")
    node = argv[argv.index("--node-id") + 1]
    client = redis_client.Redis(port=redis.port, socket_timeout=TIMEOUT)
    try:
        return node, {cid.decode() for cid in client.hkeys(f"{prefix}:node:{node}:conns")}
    finally:
        client.close()


def test_workers_share_the_port_and_restart(redis_server) -> None:
    """--workers 2: two processes on one port, one hub; a killed worker is
    restarted and its clients are announced as gone, each once, to every
    client of the other."""
    name = f"w{next(_names)}"
    sup = Supervised(
        free_port(),
        *("--redis-url", redis_server.url, "--cluster-name", name),
        *("--ip-connect-rate", "0", "--max-connections-per-ip", "0"),
    )
    try:
        with sup.explaining():
            sup.wait_listening(2)
            server = sup.server()
            pids = _worker_pids(sup.proc.pid)
            assert len(pids) == 2
            clients = spread(server, redis_server, name, pids)
            # Every client sees the same hub.
            nodes = {server.stats()["nodeId"] for _ in range(20)}
            assert len(nodes) == 2
            clients[0].send({"type": "broadcast", "content": "all"})
            for client in clients:
                assert client.recv_type("broadcast")["content"] == "all"
            victim = pids[0]
            node, held = held_by_node(redis_server, name, victim)
            os.kill(victim, signal.SIGKILL)
            # Which clients lived on it (their connection closes), and every
            # user_left each other one hears, from the first frame on: the
            # supervisor may well have reaped the node before it is asked.
            heard: dict[str, list[str]] = {}
            dead: set[str] = set()
            for client in clients:
                try:
                    heard[client.id] = [f["connectionId"] for f in departures_until_pong(client)]
                except ConnectionClosed:
                    dead.add(client.id)
            assert 0 < len(dead) < len(clients)
            assert dead == held, f"node {node} held {held} in Redis"
            for client in clients:
                if client.id not in heard:
                    continue
                while len(heard[client.id]) < len(dead):
                    # The supervisor sees the exit, reaps the node in Redis and
                    # publishes: a few round trips through a new Redis connection.
                    left = client.recv_type("user_left", timeout=3 * TIMEOUT)
                    heard[client.id].append(left["connectionId"])
                assert sorted(heard[client.id]) == sorted(dead), "each departure once"
            sup.wait_listening(3)  # the replacement worker
            assert len(_worker_pids(sup.proc.pid)) == 2
    finally:
        assert sup.stop() == 0, sup.log()


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
    # From its registration (ready follows it), not from its listening: on a
    # loaded machine the registration itself can take a second or more.
    second.wait_for(lambda: second.stats()["backplane"]["ready"], "the second node registered")
    joined = time.monotonic()
    wait_until(lambda: first.stats()["backplane"]["nodes"] == 2, "the second counted", 3 + 1.5)
    assert first.metric("wshub_cluster_nodes") == 2
    print(f"\n[figure] the second node counted {time.monotonic() - joined:.1f} s after registering")
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
