"""The seam between one node and the rest of the cluster.

A node delivers to its own connections itself and tells the backplane, which
carries the event to every *other* node (a node never handles its own
envelopes twice). The backplane also keeps a view of who is connected
elsewhere (:class:`~wshub.backplane.presence.PresenceView`), so counts are
cluster-wide without a round trip on the hot path, and it notices nodes that
died without saying goodbye.

Implementations: :class:`~wshub.backplane.memory.MemoryBackplane` (the
embedded default; several can share one in-process broker) and
:class:`~wshub.backplane.redis.RedisBackplane` (a cluster on Redis). Both
pass the same contract tests (``tests/backplane/contract.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple, Protocol

from ..ids import ConnectionId, NodeId

__all__ = [
    "Backplane",
    "BackplaneHandler",
    "Envelope",
    "EventKind",
    "decode_envelope",
    "encode_envelope",
]


class EventKind(enum.StrEnum):
    RELAY = "relay"  # a message or broadcast: deliver payload to every local connection
    JOINED = "joined"  # a connection opened on the sending node
    LEFT = "left"  # a connection closed on the sending node
    LOST = "lost"  # a dead node's connections were reaped (payload: their ids)
    PROBE = "probe"  # a node checking that its own subscription still hears


class Envelope(NamedTuple):
    """One event from one node, with the server message it produces, encoded
    once by the node where it happened. (A named tuple: immutable, and made
    for every message, at a third of a frozen dataclass's cost.)"""

    node_id: NodeId
    kind: EventKind
    connection_id: ConnectionId  # for LOST: the dead node's id
    payload: bytes


def encode_envelope(envelope: Envelope) -> bytes:
    head = f"{envelope.node_id}|{envelope.kind.value}|{envelope.connection_id}|"
    return head.encode("utf-8") + envelope.payload


def decode_envelope(data: bytes) -> Envelope:
    """Raises ValueError on anything that is not an envelope."""
    node, kind, conn, payload = data.split(b"|", 3)
    return Envelope(
        NodeId(node.decode("utf-8")),
        EventKind(kind.decode("utf-8")),
        ConnectionId(conn.decode("utf-8")),
        payload,
    )


class BackplaneHandler(Protocol):
    """What a node offers its backplane."""

    def on_envelope(self, envelope: Envelope) -> None:
        """An event from another node (RELAY, or a JOINED/LEFT that changed
        the view): deliver ``payload`` to every local connection."""

    def on_connections_found(self, connection_ids: Iterable[ConnectionId]) -> None:
        """Connections learned from a resync, whose join event was lost:
        announce ``user_joined`` for each."""

    def on_connections_lost(self, connection_ids: Iterable[ConnectionId]) -> None:
        """Connections gone without their own ``left`` event (their node died,
        or the event was lost): announce ``user_left`` for each."""

    def local_connection_ids(self) -> Iterable[ConnectionId]:
        """This node's open connections, to (re-)register presence."""


class Backplane(Protocol):
    node_id: NodeId

    async def start(self, handler: BackplaneHandler) -> None: ...

    async def stop(self) -> None:
        """Say goodbye: flush what is queued and withdraw this node's presence."""

    def publish(self, envelope: Envelope) -> None:
        """Send to every other node; never blocks, never raises."""

    def remote_count(self) -> int:
        """Connections open on the other nodes, as last known."""

    def ready(self) -> tuple[bool, str]:
        """Whether the cluster link works, and why not."""

    def metrics(self) -> dict[str, float]:
        """Counters and gauges for /metrics (name suffix -> value)."""
