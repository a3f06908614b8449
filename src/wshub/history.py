"""Per-room history of published frames, and recovery over a reconnect.

Pure: no sockets, no clocks (``now`` is passed in, from a monotonic clock; if it
ever went backwards entries would only live longer), randomness injected. The
rules are decisions.md 13 and 19 ("Recovery window", "History off").

Theory of operation
-------------------
*Offsets.* Each room has a counter: the n-th ``message`` or ``broadcast``
accepted in the room gets offset ``base + n``. Its ``epoch`` (a random string)
names one run of that counter: whenever the counter could restart, the epoch
changes, so a client never recovers across a gap. The epoch changes when

* the process starts (memory history: everything is new);
* a room's state is forgotten: only when it holds no entries, no connection
  holds it (:meth:`History.hold`, called by the room's hub for each member), and
  it has been idle for ``meta_ttl`` seconds or the memory bound needs its bytes.
  A room with members is never forgotten, so a connected client never sees an
  offset go backwards.

*Entries.* A room keeps its last ``size`` entries; entries older than ``ttl``
are dropped; over the node-wide ``memory`` bound the oldest entries of all rooms
go first (idle room states before them). A room's held entries are therefore
always a contiguous run of offsets ending at its top, and a recovery succeeds
exactly when that run reaches back to ``OFFSET + 1`` (or ``OFFSET`` is the top).

*Cost.* One global deque of ``(room, offset)`` records in append order finds
the oldest entry in O(1); records of entries already dropped by a room's own
cap are skipped when they reach the front, and the deque is compacted when such
records outnumber the live ones, so each append costs O(1) amortised and the
records never outgrow twice the entries held.

*Invisible to the garbage collector.* What is kept per entry (the entry and its
record) is a plain tuple of ints, bytes, strings, a bool, a float and None,
never an object that can be part of a cycle: CPython untracks such a tuple at
its first young collection, so however many entries are held (the default
64 MiB bound holds ~150,000), no collection walks them again, and their coming
and going never triggers a full collection. A record names its room by name,
not by the room object (which would keep the record tracked). A name always
means the room's current state: a room is emptied only by taking records from
the front of the global order (its own cap never takes its last entry), and its
newest entry's record is its last one there, so a room without entries has no
records left, and only such a room is ever forgotten. :class:`Entry`, the API's
type, is built from the tuple only when entries are read (a join's replay,
tests).

*Publication* (single-threaded, in the room's hub)::

    offset = history.next_offset(room)
    payload = encode_relay(kind, sender, content, now, offset)
    history.append(room, Entry(offset, payload, sender, kind, exclude), now)

*Join*: :meth:`History.recover` for ``?since=``, :meth:`History.recent` for
``?history=``, :meth:`History.state` otherwise; replay each entry's
:func:`~wshub.protocol.replayed` payload after the ``welcome``.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Final, NamedTuple
from urllib.parse import unquote

from .protocol import RelayKind

_MESSAGE: Final = RelayKind.MESSAGE

__all__ = [
    "ENTRIES_OVERHEAD",
    "ENTRY_OVERHEAD",
    "MAX_QUERY_LENGTH",
    "ROOM_OVERHEAD",
    "Entry",
    "History",
    "JoinQuery",
    "Position",
    "QueryRefusal",
    "Recovery",
    "new_epoch",
    "parse_join_query",
    "would_receive",
]

ENTRY_OVERHEAD: Final = 240
"""Bytes accounted per entry besides its payload and ids: the payload's object
header, the entry's tuple, its slots in the room's deque and the global deque,
and the record tuple with its float. bench/history_cost.py measures the whole
entry with tracemalloc: 455 B measured against 456 B accounted for a 186-byte
frame in one room, 389 B against 471 B over 1,000 rooms (CPython 3.11)."""

ROOM_OVERHEAD: Final = 300
"""Bytes accounted per room state (its object, its slots in the rooms' dict and
in the idle ones', its epoch) besides its name: tracemalloc over 10,000 rooms
(CPython 3.11) measured 154 B for a room with members and no entries, 220 B
for an idle one (900 B were accounted while every room held a deque)."""

ENTRIES_OVERHEAD: Final = 760
"""Bytes accounted for a room's deque of entries: the object with its first
block of 64 slots (``sys.getsizeof(deque())``). A room has one only while it
holds entries: one whose members never spoke, or whose entries all expired,
has none."""


def new_epoch() -> str:
    """12 random characters of ``[0-9a-f]``: an epoch never seen before."""
    return secrets.token_hex(6)


class Entry(NamedTuple):
    """One published frame as kept in a room's history."""

    offset: int
    payload: bytes
    """The frame as first sent (with its offset, without ``replayed``)."""
    sender: str
    """The sender's connection id, or the backend's ``connectionId``."""
    kind: RelayKind
    exclude: str | None
    """The connection a backend ``message`` was not sent to."""


class Recovery(NamedTuple):
    recovered: bool
    missed: list[Entry]
    """What to replay, in offset order (empty unless recovered)."""
    epoch: str
    offset: int
    """The room's top offset now: the ``welcome``'s ``offset``."""


def would_receive(entry: Entry, previous: str | None) -> bool:
    """Whether the connection *previous* was sent *entry*: not its own
    ``message``s, nor a ``message`` that excluded it; its broadcasts, yes."""
    if previous is None or entry.kind is not RelayKind.MESSAGE:
        return True
    return entry.sender != previous and entry.exclude != previous


_Kept = tuple[int, bytes, str, bool, str | None]
"""An entry as a room holds it: ``(offset, payload, sender, is_message,
exclude)``, all atomic, so untracked by the GC (see "Invisible to the garbage
collector" above)."""

_Record = tuple[str, int, float]
"""``(room name, offset, when appended)``, in the global order."""


class _Room:
    __slots__ = ("name", "epoch", "top", "entries", "holders")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.top = 0
        # Made on the first entry, let go with the last (ENTRIES_OVERHEAD):
        # most rooms of an idle node never hold one.
        self.entries: deque[_Kept] | None = None
        self.holders = 0


def _kept_size(kept: _Kept) -> int:
    return len(kept[1]) + len(kept[2]) + len(kept[4] or "") + ENTRY_OVERHEAD


def _entry(kept: _Kept) -> Entry:
    offset, payload, sender, is_message, exclude = kept
    return Entry(offset, payload, sender, _MESSAGE if is_message else RelayKind.BROADCAST, exclude)


def _would_receive(kept: _Kept, previous: str | None) -> bool:
    """:func:`would_receive` of a kept entry."""
    if previous is None or not kept[3]:
        return True
    return kept[2] != previous and kept[4] != previous


class History:
    """The memory history of every room of one node."""

    def __init__(
        self,
        *,
        size: int = 100,
        ttl: float = 120.0,
        memory: int = 64 * 1024 * 1024,
        meta_ttl: float = 3600.0,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        """
        Args:
            size: entries kept per room; 0 turns history off.
            ttl: seconds an entry is kept.
            memory: bytes accounted for all rooms together.
            meta_ttl: seconds an idle room (no entries, no holders) keeps its
                epoch and offset, so that a quiet room's client still recovers
                (with nothing missed); never less than *ttl*.
            epochs: makes a new epoch.
        """
        self.size = size
        self.ttl = ttl
        self.memory = memory
        self.meta_ttl = max(meta_ttl, ttl)
        self._epochs = epochs
        self._rooms: dict[str, _Room] = {}
        self._idle: OrderedDict[str, float] = OrderedDict()  # room -> idle since
        self._order: deque[_Record] = deque()  # in append order
        self._stale = 0  # records in _order whose entry is gone
        self._expired_at = float("nan")  # the last expire()'s now (nan: never)
        self.bytes = 0
        """Bytes accounted now (entries and room states): never above ``memory``
        once a call returns."""
        self.evicted = 0
        """Entries dropped by the memory bound (for /metrics)."""

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def entries(self) -> int:
        """Entries held now, in all rooms."""
        return len(self._order) - self._stale

    @property
    def room_count(self) -> int:
        """Room states held now (with entries, members, or idle)."""
        return len(self._rooms)

    # -- Rooms ------------------------------------------------------------------

    def _room(self, name: str, now: float, holders: int = 0) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _Room(name, self._epochs())
            room.holders = holders
            self.bytes += ROOM_OVERHEAD + len(name)
            # Bounded before the new room can be idle: the bound never takes
            # the room being created (it may stay over by that room until the
            # next call, when nothing else can go: held rooms only).
            self._bound()
            if not holders:
                self._idle[name] = now
        elif holders:
            room.holders += holders
            self._idle.pop(name, None)
        return room

    def _forget(self, room: _Room) -> None:
        del self._rooms[room.name]
        self._idle.pop(room.name, None)
        self.bytes -= ROOM_OVERHEAD + len(room.name)

    def _maybe_idle(self, room: _Room, now: float) -> None:
        # *room* is one of self._rooms: every caller found it there.
        if not room.entries and room.holders == 0:
            self._idle[room.name] = now
            self._idle.move_to_end(room.name)

    def hold(self, name: str, now: float) -> None:
        """A connection joined *name*: keep its epoch and offset while held."""
        if not self.enabled:
            return
        self._room(name, now, holders=1)

    def release(self, name: str, now: float) -> None:
        """A connection left *name* (once per :meth:`hold`)."""
        room = self._rooms.get(name)
        if room is None or room.holders == 0:
            return
        room.holders -= 1
        self._maybe_idle(room, now)

    def state(self, name: str, now: float) -> tuple[str, int]:
        """The room's ``(epoch, top offset)`` for a ``welcome``."""
        if not self.enabled:
            return "", 0
        self.expire(now)
        room = self._room(name, now)
        return room.epoch, room.top

    # -- Publication ------------------------------------------------------------

    def next_offset(self, name: str, now: float) -> int:
        """The offset the next :meth:`append` to *name* assigns (0 when off)."""
        if self.size <= 0:  # not the ``enabled`` property: a call per message
            return 0
        if now != self._expired_at:
            self.expire(now)
        room = self._rooms.get(name) or self._room(name, now)
        return room.top + 1

    def append(self, name: str, entry: Entry, now: float) -> int:
        """Keep *entry*, published in room *name*; returns its offset.

        ``entry.offset`` must be :meth:`next_offset`: the payload carries it.
        With history off nothing is kept and 0 is returned.
        """
        if self.size <= 0:
            return 0
        offset = self.next_offset(name, now)
        if entry.offset != offset:
            raise ValueError(f"entry offset {entry.offset} is not the next offset {offset}")
        self.keep(
            name, offset, entry.payload, entry.sender, entry.kind is _MESSAGE, entry.exclude, now
        )
        return offset

    def keep(
        self,
        name: str,
        offset: int,
        payload: bytes,
        sender: str,
        is_message: bool,
        exclude: str | None,
        now: float,
    ) -> None:
        """:meth:`append` of the relay's hot path (history on): the entry's
        fields as they are, no :class:`Entry` built, and *offset* the one
        :meth:`next_offset` gave at *now* just before, asserted rather than
        checked (the hub encodes the payload with it in between; nothing else
        runs there). :meth:`append` is the checked door."""
        if now != self._expired_at:
            self.expire(now)
        room = self._rooms.get(name) or self._room(name, now)
        assert offset == room.top + 1, (offset, room.top)
        room.top = offset
        entries = room.entries
        if entries is None:
            entries = room.entries = deque()
            self.bytes += ENTRIES_OVERHEAD
        # A plain tuple of atomic values, not the Entry: untracked by the GC.
        entries.append((offset, payload, sender, is_message, exclude))
        self.bytes += len(payload) + len(sender) + (len(exclude) if exclude else 0) + ENTRY_OVERHEAD
        if self._idle:
            self._idle.pop(name, None)
        self._order.append((name, offset, now))
        if len(entries) > self.size:
            # _drop_oldest() without its call (every message of a full room
            # comes here) and without its emptiness check: never the last,
            # size >= 1.
            self.bytes -= _kept_size(entries.popleft())
            self._stale += 1  # its record is still somewhere in _order
            if self._stale > 1024 and self._stale > len(self._order) - self._stale:
                self._compact()
        if self.bytes > self.memory:
            self._bound()

    def keep_run(
        self,
        name: str,
        first: int,
        payloads: Sequence[bytes],
        sender: str,
        messages: Sequence[bool],
        now: float,
    ) -> None:
        """:meth:`keep` of a run of one sender's relays published together
        (a read's, ``Hub.on_plain_relays``): offsets *first* up, without an
        excluded connection, and *first* the :meth:`next_offset` of *now*.
        Entry by entry the same steps as :meth:`keep`, the memory bound
        included, so what is held afterwards is what that many keep() calls
        leave; the expiry check and the room's lookup once. The room is
        held (the sender is a member), so the bound never forgets it."""
        if now != self._expired_at:
            self.expire(now)
        room = self._rooms.get(name) or self._room(name, now)
        assert first == room.top + 1, (first, room.top)
        entries = room.entries
        size = self.size
        order = self._order
        accounted = len(sender) + ENTRY_OVERHEAD
        offset = first
        for payload, is_message in zip(payloads, messages, strict=True):
            if entries is None:
                entries = room.entries = deque()
                self.bytes += ENTRIES_OVERHEAD
            room.top = offset
            entries.append((offset, payload, sender, is_message, None))
            self.bytes += len(payload) + accounted
            if self._idle:
                self._idle.pop(name, None)
            order.append((name, offset, now))
            if len(entries) > size:
                self.bytes -= _kept_size(entries.popleft())  # never the last: size >= 1
                self._stale += 1
                if self._stale > 1024 and self._stale > len(order) - self._stale:
                    self._compact()
                    order = self._order
            if self.bytes > self.memory:
                self._bound()
                entries = room.entries  # None if the bound took them all
            offset += 1

    def _drop_oldest(self, room: _Room) -> None:
        entries = room.entries
        assert entries is not None  # every caller saw the entry it drops
        self.bytes -= _kept_size(entries.popleft())
        if not entries:
            room.entries = None
            self.bytes -= ENTRIES_OVERHEAD

    def _compact(self) -> None:
        # _live_room() inlined: this walks every record, about once per
        # len(_order) appends while rooms are full, and a call per record was
        # most of its cost (docs/rooms-perf.md).
        rooms = self._rooms
        self._order = deque(
            [
                record
                for record in self._order
                if (room := rooms.get(record[0])) is not None
                and (entries := room.entries)
                and entries[0][0] <= record[1]
            ]
        )
        self._stale = 0

    def _live_room(self, record: _Record) -> _Room | None:
        """The room whose entry *record* is, if that entry is still held: a
        room keeps a contiguous run of offsets ending at its top, so the entry
        is held exactly when the room's oldest is not newer."""
        name, offset, _ = record
        room = self._rooms.get(name)
        if room is None:
            return None  # never: a room with records is not forgotten (above)
        entries = room.entries
        return room if entries and entries[0][0] <= offset else None

    # -- Dropping ---------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop entries older than ``ttl`` and forget rooms idle for
        ``meta_ttl``. Called by every other method; a sweep may call it too."""
        if now == self._expired_at:
            return  # everything due at this instant is gone already
        self._expired_at = now
        order = self._order
        deadline = now - self.ttl
        # The records are in time order: the expired ones are at the front.
        live = self._live_room
        while order and order[0][2] <= deadline:
            room = live(order.popleft())
            if room is not None:
                self._drop_oldest(room)  # a live record at the front is its room's oldest
                self._maybe_idle(room, now)
            else:
                self._stale -= 1
        idle = self._idle
        deadline = now - self.meta_ttl
        while idle:
            name, since = next(iter(idle.items()))
            if since > deadline:
                break
            self._forget(self._rooms[name])

    def _bound(self) -> None:
        """Under the memory bound: idle room states first, then the oldest
        entries of all rooms."""
        order = self._order
        while self.bytes > self.memory:
            if self._idle:
                self._forget(self._rooms[next(iter(self._idle))])
                continue
            if not order:
                break  # only held rooms left: their states are what members need
            room = self._live_room(order.popleft())
            if room is None:
                self._stale -= 1
                continue
            self._drop_oldest(room)
            self.evicted += 1
            if not room.entries and room.holders == 0:
                self._idle[room.name] = float("-inf")  # the first to go
                self._idle.move_to_end(room.name, last=False)

    # -- Join -------------------------------------------------------------------

    def recover(
        self, name: str, epoch: str, offset: int, previous: str | None, now: float
    ) -> Recovery:
        """``?since=EPOCH:OFFSET[&previous=ID]`` (decisions.md 13, 19).

        Recovered exactly when *epoch* is the room's and the room still holds
        every entry after *offset* (*offset* itself need not be held; the top
        recovers with nothing missed). ``missed`` is what *previous* would have
        received. History off: not recovered, nothing missed.
        """
        if not self.enabled:
            return Recovery(False, [], "", 0)
        self.expire(now)
        room = self._room(name, now)
        top = room.top
        if epoch != room.epoch or offset > top or offset < 0:
            return Recovery(False, [], room.epoch, top)
        if offset == top:
            return Recovery(True, [], room.epoch, top)
        entries = room.entries
        if not entries or entries[0][0] > offset + 1:
            return Recovery(False, [], room.epoch, top)
        after = _tail(entries, top - offset)
        missed = [_entry(kept) for kept in after if _would_receive(kept, previous)]
        return Recovery(True, missed, room.epoch, top)

    def recent(self, name: str, count: int, now: float) -> Recovery:
        """``?history=N``: the room's last *count* entries (at most ``size``),
        oldest first, as a ``Recovery`` whose ``recovered`` is True."""
        if not self.enabled:
            return Recovery(False, [], "", 0)
        self.expire(now)
        room = self._room(name, now)
        entries = room.entries
        if not entries:
            return Recovery(True, [], room.epoch, room.top)
        count = min(count, self.size, len(entries))
        recent = [_entry(kept) for kept in _tail(entries, count)]
        return Recovery(True, recent, room.epoch, room.top)

    def held(self, name: str) -> Sequence[Entry]:
        """The entries room *name* holds now (for tests and the API)."""
        room = self._rooms.get(name)
        if room is None or room.entries is None:
            return ()
        return tuple(_entry(kept) for kept in room.entries)

    def rooms(self) -> Iterable[str]:
        return self._rooms.keys()


def _tail(entries: deque[_Kept], count: int) -> list[_Kept]:
    if count <= 0:
        return []
    if count >= len(entries):
        return list(entries)
    out = list(islice(reversed(entries), count))  # from the right end: no walk
    out.reverse()
    return out


# -- The query of a joining connection (decisions.md 13, 19) ------------------

MAX_QUERY_LENGTH: Final = 16 * 1024
"""Longest query string read (the request head is bounded at 16 KiB anyway)."""
_MAX_FIELDS: Final = 100
_MAX_HISTORY: Final = 10**9  # any larger ?history= is capped at the history size anyway

_EPOCH: Final = re.compile(r"[A-Za-z0-9._~-]{1,64}")
# An INTEGER of decisions.md 19, one spelling per number: JSON's (no sign, no
# leading zero, no white space), the form the server writes offsets in. A
# second spelling ("01", "+1") is one more way for two readers to disagree.
_DIGITS: Final = re.compile(r"0|[1-9][0-9]{0,18}")
_MAX_INTEGER: Final = 2**63 - 1  # what an offset is counted in (Redis INCR)
_CONNECTION_ID: Final = re.compile(r"ws-[0-9]{1,20}-[a-z0-9]{9}")
_NAMES: Final = ("since", "history", "previous")


class Position(NamedTuple):
    """``since=EPOCH:OFFSET``: the last frame a client got, and whose history."""

    epoch: str
    offset: int


class JoinQuery(NamedTuple):
    """What a joining connection asked for. ``since`` wins over ``history``:
    a client with a position recovers or learns it can't, and is not handed
    recent messages it may already have."""

    since: Position | None = None
    history: int | None = None
    """Not yet capped at the history size (:meth:`History.recent` caps)."""
    previous: str | None = None


class QueryRefusal(NamedTuple):
    """Answer ``400`` with this short text, before the upgrade."""

    reason: str


def _integer(text: str) -> int | None:
    """*text* as a non-negative integer, or None: not in the canonical form,
    or past 2**63 - 1 (no offset can be that large: a number past the range
    it is counted in does not parse, in since and history alike)."""
    if _DIGITS.fullmatch(text) is None:
        return None
    value = int(text)  # at most 19 digits
    return value if value <= _MAX_INTEGER else None


def parse_join_query(query: str) -> JoinQuery | QueryRefusal:
    """Read ``since``, ``history`` and ``previous`` from a raw query string
    (without the ``?``); other parameters are ignored. Never raises.

    Values may be percent-encoded (``URLSearchParams`` writes ``:`` as
    ``%3A``). A name given twice is refused: which one was meant is unknown.
    """
    if len(query) > MAX_QUERY_LENGTH:
        return QueryRefusal("query string too long")
    fields = query.split("&", _MAX_FIELDS)
    if len(fields) > _MAX_FIELDS:
        return QueryRefusal("too many query parameters")
    found: dict[str, str] = {}
    for field in fields:
        name, _, value = field.partition("=")
        if "%" in name:
            name = unquote(name, errors="replace")
        if name not in _NAMES:
            continue
        if name in found:
            return QueryRefusal(f"{name} given more than once")
        found[name] = unquote(value, errors="replace") if "%" in value else value
    since = history = previous = None
    if "since" in found:
        epoch, colon, offset_text = found["since"].rpartition(":")
        offset = _integer(offset_text) if colon else None
        if offset is None or _EPOCH.fullmatch(epoch) is None:
            return QueryRefusal("since must be EPOCH:OFFSET (OFFSET a non-negative integer)")
        since = Position(epoch, offset)
    if "history" in found:
        history = _integer(found["history"])
        if history is None:
            return QueryRefusal("history must be a non-negative integer")
        history = min(history, _MAX_HISTORY)
    if "previous" in found:
        previous = found["previous"]
        if _CONNECTION_ID.fullmatch(previous) is None:
            return QueryRefusal("previous must be a connection id (ws-DIGITS-9 of [a-z0-9])")
    return JoinQuery(since, history, previous)
