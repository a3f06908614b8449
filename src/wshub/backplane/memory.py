"""The embedded backplane: nodes in one process, nothing to install.

A single node uses a :class:`MemoryBackplane` with a broker of its own and has
no peers. Several nodes can share one :class:`MemoryBroker` (the backplane
contract tests do): the broker then plays Redis's part, with the same
semantics: envelopes reach the room's other subscribers on a later loop pass,
presence lives per node under a lease, and a node that stops refreshing its
lease is reaped by exactly one survivor, which announces its departures in
each of its rooms.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence

from ..ids import ConnectionId, NodeId
from ..rooms import RoomName
from . import BackplaneHandler, Envelope, EventKind
from .base import ViewKeeper, lost_payload

__all__ = ["MemoryBackplane", "MemoryBroker"]


class MemoryBroker:
    """Shared state of in-process nodes: what Redis holds for a cluster."""

    def __init__(self) -> None:
        self.channels: dict[RoomName, dict[NodeId, MemoryBackplane]] = defaultdict(dict)
        self.presence: dict[NodeId, dict[ConnectionId, RoomName]] = {}
        self.users: dict[ConnectionId, str] = {}  # of the connections in presence that have one
        self.alive_until: dict[NodeId, float] = {}

    def publish(self, envelope: Envelope) -> None:
        for peer in list(self.channels.get(envelope.room, {}).values()):
            peer.deliver(envelope)

    def snapshot(self, room: RoomName) -> dict[NodeId, set[ConnectionId]]:
        return {
            node: {cid for cid, where in conns.items() if where == room}
            for node, conns in self.presence.items()
        }

    def claim(self, node: NodeId, now: float) -> dict[ConnectionId, RoomName] | None:
        """Reap *node* if its lease expired; only the first caller gets its ids."""
        if node not in self.alive_until or self.alive_until[node] > now:
            return None
        del self.alive_until[node]
        return self.withdraw(node)

    def withdraw(self, node: NodeId) -> dict[ConnectionId, RoomName]:
        claimed = self.presence.pop(node, {})
        for cid in claimed:
            self.users.pop(cid, None)
        return claimed


class MemoryBackplane(ViewKeeper):
    def __init__(
        self, node_id: NodeId, broker: MemoryBroker | None = None, *, node_ttl: float = 30.0
    ) -> None:
        super().__init__(node_id, time.monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self.broker = broker if broker is not None else MemoryBroker()
        self.node_ttl = node_ttl
        self._timer: asyncio.TimerHandle | None = None

    def deliver(self, envelope: Envelope) -> None:
        """*envelope* from the broker, on a later pass of our loop (as from Redis)."""
        if self._loop is not None:
            self._loop.call_soon(self.receive, envelope)

    async def start(self, handler: BackplaneHandler) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.clock = loop.time
        self.handler = handler
        presence = self.broker.presence[self.node_id] = {}
        for room, cid, user in handler.local_presence():
            presence[cid] = room
            if user is not None:
                self.broker.users[cid] = user
        self._tick()

    def subscribe(self, room: RoomName) -> bool:
        self.open_view(room)
        self.broker.channels[room][self.node_id] = self
        self.apply_snapshot(room, self.broker.snapshot(room), users=self.broker.users, initial=True)
        return True

    def unsubscribe(self, room: RoomName) -> None:
        self.close_view(room)
        channel = self.broker.channels.get(room)
        if channel is not None:
            channel.pop(self.node_id, None)
            if not channel:
                del self.broker.channels[room]

    def _tick(self) -> None:
        """Refresh our lease and reap nodes whose lease expired, every ttl/3."""
        now = self.clock()
        self.broker.alive_until[self.node_id] = now + self.node_ttl
        for node in list(self.broker.alive_until):
            if node == self.node_id:
                continue
            claimed = self.broker.claim(node, now)
            if claimed is None:
                continue
            by_room: dict[RoomName, list[ConnectionId]] = defaultdict(list)
            for cid, room in claimed.items():
                by_room[room].append(cid)
            for room, ids in by_room.items():
                self.apply_lost(room, node, ids)
                self.broker.publish(
                    Envelope(
                        self.node_id, EventKind.LOST, room, ConnectionId(node), lost_payload(ids)
                    )
                )
        assert self._loop is not None, "started"
        self._timer = self._loop.call_later(self.node_ttl / 3, self._tick)

    async def stop(self) -> None:
        """Leave the cluster cleanly: presence withdrawn, nothing to reap."""
        self._halt()
        self.broker.withdraw(self.node_id)
        self.broker.alive_until.pop(self.node_id, None)

    async def crash(self) -> None:
        """Vanish without a goodbye (tests): presence stays until reaped."""
        self._halt()

    def _halt(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for room in list(self.views):
            self.unsubscribe(room)
        self.handler = None

    def publish(self, envelope: Envelope) -> None:
        kind = envelope.kind
        if kind is EventKind.JOINED:
            presence = self.broker.presence.setdefault(self.node_id, {})
            presence[envelope.connection_id] = envelope.room
            if envelope.user_id is not None:
                self.broker.users[envelope.connection_id] = envelope.user_id
        elif kind is EventKind.LEFT:
            self.broker.presence.get(self.node_id, {}).pop(envelope.connection_id, None)
            self.broker.users.pop(envelope.connection_id, None)
        channel = self.broker.channels.get(envelope.room)
        # Micro-optimization: a lone node (the embedded default) has no one to tell.
        if channel is not None and (len(channel) > 1 or self.node_id not in channel):
            self.broker.publish(envelope)

    def publish_relays(
        self, room: RoomName, sender: ConnectionId, payloads: Sequence[bytes]
    ) -> None:
        # A lone node's run costs one look at the channel, not an Envelope
        # and a look per message. Asked once for the run, the question has
        # the answer it would have had for each: the run is published in one
        # step of the loop, and a peer subscribes in a step of its own (the
        # broker is this process's), before or after, never in between.
        channel = self.broker.channels.get(room)
        if channel is not None and (len(channel) > 1 or self.node_id not in channel):
            for payload in payloads:
                self.broker.publish(Envelope(self.node_id, EventKind.RELAY, room, sender, payload))

    def ready(self) -> tuple[bool, str]:
        return True, "in-memory backplane"

    def metrics(self) -> dict[str, float]:
        return {
            "up": 1,
            "nodes": len(self.broker.alive_until) or 1,
            "received": self.received,
            "forward_failures": 0,
            "reconnects": 0,
            "malformed": 0,
        }
