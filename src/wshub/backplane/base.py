"""What every backplane does with what it hears, whatever carries it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping

from ..ids import ConnectionId, NodeId
from ..rooms import RoomName
from . import BackplaneHandler, Envelope, EventKind
from .presence import PresenceView

__all__ = ["ViewKeeper", "joined_user", "lost_payload", "parse_lost"]

log = logging.getLogger("wshub.backplane")


def lost_payload(ids: Iterable[ConnectionId]) -> bytes:
    return "\n".join(ids).encode()


def parse_lost(payload: bytes) -> list[ConnectionId]:
    return [ConnectionId(i) for i in payload.decode().split("\n") if i]


def joined_user(payload: bytes) -> str | None:
    """The user id in a JOINED envelope's ``user_joined`` frame, if any (the
    frame is the only place the envelope carries it; anonymous joins, most of
    them, are not parsed)."""
    if b'"userId"' not in payload:
        return None
    try:
        user = json.loads(payload).get("userId")
    except (ValueError, AttributeError):
        return None
    return user if isinstance(user, str) else None


class ViewKeeper:
    """Applies envelopes and snapshots to one :class:`PresenceView` per room
    this node is subscribed to, and tells the node about each change once."""

    def __init__(self, node_id: NodeId, clock: Callable[[], float]) -> None:
        self.node_id = node_id
        self.clock = clock
        self.views: dict[RoomName, PresenceView] = {}
        self.handler: BackplaneHandler | None = None
        self.received = 0
        self.last_probe_heard = 0.0

    def remote_count(self, room: RoomName) -> int:
        view = self.views.get(room)
        return 0 if view is None else view.count()

    def open_view(self, room: RoomName) -> None:
        if room not in self.views:
            self.views[room] = PresenceView()

    def close_view(self, room: RoomName) -> None:
        self.views.pop(room, None)

    def receive(self, envelope: Envelope) -> None:
        handler = self.handler
        if handler is None:
            return
        kind = envelope.kind
        if kind is EventKind.RECORDED:
            # One order per room: every node, this one too, delivers it as heard.
            if envelope.node_id != self.node_id:
                self.received += 1
            if envelope.room in self.views:
                handler.on_envelope(envelope)
            return
        if envelope.node_id == self.node_id:
            if kind is EventKind.PROBE:
                self.last_probe_heard = self.clock()
            elif kind is EventKind.MARK:
                handler.on_envelope(envelope)
            return  # our own events were handled locally
        if kind is EventKind.MARK:
            return  # another node's join
        self.received += 1
        view = self.views.get(envelope.room)
        if view is None:
            return  # a room we left while this was on its way
        if kind is EventKind.RELAY:
            handler.on_envelope(envelope)
        elif kind is EventKind.JOINED:
            user = joined_user(envelope.payload)
            if view.joined(envelope.node_id, envelope.connection_id, self.clock(), user):
                handler.on_envelope(envelope)
        elif kind is EventKind.LEFT:
            if view.left(envelope.node_id, envelope.connection_id, self.clock()):
                handler.on_envelope(envelope)
        elif kind is EventKind.LOST:
            dead = NodeId(envelope.connection_id)
            self.apply_lost(envelope.room, dead, parse_lost(envelope.payload))

    def apply_lost(self, room: RoomName, dead: NodeId, ids: Iterable[ConnectionId]) -> None:
        view = self.views.get(room)
        if view is None:
            return
        gone = view.lost(dead, ids, self.clock())
        if gone.left and self.handler is not None:
            log.warning(
                "node %s lost: %d connections in room %r announced as gone",
                dead,
                len(gone.left),
                room,
            )
            self.handler.on_connections_lost(room, gone.left, gone.users)

    def apply_snapshot(
        self,
        room: RoomName,
        snapshot: dict[NodeId, set[ConnectionId]],
        *,
        users: Mapping[ConnectionId, str] | None = None,
        initial: bool = False,
        unsure: Collection[NodeId] = (),
    ) -> None:
        """Correct *room*'s view from the shared store (*users*: the user ids
        of its authenticated connections). The *initial* snapshot of a new
        subscription fills the view silently: no one here was told anything
        about the room yet. The *unsure* nodes' connections are not removed
        (:meth:`PresenceView.resync`)."""
        view = self.views.get(room)
        if view is None:
            return
        snapshot.pop(self.node_id, None)
        change = view.resync(snapshot, self.clock(), users, unsure)
        if self.handler is None or initial:
            return
        if change.joined:
            log.info("resync found %d connections in room %r", len(change.joined), room)
            self.handler.on_connections_found(room, change.joined, change.users)
        if change.left:
            log.info("resync lost %d connections in room %r", len(change.left), room)
            self.handler.on_connections_lost(room, change.left, change.users)
