"""The door of the node: every new connection's owner until its upgrade.

A request head comes in; the route table (:mod:`wshub.routes`) finds its
endpoint, or answers 404/405. The WebSocket endpoints run the upgrade as one
pipeline, each step free to refuse before the next runs:

1. the upgrade headers (426, 400, 405) and the room's name (400);
2. the origin (403, decisions.md 7);
3. admission: per-IP and node limits (429, 503, decisions.md 8);
4. the credentials: the token of decisions.md 15 (:mod:`wshub.connectauth`),
   after admission so a refused token's attempt counts toward the per-IP
   limits and a flood of forgeries is rate limited before it costs a
   signature check. A refused token is no HTTP refusal: the upgrade completes,
   then one ``error`` and a close (4401, or 4403 for a room the token does not
   open), with no room entered, no welcome, no presence and no count;
5. the room: one more room past ``--max-rooms`` is 503 (decisions.md 12);

then the 101 response, and the connection belongs to its room's hub. When the
hub is not ready yet (in a cluster, the room's state is being read from the
backplane) the connection waits, still CONNECTING, and is upgraded when it is.

What this module may not know: rooms' members, the protocol's messages.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from websockets.extensions.permessage_deflate import PerMessageDeflate

from . import http, protocol
from .admission import Admission, BadForwardedFor, Refused, client_address, is_trusted
from .auth import answered_subprotocol
from .config import Config
from .connectauth import ConnectAuth, Rejection
from .connection import Connection, ConnectionOwner
from .history import QueryRefusal, parse_join_query
from .ids import ConnectionId, new_connection_id
from .logs import LineLimiter, log_event
from .nodemetrics import Counters
from .origin import OriginPolicy
from .rooms import RoomName, room_from_path
from .routes import Route, Router
from .session import State
from .wire import Deflate, negotiate_deflate

__all__ = ["Gateway", "RoomDirectory", "Upgrade"]

log = logging.getLogger("wshub")

_FD_RESERVE = 32
"""File descriptors kept for the listening sockets, Redis, logs and the like."""


def _raise_nofile(config: Config) -> int:
    """Raise the soft open-files limit towards the hard one, as far as the
    limits can use (every connection open and every handshake slot full):
    a soft limit of 1,024, common by default, would refuse a storm far below
    --max-connections although the hard limit allows it. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if config.max_connections and config.effective_max_handshakes:
        wanted = config.max_connections + config.effective_max_handshakes + _FD_RESERVE
    else:
        wanted = hard  # unlimited: as many as the system allows
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft  # refused (a container's limit): the budget says what is left
        return wanted
    return soft


def _fd_budget(config: Config) -> int:
    """How many client sockets this process can hold: the open-files limit
    minus a reserve. Logged at start when the limits ask for more."""
    soft = _raise_nofile(config)
    if soft == resource.RLIM_INFINITY:
        return 1 << 62
    budget = max(1, soft - _FD_RESERVE)
    if config.max_connections == 0 or config.max_connections > budget:
        log_event(
            log,
            logging.WARNING,
            "fd_limit_low",
            nofile=soft,
            client_sockets=budget,
            detail="sockets past this are refused with 503 at accept; the soft limit is raised "
            "up to the hard one at start: raise the hard limit (ulimit -Hn, LimitNOFILE=, "
            "docker --ulimit nofile=) above --max-connections plus --max-handshakes",
        )
    return budget


class Upgrade:
    """A granted upgrade, waiting for its room to be ready."""

    __slots__ = ("conn", "connection_id", "response", "extension", "deflate", "_done")

    def __init__(
        self,
        conn: Connection,
        connection_id: ConnectionId,
        response: bytes,
        extension: PerMessageDeflate | None,
        deflate: Deflate | None,
        done: Callable[[Connection], None],
    ) -> None:
        self._done = done
        self.conn = conn
        self.connection_id = connection_id
        self.response = response
        self.extension = extension
        self.deflate = deflate

    def complete(self, owner: ConnectionOwner, now: float, *, rate_limited: bool = True) -> None:
        """Write the 101 response; *owner* has the connection from now on.
        (Nothing, when the client went away meanwhile.)"""
        conn = self.conn
        if conn.session.state is not State.CONNECTING or conn.transport.is_closing():
            return  # gone while waiting: its on_closed() ended the handshake
        self._done(conn)
        conn.upgrade(
            owner,
            self.connection_id,
            self.response,
            self.extension,
            self.deflate,
            now,
            rate_limited=rate_limited,
        )


