"""Nothing published after a Redis outage is lost once the nodes say they are
back (decisions.md: delivery is at most once while Redis is unreachable, but
a publication made after the backplane reported itself reconnected arrives).

Two real ``wshub serve`` nodes exchange traffic (so that their pooled Redis
connections exist and were used), the Redis they share (one Redis, or the
primary of the room's shard of a 3-primary Redis Cluster) is restarted, and
once each node has seen the outage and says it is ready again, the very first
publication of each node reaches the other: no retry, no "send until one
crosses". History on and off: with history on a room's publications go out
through the history script's pipeline, with it off through the backplane's.
"""

from __future__ import annotations

import itertools

import pytest

from wshub.backplane.redis_cluster import ClusterKeys

from .conftest import TIMEOUT, Client, Server
from .test_cluster import FAST_REAP, cluster
from .test_cluster_redis_cluster import prefix_of, shard_of
from .waiting import wait_until

_rooms = itertools.count()

HISTORY = pytest.mark.parametrize("history", ["0", "50"], ids=["history-off", "history-on"])


def exchange(a_srv: Server, b_srv: Server, room: str, text: str) -> list[Client]:
    """A member of *room* on each node; each node's first publication (the
    join, then a message each way) reaches the other at the first try."""
    x = a_srv.client(room)
    y = b_srv.client(room)
    assert x.recv_type("user_joined")["connectionId"] == y.id, text
    x.send({"type": "message", "content": f"{text} a->b"})
    assert y.recv_type("message")["content"] == f"{text} a->b"
    y.send({"type": "message", "content": f"{text} b->a"})
    assert x.recv_type("message")["content"] == f"{text} b->a"
    return [x, y]


def reconnects(srv: Server) -> float:
    return srv.metric("wshub_backplane_reconnects_total") or 0


def back_after_the_outage(nodes: list[Server], before: list[float], timeout: float) -> None:
    """Until each node has noticed the outage itself (its reconnect counter
    moved: a /readyz 200 from before it noticed means nothing) and says it is
    ready again."""
    for srv, seen in zip(nodes, before, strict=True):
        wait_until(
            lambda srv=srv, seen=seen: reconnects(srv) > seen and srv.get("/readyz")[0] == 200,
            "a reconnect, then readyz 200",
            timeout,
            0.05,
        )


@HISTORY
def test_the_first_publication_after_a_redis_restart_arrives(
    make_server, own_redis, history: str
) -> None:
    nodes = cluster(make_server, own_redis, 2, "--history-size", history, *FAST_REAP)
    room = f"outage{next(_rooms)}"
    for client in exchange(*nodes, room, "before"):
        client.close()  # with history on, a holder of the old epoch would get 1012
    before = [reconnects(srv) for srv in nodes]
    own_redis.stop()
    own_redis.start()  # empty: no persistence
    back_after_the_outage(nodes, before, TIMEOUT)
    for client in exchange(*nodes, room, "after"):
        client.close()


@HISTORY
def test_the_first_publication_after_a_cluster_primary_restart_arrives(
    make_server, own_redis_cluster, history: str
) -> None:
    # A lease longer than the outage (see test_cluster_redis_cluster.py): a
    # node reaped meanwhile would close its clients with 1012 instead.
    nodes = cluster(make_server, own_redis_cluster, 2, "--history-size", history, "--node-ttl", "8")
    room = f"outage{next(_rooms)}"
    for client in exchange(*nodes, room, "before"):
        client.close()
    before = [reconnects(srv) for srv in nodes]
    # The primary of the room's channel (and of its history and presence).
    victim = shard_of(own_redis_cluster, ClusterKeys(prefix_of(nodes[0])).room(room))
    own_redis_cluster.kill(victim)
    own_redis_cluster.start(victim)
    own_redis_cluster.wait_ok()
    back_after_the_outage(nodes, before, 3 * TIMEOUT)
    for client in exchange(*nodes, room, "after"):
        client.close()
