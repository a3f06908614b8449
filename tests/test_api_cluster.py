"""The backend API in a cluster on Redis (decisions.md 14): several real
``wshub serve`` nodes on one real redis-server.

A publication through any node reaches the room's members on every node,
once, in order with the clients' own messages; listings and counts are
cluster-wide; a disconnect finds the connection wherever it lives, and
``user_left`` follows once.
"""

from __future__ import annotations

import httpx

from .conftest import Client, Server
from .test_cluster import FAST_REAP, cluster
from .waiting import wait_until

KEY = "k-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def api_cluster(make_server, redis_server, n: int, *extra: str) -> list[Server]:
    return cluster(make_server, redis_server, n, "--api-keys", KEY, *extra)


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.http_url + path, headers=AUTH, json=body, timeout=10)


def get(srv: Server, path: str) -> httpx.Response:
    return httpx.get(srv.http_url + path, headers=AUTH, timeout=10)


def settle(*clients: Client) -> None:
    """A ping's pong: whatever was sent to *clients* before was read, and
    ``recv_type`` asserts nothing else (but presence) was in between."""
    for client in clients:
        client.roundtrip()


def test_a_publication_through_any_node_reaches_every_member_once_in_order(
    make_server, redis_server
) -> None:
    a_srv, b_srv, c_srv = api_cluster(make_server, redis_server, 3)
    x, y = a_srv.client("feed"), b_srv.client("feed")
    x.recv_type("user_joined")
    # Interleaved with a client's own messages: x's first message, then a
    # publication through x's node, then x's second. Everyone sees that order.
    x.send({"type": "broadcast", "content": "x1"})
    x.recv_type("broadcast")
    assert post(a_srv, "/api/publish", {"room": "feed", "content": "api-a"}).status_code == 200
    x.send({"type": "broadcast", "content": "x2"})
    # Through the other member's node, and through a node with no member here.
    assert post(b_srv, "/api/publish", {"room": "feed", "content": "api-b"}).status_code == 200
    assert post(c_srv, "/api/publish", {"room": "feed", "content": "api-c"}).status_code == 200
    expected = [
        (x, ["api-a", "x2", "api-b", "api-c"]),
        (y, ["x1", "api-a", "x2", "api-b", "api-c"]),
    ]
    for client, wanted in expected:
        seen = [client.recv_type("broadcast")["content"] for _ in wanted]
        assert sorted(seen) == sorted(wanted), seen
        # What went through node A keeps A's order (one Redis connection out).
        assert [c for c in seen if c in ("x1", "api-a", "x2")] == [
            c for c in wanted if c in ("x1", "api-a", "x2")
        ]
    # Once each: a sentinel through every node comes after anything that node
    # sent before it, so a duplicate would show up before the sentinels.
    for name, srv in (("end-a", a_srv), ("end-b", b_srv), ("end-c", c_srv)):
        assert post(srv, "/api/publish", {"room": "feed", "content": name}).status_code == 200
    for client in (x, y):
        rest = [client.recv_type("broadcast")["content"] for _ in range(3)]
        assert sorted(rest) == ["end-a", "end-b", "end-c"], rest
    settle(x, y)
    # History on Redis: the answer names the offset the room's script gave it,
    # the one every member gets (and the epoch of their welcomes).
    answer = post(a_srv, "/api/publish", {"room": "feed", "content": "h"}).json()
    assert answer["room"] == "feed" and answer["epoch"] == x.welcome["epoch"]
    for client in (x, y):
        got = client.recv_type("broadcast")
        assert (got["content"], got["offset"]) == ("h", answer["offset"])
    x.close()
    y.close()


def test_a_message_excludes_a_connection_on_another_node(make_server, redis_server) -> None:
    a_srv, b_srv = api_cluster(make_server, redis_server, 2)
    x, y, z = a_srv.client("ex"), b_srv.client("ex"), b_srv.client("ex")
    response = post(
        a_srv, "/api/publish", {"type": "message", "room": "ex", "content": "m", "exclude": y.id}
    )
    assert response.status_code == 200
    assert x.recv_type("message")["content"] == "m"
    assert z.recv_type("message")["content"] == "m"
    settle(y)  # y's next message is its pong: it was left out
    for client in (x, y, z):
        client.close()


def test_listings_and_counts_are_cluster_wide(make_server, redis_server) -> None:
    a_srv, b_srv, c_srv = api_cluster(make_server, redis_server, 3)
    nodes = {srv.stats()["nodeId"]: srv for srv in (a_srv, b_srv)}
    x, y = a_srv.client("wide"), b_srv.client("wide")
    lobby = b_srv.client()
    rooms = {r["room"]: r["connectionCount"] for r in get(c_srv, "/api/rooms").json()["rooms"]}
    assert rooms == {"wide": 2, "": 1}
    detail = get(c_srv, "/api/rooms/wide").json()
    assert detail["connectionCount"] == 2
    where = {c["connectionId"]: c["node"] for c in detail["connections"]}
    assert nodes[where[x.id]] is a_srv and nodes[where[y.id]] is b_srv
    assert get(a_srv, "/api/rooms/").json()["connections"][0]["connectionId"] == lobby.id
    y.close()
    wait_until(
        lambda: get(a_srv, "/api/rooms/wide").json()["connectionCount"] == 1, "y gone from it"
    )
    x.close()
    lobby.close()


def test_a_disconnect_finds_the_connection_on_another_node(make_server, redis_server) -> None:
    a_srv, b_srv, c_srv = api_cluster(make_server, redis_server, 3)
    witness, doomed = a_srv.client("kick"), b_srv.client("kick")
    witness.recv_type("user_joined")
    response = post(c_srv, "/api/disconnect", {"connectionId": doomed.id, "reason": "go"})
    assert response.status_code == 200
    assert response.json() == {"disconnected": 1, "connections": [doomed.id]}
    left = witness.recv_type("user_left")
    assert left["connectionId"] == doomed.id and left["totalUsers"] == 1
    try:
        while True:
            doomed.ws.recv(timeout=10)
    except Exception:
        pass
    assert doomed.ws.close_code == 4000 and doomed.ws.close_reason == "go"
    settle(witness)  # no second user_left
    again = post(a_srv, "/api/disconnect", {"connectionId": doomed.id})
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "not_found"
    witness.close()


def test_a_cluster_without_redis_answers_503(make_server, own_redis) -> None:
    # A Redis of its own: stopping the session's would break every later test.
    (a_srv,) = api_cluster(make_server, own_redis, 1, *FAST_REAP)
    assert get(a_srv, "/api/rooms").status_code == 200
    own_redis.stop()
    wait_until(lambda: get(a_srv, "/api/rooms").status_code == 503, "503 without Redis")
    response = post(a_srv, "/api/publish", {"content": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