class RoomDirectory(Protocol):
    """What the gateway asks of the node about rooms."""

    def enter(self, room: RoomName, upgrade: Upgrade) -> bool:
        """Hand *upgrade* to *room*'s hub (created when the room is new);
        False when one more room is past ``--max-rooms``."""
        ...

    def is_live(self, connection_id: ConnectionId) -> bool:
        """Whether *connection_id* is in use on this node."""
        ...

    def connection_ended(self, conn: Connection, previous: State) -> None:
        """A connection the gateway still owned is gone."""


class Gateway:
    """The owner of a connection while it speaks HTTP."""

    def __init__(
        self,
        config: Config,
        monotonic: Callable[[], float],
        *,
        rooms: RoomDirectory,
        admission: Admission,
        counters: Counters,
        routes: Sequence[Route[Connection]],
        echo: ConnectionOwner,
        websockets: bool = True,
        auth: ConnectAuth | None = None,
    ) -> None:
        self._config = config
        self._auth = auth  # None: --auth off, every connection anonymous
        self._now = monotonic
        # Sockets accepted and not upgraded (nor gone) yet, less those that
        # asked for a plain HTTP page (/stats itself): decisions.md 6's
        # CONNECTING is a WebSocket state. The at-accept cap counts them all.
        self.connecting = 0
        self._plain_http: set[Connection] = set()
        # Refused requests are logged at most ~5/s per reason (issue 19.4).
        self._refusal_lines = LineLimiter()
        self._fd_budget = _fd_budget(config)
        self._rooms = rooms
        self._admission = admission
        self._counters = counters
        self._origins = OriginPolicy(config.allowed_origins, config.server_names)
        # Without *websockets* (the --api-listen address) only *routes* are served.
        socket_routes: list[Route[Connection]] = []
        if websockets:
            socket_routes += [
                Route("/websocket", self._websocket),
                Route("/websocket/", self._websocket, prefix=True),
            ]
        if websockets and config.echo_endpoint == "on":
            socket_routes.append(Route("/echo", self._echo))
        self.router: Router[Connection] = Router([*socket_routes, *routes])
        self._upgrade_endpoints = {route.endpoint for route in socket_routes}
        self._echo_owner = echo

    # -- ConnectionOwner (the HTTP phase) ---------------------------------------

    def _begin_socket(self, peer: str) -> tuple[str, Refused] | None:
        """Count a socket just accepted from *peer* as unfinished, or say why
        it is refused: over the pre-upgrade caps or the file descriptor budget
        (issue 19.2)."""
        admission = self._admission
        if admission.handshakes_total + admission.open_total >= self._fd_budget:
            # Past this, accept() would fail with EMFILE, and the event loop
            # resets those connections without a word: refuse them ourselves.
            return "fd_limit", Refused(503, "server is out of file descriptors")
        refused = admission.begin_handshake(peer)
        return None if refused is None else ("handshake_limit", refused)

    def on_connect(self, conn: Connection) -> bytes | None:
        """A socket was accepted (under TLS: its TLS handshake is done): refused
        at once over the pre-upgrade caps or the file descriptor budget."""
        refusal = self._begin_socket(conn.peer)
        if refusal is not None:
            reason, refused = refusal
            self.on_refused(conn, refused.status, reason, refused.reason)
            return http.response(
                refused.status, refused.reason + "\n", headers=(("Retry-After", "1"),)
            )
        self.connecting += 1
        return None

    # -- HandshakeSlots (wshub.tlsaccept: a TLS socket before its handshake ends) --

    def begin_tls(self, peer: str) -> bool:
        """A socket for TLS was accepted: it holds a slot of the same caps from
        now on, or is refused (closed: no status can be said before TLS)."""
        refusal = self._begin_socket(peer)
        if refusal is None:
            return True
        reason, refused = refusal
        self._refused(peer, refused.status, reason, refused.reason, tls="closed at accept")
        return False

    def end_tls(self, peer: str) -> None:
        """Its TLS handshake is over: the slot is given back (a connection that
        follows takes one again in :meth:`on_connect`, in the same loop pass)."""
        self._admission.end_handshake(peer)

    def _handshake_over(self, conn: Connection) -> None:
        if conn in self._plain_http:
            self._plain_http.discard(conn)
        else:
            self.connecting -= 1
        self._admission.end_handshake(conn.peer)

    def _served_as(self, conn: Connection, upgrade: bool) -> None:
        """Count *conn* as connecting only while its request is an upgrade (a
        kept-alive socket may ask for a page, then upgrade)."""
        if upgrade and conn in self._plain_http:
            self._plain_http.discard(conn)
            self.connecting += 1
        elif not upgrade and conn not in self._plain_http:
            self._plain_http.add(conn)
            self.connecting -= 1

    def on_request(self, conn: Connection, request: http.Request) -> None:
        """Answer one HTTP request: an endpoint, or the WebSocket upgrade."""
        try:
            route = self.router.match(request)
        except http.HttpError as exc:
            self._served_as(conn, upgrade=False)
            self._http_error(conn, exc, request)
            return
        self._served_as(conn, upgrade=route.endpoint in self._upgrade_endpoints)
        try:
            if route.reads_body:
                framing = None
            elif not route.max_body:
                http.expect_no_body(request)
                framing = None
            else:
                framing = http.body_framing(request, route.max_body)
        except http.HttpError as exc:
            self._http_error(conn, exc, request)
            return
        if framing is None or framing.length == 0:
            self._call(conn, route, request)
            return

        def with_body(body: bytes) -> None:
            self._call(
                conn,
                route,
                http.Request(
                    request.method, request.target, request.headers, body, request.version
                ),
            )

        reader = http.BodyReader(framing, route.max_body)
        conn.read_body(reader, with_body, framing.expect_continue)

    def _call(self, conn: Connection, route: Route[Connection], request: http.Request) -> None:
        try:
            route.endpoint(conn, request)
        except http.HttpError as exc:
            self._http_error(conn, exc, request)

    def _http_error(self, conn: Connection, exc: http.HttpError, request: http.Request) -> None:
        if exc.status != 404:
            self.on_refused(conn, exc.status, http.refusal_reason(exc.status), exc.body)
        # A HEAD answer never has a body (RFC 9110 9.3.2), errors included: a
        # client or proxy would take the body for the start of the next response.
        conn.respond(
            http.response(
                exc.status, exc.body + "\n", headers=exc.headers, head_only=request.method == "HEAD"
            )
        )

    def on_refused(
        self, conn: Connection, status: int, reason: str, detail: str, **fields: object
    ) -> None:
        self._refused(conn.peer, status, reason, detail, **fields)

    def _refused(self, peer: str, status: int, reason: str, detail: str, **fields: object) -> None:
        self._counters.refused.inc_label(reason)
        if not log.isEnabledFor(logging.INFO):
            return
        suppressed = self._refusal_lines.allow(reason, self._now())
        if suppressed is None:
            return
        log_event(
            log,
            logging.INFO,
            "refused",
            peer=peer,
            status=status,
            reason=reason,
            detail=detail,
            **fields,
            **({"suppressed": suppressed} if suppressed else {}),
        )

    def report_suppressed(self) -> None:
        """Refusal lines dropped by the rate limit since the last line that
        passed: said once per sweep, so a flood that stops is still reported."""
        for reason, count in self._refusal_lines.take_suppressed().items():
            log_event(log, logging.INFO, "refused_suppressed", reason=reason, count=count)

    def on_closed(self, conn: Connection, previous: State) -> None:
        self._handshake_over(conn)
        self._rooms.connection_ended(conn, previous)
        if self._auth is not None and self._auth.users is not None:
            self._auth.release(conn)  # counted, then gone before it was a member

    def on_open(self, conn: Connection) -> None:
        raise AssertionError("the gateway hands a connection over before it opens")

    def on_text(self, conn: Connection, text: str) -> None:
        raise AssertionError("no frames before the upgrade")

    def on_binary(self, conn: Connection, data: bytes) -> None:
        raise AssertionError("no frames before the upgrade")

    def on_rate_limited(self, conn: Connection, *, disconnect: bool) -> None:
        raise AssertionError("no frames before the upgrade")

    def on_closing(self, conn: Connection) -> bytes:
        raise AssertionError("no closing handshake before the upgrade")

    # -- The upgrade pipeline ------------------------------------------------------

    def _websocket(self, conn: Connection, request: http.Request) -> None:
        room = room_from_path(request.path)
        if room is None:
            # Before the upgrade check: a bad name is 400 with or without
            # upgrade headers (decisions.md 19).
            raise http.HttpError(400, "invalid room name: 1-64 characters of A-Z a-z 0-9 . _ ~ -")
        # since / history / previous (decisions.md 13): a value that does not
        # parse is a 400 before the upgrade, with or without history on.
        query = request.target.partition("?")[2]
        if query:
            join = parse_join_query(query)
            if isinstance(join, QueryRefusal):
                raise http.HttpError(400, join.reason)
            if join.since is not None or join.history is not None:
                conn.join = join
        self._upgrade(conn, request, room)

    def _echo(self, conn: Connection, request: http.Request) -> None:
        self._upgrade(conn, request, None)

    def _upgrade(self, conn: Connection, request: http.Request, room: RoomName | None) -> None:
        accept = http.check_upgrade(request)
        # 2. Origin.
        origin = request.get("origin")
        host = request.get("host")
        if not self._origins.allows(origin, host, self._scheme(conn, request)):
            # The origin as a field of its own: clipped and escaped once by log_event.
            self.on_refused(conn, 403, "origin", "origin not allowed", origin=origin, host=host)
            conn.respond(http.response(403, "origin not allowed\n"))
            return
        # 3. Admission (credentials come after it: see the module's docstring).
        try:
            ip = client_address(
                conn.peer, request.get_all("x-forwarded-for"), self._config.trusted_proxies
            )
        except BadForwardedFor as exc:
            self.on_refused(conn, 400, "bad_request", str(exc))
            conn.respond(http.response(400, "malformed X-Forwarded-For\n"))
            return
        now = self._now()
        refused = self._admission.check(ip, now)
        if refused is not None:
            reason = {503: "unavailable", 429: "ip_limit"}[refused.status]
            self._refuse(conn, refused.status, reason, refused.reason)
            return
        conn.ip = sys.intern(ip)  # the peer's own string, or one per proxied address
        # Interned: a site's browsers all send the same few origins, and one
        # string per connection cost ~70 B of an idle connection's memory.
        conn.origin = sys.intern(origin) if origin is not None else None
        conn.admitted = True
        # 4. Credentials.
        verdict: Rejection | None = None
        if self._auth is not None:
            credentials, subprotocol = self._auth.credentials(request, room)
            if isinstance(credentials, Rejection):
                verdict = credentials
            else:
                conn.identity = credentials
        else:  # tokens ignored, the subprotocol answered all the same
            subprotocol = answered_subprotocol(request.get_all("sec-websocket-protocol"))
        extension = deflate = None
        extensions_header = None
        if self._config.compression == "on":
            try:
                offer = negotiate_deflate(request.get_all("sec-websocket-extensions"))
            except Exception:
                offer = None  # a malformed offer: go on uncompressed
            if offer is not None:
                extensions_header, extension, deflate = offer
        connection_id = new_connection_id(protocol.unix_ms(time.time()))
        while self._rooms.is_live(connection_id):  # 36^9 makes this a formality
            connection_id = new_connection_id(protocol.unix_ms(time.time()))
        response = http.switching_protocols(accept, extensions_header, subprotocol=subprotocol)
        upgrade = Upgrade(conn, connection_id, response, extension, deflate, self._handshake_over)
        if verdict is not None and self._auth is not None:
            # Outside every room, so a forged token creates none.
            upgrade.complete(self._auth.refused_owner(verdict), now, rate_limited=False)
            return
        if room is None:  # /echo: outside every room, and not rate limited
            upgrade.complete(self._echo_owner, now, rate_limited=False)
            return
        # 5. The room.
        conn.room = room
        if self._auth is not None and self._auth.users is not None and conn.identity is not None:
            # --max-connections-per-user across the cluster: Redis answers first.
            conn.hold()
            self._auth.reserve(conn, lambda rejection: self._counted(upgrade, room, rejection))
            return
        if not self._rooms.enter(room, upgrade):
            self._refuse(conn, 503, "rooms", "this node is at its room limit (--max-rooms)")

    def _counted(self, upgrade: Upgrade, room: RoomName, rejection: Rejection | None) -> None:
        """The cluster's per-user count answered for a held upgrade."""
        conn = upgrade.conn
        assert self._auth is not None
        if conn.session.state is not State.CONNECTING or conn.transport.is_closing():
            self._auth.release(conn)  # gone while Redis answered
            return
        if rejection is not None:  # one error, then 4429, never a member
            upgrade.complete(self._auth.refused_owner(rejection), self._now(), rate_limited=False)
            return
        if not self._rooms.enter(room, upgrade):
            self._refuse(conn, 503, "rooms", "this node is at its room limit (--max-rooms)")

    def _scheme(self, conn: Connection, request: http.Request) -> str:
        """The scheme the client used: https over TLS, or as a trusted proxy's
        X-Forwarded-Proto says; else http (issue 19.7)."""
        if conn.transport.get_extra_info("sslcontext") is not None:
            return "https"
        proto = request.get_all("x-forwarded-proto")
        if proto and is_trusted(conn.peer, self._config.trusted_proxies):
            # The proxy nearest to us appends last.
            last = proto[-1].rpartition(",")[2].strip().lower()
            if last in ("http", "https"):
                return last
        return "http"

    def _refuse(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        self.on_refused(conn, status, reason, detail)
        headers = (("Retry-After", "1"),)
        conn.respond(http.response(status, detail + "\n", headers=headers))
