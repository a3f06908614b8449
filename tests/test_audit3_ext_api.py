"""A black-box reading of decisions.md 14 and 19 on the backend API, over real
sockets: what the earlier API tests leave out (a disconnect by ``userId`` across
a cluster, a publication into an empty room seen through ``?history=``).
"""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Client, Server
from .test_auth_server import AUTH as TOKEN_AUTH
from .test_auth_server import bearer, token
from .test_cluster import cluster

KEY = "k-0123456789abcdef"
API_AUTH = {"Authorization": f"Bearer {KEY}"}


def post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.http_url + path, headers=API_AUTH, json=body, timeout=10)


def close_of(client: Client) -> tuple[int, str]:
    """Read *client* to its close; the code and reason the server sent."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            client.ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None, "no Close frame from the server"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_a_disconnect_by_user_closes_theirs_on_every_node_and_each_leaves_once(
    make_server, redis_server
) -> None:
    """14: ``{"userId"}`` "closes those connections wherever they are in the
    cluster; user_left follows once for each", with the code and reason given."""
    a_srv, b_srv, c_srv = cluster(
        make_server, redis_server, 3, "--api-keys", KEY, "--auth", "optional", *TOKEN_AUTH
    )
    witness_r = a_srv.client("r")
    witness_s = b_srv.client("s")
    alice = [
        a_srv.client("r", **bearer(token("alice"))),
        b_srv.client("r", **bearer(token("alice"))),
        b_srv.client("s", **bearer(token("alice"))),
    ]
    bob = b_srv.client("r", **bearer(token("bob")))
    for _ in range(3):  # alice twice and bob in r
        witness_r.recv_type("user_joined")
    witness_s.recv_type("user_joined")
    response = post(c_srv, "/api/disconnect", {"userId": "alice", "code": 4100, "reason": "bye"})
    assert response.status_code == 200, response.text
    assert response.json()["disconnected"] == 3
    assert sorted(response.json()["connections"]) == sorted(c.id for c in alice)
    for conn in alice:
        assert close_of(conn) == (4100, "bye")
    left_r = [witness_r.recv_type("user_left") for _ in range(2)]
    assert sorted(m["connectionId"] for m in left_r) == sorted([alice[0].id, alice[1].id])
    assert all(m["userId"] == "alice" for m in left_r)
    left_s = witness_s.recv_type("user_left")
    assert (left_s["connectionId"], left_s["userId"]) == (alice[2].id, "alice")
    # Once each: after a roundtrip through every witness's node nothing else came.
    for witness in (witness_r, witness_s):
        witness.roundtrip()
    bob.roundtrip()
    again = post(a_srv, "/api/disconnect", {"userId": "alice"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    for client in (witness_r, witness_s, bob):
        client.close()


def test_a_publication_into_an_empty_room_is_replayed_by_history_with_its_offset(
    make_server,
) -> None:
    """19: publishing into a room without members is 200 and enters its
    history; 13: a later ``?history=N`` join replays it with that offset."""
    srv = make_server("--api-keys", KEY, "--ip-connect-rate", "0", "--max-connections-per-ip", "0")
    first = post(srv, "/api/publish", {"room": "quiet", "content": "one"})
    second = post(srv, "/api/publish", {"room": "quiet", "content": "two", "connectionId": "bot"})
    assert first.status_code == second.status_code == 200
    assert second.json()["offset"] == first.json()["offset"] + 1
    ws = srv.connect("quiet?history=10")
    welcome = json.loads(ws.recv(timeout=TIMEOUT))
    assert welcome["type"] == "welcome" and welcome["epoch"] == first.json()["epoch"]
    assert welcome["offset"] == second.json()["offset"]
    replayed = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in range(2)]
    assert [(m["content"], m["connectionId"], m["offset"]) for m in replayed] == [
        ("one", "server", first.json()["offset"]),
        ("two", "bot", second.json()["offset"]),
    ]
    ws.close()


def test_a_message_that_excluded_a_connection_is_left_out_of_its_replay(make_server) -> None:
    """19: "would have received" is what the former connection was sent: a
    publication of type ``message`` whose ``exclude`` named it is not replayed to
    it by ``previous=``; a ``broadcast`` naming it (exclude ignored) is."""
    srv = make_server("--api-keys", KEY, "--ip-connect-rate", "0", "--max-connections-per-ip", "0")
    gone = srv.client("rep")
    observer = srv.client("rep")
    gone.recv_type("user_joined")
    bodies = [
        {"type": "message", "content": "not-for-gone", "exclude": gone.id},
        {"type": "message", "content": "for-all"},
        {"type": "broadcast", "content": "bcast", "exclude": gone.id},
        {"type": "message", "content": "not-for-observer", "exclude": observer.id},
    ]
    offsets = {}
    for body in bodies:
        answer = post(srv, "/api/publish", {"room": "rep", **body})
        assert answer.status_code == 200, answer.text
        offsets[body["content"]] = answer.json()["offset"]
    live = [gone.recv_type("message", "broadcast")["content"] for _ in range(3)]
    assert live == ["for-all", "bcast", "not-for-observer"]
    gone.close()
    epoch, top = gone.welcome["epoch"], gone.welcome["offset"]
    ws = srv.connect(f"rep?since={epoch}:{top}&previous={gone.id}")
    welcome = json.loads(ws.recv(timeout=TIMEOUT))
    assert welcome["recovered"] is True and welcome["missed"] == 3
    replay = [json.loads(ws.recv(timeout=TIMEOUT)) for _ in range(3)]
    assert [(m["content"], m["offset"]) for m in replay] == [
        (name, offsets[name]) for name in ("for-all", "bcast", "not-for-observer")
    ]
    ws.close()
    observer.close()
