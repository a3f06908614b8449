"""One room's recorded frames as this node hears them from Redis, and the
joins that wait for their place in it (decisions.md 13, history in a cluster).

Pure: no sockets, no clocks. With history on Redis every ``message`` and
``broadcast`` gets its offset from the room's script and reaches every node,
the publishing one too, on its subscription, in the order Redis ran the
scripts: one order per room. This module keeps what a node must know of that
order:

* *Continuity.* Once synced (after a join read the room's top), each frame
  heard must be the one after the last. One at or below the last means the
  room's history restarted (Redis emptied, a new epoch): the room's members
  hold positions that no longer follow, and the hub closes them so that they
  reconnect with ``since`` and recover or learn they cannot.
* *A gap is filled.* A frame further on means frames were lost on the way:
  the subscription was rebuilt (Redis froze, a publish timed out, a silent
  connection) while another node published, so Redis ran those scripts
  before this node subscribed again. They are in the room's stream, so the
  hub reads them (from the last offset delivered) and delivers them, then the
  frames held meanwhile, in order: the members never see the gap. Only when
  the read cannot give every missing offset (trimmed past the history size,
  expired, another epoch, Redis gone) are the members closed, as above.
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

from .history import Entry
from .ids import ConnectionId
from .protocol import RelayKind

__all__ = ["Continuity", "Recorded", "RoomStream", "from_entry", "offset_of"]


class Recorded(NamedTuple):
    """A frame of the room as heard: its offset, its bytes, and the connection
    not to send it to (a ``message``'s sender)."""

    offset: int
    payload: bytes
    exclude: ConnectionId | None


def from_entry(entry: Entry) -> Recorded:
    """A frame of the room's stream as it was heard on the subscription: a
    ``message`` skips its sender (the stream keeps only another exclusion)."""
    exclude = entry.exclude
    if exclude is None and entry.kind is RelayKind.MESSAGE:
        exclude = entry.sender
    return Recorded(entry.offset, entry.payload, ConnectionId(exclude) if exclude else None)


class Continuity(enum.Enum):
    IN_ORDER = "in_order"  # the next offset, or not synced yet: deliver it
    GAP = "gap"  # frames were lost before this one: held, read them (fill_from)
    HELD = "held"  # heard while a gap is being filled: held, delivered by filled()
    LOST = "lost"  # a gap that cannot be filled (too much held): members must go
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
        # While a gap is filled: the frames heard since it opened (the first
        # one is the frame after the gap), delivered once the read is in.
        self._held: list[Recorded] | None = None
        self._fill = 0  # which fill is running: a late answer of an older one is ignored

    @property
    def filling(self) -> int | None:
        """The fill running now (its number for :meth:`filled`), or None."""
        return self._fill if self._held is not None else None

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
        held = self._held
        if held is not None:
            if frame.offset <= held[-1].offset:  # restarted under the fill
                self._held = None
                self.top = frame.offset
                return Continuity.RESTARTED
            held.append(frame)
            if len(held) > self._limit:  # the read never came back: give up
                self._held = None
                return Continuity.LOST
            return Continuity.HELD
        top = self.top
        if top is None or frame.offset == top + 1:
            self.top = frame.offset
            return Continuity.IN_ORDER
        if frame.offset > top:
            # self.top stays the last offset delivered: the fill reads from it.
            self._held = [frame]
            self._fill += 1
            return Continuity.GAP
        self.top = frame.offset  # the restarted count is the one to follow
        return Continuity.RESTARTED

    def filled(
        self, fill: int, epoch: str | None, missed: list[Recorded] | None
    ) -> list[Recorded] | None:
        """The read of fill *fill* (see :attr:`filling`) is in: the room's
        *epoch* and its frames above :attr:`top` (None: the read failed).

        Returns the frames to deliver, in order: the missing ones, then those
        held, ``[]`` when this fill was abandoned meanwhile (a restart, a
        reset: the members were closed already), or None when the gap cannot
        be filled (an offset neither read nor held, another epoch): the
        members must go."""
        held = self._held
        if held is None or fill != self._fill:
            return []
        self._held = None
        top = self.top
        if missed is None or epoch != self.epoch or top is None:
            return None
        by_offset = {frame.offset: frame for frame in missed}
        by_offset.update((frame.offset, frame) for frame in held)
        last = held[-1].offset
        frames = [by_offset.get(offset) for offset in range(top + 1, last + 1)]
        if None in frames:
            return None
        self.top = last
        return [frame for frame in frames if frame is not None]

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
        if self._held is not None and not stale:
            # A gap is being filled: the frames kept for this join may lack
            # the missing ones, and the fill delivers the held ones to every
            # member, this one too. It starts over (rare: a fill is one read).
            return None, False
        self._held = None  # the fill, if any, is moot: the members go
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
        self._held = None
