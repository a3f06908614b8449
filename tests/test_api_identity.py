"""The backend API with connect tokens on (decisions.md 14 and 15): listings name each
connection's ``userId`` and a disconnect by ``userId`` closes every connection of that
user, a real server, real tokens."""

from __future__ import annotations

import httpx

from .conftest import Server
from .test_api_served import AUTH as API_AUTH
from .test_api_served import KEY, LIMITS
from .test_auth_server import AUTH, bearer, token
from .waiting import wait_until


def test_listings_name_users_and_a_disconnect_by_user_closes_all_of_theirs(
    make_server,
) -> None:
    srv: Server = make_server("--api-keys", KEY, "--auth", "optional", *AUTH, *LIMITS)
    alice = [srv.client("who", **bearer(token("alice"))) for _ in range(2)]
    bob = srv.client("who", **bearer(token("bob")))
    anonymous = srv.client("who")
    with httpx.Client(base_url=srv.http_url, timeout=10) as http:
        detail = http.get("/api/rooms/who", headers=API_AUTH).json()
        users = {c["connectionId"]: c.get("userId") for c in detail["connections"]}
        assert users == {
            alice[0].id: "alice",
            alice[1].id: "alice",
            bob.id: "bob",
            anonymous.id: None,
        }
        response = http.post("/api/disconnect", headers=API_AUTH, json={"userId": "alice"})
        assert response.status_code == 200
        assert response.json()["disconnected"] == 2
        assert sorted(response.json()["connections"]) == sorted(c.id for c in alice)
    for conn in alice:
        wait_until(lambda conn=conn: _closed(conn), "alice's connections to close")
        assert conn.ws.close_code == 4000
    # Bob and the anonymous connection stay, and each hears alice leave twice (two ids).
    for witness in (bob, anonymous):
        left = {witness.recv_type("user_left")["connectionId"] for _ in alice}
        assert left == {c.id for c in alice}
        witness.roundtrip()


def _closed(client) -> bool:  # noqa: ANN001
    try:
        client.ws.recv(timeout=0.2)
    except TimeoutError:
        return False
    except Exception:  # noqa: BLE001 - the close, however the library reports it
        return True
    return client.ws.close_code is not None
