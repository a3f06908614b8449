"""The seam between one node and the rest of the cluster.

A node delivers to its own connections itself and tells the backplane, which
carries the event to every *other* node (an envelope never comes back to the
node that sent it). The backplane also knows who is connected elsewhere, so
counts can be cluster-wide without asking anyone on the hot path.

Implementations: :class:`~wshub.backplane.memory.MemoryBackplane` (the
embedded default, one process) and the Redis backplane (a cluster).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..ids import ConnectionId, NodeId

__all__ = ["Backplane", "BackplaneHandler", "Envelope", "EventKind"]


class EventKind(enum.StrEnum):
    RELAY = "relay"  # a message or broadcast: deliver payload to every connection
    JOINED = "joined"  # a connection opened on the sending node
    LEFT = "left"  # a connection closed on the sending node


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event from one node, with the server message it produces,
    encoded once by the node where it happened."""

    node_id: NodeId
    kind: EventKind
    connection_id: ConnectionId
    payload: bytes


class BackplaneHandler(Protocol):
    """What a node offers the backplane."""

    def on_envelope(self, envelope: Envelope) -> None:
        """An event from another node: deliver ``payload`` to local clients."""

    def on_connections_lost(self, connection_ids: Iterable[ConnectionId]) -> None:
        """Another node's connections are gone without goodbye (it died):
        announce ``user_left`` for each, exactly once."""


class Backplane(Protocol):
    node_id: NodeId

    async def start(self, handler: BackplaneHandler) -> None: ...

    async def stop(self) -> None: ...

    def publish(self, envelope: Envelope) -> None:
        """Send to every other node; never blocks, never raises."""

    def remote_count(self) -> int:
        """Connections open on the other nodes, as last known."""

    def ready(self) -> tuple[bool, str]:
        """Whether the cluster link works, and why not."""
