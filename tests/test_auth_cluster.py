"""--max-connections-per-user across a cluster (decisions.md 15, issue 15 item 1):
real ``wshub serve`` nodes on one real redis-server, clients over real sockets.

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

from .conftest import TIMEOUT, Client, RedisServer, Server
from .test_auth_server import AUTH, NO_LIMITS, bearer, refused, token
from .waiting import wait_until

_names = itertools.count()


def nodes(
    make_server: Callable[..., Server], redis: RedisServer, n: int, limit: int, ttl: float = 1
) -> list[Server]:
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


def test_the_limit_holds_across_two_nodes(make_server, redis_server) -> None:
    a_srv, b_srv = nodes(make_server, redis_server, 2, limit=2)
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


def test_simultaneous_connects_on_both_nodes_take_exactly_the_limit(
    make_server, redis_server
) -> None:
    """The check and the add are one step on Redis: 12 connects for one user,
    at once, split over two nodes, with a limit of 3: exactly 3 welcomes."""
    a_srv, b_srv = nodes(make_server, redis_server, 2, limit=3)
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


def test_a_killed_node_stops_counting_within_the_node_ttl(make_server, redis_server) -> None:
    ttl = 2.0
    a_srv, b_srv = nodes(make_server, redis_server, 2, limit=2, ttl=ttl)
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


def test_a_stopped_node_gives_its_users_slots_back(make_server, redis_server) -> None:
    a_srv, b_srv = nodes(make_server, redis_server, 2, limit=1, ttl=30)
    b_srv.client(**bearer(token("alice")))
    too_many(a_srv)
    assert b_srv.stop() == 0  # a drain: its connections close, its counts go
    assert admitted(a_srv)


def test_any_sub_is_one_user_on_redis(make_server, redis_server) -> None:
    """A sub with Redis and Lua metacharacters, newlines and non-ASCII is one
    user, counted as itself; a sub that differs only in case is another."""
    a_srv, b_srv = nodes(make_server, redis_server, 2, limit=1)
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
    a_srv, b_srv = nodes(make_server, own_redis, 2, limit=1)
    name = a_srv.args[a_srv.args.index("--cluster-name") + 1]
    own_redis.stop()
    a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 503, "the node to see Redis gone")
    alice = a_srv.client(**bearer(token("alice")))
    too_many(a_srv)
    own_redis.start()  # empty: the restart lost every key
    client = redis.Redis(port=own_redis.port)
    try:

        def written_back() -> bool:
            return any(
                client.hget(key, "alice") == b"1"
                for key in client.scan_iter(f"{name}:node:*:users")
            )

        wait_until(written_back, "A's count written back to Redis", TIMEOUT * 3)
        a_srv.wait_for(lambda: a_srv.get("/readyz")[0] == 200, "A back on Redis")
    finally:
        client.close()
    too_many(b_srv)
    alice.roundtrip()
