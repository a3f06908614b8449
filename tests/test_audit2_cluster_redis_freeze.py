"""A node's own members while Redis is frozen or killed with history on
(decisions.md 9: a node keeps serving its own clients while Redis is
unreachable; 13: offsets are the room script's): real ``wshub serve`` nodes on
a real redis-server, which the tests stop with SIGSTOP and SIGKILL.

Found by the second cluster audit: with history on, a room's messages go
through the Redis script and reach even the sender's own node from its
subscription. While Redis was frozen, and until the node noticed (three
probe intervals: 16 s at the default node TTL), every message a client sent
waited for the script and was dropped as stale: lost for the members on its
own node too, though protocol.md promised them the message without an
offset. Now a publication Redis has not taken within its deadline is served
to the node's members without an offset (not kept, never sent to the other
nodes), in the order sent; the offsets the room gives afterwards still follow
on, since Redis recorded nothing meanwhile.
"""

from __future__ import annotations

import os
import signal
import time

from wshub.backplane.redis_cluster import ClusterKeys

from .conftest import TIMEOUT, Client, RedisCluster, RedisServer, Server
from .test_cluster import cluster
from .test_cluster_redis_cluster import shard_of
from .waiting import wait_until


def nodes(make_server, redis: RedisServer) -> tuple[Server, Server]:
    # The default node TTL: the node finds a frozen Redis by its probes only
    # after 3 x 5 s, the window this is about.
    a_srv, b_srv = cluster(make_server, redis, 2, "--node-ttl", "30")
    return a_srv, b_srv


def relay(client: Client) -> dict:
    return client.recv_type("message", "broadcast")


def test_messages_sent_while_redis_is_frozen_reach_the_senders_node(
    make_server, own_redis: RedisServer
) -> None:
    a_srv, b_srv = nodes(make_server, own_redis)
    sender, neighbour = a_srv.client("room"), a_srv.client("room")
    far = b_srv.client("room")
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.stats()["connections"]["cluster"] == 3, "3 members")
    sender.send({"type": "broadcast", "content": "before"})
    before = relay(neighbour)
    assert before["content"] == "before" and relay(far)["offset"] == before["offset"]
    assert relay(sender)["content"] == "before"
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        sent = time.monotonic()
        for i in range(3):
            sender.send({"type": "message", "content": f"frozen {i}"})
        frozen = [relay(neighbour) for _ in range(3)]
        late = time.monotonic() - sent
        assert [f["content"] for f in frozen] == ["frozen 0", "frozen 1", "frozen 2"]
        assert all("offset" not in f for f in frozen), frozen  # not recorded: none given
        # About the script's deadline (1 s) late, not a socket timeout (5 s) or never.
        assert late < 4.0, late
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.get("/readyz")[0] == 200, "readyz 200")
    # Redis recorded none of them and the other node never got them (at most
    # once, never late): the room's next offset follows on, for everyone.
    deadline = time.monotonic() + TIMEOUT
    while True:
        sender.send({"type": "broadcast", "content": "after"})
        got = relay(neighbour)
        assert got["content"] == "after"
        if "offset" in got:
            break
        # (a node whose link flapped serves it locally, without an offset)
        assert time.monotonic() < deadline, "no broadcast recorded after the freeze"
    assert got["offset"] == before["offset"] + 1
    first_far = relay(far)
    assert first_far["content"] == "after" and first_far["offset"] == got["offset"]
    assert a_srv.metric("wshub_history_redis_failures_total") >= 3


def test_messages_sent_as_redis_is_killed_reach_the_senders_node_once_in_order(
    make_server, own_redis: RedisServer
) -> None:
    """SIGKILL while a client sends: each message reaches its node's other
    member exactly once, in order (with an offset if Redis recorded it
    before it died, without one after), whether it went out before the node
    noticed or after."""
    a_srv, b_srv = nodes(make_server, own_redis)
    sender, neighbour = a_srv.client("room"), a_srv.client("room")
    a_srv.wait_for(lambda: a_srv.stats()["connections"]["cluster"] == 2, "2 members")
    assert own_redis.proc is not None
    count = 60
    for i in range(count):
        sender.send({"type": "message", "content": str(i)})
        if i == 20:
            own_redis.proc.kill()
            own_redis.proc.wait()
        sender.roundtrip()  # a steady sender: one message per round trip
    got = [int(relay(neighbour)["content"]) for _ in range(count)]
    assert got == list(range(count))
    own_redis.start()
    wait_until(lambda: a_srv.get("/readyz")[0] == 200, "readyz 200", timeout=TIMEOUT * 2)


def test_messages_sent_while_the_rooms_shard_is_frozen_reach_the_senders_node(
    make_server, own_redis_cluster: RedisCluster
) -> None:
    """On a Redis Cluster: the primary holding the room frozen (for less than
    its cluster-node-timeout, 2 s in the fixture, so that the cluster does not
    mark it failed meanwhile)."""
    a_srv, b_srv = cluster(make_server, own_redis_cluster, 2, "--node-ttl", "30")
    prefix = a_srv.args[a_srv.args.index("--cluster-name") + 1]
    sender, neighbour = a_srv.client("room"), a_srv.client("room")
    far = b_srv.client("room")
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.stats()["connections"]["cluster"] == 3, "3 members")
    sender.send({"type": "broadcast", "content": "before"})
    before = relay(neighbour)
    assert relay(far)["offset"] == before["offset"] and relay(sender)["content"] == "before"
    shard = own_redis_cluster.procs[shard_of(own_redis_cluster, ClusterKeys(prefix).room("room"))]
    assert shard is not None
    os.kill(shard.pid, signal.SIGSTOP)
    try:
        sent = time.monotonic()
        sender.send({"type": "message", "content": "frozen"})
        frozen = relay(neighbour)
        late = time.monotonic() - sent
    finally:
        os.kill(shard.pid, signal.SIGCONT)
    assert frozen["content"] == "frozen" and "offset" not in frozen, frozen
    assert late < 1.9, late
    own_redis_cluster.wait_ok()
    deadline = time.monotonic() + TIMEOUT * 2
    while True:
        sender.send({"type": "broadcast", "content": "after"})
        got = relay(neighbour)
        if "offset" in got:
            break
        assert time.monotonic() < deadline, "no broadcast recorded after the freeze"
    assert got["offset"] == before["offset"] + 1
    assert relay(far)["offset"] == got["offset"]
