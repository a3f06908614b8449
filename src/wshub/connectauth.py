"""Connect tokens on a node (decisions.md 15): the credentials step of the
upgrade, the per-user count, the expiry timers and ``refresh``.

:mod:`wshub.auth` is the pure core (what a token proves); this module applies
it to connections. A refused token still completes the upgrade: its
connection gets a :class:`RefusedOwner`, which sends one ``error`` and closes
(4401, 4403) without a welcome, presence or a place in any room. A member's
identity lives on the connection (``conn.identity``); its hub asks this
module to count it, to close it when its ``exp`` passes, and to answer its
``refresh``.

What this module may not know: rooms' members, the frames of the fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import http, protocol
from .auth import AuthRefusal, Identity, TokenVerifier, room_allowed, token_offer
from .config import Config
from .connection import Connection
from .errors import FORBIDDEN_ROOM, TOKEN_EXPIRED, TOO_MANY_CONNECTIONS, Disconnect
from .ids import ConnectionId
from .logs import log_event
from .protocol import ErrorCode, Refusal
from .session import State
from .usercount import ClusterUserCount
from .wire import text_frame

__all__ = ["ConnectAuth", "RefusedOwner", "Rejection"]

log = logging.getLogger("wshub")

_FORBIDDEN_ROOM = Refusal(ErrorCode.FORBIDDEN_ROOM, "Your token does not open this room")
_TOO_MANY = Refusal(
    ErrorCode.TOO_MANY_CONNECTIONS,
    "Too many connections for this user (--max-connections-per-user)",
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a connection is closed straight after its upgrade: one error, then a close."""

    refusal: Refusal
    disconnect: Disconnect


class _Host(Protocol):
    """What a refused connection tells the node (a subset of HubHost)."""

    def member_closing(self, conn: Connection) -> None: ...

    def member_closed(self, conn: Connection, previous: State) -> None: ...

    def member_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None: ...


class RefusedOwner:
    """The owner of a connection whose token was refused: the error, the close,
    and nothing else. It is never a member, so never counted as a connection;
    its admission slot is released when it closes, like any other's."""

    def __init__(self, host: _Host, rejection: Rejection) -> None:
        self._host = host
        self._rejection = rejection

    def on_open(self, conn: Connection) -> None:
        conn.write(text_frame(protocol.encode_error(self._rejection.refusal)))
        conn.close(self._rejection.disconnect)

    def on_text(self, conn: Connection, text: str) -> None:
        """Frames sent before the client saw its Close: ignored."""

    def on_binary(self, conn: Connection, data: bytes) -> None:
        """Ignored, as on_text."""

    def on_rate_limited(self, conn: Connection, *, disconnect: bool) -> None:
        """Not rate limited: it is closing already."""

    def on_closing(self, conn: Connection) -> bytes:
        self._host.member_closing(conn)
        return b""

    def on_closed(self, conn: Connection, previous: State) -> None:
        self._host.member_closed(conn, previous)

    def on_connect(self, conn: Connection) -> bytes | None:
        raise AssertionError("a connection is accepted by the gateway")

    def on_request(self, conn: Connection, request: http.Request) -> None:
        raise AssertionError("an upgraded connection makes no HTTP request")

    def on_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        self._host.member_refused(conn, status, reason, detail)


