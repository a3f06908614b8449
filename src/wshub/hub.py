"""One room's hub: its members, their presence, and the routing of their
messages (decisions.md 3-6, scoped to the room by section 12).

What this module may not know: sockets, HTTP, other rooms, timers, how the
backplane carries envelopes. A :class:`Hub` is the
:class:`~wshub.connection.ConnectionOwner` of its members once they are
upgraded; it decides who gets what, queues it on the fan-out, and hands the
same payload to the backplane for the room's members on other nodes. What
concerns the whole node (admission slots, close counts, the drain) it tells its
:class:`HubHost`.

Time: ``clock()`` gives the Unix time clients see in timestamps; liveness and
rate limits use the loop's monotonic time in the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Protocol, cast

from . import http, ingest, protocol
from .backplane import Backplane, Envelope, EventKind
from .backplane.base import joined_user
from .connectauth import ConnectAuth
from .connection import Connection, PlainRelayOwner
from .errors import RATE_LIMIT_EXCEEDED, CloseCode, Disconnect
from .fanout import Audience, Fanout
from .history import Entry, History, Recovery
from .ids import ConnectionId, NodeId
from .logs import log_event
from .nodemetrics import Counters
from .protocol import ErrorCode, RefreshRequest, Refusal, Relay, RelayKind
from .rooms import RoomName
from .roomstream import Continuity, Recorded, RoomStream, from_entry, offset_of
from .session import State
from .wire import TextPayloads, ping_frame, text_frame, text_payload

if TYPE_CHECKING:
    from .clusterhistory import ClusterHistory

__all__ = ["Hub", "HubHost"]

log = logging.getLogger("wshub")

_BINARY_REFUSAL = Refusal(
    ErrorCode.BINARY_NOT_SUPPORTED, "Binary frames are not supported: send JSON or text"
)
_RATE_REFUSAL = Refusal(ErrorCode.RATE_LIMITED, "Too many messages: slow down")
_PROTOCOL_PING_FRAME = ping_frame(b"wshub")
_MESSAGE = RelayKind.MESSAGE  # Micro-optimization: an enum member lookup costs ~170 ns
_BROADCAST = RelayKind.BROADCAST
_RECORDED = EventKind.RECORDED
_RELAY = EventKind.RELAY
_HOLD_LIMIT = 2.0
"""Seconds a departure waits at most for the room's publications before it."""
_HISTORY_MOVED_ON = Disconnect(
    CloseCode.SERVICE_RESTART, "room history moved on: reconnect with since"
)
# A named tuple's own constructor is a Python function (the lambda that
# NamedTuple makes); tuple.__new__ bound by partial() builds the same object
# in C, a third cheaper. Every relayed message makes an Envelope (its history
# entry goes to History.keep as plain fields). Each field in order, defaults
# included.
_new_envelope = cast(
    "Callable[[tuple[NodeId, EventKind, RoomName, ConnectionId, bytes, str | None]], Envelope]",
    partial(tuple.__new__, Envelope),
)


class _PresenceEncoder(Protocol):
    """protocol.encode_user_joined or encode_user_left."""

    def __call__(
        self, connection_id: ConnectionId, total_users: int, now: float, *, user_id: str | None
    ) -> bytes: ...


class HubHost(Protocol):
    """What a hub tells the node it belongs to."""

    def member_opened(self, conn: Connection) -> None:
        """*conn* is upgraded (and, in a room, a member)."""

    def member_closing(self, conn: Connection) -> None:
        """*conn* left the room and its closing handshake started."""

    def member_closed(self, conn: Connection, previous: State) -> None:
        """*conn*'s socket is gone (it was in state *previous*)."""

    def member_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        """*conn* refused something itself."""

    def room_emptied(self, hub: Hub) -> None:
        """The room's last member on this node left."""


