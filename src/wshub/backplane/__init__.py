"""The seam between one node and the rest of the cluster.

A node delivers to its own connections itself and tells the backplane, which
carries the event to every *other* node with members in the same room (a node
never handles its own envelopes twice). Each room is a channel: a node
subscribes to a room while it has members there (decisions.md 12), so the
traffic of a room costs nothing on the nodes it does not live on. For each
room it is subscribed to, the backplane keeps a view of who is connected
elsewhere (:class:`~wshub.backplane.presence.PresenceView`), so counts are
cluster-wide without a round trip on the hot path, and it notices nodes that
died without saying goodbye and announces their departures room by room.

Implementations: :class:`~wshub.backplane.memory.MemoryBackplane` (the
embedded default; several can share one in-process broker) and
:class:`~wshub.backplane.redis.RedisBackplane` (a cluster on Redis), and
:class:`~wshub.backplane.redis_cluster.RedisClusterBackplane` (the same on a
Redis Cluster, sharded pub/sub). All pass the same contract tests
(``tests/backplane/test_contract.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from ..ids import ConnectionId, NodeId
from ..rooms import RoomName

__all__ = [
    "Backplane",
    "BackplaneHandler",
    "Envelope",
    "EventKind",
    "NodeIdInUse",
    "decode_envelope",
    "encode_envelope",
]


class NodeIdInUse(Exception):
    """Another live process already runs under this node's ``--node-id``
    (two nodes with one id would overwrite each other's presence): the node
    refuses to start (exit code 2)."""


class EventKind(enum.StrEnum):
    RELAY = "relay"  # a message or broadcast: deliver payload to the room's local members
    JOINED = "joined"  # a connection opened on the sending node
    LEFT = "left"  # a connection closed on the sending node
    LOST = "lost"  # a dead node's connections in the room were reaped (payload: their ids)
    PROBE = "probe"  # a node checking that its own subscription still hears
    # History on Redis (decisions.md 13): a relay with the offset the room's
    # script gave it, delivered from the subscription on every node, its own
    # too, so that all see one order (connection_id: the one it excludes, or "").
    RECORDED = "recorded"
    # Published by a join's history read right after it: the joining node has
    # then heard everything the read saw (connection_id: the joining one).
    MARK = "mark"


class Envelope(NamedTuple):
    """One event from one node, with the server message it produces, encoded
    once by the node where it happened. (A named tuple: immutable, and made
    for every message, at a third of a frozen dataclass's cost.)"""

    node_id: NodeId
    kind: EventKind
    room: RoomName
    connection_id: ConnectionId  # for LOST: the dead node's id
    payload: bytes
    # A JOINED's user id (decisions.md 15), for the sender's presence store
    # only: not on the wire (receivers read it from the payload's frame).
    user_id: str | None = None


def encode_envelope(envelope: Envelope) -> bytes:
    # Neither ids nor room names can hold "|" (rooms.py, ids.py).
    head = f"{envelope.node_id}|{envelope.kind.value}|{envelope.room}|{envelope.connection_id}|"
    return head.encode("utf-8") + envelope.payload


def decode_envelope(data: bytes) -> Envelope:
    """Raises ValueError on anything that is not an envelope."""
    node, kind, room, conn, payload = data.split(b"|", 4)
    return Envelope(
        NodeId(node.decode("utf-8")),
        EventKind(kind.decode("utf-8")),
        RoomName(room.decode("utf-8")),
        ConnectionId(conn.decode("utf-8")),
        payload,
    )


class BackplaneHandler(Protocol):
    """What a node offers its backplane."""

    def on_envelope(self, envelope: Envelope) -> None:
        """An event from another node in a room this node subscribed to (RELAY,
        or a JOINED/LEFT that changed the view): deliver ``payload`` to the
        room's local members."""

    def on_connections_found(
        self,
        room: RoomName,
        connection_ids: Iterable[ConnectionId],
        users: Mapping[ConnectionId, str],
    ) -> None:
        """Connections in *room* learned from a resync, whose join event was
        lost: announce ``user_joined`` for each (with its user id in *users*,
        if it has one)."""

    def on_connections_lost(
        self,
        room: RoomName,
        connection_ids: Iterable[ConnectionId],
        users: Mapping[ConnectionId, str],
    ) -> None:
        """Connections in *room* gone without their own ``left`` event (their
        node died, or the event was lost): announce ``user_left`` for each
        (with its user id in *users*, if it has one)."""

    def on_room_ready(self, room: RoomName) -> None:
        """The subscription to *room* asked for by :meth:`Backplane.subscribe`
        works and its view holds the room's presence elsewhere."""

    def local_presence(self) -> Iterable[tuple[RoomName, ConnectionId, str | None]]:
        """This node's open connections, their rooms and user ids, to
        (re-)register presence."""


class Backplane(Protocol):
    node_id: NodeId

    async def start(self, handler: BackplaneHandler) -> None: ...

    async def stop(self) -> None:
        """Say goodbye: flush what is queued and withdraw this node's presence."""

    def publish(self, envelope: Envelope) -> None:
        """Send to the other nodes subscribed to the envelope's room; never
        blocks, never raises. JOINED and LEFT also update this node's presence."""

    def publish_relays(
        self, room: RoomName, sender: ConnectionId, payloads: Sequence[bytes]
    ) -> None:
        """:meth:`publish` of a RELAY envelope from *sender* in *room* for
        each of *payloads*, in order (a read's relays, published together)."""

    def subscribe(self, room: RoomName) -> bool:
        """Receive *room*'s traffic from now on. True when the subscription
        and the room's view are ready at once; otherwise the handler's
        :meth:`~BackplaneHandler.on_room_ready` follows (also when the link is
        down: the node then serves its own members until it is back)."""
        ...

    def unsubscribe(self, room: RoomName) -> None:
        """Stop receiving *room*'s traffic (its last local member left)."""

    def remote_count(self, room: RoomName) -> int:
        """Connections open in *room* on the other nodes, as last known."""

    def ready(self) -> tuple[bool, str]:
        """Whether the cluster link works, and why not."""

    def metrics(self) -> dict[str, float]:
        """Counters and gauges for /metrics (name suffix -> value)."""