class ConnectAuth:
    """``--auth optional|required`` on this node."""

    def __init__(
        self,
        config: Config,
        verifier: TokenVerifier,
        *,
        host: _Host,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
        users: ClusterUserCount | None = None,
    ) -> None:
        self._verifier = verifier
        # With --redis-url the per-user count is the cluster's: taken before
        # the 101 (reserve()), not when the hub admits the member (joined()).
        self.users = users
        self._reserved: dict[Connection, str] = {}
        self._query_token = config.auth_query_token == "on"
        self._max_per_user = config.max_connections_per_user
        self._host = host
        self._loop = loop
        self._clock = clock  # Unix time: tokens' exp is Unix seconds
        self._per_user: dict[str, int] = {}
        self._timers: dict[ConnectionId, asyncio.TimerHandle] = {}
        if verifier.weak_secret:
            log_event(
                log,
                logging.WARNING,
                "auth_weak_secret",
                detail="--auth-secret is shorter than 32 bytes: easier to guess offline",
            )

    # -- The credentials step of the upgrade ----------------------------------------

    def credentials(
        self, request: http.Request, room: str | None
    ) -> tuple[Identity | Rejection | None, str | None]:
        """The verdict on the token *request* offers (an identity, None for
        anonymous, or a rejection) and the subprotocol to answer."""
        offer = token_offer(
            request.get_all("sec-websocket-protocol"),
            request.get_all("authorization"),
            request.target.partition("?")[2],
            query_token=self._query_token,
        )
        verdict = self._verifier.authenticate(offer.token, self._clock())
        if isinstance(verdict, AuthRefusal):
            return Rejection(verdict.refusal, verdict.disconnect), offer.subprotocol
        if verdict is not None and room is not None and not room_allowed(verdict, room):
            return Rejection(_FORBIDDEN_ROOM, FORBIDDEN_ROOM), offer.subprotocol
        return verdict, offer.subprotocol

    def refused_owner(self, rejection: Rejection) -> RefusedOwner:
        return RefusedOwner(self._host, rejection)

    # -- Members ----------------------------------------------------------------------

    def reserve(self, conn: Connection, then: Callable[[Rejection | None], None]) -> None:
        """Count *conn*'s user across the cluster (it has an identity), then
        call *then* with None (counted until :meth:`release`) or the 4429
        rejection. Only with :attr:`users`."""
        users = self.users
        assert users is not None and conn.identity is not None
        user = conn.identity.user_id

        def counted(ok: bool) -> None:
            if ok:
                self._reserved[conn] = user
            then(None if ok else Rejection(_TOO_MANY, TOO_MANY_CONNECTIONS))

        users.acquire(user, counted)

    def release(self, conn: Connection) -> None:
        """*conn*'s cluster count is given back (once; nothing if it had none)."""
        user = self._reserved.pop(conn, None)
        if user is not None and self.users is not None:
            self.users.release(user)

    def joined(self, conn: Connection, identity: Identity) -> Rejection | None:
        """*conn* is becoming a member as *identity*: counted, and closed when
        its token expires; or a rejection when the user has too many."""
        if self.users is not None:  # counted by reserve() before its upgrade
            self._schedule(conn, identity)
            return None
        user = identity.user_id
        count = self._per_user.get(user, 0)
        if self._max_per_user and count >= self._max_per_user:
            return Rejection(_TOO_MANY, TOO_MANY_CONNECTIONS)
        self._per_user[user] = count + 1
        self._schedule(conn, identity)
        return None

    def left(self, conn: Connection, identity: Identity) -> None:
        """A member counted by :meth:`joined` is gone."""
        timer = self._timers.pop(conn.id, None)
        if timer is not None:
            timer.cancel()
        if self.users is not None:
            self.release(conn)
            return
        user = identity.user_id
        count = self._per_user.get(user, 0) - 1
        if count > 0:
            self._per_user[user] = count
        else:
            self._per_user.pop(user, None)

    def refresh(self, conn: Connection, token: str, room: str) -> bytes:
        """Answer a member's ``refresh``: ``refreshed`` and its timer moved, or
        ``unauthorized`` with nothing changed."""
        identity = conn.identity
        verdict = self._verifier.verify_refresh(identity, token, self._clock(), room=room)
        if isinstance(verdict, AuthRefusal):
            return protocol.encode_error(verdict.refusal)
        conn.identity = verdict
        self._schedule(conn, verdict)
        # verify_refresh only accepts a later exp, so there is one.
        assert verdict.expires_at is not None
        return protocol.encode_refreshed(verdict.expires_at)

    def _schedule(self, conn: Connection, identity: Identity) -> None:
        timer = self._timers.pop(conn.id, None)
        if timer is not None:
            timer.cancel()
        if identity.expires_at is None:
            return
        delay = max(0.0, identity.expires_at - self._clock())
        self._timers[conn.id] = self._loop.call_later(delay, self._expired, conn)

    def _expired(self, conn: Connection) -> None:
        self._timers.pop(conn.id, None)
        if conn.session.state is State.OPEN:
            conn.close(TOKEN_EXPIRED)
