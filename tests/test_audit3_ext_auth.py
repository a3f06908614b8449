"""A black-box reading of decisions.md 15 and 19 on connect tokens, over real
sockets: the sentences the earlier token tests leave out."""

from __future__ import annotations

import time

import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Server
from .test_auth_server import NO_LIMITS, bearer, nothing_seen, refused

SECRET = "another-test-secret-of-32-bytes-or-more"


def plain_token(sub: str = "alice", ttl: float = 60, **claims: object) -> str:
    """A token for a server without --auth-audience and --auth-issuer."""
    return jwt.encode({"sub": sub, "exp": time.time() + ttl, **claims}, SECRET, "HS256")


def test_without_an_audience_a_token_carrying_aud_is_refused(make_server) -> None:
    """19: without --auth-audience a token with ``aud`` was minted for another
    service: one ``error`` (unauthorized), 4401, nothing counted; the same token
    without ``aud`` passes."""
    srv: Server = make_server("--auth", "optional", "--auth-secret", SECRET, *NO_LIMITS)
    observer = srv.client()
    for aud in ("chat", ["chat", "other"]):
        error, close, _ = refused(srv, **bearer(plain_token(aud=aud)))
        assert (error["type"], error["code"], close) == ("error", "unauthorized", 4401)
    nothing_seen(observer)
    assert srv.stats()["connections"]["node"] == 1
    alice = srv.client(**bearer(plain_token()))
    assert alice.welcome["userId"] == "alice"


def test_refused_refreshes_change_nothing_the_old_exp_still_closes(make_server) -> None:
    """19: a refused ``refresh`` is answered with ``unauthorized`` and changes
    nothing: after an expired, a garbage, a shorter-lived and a narrower token, the
    first token's ``exp`` still closes the connection with 4401 ``token expired``."""
    srv: Server = make_server("--auth", "required", "--auth-secret", SECRET, *NO_LIMITS)
    ttl = 3.0 * max(1.0, TIMEOUT / 5)
    started = time.time()
    alice = srv.client("r1", **bearer(plain_token(ttl=ttl, rooms=["r1"])))
    for bad in (
        plain_token(ttl=-5),  # expired
        "not.a.token",
        plain_token(ttl=ttl / 3),  # not later than the current one
        plain_token(ttl=ttl * 10, rooms=["r2"]),  # does not open this room
        plain_token(sub="mallory", ttl=ttl * 10),
    ):
        alice.send({"type": "refresh", "token": bad})
        error = alice.recv_type("error")
        assert error["code"] == "unauthorized", error
    alice.roundtrip()  # still open, still a member
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            alice.ws.recv(timeout=ttl + TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "token expired")
    assert time.time() - started >= ttl - 0.5  # at the first token's exp, not before
