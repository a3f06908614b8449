"""Connect tokens on a real server (decisions.md 15), over real sockets.

A good token gives the connection its ``userId``; every refused token still
completes the upgrade, gets one ``error`` and close 4401, and counts nowhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import TIMEOUT, Client, Server
from .rawws import RawClient, encode_frame

SECRET = "a-test-secret-that-is-32-bytes-long!"
AUD = "chat"
ISS = "backend"
NO_LIMITS = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")
ALG_NONE = b'{"alg":"none","typ":"JWT"}'
EVE = b'{"sub":"eve"}'
EVE_CLAIMS = {"sub": "eve", "aud": AUD, "iss": ISS}
AUTH = ("--auth-secret", SECRET, "--auth-audience", AUD, "--auth-issuer", ISS)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: Any = "alice", ttl: float = 60, **claims: Any) -> str:
    now = time.time()
    body = {"sub": sub, "aud": AUD, "iss": ISS, "iat": int(now), "exp": int(now + ttl)}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, "HS256")


def hs256_by_hand(key: bytes, claims: dict[str, Any], alg: str = "HS256") -> str:
    """Signed without PyJWT's checks (it refuses a PEM as an HMAC key)."""
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def swap_payload(signed: str, sub: str) -> str:
    """*signed* with its payload replaced by one naming *sub*, the old signature kept."""
    head, body, signature = signed.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return f"{head}.{b64(json.dumps({**claims, 'sub': sub}).encode())}.{signature}"


def bearer(value: str) -> dict[str, object]:
    return {"subprotocols": ["wshub", "bearer." + value]}


def refused(server: Server, room: str | None = None, **kwargs: object) -> tuple[dict, int, str]:
    """Connect (the upgrade completes), read the one error, then the close."""
    ws = server.connect(room, **kwargs)
    error = json.loads(ws.recv(timeout=TIMEOUT))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    return error, closed.value.rcvd.code, closed.value.rcvd.reason


def nothing_seen(observer: Client) -> None:
    """The observer gets its pong with no presence event before it."""
    observer.send({"type": "ping"})
    while True:
        message = observer.recv()
        assert message["type"] in ("pong", "ping"), message
        if message["type"] == "pong":
            return


@pytest.fixture(scope="module")
def rsa_public_pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("keys") / "public.pem"
    path.write_bytes(pem)
    return path, pem


def test_good_token_gives_user_id_everywhere(make_server: Callable[..., Server]) -> None:
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    ws = srv.connect(**bearer(token("alice")))
    assert ws.subprotocol == "wshub"
    welcome = json.loads(ws.recv(timeout=TIMEOUT))
    assert welcome["type"] == "welcome" and welcome["userId"] == "alice"
    alice = Client(ws, welcome["connectionId"], welcome)
    bob = srv.client(additional_headers={"Authorization": "Bearer " + token("bob")})
    assert bob.welcome["userId"] == "bob"
    joined = alice.recv_type("user_joined")
    assert joined["connectionId"] == bob.id and joined["userId"] == "bob"
    bob.send({"type": "message", "content": "hi"})
    got = alice.recv_type("message")
    assert (got["userId"], got["connectionId"], got["content"]) == ("bob", bob.id, "hi")
    alice.send({"type": "broadcast", "content": "all"})
    for client in (alice, bob):
        got = client.recv_type("broadcast")
        assert got["userId"] == "alice" and got["connectionId"] == alice.id
    bob.close()
    left = alice.recv_type("user_left")
    assert left["connectionId"] == bob.id and left["userId"] == "bob"
    assert srv.stats()["connections"]["node"] == 1


@pytest.mark.parametrize(
    ("name", "make", "code"),
    [
        ("alg_none", lambda: f"{b64(ALG_NONE)}.{b64(EVE)}.", "unauthorized"),
        ("wrong_aud", lambda: token(aud="other"), "unauthorized"),
        ("wrong_iss", lambda: token(iss="other"), "unauthorized"),
        ("expired", lambda: token(ttl=-10), "token_expired"),
        ("future_nbf", lambda: token(nbf=int(time.time()) + 600), "unauthorized"),
        ("garbage", lambda: "not-a-token", "unauthorized"),
        ("over_8KiB", lambda: token(pad="x" * 9 * 1024), "unauthorized"),
        ("sub_not_string", lambda: token(sub=12), "unauthorized"),
        ("sub_129_chars", lambda: token(sub="a" * 129), "unauthorized"),
        ("other_secret", lambda: jwt.encode(EVE_CLAIMS, "x" * 40), "unauthorized"),
        ("truncated", lambda: token()[:-5], "unauthorized"),
        ("swapped_payload", lambda: swap_payload(token("alice"), "admin"), "unauthorized"),
        ("empty", lambda: "", "unauthorized"),
    ],
)
def test_attacks_fail_closed_and_count_nowhere(
    make_server: Callable[..., Server], name: str, make: Callable[[], str], code: str
) -> None:
    srv = make_server("--auth", "optional", *AUTH, *NO_LIMITS)
    observer = srv.client()  # anonymous under optional
    assert "userId" not in observer.welcome
    error, close, _ = refused(srv, **bearer(make()))
    assert error == {"type": "error", "code": code, "message": error["message"]}
    assert close == 4401
    nothing_seen(observer)
    assert srv.stats()["connections"]["node"] == 1
    # The same token in the Authorization header: the same refusal.
    error, close, _ = refused(srv, additional_headers={"Authorization": "Bearer " + make()})
    assert (error["code"], close) == (code, 4401)
    nothing_seen(observer)
    assert srv.stats()["connections"]["node"] == 1


