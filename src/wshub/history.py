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

*Runs.* What one call keeps is one *run*: :meth:`History.keep` keeps a run of
one entry, :meth:`History.keep_run` a read's relays published together (~32
in the rooms scenario), their payloads joined into one bytes object with
where each ends beside it (:data:`_Run`). A room holds a deque of runs, the
node one global deque of ``(room, last offset, time)`` records, one per run,
in append order. So the work per run, not per entry: dropping a full room's
oldest entries drops whole runs (one object freed, its bytes accounted from
its ends, no payload touched) or cuts the oldest run (a new tuple with a later
start; the blob is cut only when the dropped part outweighs what the rest is
accounted beyond its payloads, :func:`_cut`); the TTL drops whole runs (a
run's entries share its time). docs/rooms-perf.md "Session 10" has why: with
100 full rooms, an object per entry (a tuple, its payload, a record, a float)
was ~3 MB walked at its far end, cache misses that were a third of the rooms
server's time.

*Cost.* The oldest run is found in O(1) at the front of the global order;
records of runs a room's own cap dropped are skipped when they reach the
front, and the deque is compacted when such records outnumber the live ones,
so each append costs O(1) amortised and the records never outgrow twice the
runs held. The memory bound still drops entries one by one, oldest first
(from the front run, fewest first); :meth:`History.keep_run` keeps a run as
one only when the bound cannot be reached on the way (then no single keep()
would have called it), entry by entry otherwise, so every figure (entries,
bytes, evictions) is what keeping each entry on its own would leave.

*Invisible to the garbage collector.* What is kept per run (the run and its
record) is a plain tuple of ints, bytes, strings, a float and None, never an
object that can be part of a cycle: CPython untracks such a tuple at its
first young collection, so however many entries are held (the default 64 MiB
bound holds ~150,000), no collection walks them again, and their coming and
going never triggers a full collection. A record names its room by name, not
by the room object (which would keep the record tracked). A name always means
the room's current state: a room is emptied only by taking records from the
front of the global order (its own cap never takes its last entry), and its
newest run's record is its last one there, so a room without entries has no
records left, and only such a room is ever forgotten. :class:`Entry`, the
API's type, is built from a run only when entries are read (a join's replay,
tests).

