"""The embedded backplane: nodes in one process, nothing to install.

A single node uses a :class:`MemoryBackplane` with a broker of its own and has
no peers. Several nodes can share one :class:`MemoryBroker` (the backplane
contract tests do): the broker then plays Redis's part, with the same
semantics: envelopes reach every subscriber on a later loop pass, presence
lives in per-node sets under a lease, and a node that stops refreshing its
lease is reaped by exactly one survivor.
"""

from __future__ import annotations

import asyncio
import time

from ..ids import ConnectionId, NodeId
from . import BackplaneHandler, Envelope, EventKind
from .base import ViewKeeper

__all__ = ["MemoryBackplane", "MemoryBroker"]


class MemoryBroker:
    """Shared state of in-process nodes: what Redis holds for a cluster."""

    def __init__(self) -> None:
        self.subscribers: dict[NodeId, MemoryBackplane] = {}
        self.presence: dict[NodeId, set[ConnectionId]] = {}
        self.alive_until: dict[NodeId, float] = {}

    def publish(self, envelope: Envelope) -> None:
        for peer in list(self.subscribers.values()):
            peer.loop.call_soon(peer.receive, envelope)

    def claim(self, node: NodeId, now: float) -> list[ConnectionId] | None:
        """Reap *node* if its lease expired; only the first caller gets its ids."""
        if node not in self.alive_until or self.alive_until[node] > now:
            return None
        del self.alive_until[node]
        return sorted(self.presence.pop(node, set()))


class MemoryBackplane(ViewKeeper):
    def __init__(
        self, node_id: NodeId, broker: MemoryBroker | None = None, *, node_ttl: float = 30.0
    ) -> None:
        super().__init__(node_id, time.monotonic)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.broker = broker if broker is not None else MemoryBroker()
        self.node_ttl = node_ttl
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, handler: BackplaneHandler) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = self.loop.time
        self.handler = handler
        self.broker.subscribers[self.node_id] = self
        self.broker.presence[self.node_id] = set(handler.local_connection_ids())
        self.apply_snapshot({n: set(ids) for n, ids in self.broker.presence.items()})
        self._tick()

    def _tick(self) -> None:
        """Refresh our lease and reap nodes whose lease expired, every ttl/3."""
        now = self.clock()
        self.broker.alive_until[self.node_id] = now + self.node_ttl
        for node in list(self.broker.alive_until):
            if node == self.node_id:
                continue
            ids = self.broker.claim(node, now)
            if ids is not None:
                self.apply_lost(node, ids)
                self.broker.publish(
                    Envelope(
                        self.node_id, EventKind.LOST, ConnectionId(node), "\n".join(ids).encode()
                    )
                )
        self._timer = self.loop.call_later(self.node_ttl / 3, self._tick)

    async def stop(self) -> None:
        """Leave the cluster cleanly: presence withdrawn, nothing to reap."""
        self._halt()
        self.broker.presence.pop(self.node_id, None)
        self.broker.alive_until.pop(self.node_id, None)

    async def crash(self) -> None:
        """Vanish without a goodbye (tests): presence stays until reaped."""
        self._halt()

    def _halt(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.broker.subscribers.pop(self.node_id, None)
        self.handler = None

    def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EventKind.JOINED:
            self.broker.presence.setdefault(self.node_id, set()).add(envelope.connection_id)
        elif envelope.kind is EventKind.LEFT:
            self.broker.presence.get(self.node_id, set()).discard(envelope.connection_id)
        if len(self.broker.subscribers) > 1 or envelope.kind is EventKind.PROBE:
            self.broker.publish(envelope)

    def ready(self) -> tuple[bool, str]:
        return True, "in-memory backplane"

    def metrics(self) -> dict[str, float]:
        return {
            "up": 1,
            "nodes": len(self.view.nodes) + 1,
            "received": self.received,
            "forward_failures": 0,
            "reconnects": 0,
        }
