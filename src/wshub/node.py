"""The node: one process's rooms, its timers, its drain, its figures.

What this module does: it keeps the room hubs of this process (created on a
room's first member, dropped a short grace after its last), routes what the
backplane brings to the room it is for, runs the timers (heartbeat, liveness,
sweep), drains on shutdown and reports (``/stats``, ``/metrics``). What it
leaves to others: HTTP and the upgrade (:mod:`wshub.gateway`), a room's
members and routing (:mod:`wshub.hub`), writing (:mod:`wshub.fanout`), one
socket (:mod:`wshub.connection`), the cluster (:mod:`wshub.backplane`), the
metric definitions (:mod:`wshub.nodemetrics`).

Time: ``loop.time()`` (monotonic) for deadlines and rate limits,
``time.time()`` for the timestamps clients see.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from . import __version__
from .admission import Admission
from .api import ApiKeys
from .apiserve import ApiService
from .auth import TokenVerifier
from .backplane import Backplane, Envelope
from .backplane.control import Control, LocalControl
from .backplane.factory import make_backplane
from .config import Config
from .connectauth import ConnectAuth
from .connection import Connection, ConnectionSettings, pace_upgrades
from .echo import EchoEndpoint
from .endpoints import node_routes
from .errors import HEARTBEAT_TIMEOUT, SHUTTING_DOWN, SLOW_CONSUMER, CloseCode, Disconnect
from .fanout import Fanout, compiled_send_each, compiled_send_path, compiled_use_io_uring
from .gateway import Gateway, Upgrade
from .history import History
from .hub import Hub
from .ids import ConnectionId, NodeId
from .logs import log_event
from .metrics import close_code_label
from .nodemetrics import OUTCOMES, node_metrics
from .rooms import DEFAULT_ROOM, RoomName
from .routes import Route
from .session import State
from .usercount import ClusterUserCount

if TYPE_CHECKING:
    from .clusterhistory import ClusterHistory
    from .history import Recovery

__all__ = ["Node"]

log = logging.getLogger("wshub")


def _control(config: Config, node_id: NodeId) -> Control:
    """How the API asks every node: over Redis in a cluster, else this node alone."""
    if config.redis_target:
        from .backplane.control import RedisControl
        from .backplane.redis_cluster import is_cluster_url, seed_url

        # Questions go over classic pub/sub, which a Redis Cluster carries to
        # every node: one seed node serves.
        target = config.redis_target
        url = seed_url(target) if is_cluster_url(target) else target
        return RedisControl(url, node_id, prefix=config.redis_prefix)
    return LocalControl(node_id)


_REJOIN = Disconnect(CloseCode.SERVICE_RESTART, "cluster rejoin: please reconnect")

ROOM_GRACE = 1.0
"""Seconds an empty room's hub (and its backplane channel) is kept, so that a
client that reconnects at once does not cost an unsubscribe and a subscribe."""


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def _cluster_history(config: Config, node_id: NodeId) -> ClusterHistory:
    # The redis package only when asked for (as in backplane/factory.py).
    from .backplane.redis import Keys
    from .backplane.redis_cluster import ClusterKeys, is_cluster_url
    from .backplane.redis_history import RedisHistory
    from .clusterhistory import ClusterHistory

    history = RedisHistory.from_url(
        config.redis_target,
        prefix=config.redis_prefix,
        size=config.history_size,
        ttl=config.history_ttl,
        meta_ttl=config.history_epoch_ttl,
    )
    keys = (ClusterKeys if is_cluster_url(config.redis_target) else Keys)(config.redis_prefix)
    return ClusterHistory(history, node_id, keys.room)


class Node:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        backplane: Backplane | None = None,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.backplane: Backplane = backplane or make_backplane(config, on_rejoined=self._rejoin)
        self.node_id = self.backplane.node_id
        self.metrics, self.counters = node_metrics(self)
        self.rooms: dict[RoomName, Hub] = {}
        # The history of every room (decisions.md 13): in memory on one node,
        # in Redis for a cluster (then the memory one is off).
        self.history = History(
            size=0 if config.redis_target else config.history_size,
            ttl=config.history_ttl,
            memory=config.history_memory,
            meta_ttl=config.history_epoch_ttl,
        )
        self.cluster_history: ClusterHistory | None = None
        if config.redis_target and config.history_size > 0:
            self.cluster_history = _cluster_history(config, self.node_id)
            # Messages wait for the presence updates queued before them (the
            # joiner's user_joined), which travel on the backplane's connection.
            ran = getattr(self.backplane, "ran_so_far", None)
            self.cluster_history.history.presence_ran = ran
        self._occupied: set[RoomName] = set()  # rooms with members (or joining)
        self._emptied_at: dict[RoomName, float] = {}
        # Upgrades waiting for their room's backplane subscription.
        self._waiting: dict[RoomName, list[Upgrade]] = {}
        self.connections: dict[ConnectionId, Connection] = {}  # open, in every room
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
        direct = config.direct_send == "on" and compiled_send_each is not None
        self.fanout: Fanout[Connection] = Fanout(
            loop,
            send_buffer_limit=config.send_buffer_limit,
            send_buffer_total=config.send_buffer_total,  # decisions.md 18
            on_slow_consumer=self._slow_consumer,
            on_send_failed=self._send_failed,
            send_each=compiled_send_each if direct else None,
        )
        pace_upgrades(lambda: self.fanout.behind)  # decisions.md 18: passes time-sliced
        if compiled_use_io_uring is not None:
            compiled_use_io_uring(config.io_uring == "auto")
        self._direct = direct
        if config.direct_send == "on" and compiled_send_each is None:
            log_event(
                log,
                logging.WARNING,
                "direct_send_unavailable",
                detail="wshub._directsend was not built at install (no C compiler or "
                "Python headers): every write goes through the transport",
            )
        self.settings = ConnectionSettings(
            max_message_size=config.max_message_size,
            max_message_frames=config.effective_max_message_frames,
            handshake_timeout=config.handshake_timeout,
            close_timeout=config.close_timeout,
            message_rate=config.message_rate,
            message_burst=config.message_burst,
            rate_limit_refusals=config.rate_limit_refusals,
            rate_limit_window=config.rate_limit_window,
            direct_send=direct,
        )
        # The backend API (decisions.md 14): served when a key is configured,
        # under /api/ here or on its own address (--api-listen).
        self.api: ApiService | None = None
        api_routes: list[Route[Connection]] = []
        if api_keys is None and (config.api_keys or config.api_keys_file):
            api_keys = ApiKeys(config.api_keys, config.api_keys_file)
        if api_keys is not None:
            self.api = ApiService(api_keys, self, _control(config, self.node_id))
            api_routes = self.api.routes()
        # --auth optional|required (decisions.md 15); the CLI checked the key at start.
        self.auth: ConnectAuth | None = None
        self.user_count: ClusterUserCount | None = None
        if config.auth != "off":
            if config.redis_target and config.max_connections_per_user:
                self.user_count = ClusterUserCount(
                    config.redis_target,
                    self.node_id,
                    limit=config.max_connections_per_user,
                    node_ttl=config.node_ttl,
                    prefix=config.redis_prefix,
                )
            self.auth = ConnectAuth(
                config,
                TokenVerifier.from_config(config),
                host=self,
                loop=loop,
                clock=time.time,
                users=self.user_count,
            )
        echo = EchoEndpoint(host=self, fanout=self.fanout)
        self.gateway = Gateway(
            config,
            loop.time,
            rooms=self,
            admission=self.admission,
            counters=self.counters,
            routes=node_routes(self) + ([] if config.api_listen else api_routes),
            echo=echo,
            auth=self.auth,
        )
        self.api_gateway: Gateway | None = None
        if config.api_listen and api_routes:
            self.api_gateway = Gateway(
                config,
                loop.time,
                rooms=self,
                admission=self.admission,
                counters=self.counters,
                routes=api_routes,
                echo=echo,
                websockets=False,
            )
        self.started_at = time.time()
        self.draining = False
        self.n_closing = 0
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._drained: asyncio.Future[None] | None = None
        self._lag = 0.0

    def new_connection(self) -> Connection:
        """A connection for a socket just accepted (the server's protocol factory)."""
        return Connection(self.gateway, self.settings, self.loop)

    def new_api_connection(self) -> Connection:
        """A connection accepted on the --api-listen address."""
        assert self.api_gateway is not None
        return Connection(self.api_gateway, self.settings, self.loop)

    # -- Lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.backplane.start(self)
        if self.api is not None:
            await self.api.start()
        if self.user_count is not None:
            await self.user_count.start()
        self._every("heartbeat", self.config.heartbeat_interval, self._heartbeat)
        # Check often enough that a dead client is closed within a few percent
        # of the timeout, without walking all connections more than once a second.
        check = min(1.0, self.config.effective_heartbeat_timeout / 20)
        self._every("liveness", check, self._check_liveness)
        self._every("sweep", self.config.sweep_interval, self._sweep)
        shared = self.cluster_history
        if shared is not None:
            # A room with members but no traffic keeps its epoch on Redis
            # (decisions.md 13: it changes only when the history is lost).
            self._every("history_keep", shared.keep_interval, self._keep_epochs)
        self._probe_lag()
        if self._direct and compiled_send_path is not None:
            # Asked in the loop's thread, the one that sends: the ring is
            # made here (once per process), and the log says which path runs.
            path, detail = compiled_send_path()
            log_event(log, logging.INFO, "direct_send_path", path=path, detail=detail)

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
        for conn in list(self.connections.values()):
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
        if self.api is not None:
            await self.api.stop()
        if self.user_count is not None:
            await self.user_count.stop()
        if self.cluster_history is not None:
            # Departures held behind their last publications go out before
            # the backplane flushes and stops.
            await self.cluster_history.settle(max(0.5, deadline - self.loop.time()))
        await self.backplane.stop()
        if self.cluster_history is not None:
            await self.cluster_history.aclose()

    # -- Rooms (the gateway's RoomDirectory) -----------------------------------------

    def enter(self, room: RoomName, upgrade: Upgrade) -> bool:
        hub = self.rooms.get(room)
        if room not in self._occupied:
            limit = self.config.max_rooms
            if room != DEFAULT_ROOM and limit and self.room_count(default=False) >= limit:
                return False
            self._occupied.add(room)
        if hub is None:
            hub = self.rooms[room] = self._new_hub(room)
            if not self.backplane.subscribe(room):
                self._waiting[room] = []
        upgrade.conn.room = hub.room  # one string per room, not one per member
        waiting = self._waiting.get(room)
        if waiting is None:
            self._complete(hub, upgrade, self.loop.time())
        else:
            # The welcome's counts need the room's presence elsewhere: wait for it.
            upgrade.conn.hold()
            waiting.append(upgrade)
        return True

    def _new_hub(self, room: RoomName) -> Hub:
        return Hub(
            room,
            host=self,
            fanout=self.fanout,
            backplane=self.backplane,
            counters=self.counters,
            node_id=self.node_id,
            clock=time.time,
            history=self.history,
            monotonic=self.loop.time,
            auth=self.auth,
            shared=self.cluster_history,
        )

    def backend_hub(self, room: RoomName) -> Hub:
        """The hub a backend's publication goes through: the room's, or for a
        room without members here one made for it and not kept (it has no one
        to deliver to here, and publishes to the room's channel all the same)."""
        hub = self.rooms.get(room)
        return hub if hub is not None else self._new_hub(room)

    def on_room_ready(self, room: RoomName) -> None:
        hub = self.rooms.get(room)
        waiting = self._waiting.pop(room, [])
        if hub is None:
            return
        now = self.loop.time()
        for upgrade in waiting:
            self._complete(hub, upgrade, now)
        if not hub.members:  # everyone left while waiting
            self.room_emptied(hub)

    def _complete(self, hub: Hub, upgrade: Upgrade, now: float) -> None:
        """Give *upgrade* to *hub*; on Redis with history on, once the room's
        history answered the join (its since, history, or just its place)."""
        shared = self.cluster_history
        if shared is None:
            upgrade.complete(hub, now)
            return
        upgrade.conn.hold()
        connection_id = upgrade.connection_id
        hub.begin_join(connection_id)

        def done(recovery: Recovery | None) -> None:
            hub.prepare_join(connection_id, recovery)
            upgrade.complete(hub, self.loop.time())
            hub.end_join(connection_id)
            if self.draining and connection_id in self.connections:
                self.connections[connection_id].close(SHUTTING_DOWN)  # joined too late
            if not hub.members:  # the client went away meanwhile
                self.room_emptied(hub)

        shared.join(hub.room, connection_id, upgrade.conn.join, done)

    def is_live(self, connection_id: ConnectionId) -> bool:
        return connection_id in self.connections

    def connection_ended(self, conn: Connection, previous: State) -> None:
        """A connection gone before its upgrade completed."""
        if conn.admitted:
            self.admission.release(conn.ip)
        waiting = self._waiting.get(conn.room)
        if waiting is not None:
            waiting[:] = [upgrade for upgrade in waiting if upgrade.conn is not conn]

    def room_count(self, *, default: bool = True) -> int:
        """Rooms with members on this node."""
        count = len(self._occupied)
        if not default and DEFAULT_ROOM in self._occupied:
            count -= 1
        return count

    def room_emptied(self, hub: Hub) -> None:
        if self._waiting.get(hub.room) or hub.joining:
            return  # still joining
        self._occupied.discard(hub.room)
        self._emptied_at[hub.room] = self.loop.time()
        self.loop.call_later(ROOM_GRACE, self._drop_room, hub.room)

    def _drop_room(self, room: RoomName) -> None:
        """Drop an empty room's hub once it stayed empty for the grace."""
        if room in self._occupied:
            return  # members came back; when it empties again, a new timer runs
        emptied_at = self._emptied_at.get(room)
        if emptied_at is None:
            return
        wait = emptied_at + ROOM_GRACE - self.loop.time()
        if wait > 0.01:  # emptied again since this timer was set
            self.loop.call_later(wait, self._drop_room, room)
            return
        del self._emptied_at[room]
        if self.rooms.pop(room, None) is not None:
            self._waiting.pop(room, None)
            self.backplane.unsubscribe(room)

    # -- Members' lifecycle (the hubs' HubHost) -----------------------------------------

    def member_opened(self, conn: Connection) -> None:
        self.counters.accepted.inc()
        if conn.is_recipient:
            self.connections[conn.id] = conn

    def member_closing(self, conn: Connection) -> None:
        self.n_closing += 1
        self.connections.pop(conn.id, None)

    def member_closed(self, conn: Connection, previous: State) -> None:
        if previous is State.CLOSING:
            self.n_closing -= 1
            if self.n_closing == 0 and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        self.connections.pop(conn.id, None)
        code = conn.close_code if conn.close_code is not None else 1006
        self.counters.closes.inc_label(close_code_label(code))
        self.counters.closed.inc()
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

    def member_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        self.gateway.on_refused(conn, status, reason, detail)

    # -- The backplane's handler -------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        hub = self.rooms.get(envelope.room)
        if hub is not None:
            hub.on_envelope(envelope)

    def on_connections_lost(
        self,
        room: RoomName,
        connection_ids: Iterable[ConnectionId],
        users: Mapping[ConnectionId, str],
    ) -> None:
        hub = self.rooms.get(room)
        if hub is not None:
            hub.announce_left(connection_ids, users)

    def on_connections_found(
        self,
        room: RoomName,
        connection_ids: Iterable[ConnectionId],
        users: Mapping[ConnectionId, str],
    ) -> None:
        hub = self.rooms.get(room)
        if hub is not None:
            hub.announce_joined(connection_ids, users)

    def local_presence(self) -> list[tuple[RoomName, ConnectionId, str | None]]:
        return [
            (hub.room, cid, None if conn.identity is None else conn.identity.user_id)
            for hub in self.rooms.values()
            for cid, conn in hub.members.items()
        ]

    def _rejoin(self) -> None:
        """The cluster reaped us during an outage and told everyone our clients
        left: close them so they come back as new connections."""
        for conn in list(self.connections.values()):
            conn.close(_REJOIN)

    # -- Timers ---------------------------------------------------------------------

    def _heartbeat(self) -> None:
        for hub in self.rooms.values():
            hub.heartbeat()

    def _check_liveness(self) -> None:
        now = self.loop.time()
        timeout = self.config.effective_heartbeat_timeout
        silent = [c for c in self.connections.values() if c.session.silent_for(now) > timeout]
        for conn in silent:
            log_event(log, logging.INFO, "heartbeat_timeout", id=conn.id, peer=conn.peer)
            conn.close(HEARTBEAT_TIMEOUT)

    def _sweep(self) -> None:
        """Remove anything closed that was missed; forget idle rate buckets."""
        for hub in list(self.rooms.values()):
            stale = [
                conn
                for conn in hub.members.values()
                if conn.session.state is not State.OPEN or conn.transport.is_closing()
            ]
            for conn in stale:
                log.warning("sweep removed id=%s state=%s", conn.id, conn.session.state.name)
                hub.remove(conn)
                self.connections.pop(conn.id, None)
                conn.abort()
        self.admission.purge(self.loop.time())
        self.history.expire(self.loop.time())
        self.gateway.report_suppressed()
        # After a burst (a connection storm buffers hundreds of MB of
        # user_joined frames for a moment) glibc keeps the freed memory;
        # hand it back to the OS so RSS follows the load down.
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _keep_epochs(self) -> None:
        """Refresh on Redis the epochs of the rooms with members here (or joining)."""
        assert self.cluster_history is not None
        self.cluster_history.keep(self._occupied)

    def _slow_consumer(self, conn: Connection) -> None:
        self.counters.slow_closes.inc()
        log_event(
            log,
            logging.WARNING,
            "slow_consumer",
            id=conn.id,
            peer=conn.peer,
            buffered=conn.unsent(),
        )
        conn.close(SLOW_CONSUMER)

    def _send_failed(self, conn: Connection, exc: BaseException) -> None:
        self.counters.send_failures.inc()
        log_event(log, logging.WARNING, "send_failed", id=conn.id, peer=conn.peer, error=repr(exc))
        conn.abort()

    # -- Introspection ----------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        ok, reason = self.backplane.ready()
        if not ok:
            return False, f"backplane: {reason}"
        if self.config.max_connections and len(self.connections) >= self.config.max_connections:
            return False, "full: at --max-connections"
        return True, "ready"

    def cluster_count(self) -> int:
        """Open connections in the rooms this node has members in, cluster-wide."""
        return sum(hub.count() for hub in self.rooms.values() if hub.members)

    def connections_by_state(self) -> dict[str, float]:
        return {
            "connecting": self.gateway.connecting,
            "open": len(self.connections),
            "closing": self.n_closing,
        }

    def loop_lag(self) -> float:
        return self._lag

    def uptime(self) -> float:
        return round(time.time() - self.started_at, 3)

    def fanout_figures(self) -> dict[str, float]:
        fanout = self.fanout
        return {
            "deliveries": fanout.deliveries,
            "writes": fanout.writes,
            "direct_sends": fanout.direct_sends,
            "buffered_total": fanout.buffered_total,
            "budget_drops": fanout.budget_drops,
            "pass_seconds_max": round(fanout.pass_seconds_max, 6),
            "pass_cpu_seconds_max": round(fanout.pass_cpu_seconds_max, 6),
            "pass_slices": fanout.slices,
            "io_uring": float(self.uses_io_uring()),
        }

    def send_path(self) -> str:
        """How the fan-out's sends reach the sockets now, asked in the loop's
        thread (the one that sends): "io_uring" (--io-uring auto, where the
        kernel offers it), "send" (send(2) one by one), or "transport" (no
        direct sends: --direct-send off, or not compiled)."""
        if not self._direct or compiled_send_path is None:
            return "transport"
        return compiled_send_path()[0]

    def uses_io_uring(self) -> bool:
        return self.send_path() == "io_uring"

    def history_figures(self) -> dict[str, float]:
        history = self.history
        return {
            "bytes": history.bytes,
            "entries": history.entries,
            "rooms": history.room_count,
            "evicted": history.evicted,
        }

    def backplane_figures(self) -> dict[str, float]:
        figures = self.backplane.metrics()
        if self.cluster_history is not None:
            figures.update(self.cluster_history.figures())
        return figures

    def metrics_text(self) -> str:
        return self.metrics.render()

    def stats(self) -> dict[str, object]:
        ready, detail = self.backplane.ready()
        return {
            "nodeId": self.node_id,
            "version": __version__,
            "uptimeSeconds": self.uptime(),
            "connections": {
                "node": len(self.connections),
                "cluster": self.cluster_count(),
                "connecting": self.gateway.connecting,
                "open": len(self.connections),
                "closing": self.n_closing,
                "closed": self.counters.closed.value,
            },
            "rooms": self.room_count(),
            "messages": {outcome: self.counters.messages.get(outcome) for outcome in OUTCOMES},
            "deliveries": self.fanout.deliveries,
            "sendPath": self.send_path(),
            "backplane": {"ready": ready, "detail": detail, **self.backplane.metrics()},
        }
