"""The backend API when one node of the cluster does not answer (decisions.md
14): real ``wshub serve`` nodes on a real redis-server, one of them frozen
with SIGSTOP (a stuck event loop, a paused VM) while its lease still runs.

Found by the cluster audit: a disconnect of a connection on the frozen node
answered ``404`` ("no such connection is connected"), and the frozen node
closed that connection as soon as it ran again; listings answered without the
frozen node's members. Not every node answered, so neither is known: ``503``.
"""

from __future__ import annotations

import signal

from .test_api_cluster import api_cluster, get, post
from .test_audit_cluster_presence import wait_closed


def test_a_node_that_does_not_answer_makes_the_answer_503_not_a_partial_one(
    make_server, redis_server
) -> None:
    # A lease that outlasts the freeze: each of the three calls below waits
    # 2 s (ANSWER_TIMEOUT) for the frozen node. At --node-ttl 1 the node was
    # reaped 1 s into it, and passed only while, thawed, it read the disconnect
    # before its lease refresh found it reaped (then: 1012, not 4000).
    a_srv, b_srv = api_cluster(make_server, redis_server, 2, "--node-ttl", "30")
    mine, theirs = a_srv.client("room"), b_srv.client("room")
    assert mine.recv_type("user_joined")["connectionId"] == theirs.id
    b_srv.proc.send_signal(signal.SIGSTOP)
    try:
        gone = post(a_srv, "/api/disconnect", {"connectionId": theirs.id})
        assert gone.status_code == 503, gone.text
        assert gone.json()["error"]["code"] == "unavailable"
        assert get(a_srv, "/api/rooms").status_code == 503
        assert get(a_srv, "/api/rooms/room").status_code == 503
        # A disconnect that closed something says so, whoever did not answer.
        closed = post(a_srv, "/api/disconnect", {"connectionId": mine.id})
        assert closed.status_code == 200 and closed.json()["connections"] == [mine.id]
    finally:
        b_srv.proc.send_signal(signal.SIGCONT)
    assert wait_closed(mine).code == 4000
    # The frozen node acts on the disconnect it heard once it runs: that is
    # why its silence was no "not found".
    assert wait_closed(theirs).code == 4000
