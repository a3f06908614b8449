"""History on Redis, as a node uses it (decisions.md 13 in a cluster): the
thin I/O adapter between the room hubs and
:class:`~wshub.backplane.redis_history.RedisHistory`.

A hub publishes through :meth:`ClusterHistory.publish`: one script in Redis
assigns the offset, appends to the room's capped stream and publishes a
``recorded`` envelope on the room's channel, which every node (this one
too) delivers from its subscription. A join is read with
:meth:`ClusterHistory.join`: the read publishes a ``mark`` envelope right
behind itself, and the join completes once both the read's reply and the mark
arrived (see :mod:`wshub.roomstream` for why both). While the node has members
in a room it keeps the room's epoch on Redis (:meth:`ClusterHistory.keep`, on
the node's timer): an idle room with members has lost nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from .backplane import Envelope, EventKind, encode_envelope
from .backplane.redis_history import RedisHistory
from .history import Entry, JoinQuery, Recovery
from .ids import ConnectionId, NodeId
from .logs import LineLimiter, log_event
from .protocol import RelayKind
from .rooms import RoomName

__all__ = ["ClusterHistory"]

log = logging.getLogger("wshub")

JOIN_TIMEOUT = 5.0
"""Seconds a join may wait for its history read and its mark."""


class ClusterHistory:
    """The Redis history of every room this node publishes into or joins."""

    def __init__(
        self,
        history: RedisHistory,
        node_id: NodeId,
        channel: Callable[[str], str],
        *,
        join_timeout: float = JOIN_TIMEOUT,
    ) -> None:
        self.history = history
        self.node_id = node_id
        self._channel = channel
        self._join_timeout = join_timeout
        self._marks: dict[ConnectionId, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeping: asyncio.Task[None] | None = None
        # Figures for /metrics.
        self.publish_failures = 0
        self.join_failures = 0
        self.keep_failures = 0
        self.gaps_filled = 0
        self.fill_failures = 0
        self._lines = LineLimiter(rate=1.0, burst=5.0)

    def figures(self) -> dict[str, float]:
        return {
            "history_published": self.history.published,
            "history_publish_failures": self.publish_failures,
            "history_join_failures": self.join_failures,
            "history_keep_failures": self.keep_failures,
            "history_gaps_filled": self.gaps_filled,
            "history_stalled": 1 if self.history.stalled else 0,
            "history_fill_failures": self.fill_failures,
        }

    def failed(self, what: str, room: str, exc: BaseException | None) -> None:
        """A publication, a join read, a gap's read or a refresh of the epochs
        Redis did not answer (or a gap's read that found the stream short):
        counted, and logged (at most a line a second)."""
        if what == "publish":
            self.publish_failures += 1
        elif what == "keep":
            self.keep_failures += 1
        elif what == "fill":
            self.fill_failures += 1
        else:
            self.join_failures += 1
        suppressed = self._lines.allow(what, time.monotonic())
        if suppressed is not None:
            log_event(
                log,
                logging.WARNING,
                f"history_{what}_failed",
                room=room,
                error=repr(exc),
                **({"suppressed": suppressed} if suppressed else {}),
            )

    @property
    def size(self) -> int:
        return self.history.size

    def publish(
        self,
        room: RoomName,
        payload: bytes,
        sender: ConnectionId,
        kind: RelayKind,
        exclude: ConnectionId | None,
    ) -> asyncio.Future[tuple[str, int]]:
        """Record and publish *payload* (a relay without an offset) in *room*;
        the future gives its ``(epoch, offset)``. *exclude* is the connection
        not to deliver it to (a ``message``'s sender, or a backend's
        ``exclude``)."""
        head = Envelope(self.node_id, EventKind.RECORDED, room, exclude or ConnectionId(""), b"")
        # In the stream, only an exclusion other than the sender's own is kept
        # (a message is never replayed to its sender's previous connection anyway).
        other = None if exclude is None or exclude == sender else exclude
        entry = Entry(0, payload, sender, kind, other)
        return self.history.submit(room, self._channel(room), encode_envelope(head), entry)

    def pending(self) -> bool:
        """Publications wait for Redis' answer: one made now must follow them
        (a sender's order), even while Redis is known to be unreachable."""
        return self.history.pending()

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for the publications on their way, and let their
        done callbacks run: the user_left a hub held behind them is queued on
        the backplane once this returns (hub.py, ``_held_leaves``)."""
        try:
            await asyncio.wait_for(self.history.answered(), timeout)
        except TimeoutError:
            return
        await asyncio.sleep(0)

    def join(
        self,
        room: RoomName,
        connection_id: ConnectionId,
        query: JoinQuery | None,
        done: Callable[[Recovery | None], None],
    ) -> None:
        """Read what the join of *connection_id* asks for (``since``,
        ``history``, or just the room's place), then call *done* with it, on
        a later loop pass; with None when Redis could not answer in time."""
        mark = asyncio.get_running_loop().create_future()
        self._marks[connection_id] = mark
        self._spawn(self._join(room, connection_id, query, mark, done))

    def marked(self, connection_id: ConnectionId) -> None:
        """The mark of *connection_id*'s read was heard on the subscription."""
        mark = self._marks.pop(connection_id, None)
        if mark is not None and not mark.done():
            mark.set_result(None)

    async def _join(
        self,
        room: RoomName,
        connection_id: ConnectionId,
        query: JoinQuery | None,
        mark: asyncio.Future[None],
        done: Callable[[Recovery | None], None],
    ) -> None:
        head = Envelope(self.node_id, EventKind.MARK, room, connection_id, b"")
        marker = (self._channel(room), encode_envelope(head))
        history = self.history
        since = None if query is None else query.since
        try:
            async with asyncio.timeout(self._join_timeout):
                if since is not None:
                    assert query is not None
                    recovery = await history.recover(
                        room, since.epoch, since.offset, query.previous, marker=marker
                    )
                elif query is not None and query.history:
                    recovery = await history.recent(room, query.history, marker=marker)
                else:
                    epoch, top = await history.state(room, marker=marker)
                    recovery = Recovery(True, [], epoch, top)
                await mark
        except Exception as exc:  # Redis down or slow: the join goes on without history
            self.failed("join", room, exc)
            self._marks.pop(connection_id, None)
            done(None)
            return
        done(recovery)

    def fill(
        self,
        room: RoomName,
        epoch: str,
        offset: int,
        done: Callable[[str | None, list[Entry] | None], None],
    ) -> None:
        """Read the room's entries above *offset* in *epoch* (frames this
        node's subscription missed, see :mod:`wshub.roomstream`), then call
        *done* with the room's epoch and them, oldest first, on a later loop
        pass; with ``(None, None)`` when Redis could not say in time, and
        with the entries None when the stream no longer holds them all."""
        self._spawn(self._fill(room, epoch, offset, done))

    async def _fill(
        self,
        room: RoomName,
        epoch: str,
        offset: int,
        done: Callable[[str | None, list[Entry] | None], None],
    ) -> None:
        try:
            async with asyncio.timeout(self._join_timeout):
                recovery = await self.history.recover(room, epoch, offset, None)
        except Exception as exc:  # Redis down or slow: the gap stays open
            self.failed("fill", room, exc)
            done(None, None)
            return
        if recovery.recovered:
            self.gaps_filled += 1
        else:
            self.failed("fill", room, None)
        done(recovery.epoch, recovery.missed if recovery.recovered else None)

    @property
    def keep_interval(self) -> float:
        """Seconds between two calls of :meth:`keep`."""
        return self.history.keep_interval

    def keep(self, rooms: Iterable[RoomName]) -> asyncio.Task[None] | None:
        """Keep the epochs of *rooms* (the rooms with members here) on Redis,
        in the background; returns the task. One refresh at a time: a call
        while the last one still runs (Redis slow) is left out (None), the
        next interval comes soon enough (see :attr:`RedisHistory.keep_interval`)."""
        if self._keeping is not None and not self._keeping.done():
            return None
        self._keeping = task = self._spawn(self._keep(list(rooms)), "wshub-history-keep")
        return task

    def _spawn(
        self, coro: Coroutine[Any, Any, None], name: str | None = None
    ) -> asyncio.Task[None]:
        """*coro* as a task held until it ends (the loop keeps only a weak
        reference) and cancelled by :meth:`aclose`."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _keep(self, rooms: list[RoomName]) -> None:
        if not rooms:
            return
        try:
            await self.history.keep(rooms)
        except Exception as exc:  # Redis down: tried again at the next interval
            self.failed("keep", f"{len(rooms)} rooms", exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.history.aclose()