def test_two_different_tokens_are_refused_not_one_picked(
    make_server: Callable[..., Server],
) -> None:
    """A good token in one place and another in the other: refused, whichever
    is good (a proxy checking one while the server trusts the other is a bypass)."""
    srv = make_server("--auth", "optional", *AUTH, *NO_LIMITS)
    good, forged = token("alice"), jwt.encode(EVE_CLAIMS, "x" * 40)
    for subprotocol, header in ((good, forged), (forged, good), (good, token("bob"))):
        error, close, _ = refused(
            srv, **bearer(subprotocol), additional_headers={"Authorization": f"Bearer {header}"}
        )
        assert (error["code"], close) == ("unauthorized", 4401)
    same = srv.client(**bearer(good), additional_headers={"Authorization": f"Bearer {good}"})
    assert same.welcome["userId"] == "alice"
    assert srv.stats()["connections"]["node"] == 1 and srv.stats()["rooms"] <= 1


def test_20kib_token_is_refused_before_any_upgrade(make_server: Callable[..., Server]) -> None:
    """Past the 16 KiB request-head bound the request itself is refused (431)."""
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    with pytest.raises(InvalidStatus) as refusal:
        srv.connect(**bearer(token(pad="x" * 20 * 1024)))
    assert refusal.value.response.status_code == 431


def test_hs256_signed_with_the_rsa_public_key_fails(
    make_server: Callable[..., Server], rsa_public_pem: tuple[Path, bytes]
) -> None:
    path, pem = rsa_public_pem
    srv = make_server("--auth", "required", "--auth-public-key", str(path), *NO_LIMITS)
    forged = hs256_by_hand(pem, {"sub": "eve", "exp": int(time.time()) + 60})
    error, close, _ = refused(srv, **bearer(forged))
    assert (error["code"], close) == ("unauthorized", 4401)
    assert srv.stats()["connections"]["node"] == 0


def test_required_without_token_and_optional_without_token(
    make_server: Callable[..., Server],
) -> None:
    required = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    error, close, _ = refused(required)
    assert (error["code"], close) == ("unauthorized", 4401)
    optional = make_server("--auth", "optional", *AUTH, *NO_LIMITS)
    anonymous = optional.client()
    assert "userId" not in anonymous.welcome
    other = optional.client()
    joined = anonymous.recv_type("user_joined")
    assert "userId" not in joined
    other.send({"type": "message", "content": "x"})
    assert "userId" not in anonymous.recv_type("message")


def test_rooms_claim(make_server: Callable[..., Server]) -> None:
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    scoped = token(rooms=["", "game-*"])
    error, close, _ = refused(srv, "lobby", **bearer(scoped))
    assert (error["code"], close) == ("forbidden_room", 4403)
    assert srv.stats()["rooms"] == 0  # a refused token creates no room
    game = srv.client("game-7", **bearer(scoped))
    assert game.welcome["room"] == "game-7" and game.welcome["userId"] == "alice"
    default = srv.client(**bearer(scoped))
    assert default.welcome["room"] == ""


def test_per_user_limit(make_server: Callable[..., Server]) -> None:
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS, "--max-connections-per-user", "1")
    first = srv.client(**bearer(token("alice")))
    error, close, _ = refused(srv, **bearer(token("alice")))
    assert (error["code"], close) == ("too_many_connections", 4429)
    nothing_seen(first)
    first.roundtrip()
    other = srv.client(**bearer(token("bob")))  # another user is not limited
    assert first.recv_type("user_joined")["userId"] == "bob"
    assert srv.stats()["connections"]["node"] == 2
    first.close()
    srv.wait_for(lambda: srv.stats()["connections"]["node"] == 1, "alice to leave")
    again = srv.client(**bearer(token("alice")))  # her slot came back
    assert again.welcome["userId"] == "alice"
    other.close()


def test_exp_closes_and_refresh_keeps_it(make_server: Callable[..., Server]) -> None:
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    short = srv.client(**bearer(token("alice", ttl=3)))
    kept = srv.client(**bearer(token("bob", ttl=3)))
    new = token("bob", ttl=30)
    new_exp = jwt.decode(new, options={"verify_signature": False})["exp"]
    kept.send({"type": "refresh", "token": new})
    refreshed = kept.recv_type("refreshed")
    assert refreshed["expiresAt"].startswith(
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(new_exp))
    )
    with pytest.raises(ConnectionClosed) as closed:
        short.recv_type("never", timeout=TIMEOUT + 3)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "token expired")
    left = kept.recv_type("user_left")
    assert left["userId"] == "alice"
    kept.roundtrip()  # past alice's (and bob's old) exp: still open


