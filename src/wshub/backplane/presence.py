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

The view also remembers the user id (a token's ``sub``, decisions.md 15) of
each authenticated connection it learns, from its join event or a snapshot, so
that the presence it rebuilds (a dead node's connections, a resync's finds)
names the user as the events it replaces would have.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from ..ids import ConnectionId, NodeId

__all__ = ["PresenceView", "ViewChange"]


@dataclass(slots=True)
class ViewChange:
    joined: list[ConnectionId] = field(default_factory=list)
    left: list[ConnectionId] = field(default_factory=list)
    # The user ids of those in joined and left that have one.
    users: dict[ConnectionId, str] = field(default_factory=dict)


class PresenceView:
    def __init__(self, *, grace: float = 5.0, tombstone_ttl: float = 60.0) -> None:
        self.grace = grace
        self.tombstone_ttl = tombstone_ttl
        self.nodes: dict[NodeId, dict[ConnectionId, float]] = {}  # id -> when it joined
        self._tombstones: dict[ConnectionId, float] = {}
        self._users: dict[ConnectionId, str] = {}  # only the connections that have one
        self._count = 0

    def count(self) -> int:
        return self._count

    def user_of(self, conn: ConnectionId) -> str | None:
        return self._users.get(conn)

    def joined(self, node: NodeId, conn: ConnectionId, now: float, user: str | None = None) -> bool:
        """Apply a join event; True if *conn* is new to the view."""
        if conn in self._tombstones:
            return False
        conns = self.nodes.setdefault(node, {})
        if conn in conns:
            return False
        conns[conn] = now
        if user is not None:
            self._users[conn] = user
        self._count += 1
        return True

    def left(
        self,
        node: NodeId,
        conn: ConnectionId,
        now: float,
        users: dict[ConnectionId, str] | None = None,
    ) -> bool:
        """Apply a leave event; True if *conn* was in the view (its user id,
        if it had one, then goes to *users*)."""
        self._tombstones[conn] = now
        if len(self._tombstones) % 1024 == 0:
            self._expire_tombstones(now)
        conns = self.nodes.get(node)
        if conns is None or conns.pop(conn, None) is None:
            return False
        self._count -= 1
        if not conns:
            del self.nodes[node]
        user = self._users.pop(conn, None)
        if user is not None and users is not None:
            users[conn] = user
        return True

    def lost(self, node: NodeId, conns: Iterable[ConnectionId], now: float) -> ViewChange:
        """A node died: its connections are gone. Returns those that were in
        the view as ``left`` (each is to be announced as left, once)."""
        change = ViewChange()
        users = change.users
        change.left = [conn for conn in conns if self.left(node, conn, now, users)]
        # Anything else we still hold for that node is gone as well.
        rest = list(self.nodes.get(node, ()))
        change.left.extend(conn for conn in rest if self.left(node, conn, now, users))
        return change

    def resync(
        self,
        snapshot: dict[NodeId, set[ConnectionId]],
        now: float,
        users: Mapping[ConnectionId, str] | None = None,
        unsure: Collection[NodeId] = (),
    ) -> ViewChange:
        """Correct the view from a snapshot of every other node's presence
        (and the user ids of its authenticated connections). The connections
        of the *unsure* nodes, whose presence in the snapshot may be
        incomplete (one that has not registered again in a Redis that came
        back empty), are added but never removed."""
        change = ViewChange()
        known = users or {}
        for node, conns in snapshot.items():
            for conn in conns:
                user = known.get(conn)
                if self.joined(node, conn, now, user):
                    change.joined.append(conn)
                    if user is not None:
                        change.users[conn] = user
        for node in list(self.nodes):
            if node in unsure:
                continue
            present = snapshot.get(node, set())
            for conn, since in list(self.nodes[node].items()):
                if conn not in present and now - since > self.grace:
                    if self.left(node, conn, now, change.users):
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
