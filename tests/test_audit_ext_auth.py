"""Outside-tester attacks on connect tokens (decisions.md 15 and 19), on a real
``wshub serve`` over real sockets."""

from __future__ import annotations

from collections.abc import Callable

from .conftest import Server
from .test_auth_server import AUTH, NO_LIMITS, bearer, token


def test_an_anonymous_members_refresh_under_auth_optional_is_refused_unauthorized(
    make_server: Callable[..., Server],
) -> None:
    """decisions.md 19: "A refused refresh is answered with an error
    (unauthorized) and changes nothing". Under --auth optional a member without
    a token has none to refresh: its refresh is refused like any other, not an
    unknown type (that is --auth off's answer, the seed's). The member stays
    anonymous and connected."""
    srv = make_server("--auth", "optional", *AUTH, *NO_LIMITS)
    anonymous = srv.client()
    assert "userId" not in anonymous.welcome
    anonymous.send({"type": "refresh", "token": token("alice")})
    error = anonymous.recv_type("error")
    assert error["code"] == "unauthorized", error
    anonymous.send({"type": "refresh"})
    assert anonymous.recv_type("error")["code"] == "unauthorized"
    observer = srv.client()
    anonymous.send({"type": "broadcast", "content": "still me"})
    seen = observer.recv_type("broadcast")
    assert seen["connectionId"] == anonymous.id and "userId" not in seen, seen
    # A member with a token refreshes as before under optional.
    alice = srv.client(**bearer(token("alice", ttl=30)))
    alice.send({"type": "refresh", "token": token("alice", ttl=90)})
    assert alice.recv_type("refreshed")["expiresAt"].endswith("Z")