def test_refresh_for_another_sub_is_refused(make_server: Callable[..., Server]) -> None:
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    alice = srv.client(**bearer(token("alice", ttl=3)))
    alice.send({"type": "refresh", "token": token("mallory", ttl=60)})
    assert alice.recv_type("error")["code"] == "unauthorized"
    with pytest.raises(ConnectionClosed) as closed:
        alice.recv_type("never", timeout=TIMEOUT + 3)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


def test_refused_tokens_count_toward_the_connect_rate(make_server: Callable[..., Server]) -> None:
    srv = make_server(
        "--auth", "required", *AUTH, "--ip-connect-rate", "2", "--max-connections-per-ip", "2",
        "--message-rate", "0",
    )  # fmt: skip
    statuses = []
    for _ in range(6):
        try:
            error, close, _ = refused(srv, **bearer("garbage"))
            statuses.append(close)
        except InvalidStatus as exc:
            statuses.append(exc.response.status_code)
    assert statuses[0] == 4401 and 429 in statuses, statuses


def test_auth_off_refresh_is_unknown_and_no_user_id(server: Server) -> None:
    client = server.client(**bearer(token("alice")))  # ignored with --auth off
    # ``wshub`` is answered all the same: a browser fails a handshake where it
    # offered subprotocols and got none back.
    assert "userId" not in client.welcome and client.ws.subprotocol == "wshub"
    client.send({"type": "refresh", "token": token("alice")})
    assert client.recv_type("error")["code"] == "unknown_type"


def test_user_id_and_offset_together_and_in_the_replay(make_server: Callable[..., Server]) -> None:
    """History on (the one-node default): a member's frames carry both its
    ``userId`` and the room's ``offset``, and a replay keeps the ``userId``."""
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    alice = srv.client("r", **bearer(token("alice")))
    assert alice.welcome["userId"] == "alice" and alice.welcome["offset"] == 0
    epoch = alice.welcome["epoch"]
    bob = srv.client("r", **bearer(token("bob")))
    assert alice.recv_type("user_joined")["userId"] == "bob"
    bob.send({"type": "message", "content": "one"})
    got = alice.recv_type("message")
    assert (got["userId"], got["content"], got["offset"]) == ("bob", "one", 1)
    alice.send({"type": "broadcast", "content": "two"})
    got = bob.recv_type("broadcast")
    assert (got["userId"], got["content"], got["offset"]) == ("alice", "two", 2)
    late = srv.client(f"r?since={epoch}:0", **bearer(token("carol")))
    assert (late.welcome["recovered"], late.welcome["missed"]) == (True, 2)
    assert late.welcome["userId"] == "carol"
    replay = [late.recv(), late.recv()]
    assert [(f["userId"], f["offset"], f["replayed"]) for f in replay] == [
        ("bob", 1, True),
        ("alice", 2, True),
    ]


def test_a_refused_connection_reaches_no_room(make_server: Callable[..., Server]) -> None:
    """A forged token's upgrade request and its frames in one write, so they
    are in the server's buffer before it refuses: nothing reaches the room, its
    history or its presence."""
    srv = make_server("--auth", "optional", *AUTH, *NO_LIMITS)
    observer = srv.client("r")
    raw = RawClient(srv.host, srv.port)
    forged = "bearer." + jwt.encode(EVE_CLAIMS, "x" * 40)
    head = (
        f"GET /websocket/r HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wshub, {forged}\r\n\r\n"
    )
    frames = b"".join(
        encode_frame(0x1, json.dumps({"type": kind, "content": "forged"}).encode())
        for kind in ("broadcast", "message", "broadcast")
    )
    try:
        raw.send(head.encode() + frames)
        assert b" 101 " in raw.read_until(b"\r\n\r\n")
        opcode, payload, _ = raw.recv_frame()
        assert opcode == 0x1 and json.loads(payload)["code"] == "unauthorized"
        assert raw.recv_close()[0] == 4401
    finally:
        raw.close()
    nothing_seen(observer)
    late = srv.client(f"r?since={observer.welcome['epoch']}:0")
    assert (late.welcome["offset"], late.welcome["missed"]) == (0, 0)  # no history entry
    assert srv.stats()["connections"]["node"] == 2


def test_query_token_only_when_switched_on(make_server: Callable[..., Server]) -> None:
    off = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    error, close, _ = refused(off, f"r?token={token('alice')}")
    assert (error["code"], close) == ("unauthorized", 4401)
    on = make_server("--auth", "required", *AUTH, *NO_LIMITS, "--auth-query-token", "on")
    client = on.client(f"r?token={token('alice')}")
    assert client.welcome["userId"] == "alice" and client.welcome["room"] == "r"
