"""The cluster acceptance on a Redis Cluster (issue 17 item 2), over real sockets.

Real ``wshub serve`` processes on a real 3-primary Redis Cluster (the
``redis_cluster`` fixtures: three ``redis-server --cluster-enabled yes``
processes joined by ``redis-cli --cluster create``). The rooms of each test
are picked so that their slots are on different primaries: counts, presence,
messages and history across nodes hold on every shard, a SIGKILLed node's
departures are announced once per room, and after a primary is killed and
started again on its port the nodes reconnect and resync.
"""

from __future__ import annotations

import itertools

import redis

from wshub.backplane.redis_cluster import ClusterKeys

from .conftest import TIMEOUT, Client, RedisCluster, Server
from .test_cluster import cluster
from .test_cluster_rooms import count
from .waiting import wait_until

_names = itertools.count()


def rooms_on_every_shard(redis_cluster: RedisCluster, prefix: str) -> list[str]:
    """One room name per primary: room i's channel (and presence, and history)
    lives on primary i."""
    host, port = "127.0.0.1", redis_cluster.ports[0][0]
    client = redis.RedisCluster(host=host, port=port)
    try:
        keys = ClusterKeys(prefix)
        by_shard: dict[str, str] = {}
        for i in itertools.count():
            room = f"sh{next(_names)}x{i}"
            by_shard.setdefault(client.get_node_from_key(keys.room(room)).name, room)
            if len(by_shard) == len(redis_cluster.ports):
                return sorted(by_shard.values())
    finally:
        client.close()
    raise AssertionError("unreachable")


def prefix_of(srv: Server) -> str:
    return srv.args[srv.args.index("--cluster-name") + 1]


def shard_of(redis_cluster: RedisCluster, key: str) -> int:
    """The index of the primary that holds *key*."""
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0][0])
    try:
        node = client.get_node_from_key(key)
    finally:
        client.close()
    return [port for port, _ in redis_cluster.ports].index(int(node.port))


def joins(client: Client, *expected: str) -> None:
    """*client* hears user_joined for exactly the *expected* ids, once each."""
    seen = [client.recv_type("user_joined")["connectionId"] for _ in expected]
    assert sorted(seen) == sorted(expected)


def test_rooms_on_every_shard_share_counts_presence_messages_and_history(
    make_server, redis_cluster
) -> None:
    """Two nodes, a room on each primary: each room is one hub across the nodes
    (counts, user_joined/user_left, messages both ways, one order of offsets
    assigned by the room's shard, history replayed on the other node), and
    the rooms keep apart."""
    a_srv, b_srv = cluster(make_server, redis_cluster, 2)
    rooms = rooms_on_every_shard(redis_cluster, prefix_of(a_srv))
    members = {}
    for room in rooms:
        x = a_srv.client(room)
        y = b_srv.client(room)  # its welcome counts x, read from the room's presence
        assert y.welcome["connectionCount"] == 2 and y.welcome["room"] == room
        joins(x, y.id)
        members[room] = (x, y)
    for room, (x, y) in members.items():
        x.send({"type": "message", "content": f"{room} from a"})
        got = y.recv_type("message")
        assert (got["content"], got["connectionId"], got["offset"]) == (f"{room} from a", x.id, 1)
        y.send({"type": "broadcast", "content": f"{room} from b"})
        for client in (x, y):
            frame = client.recv_type("broadcast")
            assert (frame["content"], frame["offset"]) == (f"{room} from b", 2)
    for room, (x, _) in members.items():
        late = b_srv.client(f"{room}?history=5")
        replayed = [late.recv_type("message", "broadcast") for _ in range(2)]
        assert [f["offset"] for f in replayed] == [1, 2] and all(f["replayed"] for f in replayed)
        assert replayed[0]["content"] == f"{room} from a"
        joins(x, late.id)
        assert count(x) == 3
        late.close()
        assert x.recv_type("user_left")["connectionId"] == late.id
    for x, y in members.values():
        y.close()
        left = x.recv_type("user_left")
        assert left["connectionId"] == y.id and left["totalUsers"] == 1
        x.roundtrip()  # and nothing of the other rooms reached it
        x.close()


