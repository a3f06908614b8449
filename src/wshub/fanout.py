"""The fan-out engine: everything bound for a connection in one loop pass
leaves in one write.

Theory of operation
-------------------
Sending one frame with one ``send()`` per recipient costs about 10 µs of CPU
per delivery on a small VM, whatever the language. So nothing is written when
a message is routed. Instead, during one pass of the event loop:

* a frame for every open connection (``message``, ``broadcast``,
  ``user_joined``, ``user_left``, the heartbeat) is framed once and appended to
  :attr:`Fanout.frames`, with at most one connection excluded (the sender of a
  ``message``, the newcomer of a ``user_joined``);
* a frame for one connection (``welcome``, ``pong``, ``error``, ...) is kept on
  that connection with its position among the shared frames, so per-connection
  order is exactly the order in which frames were queued.

At the end of the pass (:meth:`Fanout.flush`, scheduled with ``call_soon``)
the shared frames are joined into one ``bytes`` object, and every connection
that has nothing special going on gets that same object in one
``transport.write``. Only the few "marked" connections (with private frames,
an exclusion, or that joined mid-pass) get bytes of their own. With k messages
in a pass, a recipient costs one write for k deliveries.

Direct sends: a recipient that gets the common bytes unchanged (or their
compressed copy for its window size) and has a plain TCP socket
(``conn.direct``) is not written in the Python loop. The loop collects them,
and one call of the C extension ``wshub._directsend`` per set of bytes sends
them to each socket whose transport is idle (not closing, nothing queued).
Whatever it could not send goes through ``transport.write`` as before. This
takes the interpreter and event-loop work (~1.3 µs) off each delivery of a
message to many clients, and with the sends back to back the kernel's own
cost per ``send()`` drops too (see src/wshub/_directsend.c).

Backpressure: after its write, a connection whose transport buffer holds more
than ``send_buffer_limit`` bytes is a slow consumer and is closed with 1008
(the close frame queued behind what is buffered). No one ever waits for it.

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
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

from .wire import Deflate, text_frame

try:
    from ._directsend import send_each as compiled_send_each
except ImportError:  # built without a C compiler: every write through the transport
    compiled_send_each = None

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Fanout", "Recipient", "compiled_send_each"]


PASS_FRAMES = 256
"""A pass that holds this many shared frames goes at the end of the loop
pass, without waiting for the coalescing delay: a presence storm then makes
many passes of bounded cost (each recipient's write, and each newcomer's own
share of the joins after it) instead of one pass as long as the storm."""


class Recipient(Protocol):
    """What the engine needs of a connection (see :class:`Connection`)."""

    pending: list[tuple[int, bytes]] | None
    joined_at: int
    marked: bool
    deflate: Deflate | None
    transport: asyncio.Transport
    is_recipient: bool
    buffered: int  # unsent bytes in the transport when the fan-out last looked
    # (transport, socket fd, the connection) when the fan-out may send to the
    # socket directly; None when it must always go through the transport.
    direct: tuple[asyncio.Transport, int, Connection] | None


class Fanout:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        recipients: Callable[[], Iterable[Connection]],
        *,
        send_buffer_limit: int,
        send_buffer_total: int = 0,
        on_slow_consumer: Callable[[Connection], None],
        on_send_failed: Callable[[Connection, BaseException], None],
        coalesce_delay: float = 0.05,
        send_each: Callable[..., list[tuple[int, int]] | None] | None = compiled_send_each,
    ) -> None:
        self._loop = loop
        self._recipients = recipients
        self._limit = send_buffer_limit
        self._total_limit = send_buffer_total or float("inf")
        # Connections seen with unsent bytes, and the sum of what was seen.
        self.held: set[Connection] = set()
        self.buffered_total = 0
        self._on_slow = on_slow_consumer
        self._on_failed = on_send_failed
        # This pass: shared frames, their JSON payloads (None for control
        # frames, which are never compressed) and who is excluded from each.
        self.frames: list[bytes] = []
        self.payloads: list[bytes | None] = []
        self.excluded: list[Connection | None] = []
        self.marked: list[Connection] = []
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._coalesce_delay = coalesce_delay
        self._send_each = send_each
        # Figures for /metrics.
        self.deliveries = 0
        self.writes = 0
        self.direct_sends = 0  # writes that went straight to the socket
        self.passes = 0
        self.budget_drops = 0  # closing connections dropped over send_buffer_total
        self.pass_seconds_max = 0.0  # the longest flush, for /metrics

    @property
    def direct(self) -> bool:
        """Whether recipients' sockets can be written directly (see above)."""
        return self._send_each is not None

    # -- Queueing (called while routing; never writes) -----------------------

    def to_all(
        self, payload: bytes, exclude: Connection | None = None, *, urgent: bool = True
    ) -> None:
        """Queue a text message for every open connection but *exclude*.

        A message that is not *urgent* (presence events, the heartbeat) may
        wait up to ``coalesce_delay`` for company: when a thousand clients
        connect one per loop pass, each ``user_joined`` would otherwise cost
        one write per recipient. Anything urgent queued meanwhile takes it
        along, in order.
        """
        self.frames.append(text_frame(payload))
        self.payloads.append(payload)
        self.excluded.append(exclude)
        if exclude is not None:
            self._mark(exclude)
        self._schedule(urgent)

    def control_to_all(self, frame: bytes, *, urgent: bool = True) -> None:
        """Queue a ready-made control frame (a Ping) for every connection."""
        self.frames.append(frame)
        self.payloads.append(None)
        self.excluded.append(None)
        self._schedule(urgent)

    def to_one(self, conn: Connection, payload: bytes) -> None:
        """Queue a text message for *conn* only."""
        deflate = conn.deflate
        frame = text_frame(payload) if deflate is None else deflate.text_frame(payload)
        self.raw_to_one(conn, frame)

    def raw_to_one(self, conn: Connection, frame: bytes) -> None:
        """Queue ready-made frame bytes for *conn* only."""
        pending = conn.pending
        if pending is None:
            conn.pending = pending = []
            self._mark(conn)
        pending.append((len(self.frames), frame))
        self._schedule()

    def joined(self, conn: Connection) -> None:
        """*conn* became a recipient now: it gets no frame queued before."""
        conn.joined_at = len(self.frames)
        if conn.joined_at:
            self._mark(conn)

    def _mark(self, conn: Connection) -> None:
        if not conn.marked:
            conn.marked = True
            self.marked.append(conn)

    def _schedule(self, urgent: bool = True) -> None:
        if self._scheduled:
            return
        if urgent or len(self.frames) >= PASS_FRAMES:
            self._scheduled = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loop.call_soon(self.flush)
        elif self._timer is None:
            self._timer = self._loop.call_later(self._coalesce_delay, self.flush)

    # -- Writing --------------------------------------------------------------

    def take(self, conn: Connection) -> bytes:
        """Everything queued for *conn* in this pass, removed from the pass.

        For a connection that is about to close: what it was promised goes
        out before its Close frame. Call it before the connection stops being
        a recipient.
        """
        if conn.is_recipient:
            data = self._build(conn, conn.deflate, {})
        else:
            data = b"".join(frame for _, frame in conn.pending or ())
        conn.pending = None
        conn.joined_at = len(self.frames)  # nothing more from this pass
        self._mark(conn)  # so that flush resets it
        return data

    def flush(self) -> None:
        """Write this pass's frames: one write per connection."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        frames = self.frames
        marked = self.marked
        if not frames and not marked:
            return
        started = perf_counter()
        self.passes += 1
        slow: list[Connection] = []
        writes = 0
        deflated: dict[int, list[bytes]] = {}
        if frames:
            common = frames[0] if len(frames) == 1 else b"".join(frames)
            common_deflated: dict[int, bytes] = {}
            recipients = self._recipients()
            limit = self._limit
            direct: list[tuple[asyncio.Transport, int, Connection]] = []
            direct_deflated: dict[int, list[tuple[asyncio.Transport, int, Connection]]] = {}
            for conn in recipients:
                if conn.marked:
                    data = self._build(conn, conn.deflate, deflated)
                    if not data:
                        continue
                elif conn.deflate is None:
                    if conn.direct is not None:
                        direct.append(conn.direct)
                        continue
                    data = common
                else:
                    wbits = conn.deflate.wbits
                    data = common_deflated.get(wbits)
                    if data is None:
                        data = common_deflated[wbits] = b"".join(
                            self._deflated(conn.deflate, deflated)
                        )
                    if conn.direct is not None:
                        # One send_each call per window size, after the loop.
                        group = direct_deflated.get(wbits)
                        if group is None:
                            group = direct_deflated[wbits] = []
                        group.append(conn.direct)
                        continue
                # _write(), inlined: this loop runs once per recipient.
                transport = conn.transport
                try:
                    transport.write(data)
                except Exception as exc:
                    self._on_failed(conn, exc)
                    continue
                writes += 1
                size = transport.get_write_buffer_size()
                if size or conn.buffered:
                    self._seen(conn, size)
                    if size > limit:
                        slow.append(conn)
            if direct:
                writes += self._send_direct(direct, common, slow)
            for wbits, group in direct_deflated.items():
                writes += self._send_direct(group, common_deflated[wbits], slow)
            skipped = sum(1 for conn in self.excluded if conn is not None)
            skipped += sum(conn.joined_at for conn in marked if conn.is_recipient)
            self.deliveries += len(frames) * len(recipients) - skipped  # type: ignore[arg-type]
        # Connections that are not recipients of shared frames (on /echo)
        # but have frames of their own; and, in a pass without shared frames,
        # every connection with frames of its own.
        for conn in marked:
            if frames and conn.is_recipient:
                continue  # written above
            if conn.is_recipient:
                data = self._build(conn, conn.deflate, deflated)
            elif conn.pending:
                data = b"".join(frame for _, frame in conn.pending)
            else:
                continue  # closing: its share was taken already
            if data:
                writes += self._write(conn, data, slow)
        for conn in marked:
            conn.marked = False
            conn.pending = None
            conn.joined_at = 0
        self.writes += writes
        self.frames = []
        self.payloads = []
        self.excluded = []
        self.marked = []
        for conn in slow:
            self._on_slow(conn)
        if self.buffered_total > self._total_limit:
            self._enforce_budget()
        elapsed = perf_counter() - started
        if elapsed > self.pass_seconds_max:
            self.pass_seconds_max = elapsed

    # -- The node-wide bound ----------------------------------------------------

    def _seen(self, conn: Connection, size: int) -> None:
        """The fan-out read *conn*'s unsent bytes: keep the sum up to date."""
        self.buffered_total += size - conn.buffered
        conn.buffered = size
        if size:
            self.held.add(conn)
        else:
            self.held.discard(conn)

    def forget(self, conn: Connection) -> None:
        """*conn*'s socket is gone, and its buffer with it."""
        if conn.buffered:
            self.buffered_total -= conn.buffered
            conn.buffered = 0
            self.held.discard(conn)

    def _enforce_budget(self) -> None:
        total = 0
        for conn in list(self.held):
            size = conn.transport.get_write_buffer_size()
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

    def _send_direct(
        self,
        direct: list[tuple[asyncio.Transport, int, Connection]],
        data: bytes,
        slow: list[Connection],
    ) -> int:
        """*data* to every socket in *direct*: straight to the socket where
        the transport is idle, the rest (or all) through the transport."""
        left = self._send_each(direct, data)  # type: ignore[misc]
        if left is None:
            self.direct_sends += len(direct)
            return len(direct)
        self.direct_sends += len(direct) - len(left)
        writes = len(direct)
        view = memoryview(data)
        for index, sent in left:
            transport, _, conn = direct[index]
            try:
                # Partly sent, or not at all (closing, something queued,
                # EAGAIN, an error the transport will meet and report).
                transport.write(view[sent:] if sent else data)
            except Exception as exc:
                self._on_failed(conn, exc)
                writes -= 1
                continue
            size = transport.get_write_buffer_size()
            if size or conn.buffered:
                self._seen(conn, size)
                if size > self._limit:
                    slow.append(conn)
        return writes

    def _write(self, conn: Connection, data: bytes, slow: list[Connection]) -> int:
        """One write; a connection over its buffer limit joins *slow*."""
        transport = conn.transport
        try:
            transport.write(data)
        except Exception as exc:  # a broken transport: count it, go on
            self._on_failed(conn, exc)
            return 0
        size = transport.get_write_buffer_size()
        if size or conn.buffered:
            self._seen(conn, size)
            if size > self._limit:
                slow.append(conn)
        return 1

    def _deflated(self, deflate: Deflate, cache: dict[int, list[bytes]]) -> list[bytes]:
        """This pass's shared frames, compressed once per window size."""
        frames = cache.get(deflate.wbits)
        if frames is None:
            frames = [
                frame if payload is None else deflate.text_frame(payload)
                for frame, payload in zip(self.frames, self.payloads, strict=True)
            ]
            cache[deflate.wbits] = frames
        return frames

    def _build(
        self, conn: Connection, deflate: Deflate | None, cache: dict[int, list[bytes]]
    ) -> bytes:
        """The bytes for a marked connection: its share of the shared frames,
        minus exclusions, with its private frames at their positions."""
        frames = self.frames if deflate is None else self._deflated(deflate, cache)
        excluded = self.excluded
        pending = conn.pending or ()
        out: list[bytes] = []
        index = conn.joined_at
        for position, frame in pending:
            while index < position:
                if excluded[index] is not conn:
                    out.append(frames[index])
                index += 1
            out.append(frame)
        for i in range(index, len(frames)):
            if excluded[i] is not conn:
                out.append(frames[i])
        return b"".join(out)
