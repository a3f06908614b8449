"""One room's recorded frames as this node hears them from Redis, and the
joins that wait for their place in it (decisions.md 13, history in a cluster).

Pure: no sockets, no clocks. With history on Redis every ``message`` and
``broadcast`` gets its offset from the room's script and reaches every node,
the publishing one too, on its subscription, in the order Redis ran the
scripts: one order per room. This module keeps what a node must know of that
order:

* *Continuity.* Once synced (after a join read the room's top), each frame
  heard must be the one after the last: a frame further on means frames were
  lost on the way (an outage of the subscription), one at or below the last
  means the room's history restarted (Redis emptied, a new epoch). Either way
  the room's members hold positions that no longer follow, and the hub closes
  them so that they reconnect with ``since`` and recover or learn they cannot.
* *The seam of a join.* A join reads the room's top (and what it missed) from
  Redis while frames keep arriving on the subscription, and the read's reply
  and the subscription are two sockets with no order between them. So, from
  the moment a join starts, every frame heard is also kept for it; the read
  publishes a marker behind itself, and once the node heard the marker it has
  heard every frame the read saw. The join then gets the frames kept for it
  with an offset above the read's top, after its replay: no gap, no duplicate.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from .ids import ConnectionId

__all__ = ["Continuity", "Recorded", "RoomStream", "offset_of"]


class Recorded(NamedTuple):
    """A frame of the room as heard: its offset, its bytes, and the connection
    not to send it to (a ``message``'s sender)."""

    offset: int
    payload: bytes
    exclude: ConnectionId | None


class Continuity(enum.Enum):
    IN_ORDER = "in_order"  # the next offset, or not synced yet
    GAP = "gap"  # frames were lost before this one
    RESTARTED = "restarted"  # the offset went back: the room's history restarted


def offset_of(payload: bytes) -> int:
    """The offset the room's script put last in *payload* (``,"offset":N}``).
    Raises ValueError on a payload without one."""
    colon = payload.rindex(b":")
    return int(payload[colon + 1 : -1])


class RoomStream:
    """This node's place in one room's recorded frames."""

    def __init__(self, join_buffer_limit: int = 10_000) -> None:
        self.epoch: str | None = None
        """The epoch the room's members here were welcomed with."""
        self.top: int | None = None
        """The last offset heard, once a join read the room's top."""
        self._limit = join_buffer_limit
        self._joining: dict[ConnectionId, list[Recorded] | None] = {}

    @property
    def joining(self) -> int:
        return len(self._joining)

    def begin(self, connection_id: ConnectionId) -> None:
        """A join of *connection_id* starts its read: keep what is heard for it."""
        self._joining[connection_id] = []

    def cancel(self, connection_id: ConnectionId) -> None:
        self._joining.pop(connection_id, None)

    def heard(self, frame: Recorded) -> Continuity:
        """*frame* arrived on the subscription (before it is delivered)."""
        for connection_id, kept in self._joining.items():
            if kept is not None:
                kept.append(frame)
                if len(kept) > self._limit:  # a join stuck in a flood: it starts over
                    self._joining[connection_id] = None
        top = self.top
        self.top = frame.offset if top is None or frame.offset > top else top
        if top is None or frame.offset == top + 1:
            return Continuity.IN_ORDER
        if frame.offset > top:
            return Continuity.GAP
        self.top = frame.offset  # the restarted count is the one to follow
        return Continuity.RESTARTED

    def finish(
        self, connection_id: ConnectionId, epoch: str, top: int
    ) -> tuple[list[Recorded] | None, bool]:
        """The join's read said ``(epoch, top)`` and its marker was heard.

        Returns the frames above *top* heard meanwhile, to send after the
        replay (None when too many came in for it: the join must start
        over), and whether the members already here hold an epoch that is
        no longer the room's (they must reconnect)."""
        kept = self._joining.pop(connection_id, None)
        stale = self.epoch is not None and epoch != self.epoch
        after = None if kept is None else [frame for frame in kept if frame.offset > top]
        if stale or self.top is None:
            self.epoch = epoch
            self.top = max([top, *(frame.offset for frame in after or ())])
        else:
            self.epoch = epoch
            self.top = max(self.top, top)
        return after, stale

    def published(self, epoch: str) -> bool:
        """A publication from here was given *epoch*: False when it is not
        the members' (the room's history restarted under them)."""
        if self.epoch is None:
            self.epoch = epoch
            return True
        return epoch == self.epoch

    def reset(self, epoch: str | None = None) -> None:
        """The members were closed: follow the room afresh."""
        self.epoch = epoch
        self.top = None