*Publication* (single-threaded, in the room's hub)::

    offset = history.next_offset(room)
    payload = encode_relay(kind, sender, content, now, offset)
    history.append(room, Entry(offset, payload, sender, kind, exclude), now)
    # or, for a read's run of relays, offsets first.. up:
    history.keep_run(room, first, payloads, sender, messages, now)

*Join*: :meth:`History.recover` for ``?since=``, :meth:`History.recent` for
``?history=``, :meth:`History.state` otherwise; replay each entry's
:func:`~wshub.protocol.replayed` payload after the ``welcome``.
"""

from __future__ import annotations

import re
import secrets
import struct
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
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
"""Bytes accounted per entry besides its payload and ids. Sized for an entry
kept on its own (a run of one: the payload's object header, the run's tuple,
its slots in the room's deque and the global deque, the record tuple with its
float): tracemalloc over 100,000 entries of a ~190-byte frame (CPython 3.11)
measured 442 B against 447 B accounted in one room, 417 B against 452 B over
1,000 rooms. The entries of a longer run share one tuple, one record and one
bytes object, so they hold less: 100 rooms of 100 entries kept in runs of 32
(bench/history_run_cost.py) held 2.4 MB against 4.8 MB accounted."""

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


_Run = tuple[int, int, bytes, bytes | None, int, str, bytes, str | None]
"""Entries published together, as a room holds them: ``(first, start, blob,
ends, ids, sender, flags, exclude)``, all atomic, so untracked by the GC (see
"Invisible to the garbage collector" above).

* ``first``: the offset of the run's entry 0; ``start``: the index of its
  oldest entry still held (the ones before it are dropped, their bytes maybe
  still in ``blob``: see :func:`_cut`);
* ``blob``: the payloads one after the other (a run of one: the payload itself);
* ``ends``: native 32-bit unsigned ints, one more than the entries: where
  ``blob`` begins, then where each payload ends, counted from the same place
  (so that a cut run keeps its ``ends`` by slicing); None for a run of one;
* ``ids``: the length of the sender's and the excluded connection's ids, which
  every entry is accounted with ``ENTRY_OVERHEAD`` besides its payload, kept
  here so that dropping entries never reads more than ``ends``;
* ``flags``: one byte per entry, 1 for a ``message``, 0 for a ``broadcast``;
* ``exclude``: the connection a backend ``message`` was not sent to (a run of
  one only)."""

_Record = tuple[str, int, float]
"""``(room name, the run's last offset, when appended)``, in the global order."""

_END: Final = struct.Struct("=I")
_end_at: Final = _END.unpack_from  # (ends, 4 * index) -> (the index-th end,)
_FLAGS: Final = (b"\x00", b"\x01")  # a run of one's flags (CPython keeps both)
assert array("I").itemsize == _END.size == 4


def _pack_in_python(payloads: list[bytes], messages: list[bool]) -> tuple[bytes, bytes, bytes]:
    """:func:`wshub._runpack.pack` for a build without a compiler: a run's
    ``(blob, ends, flags)``."""
    ends = array("I", accumulate(map(len, payloads), initial=0))
    return b"".join(payloads), ends.tobytes(), bytes(messages)


_pack: Callable[[list[bytes], list[bool]], tuple[bytes, bytes, bytes]]
try:
    from ._runpack import pack as _pack
except ImportError:  # pragma: no cover (built without a compiler)
    _pack = _pack_in_python


class _Room:
    __slots__ = ("name", "epoch", "top", "runs", "count", "holders")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.top = 0
        # Made on the first entry, let go with the last (ENTRIES_OVERHEAD):
        # most rooms of an idle node never hold one.
        self.runs: deque[_Run] | None = None
        self.count = 0  # entries held
        self.holders = 0


def _held_cost(run: _Run) -> int:
    """The bytes accounted for the entries the run still holds: their
    payloads' (the blob's end less where its oldest held entry begins) and
    ``ids + ENTRY_OVERHEAD`` apiece."""
    start = run[1]
    held = len(run[6]) - start
    each = run[4] + ENTRY_OVERHEAD
    if start == 0:
        return len(run[2]) + held * each
    ends = run[3]
    assert ends is not None  # a run of one has no index 1
    base: int = _end_at(ends, 0)[0]
    begin: int = _end_at(ends, 4 * start)[0]
    return base + len(run[2]) - begin + held * each


def _cut(run: _Run, start: int, base: int, cut: int) -> _Run:
    """The run without its entries before index *start* (0 < start < its
    length). Their bytes stay in the blob until they are more than what the
    entries left are accounted beyond their payloads and ids
    (``ENTRY_OVERHEAD`` each, which a run's entries do not use: they share one
    tuple); then the blob is cut to the entries left: a copy of at most that
    many bytes, so the memory held stays under what is accounted, and copying
    costs at most one byte per byte dropped. *base* and *cut* are the
    run's ends at 0 and at *start* (its caller has read them already)."""
    first, _, blob, ends, ids, sender, flags, exclude = run
    assert ends is not None  # a run of one is never cut, only dropped
    left = len(flags) - start
    if cut - base <= left * ENTRY_OVERHEAD:
        return (first, start, blob, ends, ids, sender, flags, exclude)
    rest = ends[4 * start :] if left > 1 else None  # one left: a run of one, as keep() makes
    return (first + start, 0, blob[cut - base :], rest, ids, sender, flags[start:], exclude)


def _entries(run: _Run, index: int) -> list[Entry]:
    """The run's entries from *index* (one still held, or its length) on."""
    first, _, blob, ends, _, sender, flags, exclude = run
    kinds = (RelayKind.BROADCAST, _MESSAGE)
    if ends is None:
        return [Entry(first, blob, sender, kinds[flags[0]], exclude)] if index == 0 else []
    view = memoryview(ends).cast("I")
    base = view[0]
    out = []
    for i in range(index, len(flags)):
        payload = blob[view[i] - base : view[i + 1] - base]
        out.append(Entry(first + i, payload, sender, kinds[flags[i]], exclude))
    return out


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
        self._order: deque[_Record] = deque()  # a record per run, in append order
        self._stale = 0  # records in _order whose run is gone
        self._count = 0  # entries held, in all rooms
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
        return self._count

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
        if not room.runs and room.holders == 0:
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
        runs there). :meth:`append` is the checked door. The entry is a run
        of one."""
        if now != self._expired_at:
            self.expire(now)
        room = self._rooms.get(name) or self._room(name, now)
        assert offset == room.top + 1, (offset, room.top)
        room.top = offset
        runs = room.runs
        if runs is None:
            runs = room.runs = deque()
            self.bytes += ENTRIES_OVERHEAD
        ids = len(sender) + len(exclude) if exclude else len(sender)
        runs.append((offset, 0, payload, None, ids, sender, _FLAGS[is_message], exclude))
        self.bytes += len(payload) + ids + ENTRY_OVERHEAD
        room.count += 1
        self._count += 1
        if self._idle:
            self._idle.pop(name, None)
        self._order.append((name, offset, now))
        if room.count > self.size:
            self._trim(room, room.count - self.size)
        if self.bytes > self.memory:
            self._bound()

    def keep_run(
        self,
        name: str,
        first: int,
        payloads: list[bytes],
        sender: str,
        messages: list[bool],
        now: float,
    ) -> None:
        """:meth:`keep` of a run of one sender's relays published together
        (a read's, ``Hub.on_plain_relays``): offsets *first* up, without an
        excluded connection, and *first* the :meth:`next_offset` of *now*.
        What is held afterwards, and accounted, is what that many keep()
        calls leave: kept as one run (one tuple, one record, the payloads
        joined) when the memory bound cannot be reached on the way (the bytes
        now and the whole run's are under it: then no keep() would have
        called the bound), entry by entry by keep() otherwise. The room is
        held (the sender is a member), so the bound never forgets it."""
        blob, ends, flags = _pack(payloads, messages)
        self.keep_packed(name, first, blob, ends, flags, sender, now)

    def keep_packed(
        self,
        name: str,
        first: int,
        blob: bytes,
        ends: bytes,
        flags: bytes,
        sender: str,
        now: float,
    ) -> None:
        """:meth:`keep_run` of a run packed already (``_runpack.pack``'s form,
        which ``wshub._ingest.stamp`` writes the payloads in: *blob* the
        payloads one after the other, *ends* where each ends after a 0, as
        native 32-bit ints, *flags* a byte each, 1 for a ``message``)."""
        if now != self._expired_at:
            self.expire(now)
        room = self._rooms.get(name) or self._room(name, now)
        assert first == room.top + 1, (first, room.top)
        count = len(flags)
        ids = len(sender)
        cost = len(blob) + count * (ids + ENTRY_OVERHEAD)
        runs = room.runs
        if runs is None:
            cost += ENTRIES_OVERHEAD
        if self.bytes + cost > self.memory or count < 2:
            if count == 1:  # the blob is the payload
                self.keep(name, first, blob, sender, flags[0] == 1, None, now)
                return
            view = memoryview(ends).cast("I")
            for i in range(count):
                payload = blob[view[i] : view[i + 1]]
                self.keep(name, first + i, payload, sender, flags[i] == 1, None, now)
            return
        if runs is None:
            runs = room.runs = deque()
        runs.append((first, 0, blob, ends, ids, sender, flags, None))
        self.bytes += cost
        room.top = last = first + count - 1
        room.count += count
        self._count += count
        if self._idle:
            self._idle.pop(name, None)
        self._order.append((name, last, now))
        if room.count > self.size:
            self._trim(room, room.count - self.size)

    def _trim(self, room: _Room, excess: int) -> None:
        """Room *room*'s cap: drop its *excess* oldest entries (never all of
        them: the room holds ``size`` >= 1 more). A run dropped whole leaves
        its record in the global order, stale; a run dropped in part is cut
        (:func:`_cut`)."""
        runs = room.runs
        assert runs is not None
        room.count -= excess
        self._count -= excess
        while excess:
            run = runs[0]
            start = run[1]
            held = len(run[6]) - start
            if held <= excess:
                runs.popleft()
                self.bytes -= _held_cost(run)
                self._stale += 1
                excess -= held
                continue
            stop = start + excess
            ends = run[3]
            assert ends is not None  # a run of one holds one entry
            base = _end_at(ends, 0)[0]
            cut = _end_at(ends, 4 * stop)[0]
            begin = _end_at(ends, 4 * start)[0] if start else base
            self.bytes -= cut - begin + excess * (run[4] + ENTRY_OVERHEAD)
            runs[0] = _cut(run, stop, base, cut)
            break
        if self._stale > 1024 and self._stale > len(self._order) - self._stale:
            self._compact()

    def _drop_run(self, room: _Room) -> int:
        """Drop room *room*'s oldest run, whose record has just left the front
        of the global order; returns how many entries it held."""
        runs = room.runs
        assert runs is not None  # every caller saw the run it drops
        run = runs.popleft()
        held = len(run[6]) - run[1]
        self.bytes -= _held_cost(run)
        room.count -= held
        self._count -= held
        if not runs:
            room.runs = None
            self.bytes -= ENTRIES_OVERHEAD
        return held

    def _compact(self) -> None:
        # The liveness test of _front_room() inlined: this walks every record,
        # about once per len(_order) runs appended while rooms are full.
        rooms = self._rooms
        self._order = deque(
            [
                record
                for record in self._order
                if (room := rooms.get(record[0])) is not None
                and (runs := room.runs)
                and (run := runs[0])[0] + run[1] <= record[1]
            ]
        )
        self._stale = 0

    def _front_room(self, record: _Record) -> _Room | None:
        """The room whose run *record* is, if that run still holds entries:
        then it is the room's oldest run (a room's runs are in the global
        order in its own order, and an older one's record would have left the
        front before). A room holds a contiguous run of offsets ending at its
        top, so the run is held exactly when the room's oldest entry is not
        newer than the run's last."""
        room = self._rooms.get(record[0])
        if room is None:
            return None  # never: a room with records is not forgotten (above)
        runs = room.runs
        if not runs:
            return None
        run = runs[0]
        return room if run[0] + run[1] <= record[1] else None

    # -- Dropping ---------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop entries older than ``ttl`` and forget rooms idle for
        ``meta_ttl``. Called by every other method; a sweep may call it too."""
        if now == self._expired_at:
            return  # everything due at this instant is gone already
        self._expired_at = now
        order = self._order
        deadline = now - self.ttl
        # The records are in time order: the expired ones are at the front,
        # and a run's entries share its time, so a run expires whole.
        front = self._front_room
        while order and order[0][2] <= deadline:
            room = front(order.popleft())
            if room is not None:
                self._drop_run(room)
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
        entries of all rooms, one by one (the front run's, fewest first)."""
        order = self._order
        while self.bytes > self.memory:
            if self._idle:
                self._forget(self._rooms[next(iter(self._idle))])
                continue
            if not order:
                break  # only held rooms left: their states are what members need
            room = self._front_room(order[0])
            if room is None:
                order.popleft()
                self._stale -= 1
                continue
            runs = room.runs
            assert runs is not None
            run = runs[0]
            _, start, _, ends, ids, _, flags, _ = run
            length = len(flags)
            over = self.bytes - self.memory
            stop = start + 1
            if ends is not None:
                # The fewest oldest entries whose bytes cover *over*, read
                # from the run's ends, not from the payloads.
                view = memoryview(ends).cast("I")
                each = ids + ENTRY_OVERHEAD
                freed = view[stop] - view[start] + each
                while freed < over and stop < length:
                    stop += 1
                    freed += view[stop] - view[stop - 1] + each
            if stop == length:
                order.popleft()
                self.evicted += self._drop_run(room)
            else:
                assert ends is not None
                runs[0] = _cut(run, stop, view[0], view[stop])
                self.bytes -= freed
                room.count -= stop - start
                self._count -= stop - start
                self.evicted += stop - start
            if not room.runs and room.holders == 0:
                self._idle[room.name] = float("-inf")  # the first to go
                self._idle.move_to_end(room.name, last=False)

    # -- Join -------------------------------------------------------------------

    def _since(self, room: _Room, offset: int) -> list[Entry]:
        """Room *room*'s entries after *offset*, oldest first (it holds them)."""
        runs = room.runs
        if not runs or offset >= room.top:
            return []
        chosen = []
        for run in reversed(runs):  # from the newest: no walk over older runs
            chosen.append(run)
            if run[0] + run[1] > offset:
                continue
            break
        out: list[Entry] = []
        for run in reversed(chosen):
            out += _entries(run, max(run[1], offset + 1 - run[0]))
        return out

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
        runs = room.runs
        if not runs or runs[0][0] + runs[0][1] > offset + 1:
            return Recovery(False, [], room.epoch, top)
        missed = [e for e in self._since(room, offset) if would_receive(e, previous)]
        return Recovery(True, missed, room.epoch, top)

    def recent(self, name: str, count: int, now: float) -> Recovery:
        """``?history=N``: the room's last *count* entries (at most ``size``),
        oldest first, as a ``Recovery`` whose ``recovered`` is True."""
        if not self.enabled:
            return Recovery(False, [], "", 0)
        self.expire(now)
        room = self._room(name, now)
        count = min(count, self.size, room.count)
        recent = self._since(room, room.top - count) if count > 0 else []
        return Recovery(True, recent, room.epoch, room.top)

    def held(self, name: str) -> Sequence[Entry]:
        """The entries room *name* holds now (for tests and the API)."""
        room = self._rooms.get(name)
        if room is None or room.runs is None:
            return ()
        return tuple(self._since(room, room.top - room.count))

    def rooms(self) -> Iterable[str]:
        return self._rooms.keys()