def test_a_killed_nodes_departures_on_every_shard_are_announced_once(
    make_server, redis_cluster
) -> None:
    """kill -9 of a node with members in rooms on every primary: each
    survivor's member hears user_left once for each doomed connection of its
    own room and of no other (one survivor claimed the dead node, the other
    did not announce it again); counts heal."""
    # A 2 s lease (not 1): on a loaded machine a survivor's lease refresh
    # can stall past 1 s, and a live node is then reaped, on one Redis as here.
    a_srv, b_srv, doomed_srv = cluster(make_server, redis_cluster, 3, "--node-ttl", "2")
    rooms = rooms_on_every_shard(redis_cluster, prefix_of(a_srv))
    watchers = {room: (a_srv.client(room), b_srv.client(room)) for room in rooms}
    doomed = {room: [doomed_srv.client(room) for _ in range(i + 1)] for i, room in enumerate(rooms)}
    for room, (wa, wb) in watchers.items():
        total = 2 + len(doomed[room])
        for watcher, srv in ((wa, a_srv), (wb, b_srv)):
            srv.wait_for(lambda w=watcher, n=total: count(w) == n, "the room's count")
    doomed_srv.proc.kill()
    doomed_srv.proc.wait()
    for room, pair in watchers.items():
        expected = {d.id for d in doomed[room]}
        for watcher in pair:
            left: set[str] = set()
            while left != expected:
                message = watcher.recv_type("user_left", timeout=2 * 2 + TIMEOUT)
                assert message["connectionId"] in expected - left, (room, "twice or elsewhere")
                left.add(message["connectionId"])
    everyone = [watcher for pair in watchers.values() for watcher in pair]
    assert [count(watcher) for watcher in everyone] == [2] * len(everyone)
    for watcher in everyone:
        watcher.roundtrip()  # and nothing else was announced
    for watcher in everyone:
        watcher.close()


def test_a_primary_restarted_on_its_port_the_nodes_reconnect_and_resync(
    make_server, own_redis_cluster
) -> None:
    """SIGKILL of one primary (the one of node A's lease), then the same
    redis-server started again on its port (empty: no persistence; the cluster
    keeps its slots): the nodes go unready, come back, register their presence
    again and resync, so a member that joined during the outage is announced
    once, counts are right, no member is closed (A, whose lease vanished, is
    not reaped as dead), and every room's members hear each other again, on
    every shard."""
    # A lease longer than the outage: a node whose lease (on a shard that stayed
    # up) expired meanwhile would be reaped, rightly, by the first node back,
    # and its clients asked to reconnect (1012) instead.
    a_srv, b_srv = cluster(
        make_server, own_redis_cluster, 2, "--history-size", "0", "--node-ttl", "8"
    )
    prefix = prefix_of(a_srv)
    rooms = rooms_on_every_shard(own_redis_cluster, prefix)
    members = {}
    for room in rooms:
        x, y = a_srv.client(room), b_srv.client(room)
        joins(x, y.id)
        members[room] = (x, y)
    # The primary of node A's own keys (its lease and connections: gone with
    # the restart while A lives), and of one of the rooms (one is on each).
    node_a = a_srv.stats()["nodeId"]
    victim = shard_of(own_redis_cluster, ClusterKeys(prefix).alive(node_a))
    own_redis_cluster.kill(victim)  # SIGKILL
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.get("/readyz")[0] == 503, "readyz 503")
    # Joins while the backplane is down are served locally; the resync tells the rest.
    during = b_srv.client(rooms[1])
    own_redis_cluster.start(victim)
    own_redis_cluster.wait_ok()
    for srv in (a_srv, b_srv):
        wait_until(
            lambda srv=srv: srv.get("/readyz")[0] == 200, "readyz 200 again", 3 * TIMEOUT, 0.05
        )
    x1 = members[rooms[1]][0]
    assert x1.recv_type("user_joined", timeout=3 * TIMEOUT)["connectionId"] == during.id
    for room, (x, y) in members.items():
        expected = 3 if room == rooms[1] else 2
        # The resync that finds the join runs every node TTL.
        wait_until(lambda x=x, n=expected: count(x) == n, f"the count of {room}", 3 * TIMEOUT)
        x.send({"type": "message", "content": f"{room} after"})
        assert y.recv_type("message")["content"] == f"{room} after"
        y.send({"type": "message", "content": f"{room} back"})
        assert x.recv_type("message")["content"] == f"{room} back"
    assert during.recv_type("message")["content"] == f"{rooms[1]} after"
    for x, y in members.values():
        x.close()
        y.close()
    during.close()
