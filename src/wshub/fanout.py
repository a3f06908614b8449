"""The fan-out engine: everything bound for a connection in one loop pass
leaves in one write.

Theory of operation
-------------------
Sending one frame with one ``send()`` per recipient costs about 10 µs of CPU
per delivery on a small VM, whatever the language. So nothing is written when
a message is routed. Instead, during one pass of the event loop:

* a frame for every member of an :class:`Audience` (one room's connections:
  ``message``, ``broadcast``, ``user_joined``, ``user_left``, the heartbeat)
  is framed once and appended to the audience's :attr:`Audience.frames`, with
  at most one connection excluded (the sender of a ``message``, the newcomer
  of a ``user_joined``);
* a frame for one connection (``welcome``, ``pong``, ``error``, ...) is kept on
  that connection with its position among the shared frames, so per-connection
  order is exactly the order in which frames were queued.

At the end of the pass (:meth:`Fanout.flush`, scheduled with ``call_soon``)
each audience that got frames is written in turn: its shared frames are
joined into one ``bytes`` object, and every member that has nothing special
going on gets that same object in one write. Only the few "marked"
connections (with private frames, an exclusion, or that joined mid-pass) get
bytes of their own. With k messages
in a pass, a recipient costs one write for k deliveries.

Direct sends: a recipient that gets the common bytes unchanged (or their
compressed copy for its window size) and has a plain TCP socket
(``conn.direct_fd`` is not -1) is not written in the Python loop. Each
audience keeps its members in two rosters as they join and leave
(:meth:`Fanout.admit`, :meth:`Fanout.dismiss`): :attr:`Audience.ready`, the
uncompressed ones with a direct socket, and :attr:`Audience.others`. A pass
hands the ready ones, a chunk at a time, to one call of the C extension
``wshub._directsend.send_ready``, which sends the common bytes to each socket
whose transport is idle (not closing, nothing queued) and reports back only
the exceptions: a share of its own (``sealed``: excluded, private frames,
joined mid-pass), no longer a recipient, a busy or closing transport, a
partial send. Python runs per exception, not per recipient: the pass no
longer looks at ``sealed``, ``deflate`` and ``direct_fd`` of each of a
thousand members to build the list the C call walks (docs/fanout-cpu.md).
The others (compressed, TLS, no C extension) go through the Python loop as
before, the compressed ones with a direct socket grouped per window size for
``send_each``. Whatever could not be sent goes through the connection's own
writer. With the sends back to back the kernel's own cost per ``send()``
drops too (see src/wshub/_directsend.c).

One writer per socket: the engine never touches a transport. It hands
bytes to the recipient's :meth:`Recipient.write`, and the only other path to a
socket is the C call above, which sends only while the transport is idle (the
transport stays the owner of the socket; see src/wshub/_directsend.c).

Backpressure: after its write, a connection whose transport buffer holds more
than ``send_buffer_limit`` bytes is a slow consumer and is closed with 1008
(the close frame queued behind what is buffered). No one ever waits for it.

Time slices (decisions.md 18: no pass holds the loop more than ~50 ms): a
pass to thousands of slow readers costs a write each (1-4 µs under load), so
one message to 10,000 of them held the loop 0.1-0.6 s. Each pass therefore
starts by *sealing* the audience's frames into a :class:`_Batch` (the
frames, and the per-connection state of the marked ones moved to
``conn.sealed``), and writes its members in chunks, looking at the clock
after each chunk only. Past ``slice_seconds`` the members not written yet are
kept (a list, and an index for :meth:`Fanout.take`) and the pass goes on in
the next loop pass, first. What is queued meanwhile waits in the audience's
live frames, which are sealed only once the batch before them is written to
everyone: each recipient gets batch after batch, in the order queued. A
connection closing in between gets its unwritten share from :meth:`take`;
one gone in between is skipped. A pass that fits in its slice (every pass of
the fan-out benchmark) does exactly what it did before, plus one clock read
per chunk.

The node as a whole (``send_buffer_total``, decisions.md 18): the size the
fan-out reads after each write anyway is kept on the connection
(``conn.buffered``) and summed in :attr:`Fanout.buffered_total`, which costs
nothing for a client that keeps up (its size is 0, as it was). The sum only
sees a buffer drain at the connection's next write, so it is high, never
low; when it passes the bound, :meth:`Fanout._enforce_budget` counts again
exactly, over the connections known to hold bytes, and if the node really is
over: first drops the sockets of connections already closing that still hold
bytes (they will not get them in time anyway), then closes with 1008 the open
ones holding the most, until it is under.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter, thread_time
from typing import Any, Generic, Protocol, TypeVar

from .wire import Deflate, is_text_frame, text_frame, text_payload

__all__ = [
    "Audience",
    "Fanout",
    "Recipient",
    "SendEach",
    "SendReady",
    "compiled_send_each",
    "compiled_send_path",
    "compiled_send_ready",
    "compiled_use_io_uring",
]

SendEach = Callable[[list[Any], bytes], "list[tuple[int, int]] | None"]
"""``wshub._directsend.send_each``: the bytes to every idle recipient (it
reads each one's ``transport`` and ``direct_fd``), what it could not send
handed back as ``(index, bytes sent)``."""

SendReady = Callable[[list[Any], bytes, int, int], "list[tuple[int, int]] | None"]
"""``wshub._directsend.send_ready``: the bytes to ``ready[start:stop]``
but the exceptions, handed back as ``(index, sent)`` (see :data:`OWN_SHARE`
and :data:`NOT_A_RECIPIENT`)."""

OWN_SHARE = -1
"""send_ready's *sent* for a recipient with a share of its own (``sealed``)."""

NOT_A_RECIPIENT = -2
"""send_ready's *sent* for one that stopped being a recipient (closing)."""

PASS_FRAMES = 256
"""A pass that holds this many shared frames goes at the end of the loop
pass, without waiting for the coalescing delay: a presence storm then makes
many passes of bounded cost (each recipient's write, and each newcomer's own
share of the joins after it) instead of one pass as long as the storm."""

SLICE_SECONDS = 0.01
"""How long one pass may write before it yields to the loop (the rest goes on
in the next loop pass). Measured in wall time, so a pass preempted by a busy
machine stops sooner: the loop is held well under the ~50 ms of decisions.md
18 even then."""

BATCH_FRAMES = PASS_FRAMES
"""Shared frames one pass writes at most; more wait for the next loop pass.
When a storm's 10,000 clients left at once, their user_left frames (1.1 MB)
went to each remaining member in one write: more than --send-buffer-limit at
once, so a bystander that read everything was closed 1008 slow consumer.
256 frames of presence are ~28 KB; a client that reads drains them between
two passes."""

CHUNK = 256
"""Recipients written between two looks at the clock (about 0.1-1 ms)."""

compiled_send_each: SendEach | None
compiled_send_ready: SendReady | None
compiled_send_path: Callable[[], tuple[str, str]] | None
compiled_use_io_uring: Callable[[bool], None] | None
try:
    from ._directsend import send_each as compiled_send_each
    from ._directsend import send_path as compiled_send_path
    from ._directsend import send_ready as compiled_send_ready
    from ._directsend import use_io_uring as compiled_use_io_uring
except ImportError:  # built without a C compiler: every write through the writer
    compiled_send_each = None
    compiled_send_ready = None
    compiled_send_path = None
    compiled_use_io_uring = None


class Recipient(Protocol):
    """What the engine needs of a connection (see :class:`~wshub.connection.Connection`)."""

    # Bookkeeping of the current pass, owned by the engine.
    pending: list[tuple[int, bytes]] | None
    joined_at: int
    marked: bool
    # (pending, joined_at) moved here when its audience's frames were sealed
    # into a batch not written to it yet; None otherwise.
    sealed: tuple[list[tuple[int, bytes]] | None, int] | None
    # The peer ended the stream without a closing handshake: take() builds
    # it nothing.
    gone: bool
    # Whether it is a member of its audience's shared frames now.
    is_recipient: bool
    audience: Audience[Any] | None
    deflate: Deflate | None
    buffered: int  # unsent bytes in the transport when the fan-out last looked

    # The socket's descriptor when the engine may send to it directly (with
    # ``transport``, what send_each reads); -1 when everything must go
    # through write(). A number in a slot, not a tuple per connection: that
    # was 64 bytes of every idle connection (docs/memory.md).
    @property
    def direct_fd(self) -> int: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    def write(self, data: bytes | memoryview) -> int:
        """Write *data* to the socket; return the bytes still unsent after it.
        May raise when the transport is broken."""
        ...

    def unsent(self) -> int:
        """The bytes written and not sent yet."""
        ...

    def abort(self) -> None:
        """Drop the socket now, with whatever is still unsent."""


R = TypeVar("R", bound=Recipient)

_NOTHING_QUEUED: Any = ()
"""What an audience holds in place of each of its four lists while nothing is
queued for it: one empty tuple, shared. Four empty lists were 224 bytes of
every idle room (docs/memory.md); the first frame (or mark) of a pass makes
the lists. An append to it raises instead of reaching other audiences."""


class Audience(Generic[R]):
    """One set of recipients that share frames (a room's members), and the
    frames queued for them in this pass."""

    __slots__ = (
        "ready",
        "others",
        "frames",
        "excluded",
        "marked",
        "queued",
        "batch",
    )

    def __init__(self) -> None:
        # Its members, kept by Fanout.admit() and dismiss(): those the C
        # send path takes as they are (uncompressed, a direct socket), and
        # the others. Dicts for their order and an O(1) leave (10,000
        # clients of a storm leave at once); the shared empty tuple until the
        # first member, like the lists below.
        self.ready: dict[R, None] = _NOTHING_QUEUED
        self.others: dict[R, None] = _NOTHING_QUEUED
        # This pass: shared frames and who is excluded from each. A text
        # frame holds its payload, which a compressing member's frame is made
        # from (wire.text_payload); control frames are never compressed.
        self.frames: list[bytes] = _NOTHING_QUEUED
        self.excluded: list[R | None] = _NOTHING_QUEUED
        self.marked: list[R] = _NOTHING_QUEUED
        self.queued = False  # in the engine's list of audiences to write
        # Frames sealed for a pass that did not fit in one slice, being written.
        self.batch: _Batch[R] | None = None


class _Batch(Generic[R]):
    """One audience's frames sealed for one pass (see "Time slices" above)."""

    __slots__ = (
        "frames",
        "excluded",
        "marked",
        "cut_short",
        "skipped",
        "common",
        "common_deflated",
        "deflated",
        "rest",
        "index",
    )

    # After a slice ran out, rest holds the members not written yet: the
    # ready ones, then the others.
    rest: tuple[list[R], list[R]] | None

    def __init__(self, audience: Audience[R], most: int) -> None:
        """Seal *audience*'s frames, at most *most* of them (the rest stay
        queued, for the next batch)."""
        n = len(audience.frames)
        self.cut_short = n > most
        if not self.cut_short:
            self.frames = audience.frames
            self.excluded = audience.excluded
            self.marked = audience.marked
            audience.frames = _NOTHING_QUEUED
            audience.excluded = _NOTHING_QUEUED
            audience.marked = _NOTHING_QUEUED
            excluded = self.excluded
            skipped = len(excluded) - excluded.count(None)  # C, not a loop per frame
            for conn in self.marked:
                if conn.is_recipient:
                    skipped += conn.joined_at
                conn.sealed = (conn.pending, conn.joined_at)
                conn.marked = False
                conn.pending = None
                conn.joined_at = 0
        else:
            skipped = self._seal_first(audience, most)
        self.skipped = skipped  # deliveries the members do not get (exclusions, joins)
        frames = self.frames
        self.common = frames[0] if len(frames) == 1 else b"".join(frames)
        self.common_deflated: dict[int, bytes] = {}
        self.deflated: dict[int, list[bytes]] = {}
        # After a slice ran out: the members not written yet, and their index.
        self.rest = None
        self.index: dict[R, int] | None = None

    def _seal_first(self, audience: Audience[R], cut: int) -> int:
        """Seal the first *cut* frames only; every marked connection's state
        is split at the cut (private frames and join point moved back by it
        for what stays queued). Returns the deliveries skipped in the batch."""
        self.frames = audience.frames[:cut]
        self.excluded = audience.excluded[:cut]
        audience.frames = audience.frames[cut:]
        audience.excluded = audience.excluded[cut:]
        self.marked = audience.marked
        still_excluded = {conn for conn in audience.excluded if conn is not None}
        audience.marked = []
        skipped = sum(1 for conn in self.excluded if conn is not None)
        for conn in self.marked:
            pending = conn.pending or []
            joined_at = conn.joined_at
            now = [(position, frame) for position, frame in pending if position <= cut]
            later = [(position - cut, frame) for position, frame in pending if position > cut]
            if conn.is_recipient:
                skipped += min(joined_at, cut)
            conn.sealed = (now, min(joined_at, cut))
            conn.marked = False
            conn.pending = later or None
            conn.joined_at = max(0, joined_at - cut)
            if later or conn.joined_at or conn in still_excluded:
                conn.marked = True
                audience.marked.append(conn)
        return skipped


class Fanout(Generic[R]):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        send_buffer_limit: int,
        send_buffer_total: int = 0,
        on_slow_consumer: Callable[[R], None],
        on_send_failed: Callable[[R, BaseException], None],
        coalesce_delay: float = 0.05,
        send_each: SendEach | None = compiled_send_each,
        send_ready: SendReady | None = compiled_send_ready,
        slice_seconds: float = SLICE_SECONDS,
        clock: Callable[[], float] = perf_counter,
        cpu_clock: Callable[[], float] = thread_time,
    ) -> None:
        self._loop = loop
        self._limit = send_buffer_limit
        self._total_limit = send_buffer_total or float("inf")
        # Connections seen with unsent bytes, and the sum of what was seen.
        self.held: set[R] = set()
        self.buffered_total = 0
        self._budget_check = False  # a check of the bound is scheduled (see wrote())
        self._on_slow = on_slow_consumer
        self._on_failed = on_send_failed
        self._queued: list[Audience[R]] = []
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._coalesce_delay = coalesce_delay
        self._send_each = send_each
        self._send_ready = send_ready
        self._slice = slice_seconds
        self._clock = clock
        self._cpu_clock = cpu_clock
        # Figures for /metrics.
        self.deliveries = 0
        self.writes = 0
        self.direct_sends = 0  # writes that went straight to the socket
        self.budget_drops = 0  # closing connections dropped over send_buffer_total
        self.pass_seconds_max = 0.0  # the longest flush (one slice), for /metrics
        # Its CPU time: the wall time above also counts the moments a busy
        # machine did not run the process at all.
        self.pass_cpu_seconds_max = 0.0
        self.slices = 0  # passes that ran out of their slice and went on later
        self.behind = False  # a pass is in progress over several loop passes

    # -- Queueing (called while routing; never writes) -----------------------

    def to_all(
        self,
        audience: Audience[R],
        payload: bytes,
        exclude: R | None = None,
        *,
        urgent: bool = True,
    ) -> None:
        """Queue a text message for every member of *audience* but *exclude*.

        A message that is not *urgent* (presence events, the heartbeat) may
        wait up to ``coalesce_delay`` for company: when a thousand clients
        connect one per loop pass, each ``user_joined`` would otherwise cost
        one write per recipient. Anything urgent queued meanwhile takes it
        along, in order.
        """
        if audience.frames:
            audience.frames.append(text_frame(payload))
            audience.excluded.append(exclude)
        else:  # the pass's first frame: its lists are made now
            audience.frames = [text_frame(payload)]
            audience.excluded = [exclude]
        if exclude is not None:
            self._mark(audience, exclude)
        self._schedule(audience, urgent)

    def to_all_many(
        self,
        audience: Audience[R],
        frames: list[bytes],
        excluded: list[R | None],
        exclude: R | None,
    ) -> None:
        """:meth:`to_all` (urgent) of several payloads in order, as their
        ready-made text frames (``text_frame(payload)`` each); *excluded*
        says per frame None or *exclude*. The lists become the pass's own
        when it has none yet: the caller lets go of them."""
        if audience.frames:
            audience.frames += frames
            audience.excluded += excluded
        else:
            audience.frames = frames
            audience.excluded = excluded
        if exclude is not None:
            self._mark(audience, exclude)
        self._schedule(audience, True)

    def control_to_all(self, audience: Audience[R], frame: bytes, *, urgent: bool = True) -> None:
        """Queue a ready-made control frame (a Ping) for every member."""
        if audience.frames:
            audience.frames.append(frame)
            audience.excluded.append(None)
        else:
            audience.frames = [frame]
            audience.excluded = [None]
        self._schedule(audience, urgent)

    def to_one(self, conn: R, payload: bytes) -> None:
        """Queue a text message for *conn* only."""
        deflate = conn.deflate
        frame = text_frame(payload) if deflate is None else deflate.text_frame(payload)
        self.raw_to_one(conn, frame)

    def raw_to_one(self, conn: R, frame: bytes) -> None:
        """Queue ready-made frame bytes for *conn* only, in order with what
        its audience gets."""
        audience = conn.audience
        assert audience is not None, "joined() first"
        pending = conn.pending
        if pending is None:
            conn.pending = pending = []
            self._mark(audience, conn)
        pending.append((len(audience.frames), frame))
        self._schedule(audience)

    def joined(self, audience: Audience[R], conn: R) -> None:
        """*conn* belongs to *audience* from now on: it gets no frame queued
        before. (It receives the shared frames once it is among the members
        and ``is_recipient`` is set.)"""
        conn.audience = audience
        conn.joined_at = len(audience.frames)
        if conn.joined_at:
            self._mark(audience, conn)

    def admit(self, audience: Audience[R], conn: R) -> None:
        """*conn* is a member of *audience*'s shared frames from now on (call
        it where ``is_recipient`` becomes true): kept in the roster its pass
        takes it from. Its compression and its socket are known by then."""
        if self._send_ready is not None and conn.deflate is None and conn.direct_fd >= 0:
            if audience.ready:
                audience.ready[conn] = None
            else:
                audience.ready = {conn: None}
        elif audience.others:
            audience.others[conn] = None
        else:
            audience.others = {conn: None}

    def dismiss(self, audience: Audience[R], conn: R) -> None:
        """*conn* is no longer a member (leave, close): out of its roster.
        A pass in progress skips it (``is_recipient`` is false by then)."""
        if conn in audience.ready:
            del audience.ready[conn]
            if not audience.ready:
                audience.ready = _NOTHING_QUEUED
        elif conn in audience.others:
            del audience.others[conn]
            if not audience.others:
                audience.others = _NOTHING_QUEUED

    def _mark(self, audience: Audience[R], conn: R) -> None:
        if not conn.marked:
            conn.marked = True
            if audience.marked:
                audience.marked.append(conn)
            else:
                audience.marked = [conn]

    def _schedule(self, audience: Audience[R], urgent: bool = True) -> None:
        if not audience.queued:
            audience.queued = True
            self._queued.append(audience)
        if self._scheduled:
            return
        if urgent or len(audience.frames) >= PASS_FRAMES:
            self._scheduled = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loop.call_soon(self.flush)
        elif self._timer is None:
            self._timer = self._loop.call_later(self._coalesce_delay, self.flush)

    # -- Writing --------------------------------------------------------------

    def take(self, conn: R) -> bytes:
        """Everything queued for *conn* and not written yet, removed from the
        pass (its share of a batch still being written, then of this pass).

        For a connection that is about to close: what it was promised goes
        out before its Close frame. Call it before the connection stops being
        a recipient.
        """
        audience = conn.audience
        if audience is None:
            return b""
        if conn.gone:
            # Nobody will read it. Built anyway, each of the thousands of
            # connections a storm ends in one loop pass got its own copy of
            # the user_left frames queued before it: +1 GB for 5,000.
            conn.sealed = None
            conn.pending = None
            conn.joined_at = len(audience.frames)
            self._mark(audience, conn)
            return b""
        earlier = b""
        batch = audience.batch
        if batch is not None:
            earlier = self._unwritten(batch, conn)
        if conn.is_recipient:
            data = self._share(
                audience.frames,
                audience.excluded,
                conn,
                conn.pending,
                conn.joined_at,
                {},
            )
        else:
            data = b"".join(frame for _, frame in conn.pending or ())
        conn.pending = None
        conn.joined_at = len(audience.frames)  # nothing more from this pass
        self._mark(audience, conn)  # so that flush resets it
        return earlier + data if earlier else data

    def _unwritten(self, batch: _Batch[R], conn: R) -> bytes:
        """*conn*'s share of *batch* if it was not written yet (and it no
        longer will be: the batch skips connections that are not recipients)."""
        state = conn.sealed
        conn.sealed = None
        index = batch.index
        if index is not None and conn in index and conn.is_recipient:
            if state is not None:
                pending, joined_at = state
                return self._share(
                    batch.frames,
                    batch.excluded,
                    conn,
                    pending,
                    joined_at,
                    batch.deflated,
                )
            deflate = conn.deflate
            if deflate is None:
                return batch.common
            return self._common_deflated(batch, deflate)
        if state is not None and state[0]:
            return b"".join(frame for _, frame in state[0])
        return b""

    def flush(self) -> None:
        """Write this pass's frames: one write per connection, for at most
        ``slice_seconds``; what is left goes on in the next loop pass."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queued = self._queued, []
        self.behind = False
        if not queued:
            return
        clock = self._clock
        cpu_started = self._cpu_clock()
        started = clock()
        deadline = started + self._slice
        slow: list[R] = []
        for i, audience in enumerate(queued):
            if (i and clock() >= deadline) or not self._flush_audience(audience, slow, deadline):
                # Out of time: this audience and those after it go first in
                # the next loop pass (the ones queued meanwhile after them).
                self._queued = queued[i:] + self._queued
                self.slices += 1
                self.behind = True
                self._scheduled = True
                self._loop.call_soon(self.flush)
                break
            audience.queued = False
        for conn in slow:
            self._on_slow(conn)
        if self.buffered_total > self._total_limit:
            self._enforce_budget()
        elapsed = clock() - started
        if elapsed > self.pass_seconds_max:
            self.pass_seconds_max = elapsed
        cpu = self._cpu_clock() - cpu_started
        if cpu > self.pass_cpu_seconds_max:
            self.pass_cpu_seconds_max = cpu

    def _flush_audience(self, audience: Audience[R], slow: list[R], deadline: float) -> bool:
        """Write *audience*'s batch in progress, then what was queued after
        it; False when the slice ran out first."""
        while True:
            batch = audience.batch
            if batch is None:
                if not audience.frames and not audience.marked:
                    return True
                batch = audience.batch = _Batch(audience, BATCH_FRAMES)
            if not self._write_batch(audience, batch, slow, deadline):
                return False
            audience.batch = None
            if batch.cut_short:
                # The rest in the next loop pass: a client that reads gets
                # time to, before its next share (see BATCH_FRAMES).
                return False

    def _write_batch(
        self, audience: Audience[R], batch: _Batch[R], slow: list[R], deadline: float
    ) -> bool:
        frames = batch.frames
        writes = 0
        if frames:
            if batch.rest is None:
                # Copies of the rosters (a C-level copy of their keys, ~2 µs
                # for 1,000): a member that leaves while the pass runs (a
                # failed write closes it) must not shift the others.
                ready = list(audience.ready)
                others = list(audience.others)
            else:
                # A later slice: skip those gone or closing since (a closing
                # one had its share from take(); send_ready skips them itself).
                ready, others = batch.rest
                others = [conn for conn in others if conn.is_recipient]
            clock = self._clock
            start = 0
            while start < len(ready):
                stop = min(start + CHUNK, len(ready))
                writes += self._write_ready(batch, ready, start, stop, slow)
                start = stop
                if clock() >= deadline and (start < len(ready) or others):
                    self._keep_rest(batch, ready[start:], others)
                    self.writes += writes
                    return False
            start = 0
            while start < len(others):
                chunk = others[start : start + CHUNK]
                writes += self._write_chunk(batch, chunk, slow)
                start += len(chunk)
                if start < len(others) and clock() >= deadline:
                    self._keep_rest(batch, [], others[start:])
                    self.writes += writes
                    return False
            self.deliveries -= batch.skipped
        # Connections that are not recipients of shared frames (on /echo, or
        # closing) but have frames of their own; and, in a pass without shared
        # frames, every connection with frames of its own.
        for conn in batch.marked:
            state = conn.sealed
            if state is None:
                continue  # written above, or its share was taken
            conn.sealed = None
            pending, joined_at = state
            if conn.is_recipient:
                data = self._share(
                    frames,
                    batch.excluded,
                    conn,
                    pending,
                    joined_at,
                    batch.deflated,
                )
            elif pending:
                data = b"".join(frame for _, frame in pending)
            else:
                continue  # closing: its share was taken already
            if data:
                writes += self._write(conn, data, slow)
        self.writes += writes
        return True

    @staticmethod
    def _keep_rest(batch: _Batch[R], ready: list[R], others: list[R]) -> None:
        """The members not written when the slice ran out, for the next one
        (and their index, for take())."""
        batch.rest = (ready, others)
        index = dict(zip(ready, range(len(ready)), strict=True))
        index.update(zip(others, range(len(ready), len(ready) + len(others)), strict=True))
        batch.index = index

    def _write_ready(
        self, batch: _Batch[R], ready: list[R], start: int, stop: int, slow: list[R]
    ) -> int:
        """The batch's common bytes to ``ready[start:stop]``, in one C call;
        Python for the exceptions it reports only. Returns the writes made."""
        assert self._send_ready is not None
        common = batch.common
        left = self._send_ready(ready, common, start, stop)
        n = stop - start
        if left is None:
            self.direct_sends += n
            self.deliveries += len(batch.frames) * n
            return n
        writes = n
        direct = n
        recipients = n
        limit = self._limit
        view: memoryview | None = None
        for index, sent in left:
            conn = ready[index]
            direct -= 1
            if sent == NOT_A_RECIPIENT:  # closing since: take() gave its share
                writes -= 1
                recipients -= 1
                continue
            if sent == OWN_SHARE:
                state = conn.sealed
                assert state is not None
                conn.sealed = None
                data: bytes | memoryview = self._share(
                    batch.frames, batch.excluded, conn, state[0], state[1], {}
                )
                if not data:
                    writes -= 1
                    continue
            elif sent:
                # Partly sent: the rest after it, through the writer.
                if view is None:
                    view = memoryview(common)
                data = view[sent:]
            else:
                # Not sent at all (closing, something queued, EAGAIN, an
                # error the transport will meet and report).
                data = common
            try:
                unsent = conn.write(data)
            except Exception as exc:
                self._on_failed(conn, exc)
                writes -= 1
                continue
            if unsent or conn.buffered:
                self._seen(conn, unsent)
                if unsent > limit:
                    slow.append(conn)
        self.direct_sends += direct
        self.deliveries += len(batch.frames) * recipients
        return writes

    def _write_chunk(self, batch: _Batch[R], recipients: list[R], slow: list[R]) -> int:
        """The batch's frames to each of *recipients*; the writes made."""
        writes = 0
        common = batch.common
        limit = self._limit
        direct: list[R] = []
        direct_deflated: dict[int, list[R]] = {}
        can_send_direct = self._send_each is not None  # else the writer for all
        for conn in recipients:
            state = conn.sealed
            if state is not None:
                conn.sealed = None
                data = self._share(
                    batch.frames,
                    batch.excluded,
                    conn,
                    state[0],
                    state[1],
                    batch.deflated,
                )
                if not data:
                    continue
            elif conn.deflate is None:
                if can_send_direct and conn.direct_fd >= 0:
                    direct.append(conn)
                    continue
                data = common
            else:
                data = self._common_deflated(batch, conn.deflate)
                if can_send_direct and conn.direct_fd >= 0:
                    # One send_each call per window size, after the loop.
                    wbits = conn.deflate.wbits
                    group = direct_deflated.get(wbits)
                    if group is None:
                        group = direct_deflated[wbits] = []
                    group.append(conn)
                    continue
            # _write(), inlined: this loop runs once per recipient.
            try:
                unsent = conn.write(data)
            except Exception as exc:
                self._on_failed(conn, exc)
                continue
            writes += 1
            if unsent or conn.buffered:
                self._seen(conn, unsent)
                if unsent > limit:
                    slow.append(conn)
        if direct:
            writes += self._send_direct(direct, common, slow)
        for wbits, group in direct_deflated.items():
            writes += self._send_direct(group, batch.common_deflated[wbits], slow)
        self.deliveries += len(batch.frames) * len(recipients)
        return writes

    def _common_deflated(self, batch: _Batch[R], deflate: Deflate) -> bytes:
        """The batch's frames compressed for *deflate*'s window size, once."""
        compressed = batch.common_deflated.get(deflate.wbits)
        if compressed is None:
            compressed = batch.common_deflated[deflate.wbits] = b"".join(
                self._deflated(batch.frames, deflate, batch.deflated)
            )
        return compressed

    def _send_direct(self, direct: list[R], data: bytes, slow: list[R]) -> int:
        """*data* to every target in *direct*: straight to the socket where
        the transport is idle, the rest (or all) through the writer."""
        assert self._send_each is not None
        left = self._send_each(direct, data)
        if left is None:
            self.direct_sends += len(direct)
            return len(direct)
        self.direct_sends += len(direct) - len(left)
        writes = len(direct)
        view = memoryview(data)
        for index, sent in left:
            conn = direct[index]
            # Partly sent, or not at all (closing, something queued, EAGAIN,
            # an error the transport will meet and report).
            try:
                unsent = conn.write(view[sent:] if sent else data)
            except Exception as exc:
                self._on_failed(conn, exc)
                writes -= 1
                continue
            if unsent or conn.buffered:
                self._seen(conn, unsent)
                if unsent > self._limit:
                    slow.append(conn)
        return writes

    def _write(self, conn: R, data: bytes, slow: list[R]) -> int:
        """One write; a connection over its buffer limit joins *slow*."""
        try:
            unsent = conn.write(data)
        except Exception as exc:  # a broken transport: count it, go on
            self._on_failed(conn, exc)
            return 0
        if unsent or conn.buffered:
            self._seen(conn, unsent)
            if unsent > self._limit:
                slow.append(conn)
        return 1

    # -- The node-wide bound ----------------------------------------------------

    def _seen(self, conn: R, size: int) -> None:
        """The fan-out read *conn*'s unsent bytes: keep the sum up to date."""
        self.buffered_total += size - conn.buffered
        conn.buffered = size
        if size:
            self.held.add(conn)
        else:
            self.held.discard(conn)

    def wrote(self, conn: R, unsent: int) -> None:
        """Bytes were written to *conn* outside a pass (its welcome and the
        replay of its ``since`` or ``history``), leaving *unsent* in its
        buffer: count them toward the node's bound (a replay of 100 large
        frames is ~600 KB that no pass would otherwise see while the client
        is alone in its room), checked at the end of this loop pass, once
        for all the joins in it."""
        self._seen(conn, unsent)
        if self.buffered_total > self._total_limit and not self._budget_check:
            self._budget_check = True
            self._loop.call_soon(self._check_budget)

    def _check_budget(self) -> None:
        self._budget_check = False
        if self.buffered_total > self._total_limit:
            self._enforce_budget()

    def forget(self, conn: R) -> None:
        """*conn*'s socket is gone, and its buffer with it."""
        if conn.buffered:
            self.buffered_total -= conn.buffered
            conn.buffered = 0
            self.held.discard(conn)

    def _enforce_budget(self) -> None:
        total = 0
        for conn in list(self.held):
            size = conn.unsent()
            conn.buffered = size
            if size:
                total += size
            else:
                self.held.discard(conn)
        self.buffered_total = total
        budget = self._total_limit
        if total <= budget:
            return
        biggest = sorted(self.held, key=lambda conn: conn.buffered, reverse=True)
        for conn in biggest:  # closing already: drop the socket and its bytes
            if total <= budget:
                return
            if not conn.is_recipient:
                total -= conn.buffered
                self.forget(conn)
                self.budget_drops += 1
                conn.abort()
        for conn in biggest:  # then the open ones holding the most: 1008
            if total <= budget:
                break
            if conn.is_recipient:
                total -= conn.buffered  # on their way out, like the above
                self._on_slow(conn)

    def _deflated(
        self,
        frames: list[bytes],
        deflate: Deflate,
        cache: dict[int, list[bytes]],
    ) -> list[bytes]:
        """*frames* compressed once per window size (the text frames, from
        their payloads; control frames as they are)."""
        compressed = cache.get(deflate.wbits)
        if compressed is None:
            compressed = [
                deflate.text_frame(text_payload(frame)) if is_text_frame(frame) else frame
                for frame in frames
            ]
            cache[deflate.wbits] = compressed
        return compressed

    def _share(
        self,
        frames: list[bytes],
        excluded: list[R | None],
        conn: R,
        pending: list[tuple[int, bytes]] | None,
        joined_at: int,
        cache: dict[int, list[bytes]],
    ) -> bytes:
        """The bytes for a marked connection: its share of the shared frames,
        minus exclusions, with its private frames at their positions."""
        if (
            not pending
            and not joined_at
            and excluded
            and excluded[-1] is conn
            and excluded.count(conn) == len(excluded)
        ):
            # The sender of every message of the pass (a room's sender with
            # its read's run): nothing, found without a Python step per frame
            # (list.count tests identity first; the last frame's test first
            # keeps the others' case from counting a whole pass's).
            return b""
        deflate = conn.deflate
        if deflate is not None:
            frames = self._deflated(frames, deflate, cache)
        out: list[bytes] = []
        index = joined_at
        for position, frame in pending or ():
            while index < position:
                if excluded[index] is not conn:
                    out.append(frames[index])
                index += 1
            out.append(frame)
        for i in range(index, len(frames)):
            if excluded[i] is not conn:
                out.append(frames[i])
        return b"".join(out)
