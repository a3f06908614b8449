"""What every backplane does with what it hears, whatever carries it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ..ids import ConnectionId, NodeId
from . import BackplaneHandler, Envelope, EventKind
from .presence import PresenceView

__all__ = ["ViewKeeper"]

log = logging.getLogger("wshub.backplane")


class ViewKeeper:
    """Applies envelopes and snapshots to the :class:`PresenceView` and tells
    the node about each change once."""

    def __init__(self, node_id: NodeId, clock: Callable[[], float]) -> None:
        self.node_id = node_id
        self.clock = clock
        self.view = PresenceView()
        self.handler: BackplaneHandler | None = None
        self.received = 0
        self.last_probe_heard = 0.0

    def remote_count(self) -> int:
        return self.view.count()

    def receive(self, envelope: Envelope) -> None:
        handler = self.handler
        if handler is None:
            return
        kind = envelope.kind
        if envelope.node_id == self.node_id:
            if kind is EventKind.PROBE:
                self.last_probe_heard = self.clock()
            return  # our own events were handled locally
        self.received += 1
        if kind is EventKind.RELAY:
            handler.on_envelope(envelope)
        elif kind is EventKind.JOINED:
            if self.view.joined(envelope.node_id, envelope.connection_id, self.clock()):
                handler.on_envelope(envelope)
        elif kind is EventKind.LEFT:
            if self.view.left(envelope.node_id, envelope.connection_id, self.clock()):
                handler.on_envelope(envelope)
        elif kind is EventKind.LOST:
            ids = [ConnectionId(i) for i in envelope.payload.decode().split("\n") if i]
            self.apply_lost(NodeId(envelope.connection_id), ids)

    def apply_lost(self, dead: NodeId, ids: Iterable[ConnectionId]) -> None:
        gone = self.view.lost(dead, ids, self.clock())
        if gone and self.handler is not None:
            log.warning("node %s lost: %d connections announced as gone", dead, len(gone))
            self.handler.on_connections_lost(gone)

    def apply_snapshot(self, snapshot: dict[NodeId, set[ConnectionId]]) -> None:
        snapshot.pop(self.node_id, None)
        change = self.view.resync(snapshot, self.clock())
        if self.handler is None:
            return
        if change.joined:
            log.info("resync found %d connections", len(change.joined))
            self.handler.on_connections_found(change.joined)
        if change.left:
            log.info("resync lost %d connections", len(change.left))
            self.handler.on_connections_lost(change.left)