# -- The query of a joining connection (decisions.md 13, 19) ------------------

MAX_QUERY_LENGTH: Final = 16 * 1024
"""Longest query string read (the request head is bounded at 16 KiB anyway).
No bound on how many parameters it holds: the ones not named here are
ignored however many there are (decisions.md 1, 19), and splitting 16 KiB is
cheap."""
_MAX_HISTORY: Final = 10**9  # any larger ?history= is capped at the history size anyway

_EPOCH: Final = re.compile(r"[A-Za-z0-9._~-]{1,64}")
# An INTEGER of decisions.md 19, one spelling per number: JSON's (no sign, no
# leading zero, no white space), the form the server writes offsets in. A
# second spelling ("01", "+1") is one more way for two readers to disagree.
_DIGITS: Final = re.compile(r"0|[1-9][0-9]*")
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
    """*text* as a non-negative integer, or None when it is not one in its
    canonical form (digits only, no sign, space or leading zero). A value past
    2**63 - 1 is an integer all the same (decisions.md 19: it parses), held at
    that bound: no offset can be that large, so ``since`` recovers nothing
    (``recovered: false``) and ``history`` is capped, as for any large value."""
    if _DIGITS.fullmatch(text) is None:
        return None
    if len(text) > 19:  # int() of thousands of digits is slow, or refused
        return _MAX_INTEGER
    return min(int(text), _MAX_INTEGER)


def parse_join_query(query: str) -> JoinQuery | QueryRefusal:
    """Read ``since``, ``history`` and ``previous`` from a raw query string
    (without the ``?``); other parameters are ignored. Never raises.

    Values may be percent-encoded (``URLSearchParams`` writes ``:`` as
    ``%3A``). A name given twice is refused: which one was meant is unknown.
    """
    if len(query) > MAX_QUERY_LENGTH:
        return QueryRefusal("query string too long")
    found: dict[str, str] = {}
    for field in query.split("&"):
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
