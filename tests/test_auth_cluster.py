"""--max-connections-per-user across a cluster (decisions.md 15, issue 15 item 1):
real ``wshub serve`` nodes on one real redis-server, and the same on a real
3-primary Redis Cluster (``any_redis``), clients over real sockets.

One user's connections are counted on every node together; one more gets one
``error`` (``too_many_connections``) and close 4429, never a ``welcome``; a
node killed with SIGKILL stops counting within its node TTL.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable

import pytest
import redis
from websockets.exceptions import ConnectionClosed

from wshub.usercount import user_key

from .conftest import TIMEOUT, Client, RedisCluster, RedisServer, Server
from .test_auth_server import AUTH, NO_LIMITS, bearer, refused, token
from .waiting import wait_until

_names = itertools.count()


@pytest.fixture(params=["redis_server", "redis_cluster"])
def any_redis(request: pytest.FixtureRequest) -> RedisServer | RedisCluster:
    """One real redis-server, or a real 3-primary Redis Cluster: the limit is
    the same on both (one key per user, so one slot)."""
    backend: RedisServer | RedisCluster = request.getfixturevalue(request.param)
    return backend


def nodes(
    make_server: Callable[..., Server],
    redis: RedisServer | RedisCluster,
    n: int,
    limit: int,
    ttl: float = 6,
) -> list[Server]:
    """n nodes of one cluster. The lease (and a user's count entries, which
    live as long) is 6 s unless a test asks: at 1 s a node stalled ~0.7 s on a
    busy machine stopped counting its users, and the other admitted more."""
    name = f"authcluster{next(_names)}"
    return [
        make_server(
            "--auth",
            "required",
            *AUTH,
            *NO_LIMITS,
            "--redis-url",
            redis.url,
            "--cluster-name",
            name,
            "--node-ttl",
            str(ttl),
            "--max-connections-per-user",
            str(limit),
        )  # fmt: skip
        for _ in range(n)
    ]


def too_many(srv: Server, user: str = "alice") -> None:
    """One more connection for *user*: one error, then 4429, never a welcome."""
    error, close, _ = refused(srv, **bearer(token(user)))
    assert (error["type"], error["code"], close) == ("error", "too_many_connections", 4429)


def admitted(srv: Server, user: str = "alice") -> bool:
    """Try one connection for *user*: True when welcomed (it stays open)."""
    ws = srv.connect(**bearer(token(user)))
    first = json.loads(ws.recv(timeout=TIMEOUT))
    if first["type"] == "welcome":
        assert first["userId"] == user
        return True
    assert first["code"] == "too_many_connections", first
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
    return False


def test_the_limit_holds_across_two_nodes(make_server, any_redis) -> None:
    a_srv, b_srv = nodes(make_server, any_redis, 2, limit=2)
    on_a = a_srv.client(**bearer(token("alice")))
    on_b = b_srv.client(**bearer(token("alice")))
    for srv in (a_srv, b_srv):
        too_many(srv)
    on_a.roundtrip()  # the first two saw nothing of it and still work
    on_b.roundtrip()
    assert a_srv.stats()["connections"]["node"] == 1
    assert b_srv.stats()["connections"]["node"] == 1
    bob = b_srv.client(**bearer(token("bob")))  # another user is not limited
    assert bob.welcome["userId"] == "bob"
    # alice leaves A: her slot is free on B as soon as A told Redis.
    on_a.close()
    wait_until(lambda: admitted(b_srv), "alice's slot to come back on the other node")
    too_many(a_srv)


def test_simultaneous_connects_on_both_nodes_take_exactly_the_limit(make_server, any_redis) -> None:
    """The check and the add are one step on Redis: 12 connects for one user,
    at once, split over two nodes, with a limit of 3: exactly 3 welcomes."""
    a_srv, b_srv = nodes(make_server, any_redis, 2, limit=3)
    results: list[bool] = []
    barrier = threading.Barrier(12)

    def attempt(srv: Server) -> None:
        barrier.wait(TIMEOUT)
        results.append(admitted(srv))

    threads = [threading.Thread(target=attempt, args=(srv,)) for srv in [a_srv, b_srv] * 6]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert len(results) == 12 and results.count(True) == 3, results
    cluster = a_srv.stats()["connections"]["node"] + b_srv.stats()["connections"]["node"]
    assert cluster == 3


def test_a_killed_node_stops_counting_within_the_node_ttl(make_server, any_redis) -> None:
    ttl = 2.0
    a_srv, b_srv = nodes(make_server, any_redis, 2, limit=2, ttl=ttl)
    keep = a_srv.client(**bearer(token("alice")))
    doomed = b_srv.client(**bearer(token("alice")))
    too_many(a_srv)
    b_srv.proc.kill()
    killed = time.monotonic()
    b_srv.proc.wait()
    # No goodbye reached Redis: its count is still there until its lease expires.
    with pytest.raises(ConnectionClosed):
        doomed.recv()  # its socket went with the process
    took = wait_until(
        lambda: admitted(a_srv), "the killed node's connection to stop counting", TIMEOUT + ttl
    )
    # Within the TTL, plus room for a busy machine (a reaping survivor alone
    # would take up to ttl + ttl/3, and this bound still catches "never").
    assert time.monotonic() - killed < ttl + TIMEOUT / 2, took
    too_many(a_srv)  # and the limit is back in force: 2 open on A now
    keep.roundtrip()


def test_a_stopped_node_gives_its_users_slots_back(make_server, any_redis) -> None:
    a_srv, b_srv = nodes(make_server, any_redis, 2, limit=1, ttl=30)
    b_srv.client(**bearer(token("alice")))
    too_many(a_srv)
    assert b_srv.stop() == 0  # a drain: its connections close, its counts go
    assert admitted(a_srv)


def test_any_sub_is_one_user_on_redis(make_server, any_redis) -> None:
    """A sub with Redis and Lua metacharacters, newlines and non-ASCII is one
    user, counted as itself; a sub that differs only in case is another."""
    a_srv, b_srv = nodes(make_server, any_redis, 2, limit=1)
    odd = "é:*{x}\n' -- ]]" + "z" * 100
    a_srv.client(**bearer(token(odd)))
    too_many(b_srv, odd)
    assert admitted(b_srv, odd.upper())


def test_refused_tokens_take_no_slot(make_server, redis_server) -> None:
    """Forged, expired or out-of-limit attempts never count toward the user."""
    (srv,) = nodes(make_server, redis_server, 1, limit=1)
    for forged in (token("alice", ttl=-5), "garbage"):
        error, close, _ = refused(srv, **bearer(forged))
        assert close == 4401, error
    first: Client = srv.client(**bearer(token("alice")))
    for _ in range(3):
        too_many(srv)
    first.close()
    wait_until(lambda: admitted(srv), "alice's only slot to come back")


def test_redis_outage_falls_back_to_the_node_count_and_heals(make_server, own_redis) -> None:
    """Redis stopped: a node judges by its own count (the limit still holds on
    it, and nothing fails); Redis restarted empty: the node writes its counts
    back, so the other node refuses the user again."""
    a_srv, b_srv = nodes(make_server, own_redis, 2, limit=1, ttl=1)  # rewritten every ttl / 3
    name = a_srv.args[a_srv.args.index("--cluster-name") + 1]
    own_redis.stop()
    a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 503, "the node to see Redis gone")
    alice = a_srv.client(**bearer(token("alice")))
    too_many(a_srv)
    own_redis.start()  # empty: the restart lost every key
    client = redis.Redis(port=own_redis.port)
    try:

        def written_back() -> bool:
            entries = client.hvals(user_key(name, "alice"))  # node id -> "COUNT:DEADLINE"
            return [entry.split(b":")[0] for entry in entries] == [b"1"]

        wait_until(written_back, "A's count written back to Redis", TIMEOUT * 3)
        a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 200, "A back on Redis")
    finally:
        client.close()
    too_many(b_srv)
    alice.roundtrip()


def users_on_every_shard(redis_cluster: RedisCluster, prefix: str) -> list[str]:
    """One user per primary: user i's counts live on primary i."""
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0][0])
    try:
        by_shard: dict[str, str] = {}
        for i in itertools.count():
            user = f"u{next(_names)}x{i}"
            by_shard.setdefault(client.get_node_from_key(user_key(prefix, user)).name, user)
            if len(by_shard) == len(redis_cluster.ports):
                return sorted(by_shard.values())
    finally:
        client.close()
    raise AssertionError("unreachable")


def test_on_a_redis_cluster_the_limit_holds_for_users_on_every_shard(
    make_server, redis_cluster
) -> None:
    """Users whose counts are on each of the three primaries: each one's
    second connection is refused on either node, each one's slot comes back
    on the other node when it leaves; one user's count is not another's."""
    a_srv, b_srv = nodes(make_server, redis_cluster, 2, limit=1, ttl=30)
    prefix = a_srv.args[a_srv.args.index("--cluster-name") + 1]
    users = users_on_every_shard(redis_cluster, prefix)
    held = {user: a_srv.client(**bearer(token(user))) for user in users}
    for user in users:
        too_many(b_srv, user)
        too_many(a_srv, user)
    for user, ws in held.items():
        ws.roundtrip()
        ws.close()
        wait_until(lambda u=user: admitted(b_srv, u), f"{user}'s slot to come back on B")
        too_many(a_srv, user)
    assert a_srv.stats()["connections"]["node"] == 0
    assert b_srv.stats()["connections"]["node"] == len(users)
