"""Presence a node rebuilds names the user (decisions.md 15, issue 15's last
item): real ``wshub serve`` nodes on a real redis-server, clients over real
sockets with tokens.

A survivor that announces a killed node's connections as ``user_left``, and a
node whose resync after a Redis outage finds a join it never heard, carry the
``userId`` of each authenticated connection, as the node that served it would
have; an anonymous connection's frames carry none.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections.abc import Callable

from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Client, RedisServer, Server, free_port
from .test_auth_server import AUTH, NO_LIMITS, bearer, token
from .test_cluster import Supervised, _worker_pids, departures_until_pong

_names = itertools.count()

ODD_USER = 'al|ice\t"userId"\n:*{x} é'  # the envelope's and the presence hash's separators


def nodes(make_server: Callable[..., Server], redis: RedisServer, n: int) -> list[Server]:
    name = f"presenceusers{next(_names)}"
    return [
        make_server(
            "--auth",
            "optional",
            *AUTH,
            *NO_LIMITS,
            "--redis-url",
            redis.url,
            "--cluster-name",
            name,
            "--node-ttl",
            "1",
        )  # fmt: skip
        for _ in range(n)
    ]


def presence(watcher: Client, kind: str, count: int, timeout: float) -> dict[str, dict]:
    """The next *count* frames of *kind* the watcher gets, by connection id."""
    seen: dict[str, dict] = {}
    while len(seen) < count:
        frame = watcher.recv_type(kind, timeout=timeout)
        assert frame["connectionId"] not in seen, f"announced twice: {frame}"
        seen[frame["connectionId"]] = frame
    return seen


def test_a_killed_nodes_users_are_named_in_their_user_left(make_server, redis_server) -> None:
    a_srv, b_srv = nodes(make_server, redis_server, 2)
    watcher = b_srv.client("lobby")
    alice = a_srv.client("lobby", **bearer(token("alice")))
    odd = a_srv.client("lobby", **bearer(token(ODD_USER)))
    anonymous = a_srv.client("lobby")
    joined = presence(watcher, "user_joined", 3, TIMEOUT)
    assert joined[alice.id]["userId"] == "alice" and joined[odd.id]["userId"] == ODD_USER
    assert "userId" not in joined[anonymous.id]
    a_srv.proc.kill()
    a_srv.proc.wait()
    # A survivor reaps the node once its lease (1 s) expired.
    left = presence(watcher, "user_left", 3, 2 + TIMEOUT)
    assert left[alice.id]["userId"] == "alice"
    assert left[odd.id]["userId"] == ODD_USER
    assert "userId" not in left[anonymous.id]
    assert left[anonymous.id]["totalUsers"] == 1
    watcher.roundtrip()  # and nothing else came


def test_a_late_joiner_names_the_users_it_only_read_from_redis(make_server, redis_server) -> None:
    """A node that entered the room after alice joined elsewhere knows her
    from the room's presence in Redis alone; it still names her when her node
    dies."""
    a_srv, b_srv = nodes(make_server, redis_server, 2)
    alice = a_srv.client("late", **bearer(token("alice")))
    anonymous = a_srv.client("late")
    watcher = b_srv.client("late")  # B subscribes the room only now
    assert watcher.welcome["connectionCount"] == 3
    a_srv.proc.kill()
    a_srv.proc.wait()
    left = presence(watcher, "user_left", 2, 2 + TIMEOUT)
    assert left[alice.id]["userId"] == "alice"
    assert "userId" not in left[anonymous.id]


def test_a_join_found_by_the_resync_after_an_outage_names_its_user(make_server, own_redis) -> None:
    """Redis stops; alice joins on A meanwhile (B cannot hear it); Redis
    comes back empty, A writes its presence back, and B's resync announces
    alice's join with her userId, and the anonymous one's without."""
    a_srv, b_srv = nodes(make_server, own_redis, 2)
    watcher = b_srv.client("outage")
    before = a_srv.client("outage")  # A is in the room before the outage, subscribed
    presence(watcher, "user_joined", 1, TIMEOUT)
    own_redis.stop()
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda s=srv: s.get("/readyz")[0] == 503, "the node to see Redis gone")
    alice = a_srv.client("outage", **bearer(token("alice")))
    anonymous = a_srv.client("outage")
    own_redis.start()
    found = presence(watcher, "user_joined", 2, 3 * TIMEOUT)
    assert before.id not in found
    assert found[alice.id]["userId"] == "alice"
    assert "userId" not in found[anonymous.id]


def test_the_supervisor_names_a_dead_workers_users(redis_server) -> None:
    """--workers 2: a worker killed with SIGKILL is reaped by the supervisor,
    whose user_left for each of its connections names the user it had."""
    sup = Supervised(
        free_port(),
        *("--redis-url", redis_server.url, "--cluster-name", f"presenceworkers{next(_names)}"),
        *("--auth", "optional", *AUTH, *NO_LIMITS),
    )
    try:
        with sup.explaining():
            sup.wait_listening(2)
            server = sup.server()
            users: dict[str, str | None] = {}
            clients = []
            for i in range(16):
                # Every fourth anonymous; the kernel spreads them over the workers.
                kwargs = {} if i % 4 == 3 else bearer(token(f"user-{i}"))
                client = server.client(**kwargs)
                users[client.id] = client.welcome.get("userId")
                clients.append(client)
            os.kill(_worker_pids(sup.proc.pid)[0], signal.SIGKILL)
            # The dead worker's clients find their connection closed; the
            # supervisor may have reaped it before a survivor's ping is
            # answered, so the departures come from the first frame on.
            survivors: dict[str, list[dict]] = {}
            for client in clients:
                with contextlib.suppress(ConnectionClosed):
                    survivors[client.id] = departures_until_pong(client)
            gone = {c.id for c in clients} - survivors.keys()
            assert survivors and gone
            watcher = next(c for c in clients if c.id in survivors)
            early = survivors[watcher.id]
            left = presence(watcher, "user_left", len(gone) - len(early), 3 * TIMEOUT)
            for frame in early:
                assert frame["connectionId"] not in left, f"announced twice: {frame}"
                left[frame["connectionId"]] = frame
            assert set(left) == gone
            for cid, frame in left.items():
                assert frame.get("userId") == users[cid], frame
            assert any(users[cid] is not None for cid in gone)
    finally:
        assert sup.stop() == 0, sup.log()