class Hub(PlainRelayOwner):
    """The members of one room on this node, and its routing."""

    # One hub per room: an instance dict cost each room ~60 B more than
    # these slots (docs/memory.md).
    __slots__ = (
        "room",
        "_auth",
        "members",
        "audience",
        "_host",
        "_fanout",
        "_backplane",
        "_counters",
        "_fanout_sizes",
        "_outcomes",
        "_node_id",
        "_clock",
        "_history",
        "_monotonic",
        "_shared",
        "_stream",
        "_unsettled",
        "_held_leaves",
        "_awaited",
        "_prepared",
    )

    def __init__(
        self,
        room: RoomName,
        *,
        host: HubHost,
        fanout: Fanout[Connection],
        backplane: Backplane,
        counters: Counters,
        node_id: NodeId,
        clock: Callable[[], float],
        history: History | None = None,
        monotonic: Callable[[], float] | None = None,
        shared: ClusterHistory | None = None,
        auth: ConnectAuth | None = None,
    ) -> None:
        self.room = room
        self._auth = auth  # None: --auth off
        self.members: dict[ConnectionId, Connection] = {}
        self.audience: Audience[Connection] = Audience()
        self._host = host
        self._fanout = fanout
        self._backplane = backplane
        self._counters = counters
        # The fan-out size histogram's tally, added to inline per message.
        self._fanout_sizes = counters.fanout_sizes.tally
        self._outcomes = counters.outcomes
        self._node_id = node_id
        self._clock = clock
        # The node's history (decisions.md 13), None when off: then no frame
        # carries an offset and nothing on the hot path changes.
        self._history = history if history is not None and history.enabled else None
        self._monotonic = monotonic or clock
        # History on Redis (a cluster): offsets come from the room's script and
        # every frame, this node's own too, from the subscription (roomstream.py).
        self._shared = shared
        self._stream = RoomStream() if shared is not None else None
        # This room's publications whose outcome is not handled yet (their
        # done callbacks not run): while any is, a new one must not be served
        # ahead of it, even when Redis is known to be unreachable.
        self._unsettled = 0
        # user_left envelopes waiting for those publications: a publication
        # travels on the history's own Redis connection, presence on the
        # backplane's, so a leave published at once could reach the other
        # nodes before the leaver's last messages (decisions.md 9: one order).
        # Each with its frame for this node's members, who hear the leaver's
        # messages from the subscription, after Redis ran their script: the
        # leave waits until the room's stream has delivered the last offset a
        # publication of this room was given (_awaited) as well.
        self._held_leaves: list[tuple[bytes, Envelope]] = []
        self._awaited = 0
        self._prepared: dict[ConnectionId, tuple[Recovery | None, list[Recorded] | None]] = {}

    def count(self) -> int:
        """The room's connections across the cluster, as this node knows them."""
        return len(self.members) + self._backplane.remote_count(self.room)

    # -- Members ----------------------------------------------------------------

    def on_open(self, conn: Connection) -> None:
        """*conn* completed its upgrade: welcome it, then tell the room."""
        identity = conn.identity
        user_id = None
        if identity is not None and self._auth is not None:
            rejection = self._auth.joined(conn, identity)
            if rejection is not None:  # over --max-connections-per-user: never a member
                conn.write(text_frame(protocol.encode_error(rejection.refusal)))
                conn.close(rejection.disconnect)
                if not self.members:  # it may have been the room's first: not a room
                    self._host.room_emptied(self)
                return
            user_id = identity.user_id
        self.members[conn.id] = conn
        conn.is_recipient = True
        self._fanout.admit(self.audience, conn)
        self._host.member_opened(conn)
        self._fanout.joined(self.audience, conn)
        now = self._clock()
        total = self.count()
        # The welcome goes out at once, straight after the 101 response: the
        # newcomer has nothing queued before it. Its user_joined may wait a
        # little for other joins, so a connection storm costs few writes.
        history = self._history
        prepared = self._prepared.pop(conn.id, None) if self._shared is not None else None
        recovery: Recovery | None = None  # history off: no place in the room
        after: list[Recorded] | None = None
        if prepared is not None and prepared[0] is not None:
            recovery, after = prepared  # on Redis: the join's read and its mark are in
        elif history is not None:
            recovery = self._read_here(conn, history)
        # (On Redis with the join's read failed, Redis is down: no history.)
        self._welcome(conn, total, now, recovery, user_id, after)
        conn.join = None
        if prepared is not None and prepared[1] is None:
            conn.close(_HISTORY_MOVED_ON)  # too much came in during its join: start over
        joined = protocol.encode_user_joined(conn.id, total, now, user_id=user_id)
        self._fanout.to_all(self.audience, joined, exclude=conn, urgent=False)
        self._backplane.publish(
            Envelope(self._node_id, EventKind.JOINED, self.room, conn.id, joined, user_id)
        )
        log_event(
            log,
            logging.INFO,
            "open",
            id=conn.id,
            room=self.room,
            peer=conn.peer,
            ip=conn.ip,
            origin=conn.origin,
        )

    def _read_here(self, conn: Connection, history: History) -> Recovery:
        """What *conn*'s join asks of this node's memory history (its since,
        its history, or just the room's place), read now; the room's state
        is held for it from now on (its epoch stays while it is a member)."""
        mono = self._monotonic()
        history.hold(self.room, mono)
        join = conn.join
        if join is not None and join.since is not None:
            since = join.since
            return history.recover(self.room, since.epoch, since.offset, join.previous, mono)
        if join is not None and join.history:
            return history.recent(self.room, join.history, mono)
        epoch, top = history.state(self.room, mono)
        return Recovery(True, [], epoch, top)

    def _welcome(
        self,
        conn: Connection,
        total: int,
        now: float,
        recovery: Recovery | None,
        user_id: str | None,
        after: list[Recorded] | None,
    ) -> None:
        """The welcome, with the room's place when there is a *recovery*,
        then the replay, in one step of the loop, after the join (the fan-out
        queues nothing for it from before): every offset after the welcome's
        arrives exactly once, replayed or live. On Redis, *after* holds the
        frames above the read's top that were heard while the join waited for
        its read and its mark; they follow the replay, the rest come live.

        Without a recovery (history off, decisions.md 19) no offset is
        promised, and a since is answered recovered:false, missed:0."""
        asked = conn.join is not None and conn.join.since is not None
        epoch = offset = None
        recovered, missed = False, 0
        if recovery is not None:
            epoch, offset = recovery.epoch, recovery.offset
            recovered, missed = recovery.recovered, len(recovery.missed)
        welcome = protocol.encode_welcome(
            conn.id,
            total,
            now,
            self.room,
            epoch=epoch,
            offset=offset,
            recovered=recovered if asked else None,
            missed=missed if asked else None,
            user_id=user_id,
        )
        frames = [text_frame(welcome)]
        if recovery is not None:
            frames += [text_frame(protocol.replayed(entry.payload)) for entry in recovery.missed]
        frames += [text_frame(frame.payload) for frame in after or ()]
        # One write; what the socket did not take counts toward the node's
        # --send-buffer-total like anything the fan-out writes (a client
        # alone in its room would otherwise hold its replay uncounted).
        unsent = conn.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if unsent:
            self._fanout.wrote(conn, unsent)

    # -- Joins on Redis (the node runs the reads: clusterhistory.py) ----------------

    @property
    def history_in_redis(self) -> bool:
        """Whether the room's offsets come from Redis (a cluster with history on)."""
        return self._shared is not None

    @property
    def joining(self) -> int:
        """Joins of this room waiting for their history read."""
        return 0 if self._stream is None else self._stream.joining

    def begin_join(self, connection_id: ConnectionId) -> None:
        """The read of *connection_id*'s join starts: keep what arrives for it."""
        assert self._stream is not None
        self._stream.begin(connection_id)

    def prepare_join(self, connection_id: ConnectionId, recovery: Recovery | None) -> None:
        """The read is in (None: it failed): :meth:`on_open` will use it."""
        stream = self._stream
        assert stream is not None
        if recovery is None:
            stream.cancel(connection_id)
            self._prepared[connection_id] = (None, [])
            return
        after, stale = stream.finish(connection_id, recovery.epoch, recovery.offset)
        if stale:  # the stream follows the new epoch already: only the members go
            self._close_members("epoch")
        self._prepared[connection_id] = (recovery, after)

    def end_join(self, connection_id: ConnectionId) -> None:
        """Forget what a join did not take (its client went away meanwhile)."""
        self._prepared.pop(connection_id, None)

    def _history_moved_on(self, why: str) -> None:
        """The room's offsets no longer follow on from what its members here
        were sent (frames lost, or the history restarted): close them so that
        they reconnect with ``since`` and recover, or learn that they cannot."""
        assert self._stream is not None
        self._stream.reset()
        self._close_members(why)

    def _close_members(self, why: str) -> None:
        if not self.members:
            return
        log_event(
            log, logging.WARNING, "history_moved_on", room=self.room, why=why, n=len(self.members)
        )
        for conn in list(self.members.values()):
            conn.close(_HISTORY_MOVED_ON)

    def on_closing(self, conn: Connection) -> bytes:
        data = self._fanout.take(conn)
        self._host.member_closing(conn)
        self.remove(conn)
        return data

    def on_closed(self, conn: Connection, previous: State) -> None:
        self._fanout.forget(conn)  # its socket's buffer is gone with it
        if previous is State.OPEN:  # dropped without a closing handshake
            self.remove(conn)
        self._host.member_closed(conn, previous)

    def remove(self, conn: Connection) -> None:
        """Remove *conn* and announce its ``user_left`` to the room, once."""
        if self.members.pop(conn.id, None) is None:
            return
        conn.is_recipient = False
        self._fanout.dismiss(self.audience, conn)
        if self._history is not None:
            self._history.release(self.room, self._monotonic())
        identity = conn.identity
        user_id = None
        if identity is not None and self._auth is not None:
            self._auth.left(conn, identity)
            user_id = identity.user_id
        left = protocol.encode_user_left(conn.id, self.count(), self._clock(), user_id=user_id)
        envelope = Envelope(self._node_id, EventKind.LEFT, self.room, conn.id, left)
        if self._shared is not None and self._in_flight():
            if not self._held_leaves:
                # Bounded: a stream that stalls (a gap being filled, Redis
                # frozen) holds no departure for long.
                asyncio.get_running_loop().call_later(_HOLD_LIMIT, self._release_leaves, True)
            self._held_leaves.append((left, envelope))
        else:
            if self.members:
                self._fanout.to_all(self.audience, left, urgent=False)
            self._backplane.publish(envelope)
        if not self.members:
            self._host.room_emptied(self)

    # -- Messages from members ------------------------------------------------------

    def on_text(self, conn: Connection, text: str) -> None:
        # The hot path of every relayed message: counters as plain dict
        # updates, the relay case tested first.
        outcomes = self._outcomes
        outcomes["INCOMING"] += 1
        identity = conn.identity
        # With --auth on, refresh is a command even from an anonymous member
        # (--auth optional): refused as unauthorized (decisions.md 19), not an
        # unknown type, which is what --auth off answers, as the seed has it.
        result = protocol.parse_client_text(text, refresh=self._auth is not None)
        if type(result) is Relay:
            outcomes["VALIDATED"] += 1
            kind = result.kind
            history = self._history
            if history is None:
                if identity is None:
                    payload = protocol.encode_relay(kind, conn.id, result.content, self._clock())
                else:
                    payload = protocol.encode_relay_from_user(
                        kind, conn.id, identity.user_id, result.content, self._clock()
                    )
                self.publish(payload, conn.id, conn if kind is _MESSAGE else None)
            else:
                # Encoded with its offset at once: cheaper than a splice later.
                mono = self._monotonic()
                offset = history.next_offset(self.room, mono)
                if identity is None:
                    payload = protocol.encode_relay(
                        kind, conn.id, result.content, self._clock(), offset
                    )
                else:
                    payload = protocol.encode_relay_from_user(
                        kind, conn.id, identity.user_id, result.content, self._clock(), offset
                    )
                # Positional: binding keywords to keyword-only parameters
                # costs more per call than the other way, once per message.
                self.publish(
                    payload, conn.id, conn if kind is _MESSAGE else None, kind, offset, mono
                )
            outcomes["ROUTED"] += 1
            return
        if isinstance(result, Refusal):
            self._refuse(conn, result)
            return
        outcomes["VALIDATED"] += 1
        if result is protocol.PING:
            self._fanout.to_one(conn, protocol.encode_pong(self._clock()))
        elif result is protocol.USER_INFO:
            self._fanout.to_one(
                conn,
                protocol.encode_user_info_response(conn.id, self.count(), self._clock(), self.room),
            )
        elif type(result) is RefreshRequest and self._auth is not None:
            self._fanout.to_one(conn, self._auth.refresh(conn, result.token, self.room))
        # PONG: a sign of life, already noted by the connection.
        outcomes["ROUTED"] += 1

    def on_plain_relays(self, conn: Connection, kinds: bytes, contents: list[bytes]) -> None:
        """A read's plain relays in a row (wshub._ingest recognised and
        checked them: their codes and contents), published together:
        :meth:`publish` of each, in order, with the envelopes written in one
        C call (``ingest.stamp``), one clock read, one offset lookup and one
        history call for the run. A cluster's room (offsets from Redis) takes
        them one by one."""
        stamp = ingest.stamp
        if self._shared is not None or stamp is None:
            relay_kinds = ingest.KINDS
            for code, content in zip(kinds, contents, strict=True):
                self.on_plain_relay(conn, relay_kinds[code], content)  # type: ignore[arg-type]
            return
        count = len(kinds)
        outcomes = self._outcomes
        outcomes["INCOMING"] += count
        outcomes["VALIDATED"] += count
        sender = conn.id
        identity = conn.identity
        user_id = None if identity is None else identity.user_id
        head_message = protocol.plain_relay_head(_MESSAGE, sender, user_id)
        head_broadcast = protocol.plain_relay_head(_BROADCAST, sender, user_id)
        tail = protocol.plain_relay_tail(self._clock())
        history = self._history
        if history is None:
            frames, excluded, sent_alone, _, _, _ = stamp(
                kinds, contents, head_message, head_broadcast, tail, -1, conn
            )
        else:
            mono = self._monotonic()
            first = history.next_offset(self.room, mono)
            # The payloads come joined, as the history keeps a run: no bytes
            # object of its own per message (docs/rooms-perf.md "Session 12").
            frames, excluded, sent_alone, blob, ends, flags = stamp(
                kinds, contents, head_message, head_broadcast, tail, first, conn
            )
            assert blob is not None and ends is not None and flags is not None  # offsets given
            history.keep_packed(self.room, first, blob, ends, flags, sender, mono)
        # The payloads taken from the frames only if a peer is sent them.
        self._backplane.publish_relays(self.room, sender, TextPayloads(frames))
        members = len(self.members)
        sizes = self._fanout_sizes
        if sent_alone:
            sizes[members - 1] = sizes.get(members - 1, 0) + sent_alone
            if count > sent_alone:
                sizes[members] = sizes.get(members, 0) + count - sent_alone
        else:
            sizes[members] = sizes.get(members, 0) + count
        if members > 1:
            self._fanout.to_all_many(self.audience, frames, excluded, conn if sent_alone else None)
        elif members:  # the sender alone: its broadcasts come back to it, its messages go nowhere
            for frame, code in zip(frames, kinds, strict=True):
                if code != ingest.MESSAGE:
                    self._fanout.to_all(self.audience, text_payload(frame))
        outcomes["ROUTED"] += count

    def on_plain_relay(self, conn: Connection, kind: RelayKind, content: bytes) -> None:
        """:meth:`on_text`'s relay case for what wshub._ingest recognised
        and checked: the envelope from the content's bytes, no str."""
        outcomes = self._outcomes
        outcomes["INCOMING"] += 1
        outcomes["VALIDATED"] += 1
        identity = conn.identity
        user_id = None if identity is None else identity.user_id
        exclude = conn if kind is _MESSAGE else None
        history = self._history
        if history is None:
            payload = protocol.encode_plain_relay(
                kind, conn.id, content, self._clock(), user_id=user_id
            )
            self.publish(payload, conn.id, exclude)
        else:
            mono = self._monotonic()
            offset = history.next_offset(self.room, mono)
            payload = protocol.encode_plain_relay(
                kind, conn.id, content, self._clock(), offset, user_id
            )
            self.publish(payload, conn.id, exclude, kind, offset, mono)  # positional: cheaper
        outcomes["ROUTED"] += 1

    def publish(
        self,
        payload: bytes,
        sender: ConnectionId,
        exclude: Connection | None,
        kind: RelayKind | None = None,
        offset: int | None = None,
        now: float | None = None,
        *,
        excluded_id: ConnectionId | None = None,
    ) -> None:
        """A ``message`` or ``broadcast`` into the room: to every local member
        but *exclude*, and to the room's members on the other nodes.

        *excluded_id* names a connection to skip that may live on another
        node (a backend's ``message`` with ``exclude``): the envelope carries
        it, and the node where it lives leaves it out.

        The one door for room traffic: a backend's publication (decisions.md
        14) comes in here too, and the room's history (13) will give each
        payload its offset here, at publication, before anyone gets it.
        Local members get it in this loop pass; one sender's messages keep
        their order everywhere (one fan-out here, one Redis connection out).

        With history on, the payload gets the room's next offset (spliced in
        unless the caller encoded it with *offset* from ``next_offset``) and
        is kept with its *kind* (a ``message`` when *exclude* is given and no
        kind is) for ``?since=`` and ``?history=``; *now* is the monotonic
        time *offset* was taken at.
        """
        shared = self._shared
        if shared is not None:
            self._publish_shared(shared, payload, sender, exclude, kind, excluded_id)
            return
        history = self._history
        if history is not None:
            if now is None:
                now = self._monotonic()
            if offset is None:
                offset = history.next_offset(self.room, now)
                payload = protocol.with_offset(payload, offset)
            if kind is None:
                kind = _MESSAGE if exclude is not None else RelayKind.BROADCAST
            excluded = None if exclude is None or exclude.id == sender else exclude.id
            if excluded is None and excluded_id is not None:
                excluded = excluded_id
            history.keep(self.room, offset, payload, sender, kind is _MESSAGE, excluded, now)
        recipients = len(self.members) - (1 if exclude is not None else 0)
        sizes = self._fanout_sizes
        sizes[recipients] = sizes.get(recipients, 0) + 1
        if recipients:
            self._fanout.to_all(self.audience, payload, exclude=exclude)
        self._backplane.publish(
            _new_envelope((self._node_id, _RELAY, self.room, excluded_id or sender, payload, None))
        )

    def _publish_shared(
        self,
        shared: ClusterHistory,
        payload: bytes,
        sender: ConnectionId,
        exclude: Connection | None,
        kind: RelayKind | None,
        excluded_id: ConnectionId | None = None,
        *,
        serve_if_lost: bool = True,
    ) -> asyncio.Future[tuple[str, int]] | None:
        """Through the room's script (None: Redis unreachable, served here).
        A publication Redis does not take in time is served to this node's
        members all the same, without an offset, unless *serve_if_lost* is
        False (a backend's, answered 503 instead: it may send it again)."""
        if not self._backplane.ready()[0] and not self._unsettled and not shared.pending():
            # Redis unreachable: serve this node's members at once, without an
            # offset (none can be assigned), rather than late or never.
            self._deliver(payload, exclude)
            # The backplane counts what it could not forward.
            self._backplane.publish(
                Envelope(self._node_id, EventKind.RELAY, self.room, sender, payload)
            )
            return None
        if kind is None:
            kind = _MESSAGE if exclude is not None else RelayKind.BROADCAST
        # The connection it skips, here or on another node (a backend's exclude).
        skip = exclude.id if exclude is not None else excluded_id
        future = shared.publish(self.room, payload, sender, kind, skip)
        # Counted until _published runs: the flusher can be done (pending()
        # False) with this future failed and its callback still queued, and a
        # message served at once meanwhile would overtake it.
        self._unsettled += 1
        lost = (payload, exclude) if serve_if_lost else None
        future.add_done_callback(partial(self._published, shared, lost))
        return future

    def _published(
        self,
        shared: ClusterHistory,
        lost: tuple[bytes, Connection | None] | None,
        future: asyncio.Future[tuple[str, int]],
    ) -> None:
        self._unsettled -= 1
        try:
            self._settle(shared, lost, future)
        finally:
            if self._held_leaves:
                self._release_leaves()

    def _in_flight(self) -> bool:
        """This room's publications are on their way: not answered by Redis,
        or answered and not delivered from the subscription yet."""
        if self._unsettled:
            return True
        top = self._stream.top if self._stream is not None else None
        return top is not None and top < self._awaited

    def _release_leaves(self, anyway: bool = False) -> None:
        """The held departures, once every publication before them is
        delivered here and run by Redis (so on every node they follow)."""
        if not self._held_leaves or (self._in_flight() and not anyway):
            return
        held, self._held_leaves = self._held_leaves, []
        for left, envelope in held:
            if self.members:
                self._fanout.to_all(self.audience, left, urgent=False)
            self._backplane.publish(envelope)

    def _settle(
        self,
        shared: ClusterHistory,
        lost: tuple[bytes, Connection | None] | None,
        future: asyncio.Future[tuple[str, int]],
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            # Not recorded (Redis frozen, or gone with it in flight): lost for
            # the other nodes (at most once), counted; this node's members
            # still get it, without an offset, as while Redis is known to be
            # unreachable (decisions.md 9). In order: publications fail in
            # the order they were made.
            shared.failed("publish", self.room, None if future.cancelled() else future.exception())
            if lost is not None:
                self._deliver(*lost)
            return
        stream = self._stream
        assert stream is not None
        epoch, offset = future.result()
        self._awaited = max(self._awaited, offset)
        if not stream.published(epoch):
            self._history_moved_on("epoch")
            stream.reset(epoch)
            self._awaited = offset  # the new history's count

    def _deliver(self, payload: bytes, exclude: Connection | None) -> None:
        recipients = len(self.members) - (1 if exclude is not None else 0)
        sizes = self._fanout_sizes
        sizes[recipients] = sizes.get(recipients, 0) + 1
        if recipients > 0:
            self._fanout.to_all(self.audience, payload, exclude=exclude)

    def _on_recorded(self, envelope: Envelope) -> None:
        payload = envelope.payload
        excluded = envelope.connection_id or None
        stream = self._stream
        if stream is not None:
            try:
                offset = offset_of(payload)
            except ValueError:
                log.warning("recorded frame without an offset in room %r", self.room)
                return
            continuity = stream.heard(Recorded(offset, payload, excluded))
            if continuity is not Continuity.IN_ORDER:
                self._discontinuous(stream, continuity)
                return
        members = self.members
        self._deliver(payload, None if excluded is None else members.get(excluded))
        if self._held_leaves:
            self._release_leaves()

    def _discontinuous(self, stream: RoomStream, continuity: Continuity) -> None:
        if continuity is Continuity.HELD:
            return  # delivered with the gap's frames
        shared = self._shared
        fill = stream.filling
        if continuity is not Continuity.GAP or shared is None or fill is None:
            self._history_moved_on(continuity.value)
            return
        # Frames lost on the way (the subscription was rebuilt meanwhile) are
        # in the room's stream: read them rather than close the members.
        assert stream.epoch is not None and stream.top is not None
        shared.fill(self.room, stream.epoch, stream.top, partial(self._filled, stream, fill))

    def _filled(
        self, stream: RoomStream, fill: int, epoch: str | None, entries: list[Entry] | None
    ) -> None:
        missed = None if entries is None else [from_entry(entry) for entry in entries]
        frames = stream.filled(fill, epoch, missed)
        if frames is None:
            self._history_moved_on("gap")
            return
        members = self.members
        for frame in frames:
            excluded = frame.exclude
            self._deliver(frame.payload, None if excluded is None else members.get(excluded))
        if self._held_leaves:
            self._release_leaves()

    def publish_backend(
        self, kind: RelayKind, sender: ConnectionId, content: str, exclude: ConnectionId | None
    ) -> tuple[int | None, str | None]:
        """A backend's publication (decisions.md 14), through :meth:`publish`
        like a member's message: it gets the room's next offset and enters
        its history. Returns ``(offset, epoch)``, both None with history off."""
        member = None if exclude is None else self.members.get(exclude)
        history = self._history
        if history is None and self._shared is not None:
            # On Redis the offset comes later, from the room's script:
            # publish_backend_recorded() gives it to whoever waits for it.
            self.publish_backend_recorded(kind, sender, content, exclude)
            return None, None
        if history is None:
            payload = protocol.encode_relay(kind, sender, content, self._clock())
            self.publish(payload, sender, member, kind=kind, excluded_id=exclude)
            return None, None
        mono = self._monotonic()
        offset = history.next_offset(self.room, mono)
        payload = protocol.encode_relay(kind, sender, content, self._clock(), offset)
        self.publish(
            payload, sender, member, kind=kind, offset=offset, now=mono, excluded_id=exclude
        )
        epoch, _ = history.state(self.room, mono)
        return offset, epoch

    def publish_backend_recorded(
        self, kind: RelayKind, sender: ConnectionId, content: str, exclude: ConnectionId | None
    ) -> asyncio.Future[tuple[str, int]] | None:
        """A backend's publication with history on Redis: the future of its
        ``(epoch, offset)`` from the room's script; None when this node has
        no Redis history (use :meth:`publish_backend`) or Redis is
        unreachable (it was served to this node's members only)."""
        shared = self._shared
        if shared is None:
            return None
        member = None if exclude is None else self.members.get(exclude)
        payload = protocol.encode_relay(kind, sender, content, self._clock())
        return self._publish_shared(
            shared, payload, sender, member, kind, exclude, serve_if_lost=False
        )

    def on_binary(self, conn: Connection, data: bytes) -> None:
        self._counters.messages.inc_label("INCOMING")
        self._refuse(conn, _BINARY_REFUSAL)

    def on_rate_limited(self, conn: Connection, *, disconnect: bool) -> None:
        self._counters.messages.inc_label("INCOMING")
        self._counters.rate_refusals.inc()
        if disconnect:
            self._counters.messages.inc_label("FAILED")
            log_event(log, logging.INFO, "rate_limit_close", id=conn.id, ip=conn.ip)
            conn.close(RATE_LIMIT_EXCEEDED)
            return
        self._refuse(conn, _RATE_REFUSAL)

    def on_connect(self, conn: Connection) -> bytes | None:
        raise AssertionError("a connection is accepted by the gateway")

    def on_request(self, conn: Connection, request: http.Request) -> None:
        raise AssertionError("an upgraded connection makes no HTTP request")

    def on_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        self._host.member_refused(conn, status, reason, detail)

    def _refuse(self, conn: Connection, refusal: Refusal) -> None:
        self._counters.messages.inc_label("FAILED")
        self._counters.errors.inc_label(refusal.code.value)
        self._fanout.to_one(conn, protocol.encode_error(refusal))

    # -- Messages from other nodes ----------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """A relay, or a join or leave that changed the room's view."""
        kind = envelope.kind
        if kind is _RECORDED:
            self._on_recorded(envelope)
            return
        if kind is EventKind.MARK:
            if self._shared is not None:
                self._shared.marked(envelope.connection_id)
            return
        if self.members:
            # Relays are urgent; presence from other nodes may wait for company.
            urgent = envelope.kind is EventKind.RELAY
            # A relay's connection id is its sender, or the connection a
            # backend's message skips: skipped when it is a member here.
            skip = self.members.get(envelope.connection_id) if urgent else None
            payload = envelope.payload if urgent else self._presence_frame(envelope)
            self._fanout.to_all(self.audience, payload, exclude=skip, urgent=urgent)
        if envelope.kind is EventKind.RELAY:
            self._counters.fanout_sizes.observe(len(self.members))

    def _presence_frame(self, envelope: Envelope) -> bytes:
        """Another node's ``user_joined`` / ``user_left``, framed again with
        this node's count: the sender's ``totalUsers`` missed what it had not
        heard yet (leaves here at the same moment), and the last figure a
        client is told must be the room's count as its node knows it."""
        encode = (
            protocol.encode_user_joined
            if envelope.kind is EventKind.JOINED
            else protocol.encode_user_left
        )
        user = joined_user(envelope.payload)
        return encode(envelope.connection_id, self.count(), self._clock(), user_id=user)

    def announce_left(
        self, connection_ids: Iterable[ConnectionId], users: Mapping[ConnectionId, str]
    ) -> None:
        """Members elsewhere gone without their own ``left`` event (their node
        died): the view already dropped them (*users*: their user ids)."""
        self._announce(connection_ids, users, protocol.encode_user_left)

    def announce_joined(
        self, connection_ids: Iterable[ConnectionId], users: Mapping[ConnectionId, str]
    ) -> None:
        """Members elsewhere whose ``joined`` event was lost (an outage)."""
        self._announce(connection_ids, users, protocol.encode_user_joined)

    def _announce(
        self,
        connection_ids: Iterable[ConnectionId],
        users: Mapping[ConnectionId, str],
        encode: _PresenceEncoder,
    ) -> None:
        if not self.members:
            return
        now = self._clock()
        total = self.count()
        for connection_id in connection_ids:
            frame = encode(connection_id, total, now, user_id=users.get(connection_id))
            self._fanout.to_all(self.audience, frame, urgent=False)

    # -- Timers -----------------------------------------------------------------------

    def heartbeat(self) -> None:
        """The JSON ping for browsers' scripts, and a protocol Ping frame,
        which browsers answer on their own (decisions.md 6)."""
        if not self.members:
            return
        self._fanout.to_all(self.audience, protocol.encode_ping(self._clock()), urgent=False)
        self._fanout.control_to_all(self.audience, _PROTOCOL_PING_FRAME, urgent=False)
