"""Who is connected on the other nodes, as this node knows it (pure).

Every node keeps a :class:`PresenceView` of the other nodes' connections. It is
fed by three sources that can overlap and arrive in any order:

* ``joined`` / ``left`` events from the other nodes (pub/sub);
* periodic snapshots read from the shared store (``resync``), which correct the
  view after events were lost (a Redis outage, a rebuilt subscription);
* ``lost`` notices when a dead node's connections are reaped.

Every change is reported at most once: an id is announced as joined only when
it enters the view and as left only when it leaves it, so duplicates from the
three sources cost nothing. Two guards keep a stale snapshot from undoing
fresher events: an id that left is remembered (a tombstone) and never
re-added, and an id that joined recently is not removed by a snapshot that
may have been read before it joined.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..ids import ConnectionId, NodeId

__all__ = ["PresenceView", "ViewChange"]


@dataclass(slots=True)
class ViewChange:
    joined: list[ConnectionId] = field(default_factory=list)
    left: list[ConnectionId] = field(default_factory=list)


class PresenceView:
    def __init__(self, *, grace: float = 5.0, tombstone_ttl: float = 60.0) -> None:
        self.grace = grace
        self.tombstone_ttl = tombstone_ttl
        self.nodes: dict[NodeId, dict[ConnectionId, float]] = {}  # id -> when it joined
        self._tombstones: dict[ConnectionId, float] = {}
        self._count = 0

    def count(self) -> int:
        return self._count

    def joined(self, node: NodeId, conn: ConnectionId, now: float) -> bool:
        """Apply a join event; True if *conn* is new to the view."""
        if conn in self._tombstones:
            return False
        conns = self.nodes.setdefault(node, {})
        if conn in conns:
            return False
        conns[conn] = now
        self._count += 1
        return True

    def left(self, node: NodeId, conn: ConnectionId, now: float) -> bool:
        """Apply a leave event; True if *conn* was in the view."""
        self._tombstones[conn] = now
        if len(self._tombstones) % 1024 == 0:
            self._expire_tombstones(now)
        conns = self.nodes.get(node)
        if conns is None or conns.pop(conn, None) is None:
            return False
        self._count -= 1
        if not conns:
            del self.nodes[node]
        return True

    def lost(self, node: NodeId, conns: Iterable[ConnectionId], now: float) -> list[ConnectionId]:
        """A node died: its connections are gone. Returns those that were in
        the view (each is to be announced as left, once)."""
        gone = [conn for conn in conns if self.left(node, conn, now)]
        # Anything else we still hold for that node is gone as well.
        rest = list(self.nodes.get(node, ()))
        gone.extend(conn for conn in rest if self.left(node, conn, now))
        return gone

    def resync(self, snapshot: dict[NodeId, set[ConnectionId]], now: float) -> ViewChange:
        """Correct the view from a snapshot of every other node's presence."""
        change = ViewChange()
        for node, conns in snapshot.items():
            for conn in conns:
                if self.joined(node, conn, now):
                    change.joined.append(conn)
        for node in list(self.nodes):
            present = snapshot.get(node, set())
            for conn, since in list(self.nodes[node].items()):
                if conn not in present and now - since > self.grace:
                    if self.left(node, conn, now):
                        change.left.append(conn)
        self._expire_tombstones(now)
        return change

    def _expire_tombstones(self, now: float) -> None:
        # A tombstone only has to outlive a snapshot that was in flight when
        # its connection left; insertion order is time order, so stop early.
        horizon = now - self.tombstone_ttl
        for conn, when in list(self._tombstones.items()):
            if when >= horizon:
                break
            del self._tombstones[conn]
