"""Two processes under one ``--node-id`` (decisions.md 9: presence per node,
``user_left`` exactly once): real ``wshub serve`` nodes on a real
redis-server, clients over real sockets.

Found by the second cluster audit: an operator who copied a node's config
started a second live node under the same id; it took the first one's
connections on record for its own last run's, announced them gone to the
whole cluster (while they were still connected) and overwrote the first
node's presence. A node restarted under its id after a crash must still
start (tests/test_audit_cluster_presence.py covers that case).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, RedisServer
from .test_audit_cluster_presence import frames_until_pong
from .test_cluster import cluster
from .waiting import wait_until


@pytest.mark.parametrize("backend", ["redis", "redis-cluster"])
def test_a_second_live_node_under_a_node_id_in_use_refuses_to_start(
    make_server, request: pytest.FixtureRequest, backend: str
) -> None:
    """On one Redis and on a Redis Cluster (the probe channel is a sharded
    one there, its listeners known to its shard)."""
    redis_server = request.getfixturevalue(
        "redis_server" if backend == "redis" else "redis_cluster"
    )
    (a_srv,) = cluster(make_server, redis_server, 1, "--node-ttl", "30", "--node-id", "twin")
    p_srv = make_server(*a_srv.args[:-2], "--node-id", "peer")
    on_a, on_p = a_srv.client("room"), p_srv.client("room")
    assert on_a.recv_type("user_joined")["connectionId"] == on_p.id
    twin = subprocess.Popen(
        [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "warning"]
        + a_srv.args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A process start, a Redis connection and the check: about a second
        # here, more on a loaded machine; an exit too slow tells nothing of
        # whether it served, which its stdout says.
        out, err = twin.communicate(timeout=3 * TIMEOUT)
    except subprocess.TimeoutExpired:
        twin.kill()
        out, err = twin.communicate()
        pytest.fail(f"the twin did not exit within {3 * TIMEOUT:.0f} s: {out!r} {err!r}")
    assert twin.returncode == 2, (twin.returncode, err)
    assert "'twin'" in err and "in use" in err, err
    assert "listening" not in out
    # The first node's client is still there for everyone: nothing was
    # announced gone, and the counts hold.
    assert [f for f in frames_until_pong(on_p) if f["type"] != "ping"] == []
    on_p.send({"type": "user_info"})
    assert on_p.recv_type("user_info_response")["connectionCount"] == 2
    on_a.close()
    on_p.close()


def test_a_node_whose_id_another_process_took_steps_aside(
    make_server, redis_server: RedisServer
) -> None:
    """Another process took the id while this one could not see it (started
    while this node was cut off from Redis, or at the same instant): the
    node finds another run's token at its next lease, stops writing under
    the id, closes its clients with 1012 so they reconnect elsewhere, and
    /readyz says why. (The other process is stood in for by writing its run
    token, as its start does.)"""
    (a_srv,) = cluster(make_server, redis_server, 1, "--node-ttl", "3", "--node-id", "taken")
    on_a = a_srv.client("room")
    prefix = a_srv.args[a_srv.args.index("--cluster-name") + 1]
    client = redis.Redis(port=redis_server.port)
    run_key = f"{prefix}:node:taken:run"
    wait_until(lambda: client.exists(run_key) == 1, "the node's run token")
    client.set(run_key, "another-process", px=30_000)
    with pytest.raises(ConnectionClosed) as info:
        while True:
            on_a.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1012
    status, _, body = a_srv.get("/readyz")
    assert status == 503 and b"node id in use" in body, (status, body)
    # It wrote nothing more under the id: the other's token stands.
    assert client.get(run_key) == b"another-process"
    client.close()
    a_srv.wait_for(
        lambda: any("node_id_in_use" in line for line in a_srv.stderr_lines), "the error line"
    )


def test_a_twin_that_could_not_reach_redis_at_its_start_steps_aside_at_its_first_connection(
    make_server, own_redis: RedisServer
) -> None:
    """The twin starts while Redis is frozen, so it serves before it could
    check its id (a node serves its own clients while Redis is unreachable);
    at its first connection it finds the id held: it closes its clients with
    1012, writes nothing under the id and says why on /readyz, while the
    first node's clients hear nothing."""
    # History off: with it a join waits (up to 5 s) for its read from Redis.
    (a_srv,) = cluster(
        make_server, own_redis, 1, "--node-ttl", "30", "--history-size", "0", "--node-id", "twin"
    )
    p_srv = make_server(*a_srv.args[:-2], "--node-id", "peer")
    on_a, on_p = a_srv.client("room"), p_srv.client("room")
    assert on_a.recv_type("user_joined")["connectionId"] == on_p.id
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        twin = make_server(*a_srv.args)  # serves: Redis did not answer within its start wait
        on_twin = twin.client("room")
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    with pytest.raises(ConnectionClosed) as info:
        while True:
            on_twin.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1012
    twin.wait_for(lambda: b"node id in use" in twin.get("/readyz")[2], "readyz to say why")
    assert [f for f in frames_until_pong(on_p) if f["type"] != "ping"] == []
    on_p.send({"type": "user_info"})
    assert on_p.recv_type("user_info_response")["connectionCount"] == 2
    on_a.close()
    on_p.close()
