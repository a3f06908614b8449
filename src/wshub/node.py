"""The hub on one node: admission, the registry, routing, heartbeat, drain.

The node owns every protocol decision; :mod:`wshub.connection` only moves
bytes and :mod:`wshub.fanout` only writes them. Routing a message means:
encode it once (:mod:`wshub.protocol`), queue it for local recipients
(:class:`~wshub.fanout.Fanout`), and hand the same payload to the backplane
for the other nodes.

Time: ``loop.time()`` (monotonic) for deadlines and rate limits,
``time.time()`` for the timestamps clients see.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import resource
import time
from collections.abc import Callable, Iterable
from importlib import resources

from . import __version__, http, protocol
from .admission import Admission, BadForwardedFor, Refused, client_address, is_trusted
from .backplane import Backplane, Envelope, EventKind
from .backplane.memory import MemoryBackplane
from .config import Config
from .connection import Connection
from .errors import (
    HEARTBEAT_TIMEOUT,
    RATE_LIMIT_EXCEEDED,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    CloseCode,
    Disconnect,
)
from .fanout import Fanout, compiled_send_each
from .ids import ConnectionId, NodeId, new_connection_id, new_node_id
from .logs import LineLimiter, log_event
from .metrics import Metrics, close_code_label
from .origin import OriginPolicy
from .protocol import ErrorCode, Refusal, Relay, RelayKind
from .session import Session, State
from .wire import OP_BINARY, OP_TEXT, negotiate_deflate, ping_frame, text_frame
from .wire import frame as wire_frame

__all__ = ["Node"]

log = logging.getLogger("wshub")

_BINARY_REFUSAL = Refusal(
    ErrorCode.BINARY_NOT_SUPPORTED, "Binary frames are not supported: send JSON or text"
)
_RATE_REFUSAL = Refusal(ErrorCode.RATE_LIMITED, "Too many messages: slow down")
_PROTOCOL_PING_FRAME = ping_frame(b"wshub")
_REJOIN = Disconnect(CloseCode.SERVICE_RESTART, "cluster rejoin: please reconnect")
_MESSAGE = RelayKind.MESSAGE  # an enum member lookup costs ~170 ns in Python 3.11


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


_malloc_trim = _find_malloc_trim()

_FD_RESERVE = 32
"""File descriptors kept for the listening sockets, Redis, logs and the like."""


def _fd_budget(config: Config) -> int:
    """How many client sockets this process can hold: the open-files limit
    minus a reserve. Logged at start when the limits ask for more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
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
            detail="sockets past this are refused with 503 at accept; raise ulimit -n above "
            "--max-connections (+ room for handshakes)",
        )
    return budget


_FANOUT_BUCKETS = (0, 1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000)


