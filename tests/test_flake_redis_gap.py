"""A node whose subscription was rebuilt while another node published misses
those frames' offsets: it fills the gap from the room's stream in Redis, and
its members get every frame in order, none closed (decisions.md 9 and 13).
Before, the next frame showed the gap and the members were closed 1012
"room history moved on" (tests/test_security.py's frozen-Redis test, now
and then in the whole-suite run)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import redis

from .conftest import TIMEOUT, RedisServer, Server

OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process *pid* holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def kill_subscription(r: redis.Redis, srv: Server) -> None:
    """Close *srv*'s pub/sub connection from Redis' side (CLIENT KILL): the
    node rebuilds it after its backoff; the other node notices nothing."""
    ports = local_ports(srv.proc.pid)
    ids = [
        client["id"]
        for client in r.client_list()
        if int(client.get("sub", 0)) > 0 and int(client["addr"].rsplit(":", 1)[1]) in ports
    ]
    assert len(ids) == 1, (ids, ports)
    r.client_kill_filter(_id=ids[0])


def test_frames_missed_while_a_subscription_was_rebuilt_are_filled_from_the_stream(
    make_server, redis_server: RedisServer
) -> None:
    name = f"gap{os.getpid()}"
    a_srv, b_srv = (
        make_server("--redis-url", redis_server.url, "--cluster-name", name, *OPEN)
        for _ in range(2)
    )
    a = a_srv.client("g")
    b = b_srv.client("g")
    a.recv_type("user_joined")
    a.send({"type": "broadcast", "content": "first"})
    offsets = [b.recv_type("broadcast")["offset"]]
    r = redis.Redis(port=redis_server.port)
    # The frame must reach Redis before the node resubscribes (its backoff
    # is 50-100 ms, A's publication a few ms): tried again if it did not.
    for attempt in range(5):
        reconnects = b_srv.metric("wshub_backplane_reconnects_total")
        kill_subscription(r, b_srv)
        a.send({"type": "broadcast", "content": f"missed {attempt}"})
        b_srv.wait_for(
            lambda reconnects=reconnects: (
                b_srv.metric("wshub_backplane_reconnects_total") > reconnects
                and b_srv.get("/readyz")[0] == 200
            ),
            "the subscription rebuilt",
        )
        a.send({"type": "broadcast", "content": f"next {attempt}"})
        got = [b.recv_type("broadcast", timeout=TIMEOUT) for _ in range(2)]
        assert [m["content"] for m in got] == [f"missed {attempt}", f"next {attempt}"]
        assert not any(m.get("replayed") for m in got)
        offsets += [m["offset"] for m in got]
        if b_srv.metric("wshub_history_redis_gaps_filled_total") >= 1:
            break
    assert b_srv.metric("wshub_history_redis_gaps_filled_total") >= 1, "no gap in 5 tries"
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    # Nobody was asked to reconnect: b is still there and follows on.
    a.send({"type": "broadcast", "content": "last"})
    assert b.recv_type("broadcast")["offset"] == offsets[-1] + 1
    assert not [line for line in b_srv.stderr_lines if re.search("history_moved_on", line)]
    r.close()
    a.close()
    b.close()
