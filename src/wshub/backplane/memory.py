"""The embedded backplane: nodes in one process, nothing to install.

A single node uses a :class:`MemoryBackplane` of its own and has no peers.
Several nodes can share one :class:`MemoryBroker` (the backplane contract
tests do): envelopes then reach the other nodes' handlers on the next loop
pass, as they would over a network, never synchronously.
"""

from __future__ import annotations

import asyncio

from ..ids import ConnectionId, NodeId
from . import BackplaneHandler, Envelope, EventKind

__all__ = ["MemoryBackplane", "MemoryBroker"]


class MemoryBroker:
    def __init__(self) -> None:
        self.nodes: dict[NodeId, MemoryBackplane] = {}


class MemoryBackplane:
    def __init__(self, node_id: NodeId, broker: MemoryBroker | None = None) -> None:
        self.node_id = node_id
        self.broker = broker if broker is not None else MemoryBroker()
        self.handler: BackplaneHandler | None = None
        self.presence: set[ConnectionId] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, handler: BackplaneHandler) -> None:
        self.handler = handler
        self._loop = asyncio.get_running_loop()
        self.broker.nodes[self.node_id] = self

    async def stop(self) -> None:
        self.broker.nodes.pop(self.node_id, None)
        self.handler = None

    def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EventKind.JOINED:
            self.presence.add(envelope.connection_id)
        elif envelope.kind is EventKind.LEFT:
            self.presence.discard(envelope.connection_id)
        for node_id, peer in self.broker.nodes.items():
            if node_id != self.node_id and peer._loop is not None:
                peer._loop.call_soon(peer._deliver, envelope)

    def _deliver(self, envelope: Envelope) -> None:
        if self.handler is not None:
            self.handler.on_envelope(envelope)

    def remote_count(self) -> int:
        return sum(
            len(peer.presence) for node_id, peer in self.broker.nodes.items()
            if node_id != self.node_id
        )

    def ready(self) -> tuple[bool, str]:
        return True, "in-memory backplane"
