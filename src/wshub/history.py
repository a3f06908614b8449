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

__all__ = [
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
header, the Entry tuple and its float, its slots in the room's deque and the
global deque, and the record tuple. bench/history_cost.py measures the whole
entry with tracemalloc: 455 B measured against 456 B accounted for a 186-byte
frame in one room, 389 B against 471 B over 1,000 rooms (CPython 3.11)."""

ROOM_OVERHEAD: Final = 900
"""Bytes accounted per room state (its object, deque, dict slots, epoch)."""


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


class _Room:
    __slots__ = ("name", "epoch", "top", "entries", "holders", "alive", "bytes")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.top = 0
        self.entries: deque[Entry] = deque()
        self.holders = 0
        self.alive = True
        self.bytes = 0


def _entry_size(entry: Entry) -> int:
    return len(entry.payload) + len(entry.sender) + len(entry.exclude or "") + ENTRY_OVERHEAD


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
        # (room, offset, when appended), in append order
        self._order: deque[tuple[_Room, int, float]] = deque()
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
        room.alive = False
        del self._rooms[room.name]
        self._idle.pop(room.name, None)
        self.bytes -= ROOM_OVERHEAD + len(room.name)

    def _maybe_idle(self, room: _Room, now: float) -> None:
        if not room.entries and room.holders == 0 and room.alive:
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
        if not self.enabled:
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
        if not self.enabled:
            return 0
        if now != self._expired_at:
            self.expire(now)
        room = self._rooms.get(name) or self._room(name, now)
        offset = room.top + 1
        if entry.offset != offset:
            raise ValueError(f"entry offset {entry.offset} is not the next offset {offset}")
        room.top = offset
        entries = room.entries
        entries.append(entry)
        size = len(entry.payload) + len(entry.sender) + len(entry.exclude or "") + ENTRY_OVERHEAD
        room.bytes += size
        self.bytes += size
        if self._idle:
            self._idle.pop(name, None)
        self._order.append((room, offset, now))
        if len(entries) > self.size:
            self._drop_oldest(room)
            self._stale += 1  # its record is still somewhere in _order
            if self._stale > 1024 and self._stale > len(self._order) - self._stale:
                self._compact()
        if self.bytes > self.memory:
            self._bound()
        return offset

    def _drop_oldest(self, room: _Room) -> None:
        entry = room.entries.popleft()
        size = _entry_size(entry)
        room.bytes -= size
        self.bytes -= size

    def _compact(self) -> None:
        # _live() inlined: this walks every record, about once per
        # len(_order) appends in a room that is full (6.7 % of the rooms
        # scenario's CPU with a call per record; docs/rooms-perf.md).
        self._order = deque(
            [
                record
                for record in self._order
                if (room := record[0]).alive
                and (entries := room.entries)
                and entries[0].offset <= record[1]
            ]
        )
        self._stale = 0

    @staticmethod
    def _live(record: tuple[_Room, int, float]) -> bool:
        room, offset, _ = record
        return room.alive and bool(room.entries) and room.entries[0].offset <= offset

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
        while order and order[0][2] <= deadline:
            room, offset, _ = order.popleft()
            entries = room.entries
            if room.alive and entries and entries[0].offset <= offset:
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
            record = order.popleft()
            if not self._live(record):
                self._stale -= 1
                continue
            room = record[0]
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
        if not entries or entries[0].offset > offset + 1:
            return Recovery(False, [], room.epoch, top)
        after = _tail(entries, top - offset)
        return Recovery(True, [e for e in after if would_receive(e, previous)], room.epoch, top)

    def recent(self, name: str, count: int, now: float) -> Recovery:
        """``?history=N``: the room's last *count* entries (at most ``size``),
        oldest first, as a ``Recovery`` whose ``recovered`` is True."""
        if not self.enabled:
            return Recovery(False, [], "", 0)
        self.expire(now)
        room = self._room(name, now)
        count = min(count, self.size, len(room.entries))
        return Recovery(True, _tail(room.entries, count), room.epoch, room.top)

    def held(self, name: str) -> Sequence[Entry]:
        """The entries room *name* holds now (for tests and the API)."""
        room = self._rooms.get(name)
        return tuple(room.entries) if room is not None else ()

    def rooms(self) -> Iterable[str]:
        return self._rooms.keys()


def _tail(entries: deque[Entry], count: int) -> list[Entry]:
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
_DIGITS: Final = re.compile(r"[0-9]+")
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
    if _DIGITS.fullmatch(text) is None:
        return None
    digits = text.lstrip("0")
    return _MAX_HISTORY if len(digits) > 18 else int(digits or "0")


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
    if "previous" in found:
        previous = found["previous"]
        if _CONNECTION_ID.fullmatch(previous) is None:
            return QueryRefusal("previous must be a connection id (ws-DIGITS-9 of [a-z0-9])")
    return JoinQuery(since, history, previous)