class Node:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        backplane: Backplane | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        if backplane is None:
            node_id = NodeId(config.node_id) if config.node_id else new_node_id()
            if config.redis_url:
                from .backplane.redis import RedisBackplane

                backplane = RedisBackplane(
                    config.redis_url,
                    node_id,
                    node_ttl=config.node_ttl,
                    prefix=config.cluster_name,
                    on_rejoined_after_reap=self._rejoin,
                )
            else:
                backplane = MemoryBackplane(node_id, node_ttl=config.node_ttl)
        self.node_id = backplane.node_id
        self.backplane: Backplane = backplane
        self.conns: dict[ConnectionId, Connection] = {}
        self.admission = Admission(
            max_connections=config.max_connections,
            max_connections_per_ip=config.max_connections_per_ip,
            ip_connect_rate=config.ip_connect_rate,
            max_handshakes=config.effective_max_handshakes,
            max_handshakes_per_ip=config.effective_max_handshakes_per_ip,
            ipv4_prefix=config.ipv4_prefix,
            ipv6_prefix=config.ipv6_prefix,
            trusted_proxies=config.trusted_proxies,
        )
        self.origins = OriginPolicy(config.allowed_origins, config.server_names)
        # Refused requests are logged at most ~5/s per reason (issue 19.4).
        self._refusal_lines = LineLimiter()
        self._fd_budget = _fd_budget(config)
        self.fanout = Fanout(
            loop,
            self.conns.values,
            send_buffer_limit=config.send_buffer_limit,
            send_buffer_total=config.send_buffer_total,  # decisions.md 18
            on_slow_consumer=self._slow_consumer,
            on_send_failed=self._send_failed,
            send_each=compiled_send_each if config.direct_send == "on" else None,
        )
        if config.direct_send == "on" and compiled_send_each is None:
            log_event(
                log,
                logging.WARNING,
                "direct_send_unavailable",
                detail="wshub._directsend was not built at install (no C compiler or "
                "Python headers): every write goes through the transport",
            )
        self.started_at = time.time()
        self.draining = False
        self.n_connecting = 0
        self.n_closing = 0
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._drained: asyncio.Future[None] | None = None
        self._page: bytes | None = None
        self._page_headers: tuple[tuple[str, str], ...] = ()
        self._lag = 0.0
        self._setup_metrics()

    # -- Metrics ----------------------------------------------------------------

    def _setup_metrics(self) -> None:
        m = self.metrics = Metrics()
        m.gauge(
            "wshub_connections",
            "Connections on this node by state.",
            lambda: {
                "connecting": self.n_connecting,
                "open": len(self.conns),
                "closing": self.n_closing,
            },
            label="state",
        )
        m.gauge(
            "wshub_cluster_connections",
            "Open connections in the whole cluster, as this node knows them.",
            self.cluster_count,
        )
        self.accepted = m.counter(
            "wshub_connections_accepted_total", "WebSocket upgrades accepted."
        )
        self.refused = m.counter(
            "wshub_connections_refused_total",
            "Requests refused before or at the upgrade, by reason.",
            label="reason",
        )
        self.messages = m.counter(
            "wshub_messages_total",
            "Client data messages by outcome: INCOMING when received, VALIDATED when they "
            "passed the checks, ROUTED when handled or delivered, FAILED when refused.",
            label="outcome",
        )
        self.errors = m.counter("wshub_errors_total", "error messages sent, by code.", label="code")
        # Known label values start at 0, so dashboards see every series at once.
        for outcome in ("INCOMING", "VALIDATED", "ROUTED", "FAILED"):
            self.messages.inc_label(outcome, 0)
        self._outcomes = self.messages.values  # updated directly on the hot path
        for code in ErrorCode:
            self.errors.inc_label(code.value, 0)
        for reason in (
            "bad_request",
            "method",
            "upgrade_required",
            "too_large",
            "http_version",
            "origin",
            "ip_limit",
            "unavailable",
            "handshake_timeout",
            "handshake_limit",
            "fd_limit",
        ):
            self.refused.inc_label(reason, 0)
        self.closes = m.counter(
            "wshub_closes_total",
            "Closed WebSocket connections by close code (codes from clients outside the "
            "known ones are counted as 3000-3999, 4000-4999 or other).",
            label="code",
        )
        for close_code in ("1000", "1001", "1002", "1006", "1007", "1008", "1009", "1011"):
            self.closes.inc_label(close_code, 0)
        self.slow_closes = m.counter(
            "wshub_slow_consumer_closes_total",
            "Connections closed because their send buffer overflowed.",
        )
        self.rate_refusals = m.counter(
            "wshub_rate_limited_total", "Data frames refused by the per-connection rate limit."
        )
        self.send_failures = m.counter(
            "wshub_send_failures_total", "Writes to a client socket that raised."
        )
        self.fanout_sizes = m.histogram(
            "wshub_fanout_recipients", "Local recipients of each routed message.", _FANOUT_BUCKETS
        )
        m.gauge(
            "wshub_deliveries_total",
            "Frames written to local recipients.",
            lambda: self.fanout.deliveries,
            kind="counter",
        )
        m.gauge(
            "wshub_socket_writes_total",
            "Socket writes made by the fan-out (one carries "
            "every frame bound for a client in one loop pass).",
            lambda: self.fanout.writes,
            kind="counter",
        )
        m.gauge(
            "wshub_direct_sends_total",
            "Of those, the ones sent straight to the socket "
            "from one C call for many clients (--direct-send), not through the transport.",
            lambda: self.fanout.direct_sends,
            kind="counter",
        )
        # Floods and storms (decisions.md 18).
        m.gauge(
            "wshub_send_buffered_bytes",
            "Unsent bytes in client buffers, as the fan-out last saw them (an upper "
            "bound; --send-buffer-total caps it).",
            lambda: self.fanout.buffered_total,
        )
        m.gauge(
            "wshub_send_buffer_total_drops_total",
            "Closing connections whose socket was dropped, unsent bytes and all, to bring "
            "the node under --send-buffer-total.",
            lambda: self.fanout.budget_drops,
            kind="counter",
        )
        m.gauge(
            "wshub_fanout_pass_seconds_max",
            "The longest fan-out pass since start (one pass holds the event loop).",
            lambda: round(self.fanout.pass_seconds_max, 6),
        )
        m.gauge(
            "wshub_event_loop_lag_seconds",
            "How late the last 1 s loop-lag probe timer fired.",
            lambda: self._lag,
        )
        m.gauge(
            "wshub_backplane_up",
            "1 when the backplane link works (always 1 in memory).",
            lambda: self.backplane.metrics()["up"],
        )
        m.gauge(
            "wshub_cluster_nodes",
            "Nodes this node knows of with open connections, itself included.",
            lambda: self.backplane.metrics()["nodes"],
        )
        m.gauge(
            "wshub_backplane_received_total",
            "Envelopes received from other nodes.",
            lambda: self.backplane.metrics()["received"],
            kind="counter",
        )
        m.gauge(
            "wshub_backplane_forward_failures_total",
            "Envelopes that could not be "
            "forwarded to the other nodes (backplane down): dropped, at most once.",
            lambda: self.backplane.metrics()["forward_failures"],
            kind="counter",
        )
        m.gauge(
            "wshub_backplane_malformed_total",
            "Envelopes from the backplane that could not be handled: logged and skipped.",
            lambda: self.backplane.metrics().get("malformed", 0),
            kind="counter",
        )
        m.gauge(
            "wshub_backplane_reconnects_total",
            "Times the backplane subscription was rebuilt.",
            lambda: self.backplane.metrics()["reconnects"],
            kind="counter",
        )
        m.gauge(
            "wshub_uptime_seconds",
            "Seconds since this node started.",
            lambda: round(time.time() - self.started_at, 3),
        )

    def count_message(self, outcome: str) -> None:
        self.messages.inc_label(outcome)

    # -- Lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.backplane.start(self)
        self._every("heartbeat", self.config.heartbeat_interval, self._heartbeat)
        # Check often enough that a dead client is closed within a few percent
        # of the timeout, without walking all connections more than once a second.
        check = min(1.0, self.config.effective_heartbeat_timeout / 20)
        self._every("liveness", check, self._check_liveness)
        self._every("sweep", self.config.sweep_interval, self._sweep)
        self._probe_lag()

    def _every(self, name: str, interval: float, callback: Callable[[], None]) -> None:
        def tick() -> None:
            self._timers[name] = self.loop.call_later(interval, tick)
            callback()

        self._timers[name] = self.loop.call_later(interval, tick)

    def _probe_lag(self) -> None:
        """Measure how late a 1 s timer fires: a blocked loop shows here."""
        expected = self.loop.time() + 1.0

        def fire() -> None:
            self._lag = max(0.0, self.loop.time() - expected)
            self._probe_lag()

        self._timers["lag"] = self.loop.call_later(1.0, fire)

    async def drain(self, timeout: float) -> None:
        """Stop admitting, close every client with 1001, wait for them to go."""
        self.draining = True
        self.admission.draining = True
        deadline = self.loop.time() + timeout
        for conn in list(self.conns.values()):
            conn.close(SHUTTING_DOWN)
        self.fanout.flush()
        # Wait (event-driven, bounded) for the closing handshakes to finish.
        if self.n_closing > 0:
            self._drained = self.loop.create_future()
            try:
                await asyncio.wait_for(self._drained, max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                pass
        for handle in self._timers.values():
            handle.cancel()
        await self.backplane.stop()

    # -- Connections: admission and registry --------------------------------------

    def new_session(self) -> Session:
        c = self.config
        return Session(
            self.loop.time(),
            message_rate=c.message_rate,
            message_burst=c.message_burst,
            strike_limit=c.rate_limit_refusals,
            strike_window=c.rate_limit_window,
        )

    def connecting(self, conn: Connection) -> bytes | None:
        """A socket was accepted. Returns the response that refuses it at
        once (over the pre-upgrade caps, or the file descriptor budget: issue
        19.2), or None."""
        admission = self.admission
        refused: Refused | None
        if admission.handshakes_total + admission.open_total >= self._fd_budget:
            # Past this, accept() would fail with EMFILE, and the event loop
            # resets those connections without a word: refuse them ourselves.
            reason, refused = "fd_limit", Refused(503, "server is out of file descriptors")
        else:
            reason, refused = "handshake_limit", admission.begin_handshake(conn.peer)
        if refused is not None:
            conn.session.transition(State.CLOSED)  # never counted: nothing to undo
            self.refuse(conn, refused.status, reason, refused.reason)
            return http.response(
                refused.status, refused.reason + "\n", headers=(("Retry-After", "1"),)
            )
        self.n_connecting += 1
        return None

    def _handshake_over(self, conn: Connection) -> None:
        self.n_connecting -= 1
        self.admission.end_handshake(conn.peer)

    def refuse(
        self, conn: Connection, status: int, reason: str, detail: str, **fields: object
    ) -> None:
        self.refused.inc_label(reason)
        if not log.isEnabledFor(logging.INFO):
            return
        suppressed = self._refusal_lines.allow(reason, self.loop.time())
        if suppressed is None:
            return
        log_event(
            log,
            logging.INFO,
            "refused",
            peer=conn.peer,
            status=status,
            reason=reason,
            detail=detail,
            **fields,
            **({"suppressed": suppressed} if suppressed else {}),
        )

    def handle_request(self, conn: Connection, request: http.Request) -> None:
        """Answer one HTTP request: an endpoint, or the WebSocket upgrade."""
        try:
            path = request.path
            head = request.method == "HEAD"
            if path == "/websocket":
                self._upgrade(conn, request)
            elif path == "/echo" and self.config.echo_endpoint == "on":
                conn.echo = True
                self._upgrade(conn, request)
            elif path == "/":
                page = self._chat_page()
                conn.respond(
                    http.response(
                        200,
                        page,
                        content_type="text/html; charset=utf-8",
                        headers=self._page_headers,
                        head_only=head,
                    )
                )
            elif path == "/healthz":
                conn.respond(http.response(200, "ok\n", head_only=head))
            elif path == "/readyz":
                ready, reason = self.readiness()
                conn.respond(http.response(200 if ready else 503, reason + "\n", head_only=head))
            elif path == "/metrics":
                conn.respond(
                    http.response(
                        200,
                        self.metrics.render(),
                        content_type="text/plain; version=0.0.4; charset=utf-8",
                        head_only=head,
                    )
                )
            elif path == "/stats":
                conn.respond(
                    http.response(
                        200,
                        json.dumps(self.stats(), indent=2) + "\n",
                        content_type="application/json",
                        head_only=head,
                    )
                )
            else:
                conn.respond(http.response(404, "not found\n", head_only=head))
        except http.HttpError as exc:
            self.refuse(conn, exc.status, http.refusal_reason(exc.status), exc.body)
            conn.respond(http.response(exc.status, exc.body + "\n", headers=exc.headers))

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        ok, reason = self.backplane.ready()
        if not ok:
            # A fixed public phrase (issue 19.9): the backplane logs the details.
            return False, f"backplane: {reason}"
        if self.config.max_connections and len(self.conns) >= self.config.max_connections:
            return False, "full: at --max-connections"
        return True, "ready"

    def _scheme(self, conn: Connection, request: http.Request) -> str:
        """The scheme the client used: https over TLS, or as a trusted proxy's
        X-Forwarded-Proto says; else http (issue 19.7)."""
        if conn.transport.get_extra_info("sslcontext") is not None:
            return "https"
        proto = request.get_all("x-forwarded-proto")
        if proto and is_trusted(conn.peer, self.config.trusted_proxies):
            # The proxy nearest to us appends last.
            last = proto[-1].rpartition(",")[2].strip().lower()
            if last in ("http", "https"):
                return last
        return "http"

    def _chat_page(self) -> bytes:
        if self._page is None:
            self._page = resources.files("wshub").joinpath("static/index.html").read_bytes()
            self._page_headers = http.page_headers(self._page)
        return self._page

    def _upgrade(self, conn: Connection, request: http.Request) -> None:
        accept = http.check_upgrade(request)
        origin = request.get("origin")
        host = request.get("host")
        if not self.origins.allows(origin, host, self._scheme(conn, request)):
            # The origin as a field of its own: clipped and escaped once by log_event.
            self.refuse(conn, 403, "origin", "origin not allowed", origin=origin, host=host)
            conn.respond(http.response(403, "origin not allowed\n"))
            return
        try:
            ip = client_address(
                conn.peer, request.get_all("x-forwarded-for"), self.config.trusted_proxies
            )
        except BadForwardedFor as exc:
            self.refuse(conn, 400, "bad_request", str(exc))
            conn.respond(http.response(400, "malformed X-Forwarded-For\n"))
            return
        now = self.loop.time()
        refused = self.admission.check(ip, now)
        if refused is not None:
            reason = {503: "unavailable", 429: "ip_limit"}[refused.status]
            self.refuse(conn, refused.status, reason, refused.reason)
            headers = (("Retry-After", "1"),)
            conn.respond(http.response(refused.status, refused.reason + "\n", headers=headers))
            return
        extension = deflate = None
        extensions_header = None
        if self.config.compression == "on":
            try:
                negotiated = negotiate_deflate(request.get_all("sec-websocket-extensions"))
            except Exception:
                negotiated = None  # a malformed offer: go on uncompressed
            if negotiated is not None:
                extensions_header, extension, deflate = negotiated
        conn.ip = ip
        conn.origin = origin
        connection_id = new_connection_id(protocol.unix_ms(time.time()))
        while connection_id in self.conns:  # 36^9 makes this a formality
            connection_id = new_connection_id(protocol.unix_ms(time.time()))
        self._handshake_over(conn)
        conn.upgrade(
            connection_id,
            http.switching_protocols(accept, extensions_header),
            extension,
            deflate,
            now,
        )

    def opened(self, conn: Connection) -> None:
        """*conn* completed its upgrade: welcome it, then tell everyone."""
        self.accepted.inc()
        if conn.echo:
            return  # a conformance-test connection: not part of the hub
        self.conns[conn.id] = conn
        conn.is_recipient = True
        self.fanout.joined(conn)
        now = time.time()
        total = self.cluster_count()
        # The welcome goes out at once, straight after the 101 response: the
        # newcomer has nothing queued before it. Its user_joined may wait a
        # little for other joins, so a connection storm costs few writes.
        welcome = protocol.encode_welcome(conn.id, total, now)
        conn.transport.write(text_frame(welcome))
        joined = protocol.encode_user_joined(conn.id, total, now)
        self.fanout.to_all(joined, exclude=conn, urgent=False)
        self.backplane.publish(Envelope(self.node_id, EventKind.JOINED, conn.id, joined))
        log_event(
            log, logging.INFO, "open", id=conn.id, peer=conn.peer, ip=conn.ip, origin=conn.origin
        )

    def closing(self, conn: Connection) -> None:
        """*conn* stopped being a recipient: its Close frame is on its way."""
        self.n_closing += 1
        self._unregister(conn)

    def closed(self, conn: Connection, previous: State) -> None:
        """The socket is gone, whatever the reason; *previous* is the state
        the connection was in."""
        if previous is State.CONNECTING:
            self._handshake_over(conn)
            return
        if previous is State.CLOSING:
            self.n_closing -= 1
            if self.n_closing == 0 and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        else:  # dropped while open, without a closing handshake
            self._unregister(conn)
        code = conn.close_code if conn.close_code is not None else 1006
        self.closes.inc_label(close_code_label(code))
        self.admission.release(conn.ip)
        duration = self.loop.time() - conn.opened_at
        log_event(
            log,
            logging.INFO,
            "close",
            id=conn.id or None,
            peer=conn.peer,
            ip=conn.ip,
            origin=conn.origin,
            code=code,
            reason=conn.close_reason or None,
            duration=round(duration, 3),
        )

    def _unregister(self, conn: Connection) -> None:
        """Remove *conn* from the registry and announce ``user_left``, once."""
        if self.conns.pop(conn.id, None) is None:
            return
        conn.is_recipient = False
        left = protocol.encode_user_left(conn.id, self.cluster_count(), time.time())
        if self.conns:
            self.fanout.to_all(left, urgent=False)
        self.backplane.publish(Envelope(self.node_id, EventKind.LEFT, conn.id, left))

    def cluster_count(self) -> int:
        return len(self.conns) + self.backplane.remote_count()

    # -- Messages from clients ------------------------------------------------------

    def on_text(self, conn: Connection, text: str) -> None:
        # The hot path of every relayed message: counters as plain dict
        # updates, the relay case tested first.
        outcomes = self._outcomes
        outcomes["INCOMING"] += 1
        result = protocol.parse_client_text(text)
        if type(result) is Relay:
            outcomes["VALIDATED"] += 1
            payload = protocol.encode_relay(result.kind, conn.id, result.content, time.time())
            exclude = conn if result.kind is _MESSAGE else None
            recipients = len(self.conns) - (1 if exclude is not None else 0)
            self.fanout_sizes.observe(recipients)
            if recipients:
                self.fanout.to_all(payload, exclude=exclude)
            self.backplane.publish(Envelope(self.node_id, EventKind.RELAY, conn.id, payload))
            outcomes["ROUTED"] += 1
            return
        if isinstance(result, Refusal):
            self._refuse(conn, result)
            return
        outcomes["VALIDATED"] += 1
        if result is protocol.PING:
            self.fanout.to_one(conn, protocol.encode_pong(time.time()))
        elif result is protocol.USER_INFO:
            self.fanout.to_one(
                conn, protocol.encode_user_info_response(conn.id, self.cluster_count(), time.time())
            )
        # PONG: a sign of life, already noted by the connection.
        outcomes["ROUTED"] += 1

    def on_echo(self, conn: Connection, text: bool, message: bytes) -> None:
        """/echo: send the message back as it came (conformance testing)."""
        opcode = OP_TEXT if text else OP_BINARY
        deflate = conn.deflate
        frame = wire_frame(opcode, message) if deflate is None else deflate.frame(opcode, message)
        self.fanout.raw_to_one(conn, frame)

    def on_binary(self, conn: Connection) -> None:
        self.messages.inc_label("INCOMING")
        self._refuse(conn, _BINARY_REFUSAL)

    def rate_limited(self, conn: Connection, *, disconnect: bool) -> None:
        self.messages.inc_label("INCOMING")
        self.rate_refusals.inc()
        if disconnect:
            self.messages.inc_label("FAILED")
            log_event(log, logging.INFO, "rate_limit_close", id=conn.id, ip=conn.ip)
            conn.close(RATE_LIMIT_EXCEEDED)
            return
        self._refuse(conn, _RATE_REFUSAL)

    def _refuse(self, conn: Connection, refusal: Refusal) -> None:
        self.messages.inc_label("FAILED")
        self.errors.inc_label(refusal.code.value)
        self.fanout.to_one(conn, protocol.encode_error(refusal))

    # -- Messages from other nodes ----------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        if self.conns:
            # Relays are urgent; presence from other nodes may wait for company.
            self.fanout.to_all(envelope.payload, urgent=envelope.kind is EventKind.RELAY)
        if envelope.kind is EventKind.RELAY:
            self.fanout_sizes.observe(len(self.conns))

    def on_connections_lost(self, connection_ids: Iterable[ConnectionId]) -> None:
        """Connections elsewhere that are gone without their own ``left``
        event (their node died): the view already dropped them."""
        self._announce(connection_ids, protocol.encode_user_left)

    def on_connections_found(self, connection_ids: Iterable[ConnectionId]) -> None:
        """Connections elsewhere whose ``joined`` event was lost (an outage)."""
        self._announce(connection_ids, protocol.encode_user_joined)

    def _announce(
        self,
        connection_ids: Iterable[ConnectionId],
        encode: Callable[[ConnectionId, int, float], bytes],
    ) -> None:
        if not self.conns:
            return
        now = time.time()
        total = self.cluster_count()
        for connection_id in connection_ids:
            self.fanout.to_all(encode(connection_id, total, now), urgent=False)

    def local_connection_ids(self) -> list[ConnectionId]:
        return list(self.conns)

    def _rejoin(self) -> None:
        """The cluster reaped us during an outage and told everyone our clients
        left: close them so they come back as new connections."""
        for conn in list(self.conns.values()):
            conn.close(_REJOIN)

    # -- Timers ---------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Every interval: the JSON ping for browsers' scripts, and a protocol
        Ping frame, which browsers answer on their own (decisions.md 6)."""
        if not self.conns:
            return
        self.fanout.to_all(protocol.encode_ping(time.time()), urgent=False)
        self.fanout.control_to_all(_PROTOCOL_PING_FRAME, urgent=False)

    def _check_liveness(self) -> None:
        now = self.loop.time()
        timeout = self.config.effective_heartbeat_timeout
        silent = [conn for conn in self.conns.values() if now - conn.session.last_seen > timeout]
        for conn in silent:
            log_event(log, logging.INFO, "heartbeat_timeout", id=conn.id, peer=conn.peer)
            conn.close(HEARTBEAT_TIMEOUT)

    def _sweep(self) -> None:
        """Remove anything closed that was missed; forget idle rate buckets."""
        stale = [
            conn
            for conn in self.conns.values()
            if conn.session.state is not State.OPEN or conn.transport.is_closing()
        ]
        for conn in stale:
            log.warning("sweep removed id=%s state=%s", conn.id, conn.session.state.name)
            self._unregister(conn)
            conn.abort()
        self.admission.purge(self.loop.time())
        # Refusal lines dropped by the rate limit since the last line that
        # passed: said once per sweep, so a flood that stops is still reported.
        for reason, count in self._refusal_lines.take_suppressed().items():
            log_event(log, logging.INFO, "refused_suppressed", reason=reason, count=count)
        # After a burst (a connection storm buffers hundreds of MB of
        # user_joined frames for a moment) glibc keeps the freed memory;
        # hand it back to the OS so RSS follows the load down.
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _slow_consumer(self, conn: Connection) -> None:
        self.slow_closes.inc()
        log_event(
            log,
            logging.WARNING,
            "slow_consumer",
            id=conn.id,
            peer=conn.peer,
            buffered=conn.transport.get_write_buffer_size(),
        )
        conn.close(SLOW_CONSUMER)

    def _send_failed(self, conn: Connection, exc: BaseException) -> None:
        self.send_failures.inc()
        log_event(log, logging.WARNING, "send_failed", id=conn.id, peer=conn.peer, error=repr(exc))
        conn.abort()

    # -- Introspection ----------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        outcomes = ("INCOMING", "VALIDATED", "ROUTED", "FAILED")
        return {
            "nodeId": self.node_id,
            "version": __version__,
            "uptimeSeconds": round(time.time() - self.started_at, 3),
            "connections": {
                "node": len(self.conns),
                "cluster": self.cluster_count(),
                "connecting": self.n_connecting,
                "closing": self.n_closing,
            },
            "messages": {outcome: self.messages.get(outcome) for outcome in outcomes},
            "deliveries": self.fanout.deliveries,
            "backplane": {
                "ready": self.backplane.ready()[0],
                "detail": self.backplane.ready()[1],
                **self.backplane.metrics(),
            },
        }
