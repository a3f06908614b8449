"""One client socket: the HTTP request, the upgrade, frames in, frames out.

This is a thin asyncio ``Protocol`` (no task per connection, no per-client
queue: see :mod:`wshub.fanout`). Incoming bytes go to the ``websockets``
library's sans-I/O :class:`~websockets.protocol.Protocol`, which parses frames
and enforces RFC 6455 (masking, reserved bits, opcodes, control frame rules,
the message size limit, permessage-deflate decoding, the close handshake).
This module assembles fragmented messages, checks UTF-8, and hands complete
messages to its owner.

What this module may not know: who else is connected, rooms, the protocol's
JSON, metrics, the backplane. It talks to its owner only through
:class:`ConnectionOwner`, defined here: the node while the request is plain
HTTP, then the room's hub (or the echo endpoint) once the upgrade is granted.

One writer per socket: only :meth:`Connection.write` and the methods of this
class write to the transport. The fan-out hands its bytes to ``write()``
(or, for an idle plain socket, sends them from one C call while the transport
has nothing queued: see :mod:`wshub.fanout`). The library's Close frames go
out behind what was promised to the client, which the owner hands back.

Floods (decisions.md 18):

* Pongs never pile up. A Pong is written at once only while nothing is
  waiting in the transport's buffer; otherwise it waits in one slot per
  connection, where the next Ping's Pong replaces it (RFC 6455 5.5.3 lets an
  endpoint answer only the latest Ping), and it goes out when the buffer has
  drained (``resume_writing``, with a high-water mark of 0). A client that
  pings and never reads thus holds at most one Pong of ours.
* Every frame a client sends, control frames included, is charged to its
  frame budget (:meth:`Session.admit`): a flood of Pings, Pongs or Closes is
  refused and closed with 1008 like a flood of messages. A Close ends the
  connection anyway, so it is charged but never refused.
* A message is bounded in frames as well as bytes (``--max-message-frames``):
  a flood of empty continuation frames closes with 1009.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.protocol import SEND_EOF, Side
from websockets.protocol import Protocol as FrameProtocol
from websockets.protocol import State as FrameState

from . import http, ingest
from .errors import CloseCode, Disconnect
from .framescan import FrameScanner, MalformedFrame
from .history import JoinQuery
from .ids import ConnectionId
from .ratelimit import UNLIMITED, MessageLimit
from .rooms import DEFAULT_ROOM
from .session import Admit, Session, State
from .wire import Deflate

if TYPE_CHECKING:
    from .auth import Identity
    from .fanout import Audience

__all__ = ["Connection", "ConnectionOwner", "ConnectionSettings", "PlainRelayOwner"]

# The library logs every closed connection at INFO on the server side; wshub
# writes its own lines, so keep the library's for warnings and errors.
_frames_logger = logging.getLogger("wshub.frames")
_frames_logger.setLevel(logging.WARNING)

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
# Admit.ACCEPT as a global: compared once per frame (see session._ACCEPT).
_ACCEPT: Final = Admit.ACCEPT
_RUN: Final = ingest.RUN
_PING, _PONG, _CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE
_utf8_decoder = codecs.getincrementaldecoder("utf-8")

KERNEL_SEND_BUFFER = 64 * 1024
"""SO_SNDBUF for client sockets (Linux doubles it for bookkeeping)."""

READ_SLICE = 256 * 1024
"""Bytes one connection may have parsed before it waits a loop pass. libuv
reads a readable socket up to 32 times per pass: a client flooding frames
the library parses (Pings: ~15 us each) held the loop 1-2 s at a time, and
every other client waited (decisions.md 18). ~30 ms of Pings, ~1,000 common
messages: a normal client never reaches it within a pass."""

_READ_SLICE_UNITS = READ_SLICE >> 10
"""READ_SLICE as a connection counts it: in KiB, each read at least one unit.
The count then stays within CPython's shared small ints (-5 to 256), so a
connection that reads now and then (a Pong every 20 s) does not hold an int
object of its own, as a count in bytes did (32 B: docs/memory.md). A client
sending one small frame a read waits a loop pass every 256 reads."""

_LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() then resets the connection and discards what
the kernel still holds for a client that stopped reading (issue 19.1)."""


def _discard_received(fd: int) -> None:
    """Read and drop what a client sent before we close on it unanswered.

    Closing a socket with unread bytes makes the kernel reset it (RFC 1122
    4.2.2.13), and the reset can reach the client before it has read our
    answer: a health checker refused at accept would see "connection reset"
    instead of the 503. Its request is usually in by now; a few reads take it.
    """
    for _ in range(4):
        try:
            if not os.read(fd, 65536):
                return
        except OSError:  # BlockingIOError: nothing more yet
            return


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """The options a connection applies by itself."""

    max_message_size: int
    max_message_frames: float  # frames of one incoming message (inf: no limit)
    handshake_timeout: float
    close_timeout: float
    message_rate: float
    message_burst: int
    rate_limit_refusals: int
    rate_limit_window: float
    direct_send: bool  # the fan-out may send to plain sockets itself
    message_limit: MessageLimit = field(init=False)  # shared by every Session
    # Shared by every connection: each keeps its own carry (see wshub.framescan).
    scanner: FrameScanner = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        limit = MessageLimit(
            rate=self.message_rate,
            burst=self.message_burst,
            strike_limit=self.rate_limit_refusals,
            strike_window=self.rate_limit_window,
        )
        object.__setattr__(self, "message_limit", limit)  # frozen: set once, here
        object.__setattr__(self, "scanner", FrameScanner(self.max_message_size))


class ConnectionOwner(Protocol):
    """What a connection tells its owner. Each call is made once per event,
    in the order the events happen on the socket."""

    def on_connect(self, conn: Connection) -> bytes | None:
        """The socket was accepted: None to go on, or the HTTP response that
        refuses it at once (the pre-upgrade caps)."""
        ...

    def on_request(self, conn: Connection, request: http.Request) -> None:
        """A plain HTTP request head (before any upgrade): answer it with
        :meth:`Connection.respond`, or grant the upgrade."""

    def on_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        """The connection refused something itself (a malformed request head,
        the handshake deadline): count it, log it."""

    def on_open(self, conn: Connection) -> None:
        """The upgrade response is written: the connection is OPEN."""

    def on_text(self, conn: Connection, text: str) -> None:
        """A whole text message that passed the rate limit."""

    def on_binary(self, conn: Connection, data: bytes) -> None:
        """A whole binary message that passed the rate limit."""

    def on_rate_limited(self, conn: Connection, *, disconnect: bool) -> None:
        """A data message over the rate limit (dropped); *disconnect*: too
        many of them, close the connection."""

    def on_closing(self, conn: Connection) -> bytes:
        """The connection stops receiving frames (a Close frame is about to
        go out): return what was queued for it, which goes out first."""
        ...

    def on_closed(self, conn: Connection, previous: State) -> None:
        """The socket is gone; *previous* is the state it was in."""


class PlainRelayOwner:
    """An owner that takes a plain relay as the C ingest path gives it
    (:mod:`wshub.ingest`): a base class, not a protocol, so that the
    connection asks with one cheap isinstance() per read."""

    __slots__ = ()

    def on_plain_relays(self, conn: Connection, kinds: bytes, contents: list[bytes]) -> None:
        """Plain relays in a row from one read (a run of scan(): their codes,
        one byte each, and their contents, in order), each past the rate
        limit and the content checks; their contents are JSON-escaped (see
        :func:`protocol.encode_plain_relay`).
        Queuing them must not close *conn*: the connection does not look
        again between them."""
        raise NotImplementedError


class _FrameProtocol(FrameProtocol):
    """The library's sans-I/O protocol, with one correction."""

    def release(self) -> None:
        """End the parser generator: it holds a reference to this protocol
        (its frame's ``self``), a cycle only the cyclic GC would free, and a
        connection that pings now and then makes and drops one per Ping.
        Ended, the protocol is freed by its reference count at once."""
        self.parser.close()

    def holds_nothing(self) -> bool:
        """Open, between frames and messages, nothing to send, no error: the
        same as a protocol just made (see :class:`_IdleLibrary`)."""
        return (
            self.state is FrameState.OPEN
            and self.current_size is None
            and not self.extensions
            and not self.reader.buffer
            and not self.events
            and not self.writes
            and self.parser_exc is None
            and self.close_rcvd is None
            and self.close_sent is None
            and not self.eof_sent
        )

    def recv_frame(self, frame: Frame) -> None:
        # RFC 6455 5.4 lets control frames arrive between the fragments of a
        # message, and a Close ends the connection: the unfinished message is
        # simply dropped. The library fails the connection with 1002 instead
        # ("incomplete fragmented message"); Autobahn case 7.1.5 expects 1000.
        if frame.opcode is _CLOSE and self.current_size is not None:
            self.current_size = None
        super().recv_frame(frame)


class _IdleLibrary:
    """What :attr:`Connection.ws` holds while the library is not needed.

    Most connections never give the library a byte: the common data frame is
    read by :mod:`wshub.framescan`. Yet a library protocol costs ~1.4 KiB (a
    parser generator suspended inside a second one, a stream reader, three
    lists, a UUID for its logs, its attributes: docs/memory.md). So an
    uncompressed connection holds this one shared object, which answers the
    two questions the fast path asks, until a frame needs the library
    (:meth:`Connection._library`), and again once the library holds nothing
    between frames (a client that pings now and then does not keep one). With
    permessage-deflate the library is kept: its inflate context lives there.
    """

    __slots__ = ()
    state = FrameState.OPEN
    current_size = None


_IDLE_LIBRARY = _IdleLibrary()


class _Fragments:
    """A fragmented message being received: made by its first frame, dropped
    with its last, so the connections that never send one (nearly all) do not
    carry its five fields (docs/memory.md)."""

    __slots__ = ("opcode", "refused", "parts", "frames", "decoder")

    def __init__(self, opcode: Opcode, refused: bool, first: bytes) -> None:
        self.opcode = opcode
        self.refused = refused  # over the rate limit: dropped once whole
        # One growing buffer, not a list of fragments: memory follows the
        # bytes received, not the number of (possibly one-byte) fragments.
        self.parts = bytearray(first)
        self.frames = 1
        self.decoder: codecs.IncrementalDecoder | None = (
            _utf8_decoder() if opcode is _TEXT else None
        )


class _Closing:
    """How a connection ends: made when its close begins (a Close sent or
    received, a failure), so an open connection does not carry these three
    fields (docs/memory.md)."""

    __slots__ = ("code", "reason", "received")

    def __init__(self) -> None:
        self.code: int | None = None  # None: no Close either way (1006)
        self.reason = ""
        self.received = 0  # bytes received since the connection began to close


class _HttpPhase:
    """What a connection needs only while it speaks HTTP: from accept to its
    upgrade, or for as long as it serves plain requests. Let go at the
    upgrade, so an open WebSocket does not carry these seven fields
    (docs/memory.md)."""

    __slots__ = ("accepted_at", "held", "body", "refused_body", "in_request", "queued", "served")

    def __init__(self, accepted_at: float) -> None:
        self.accepted_at = accepted_at  # the handshake deadline counts from here
        self.held = False  # the upgrade is granted but waits (see Connection.hold())
        self.body: tuple[http.BodyReader, Callable[[bytes], None]] | None = None  # read_body()
        self.refused_body: Callable[[http.HttpError], bytes] | None = None
        # A request is being answered (an API call may wait for the cluster):
        # what the client pipelines behind it waits in the buffer.
        self.in_request = False
        self.queued = False  # a whole upgrade request waiting for its loop pass
        self.served = 0  # requests answered on this connection with keep-alive


UPGRADES_PER_PASS = 256
"""WebSocket upgrades handled in one loop pass. In a storm of thousands of
connections the loop would otherwise upgrade all that arrived while the last
pass ran, and every newcomer's user_joined would land in one fan-out pass
whose cost grows with the square of its newcomers (each is built the joins
after its own): 5,000 at once held the loop 6.6 s (decisions.md 18). The
rest wait for a later pass, in arrival order; their request came whole, so the
wait is ours and the handshake deadline does not drop them meanwhile (it is
bounded by --max-handshakes all the same). Plain requests (/healthz, /stats, ...) never wait."""


UPGRADES_PER_PASS_BEHIND = 16
"""The cap while the fan-out is behind (a pass did not fit in its time slice
and goes on in the next loop passes): the frames queued meanwhile wait for
that pass to end, and each newcomer among them is built the joins after its
own, so upgrading at full pace while sliced grew one pass to thousands of
newcomers (hundreds of MB, a second of loop). Never zero: upgrades go on."""


def _never() -> bool:
    return False


class _UpgradesPerPass:
    """Counts the upgrades handled in this loop pass; queues those over the
    cap for the next passes."""

    def __init__(self) -> None:
        self.count = 0
        self.waiting: deque[Connection] = deque()
        self.scheduled = False
        self.behind: Callable[[], bool] = _never  # the node's fan-out, see pace_upgrades()

    def cap(self) -> int:
        return UPGRADES_PER_PASS_BEHIND if self.behind() else UPGRADES_PER_PASS

    def admit(self, conn: Connection) -> bool:
        self._schedule(conn.loop)
        if self.count < self.cap() and not self.waiting:
            self.count += 1
            return True
        conn.transport.pause_reading()
        conn._phase().queued = True
        self.waiting.append(conn)
        return False

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._next_pass, loop)

    def _next_pass(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduled = False
        self.count = 0
        waiting = self.waiting
        cap = self.cap()
        while waiting and self.count < cap:
            conn = waiting.popleft()
            conn._phase().queued = False
            if conn._request_again():
                self.count += 1
        if self.count or waiting:
            self._schedule(loop)


_upgrades = _UpgradesPerPass()

KEEP_ALIVE_UNSENT = 256 * 1024
"""Bytes of answers a kept-alive HTTP client may leave unread before it is dropped."""


def pace_upgrades(behind: Callable[[], bool]) -> None:
    """Upgrade fewer per loop pass while *behind()* (the node's fan-out has a
    pass in progress over several loop passes): see UPGRADES_PER_PASS_BEHIND."""
    _upgrades.behind = behind


class Connection(Session, asyncio.Protocol):
    """One client socket, from accept to close.

    It is its own :class:`~wshub.session.Session` (state, last sign of life,
    rate limit: the session's slots are this object's): a session object of
    its own was 80 bytes of every idle connection, 32 of them its header
    (docs/memory.md). :attr:`session` still names that part.
    """

    __slots__ = (
        "owner",
        "settings",
        "loop",
        "transport",
        "peer",
        "ip",
        "origin",
        "id",
        "ws",
        "deflate",
        "pending",
        "joined_at",
        "marked",
        "sealed",
        "gone",
        "is_recipient",
        "audience",
        "room",
        "admitted",
        "opened_at",
        "_buffer",
        "_timer",
        "_fragments",
        "_read_slice",
        "pong",
        "buffered",
        "_failed",
        "scan_carry",
        "_closing",
        "direct_fd",
        "join",
        "identity",
        "_http",
    )

    def __init__(
        self,
        owner: ConnectionOwner,
        settings: ConnectionSettings,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.owner = owner
        self.settings = settings
        self.loop = loop
        self.transport: asyncio.Transport  # set by connection_made(), the first call
        self.peer = ""
        self.ip = ""  # the client address the per-IP limits apply to
        self.origin: str | None = None
        self.id = ConnectionId("")
        self.room = DEFAULT_ROOM  # the room it belongs to once admitted
        self.join: JoinQuery | None = None  # ?since= / ?history= / ?previous= (decisions.md 13)
        self.admitted = False  # holds a slot of the per-IP and node limits
        self.identity: Identity | None = None  # its verified token (None: anonymous)
        now = loop.time()
        self._http: _HttpPhase | None = _HttpPhase(now)  # one float for it and the session
        Session.__init__(self, now, settings.message_limit)
        self.ws: _FrameProtocol | _IdleLibrary | None = None
        self.deflate: Deflate | None = None
        # Fan-out bookkeeping (see wshub.fanout).
        self.pending: list[tuple[int, bytes]] | None = None
        self.joined_at = 0
        self.marked = False
        self.sealed: tuple[list[tuple[int, bytes]] | None, int] | None = None  # the fan-out's
        self.gone = False  # the peer ended the TCP stream without a closing handshake
        self.is_recipient = False
        self.buffered = 0  # unsent bytes in the transport, as the fan-out last saw them
        self.pong: bytes | None = None  # the latest Pong, waiting for the buffer to drain
        self.audience: Audience[Any] | None = None
        self.direct_fd = -1  # the socket's descriptor once the fan-out may send to it
        self.opened_at = 0.0
        self._closing: _Closing | None = None
        self._buffer: bytearray | None = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._fragments: _Fragments | None = None  # a fragmented message being received
        self._read_slice = _READ_SLICE_UNITS  # KiB it may still read before it waits a pass
        self._failed = False  # we failed the connection in this batch of frames
        self.scan_carry: bytes | int = 0  # what a read left for the next (wshub.framescan)

    def _phase(self) -> _HttpPhase:
        """The state of the HTTP phase: only asked for before the upgrade."""
        phase = self._http
        assert phase is not None, "the HTTP phase is over"
        return phase

    @property
    def session(self) -> Session:
        """The connection's session state (this object itself)."""
        return self

    @property
    def close_code(self) -> int | None:
        """The code of the Close that ends the connection; None without one."""
        closing = self._closing
        return None if closing is None else closing.code

    @property
    def close_reason(self) -> str:
        closing = self._closing
        return "" if closing is None else closing.reason

    def _close_state(self) -> _Closing:
        closing = self._closing
        if closing is None:
            closing = self._closing = _Closing()
        return closing

    def _closed_with(self, code: int, reason: str) -> None:
        closing = self._close_state()
        closing.code = code
        closing.reason = reason

    @property
    def requests_served(self) -> int:
        """Requests answered on this connection with keep-alive."""
        phase = self._http
        return 0 if phase is None else phase.served

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is no subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A fixed kernel send buffer instead of Linux's autotuning (up to
            # 4 MiB per socket): what a client that never reads can pin is then
            # this plus --send-buffer-limit, and the limit is reached quickly.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER)
            if self.settings.direct_send and transport.get_extra_info("sslcontext") is None:
                # The fan-out may send to this socket itself while the
                # transport is idle (wshub.fanout, "Direct sends").
                self.direct_fd = sock.fileno()
        # resume_writing() then means "the buffer is empty": the moment a
        # waiting Pong can go (the fan-out ignores pause_writing()).
        self.transport.set_write_buffer_limits(high=0)
        peer = transport.get_extra_info("peername")
        # One string per address, not per connection (interned strings are
        # freed with their last user): many clients share an address behind
        # a NAT or a proxy, and the benchmark's all come from a few.
        self.peer = sys.intern(str(peer[0])) if peer else "unknown"
        self.ip = self.peer
        # Pre-upgrade admission (issue 19.2): a socket that has not finished
        # its upgrade counts toward caps per peer and per node from accept on.
        refusal = self.owner.on_connect(self)
        if refusal is not None:
            # Closed at once (the few bytes fit in the kernel's buffer): a
            # refused socket must not hold a descriptor. Never counted, so
            # nothing to undo: connection_lost() tells no one.
            self.transition(State.CLOSED)
            self._buffer = None
            self.transport.write(refusal)
            if sock is not None and transport.get_extra_info("sslcontext") is None:
                _discard_received(sock.fileno())  # (TLS: its bytes are the TLS layer's)
            self.transport.close()
            return
        self._timer = self.loop.call_later(self.settings.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self._receive_frames(data)
            self._read_slice -= (len(data) >> 10) + 1
            if self._read_slice <= 0:
                self._yield_reading()
            return
        buffer = self._buffer
        if buffer is None:  # an HTTP response is on its way out: ignore the rest
            return
        buffer += data
        phase = self._phase()
        if phase.body is not None:
            self._body_received()
            return
        if phase.held:  # the client spoke first: keep it for after the upgrade
            if len(buffer) > http.MAX_HEAD_SIZE:
                self.abort()
            return
        if phase.in_request:
            # Pipelined behind a request still being answered: stop reading
            # past a head's worth, so a pipeline costs bounded memory.
            if len(buffer) > http.MAX_HEAD_SIZE:
                self.transport.pause_reading()
            return
        self._next_request()
        if self.ws is None and self._buffer is not None and len(self._buffer) > http.MAX_HEAD_SIZE:
            # More than a head waits behind the request just handled (answered
            # at once, a publish or a 401, so never "in request" here): stop
            # reading until the pipeline is served (respond_keep_alive), or a
            # client that pipelines faster than one request a read grows the
            # buffer without bound (8 such clients: +129 MiB).
            self.transport.pause_reading()

    def _next_request(self) -> None:
        """Parse and hand over the request at the start of the buffer, if whole."""
        buffer = self._buffer
        if buffer is None or self._phase().in_request:
            return
        try:
            parsed = http.parse_request_head(buffer)
        except http.HttpError as exc:
            self.owner.on_refused(self, exc.status, http.refusal_reason(exc.status), exc.body)
            self.respond(http.response(exc.status, exc.body, headers=exc.headers))
            return
        if parsed is None:
            return
        request, length = parsed
        # get_all, not get: a repeated Upgrade field is the gateway's 400 to
        # answer (get() raises it here, out of data_received: no answer).
        if request.get_all("upgrade") and not _upgrades.admit(self):
            return  # handled in a later loop pass (see UPGRADES_PER_PASS)
        del buffer[:length]
        self._phase().in_request = True
        self.owner.on_request(self, request)

    def _request_again(self) -> bool:
        """Our upgrade waited for a later loop pass: handle it now (False if
        the connection is gone meanwhile)."""
        buffer = self._buffer
        if buffer is None or self.transport.is_closing():
            return False
        self.transport.resume_reading()
        parsed = http.parse_request_head(buffer)  # it parsed before
        assert parsed is not None
        request, length = parsed
        del buffer[:length]
        self._phase().in_request = True
        self.owner.on_request(self, request)
        return True

    def eof_received(self) -> bool | None:
        if self.ws is not None and self.state is not State.CLOSED:
            ws = self._library()
            if ws.state is FrameState.OPEN:
                # No Close came first: nobody will read what was queued for
                # it (the fan-out builds it nothing, see Fanout.take).
                self.gone = True
            ws.receive_eof()
            self._drain_library_output(ws.data_to_send())
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.direct_fd = -1  # the descriptor is closed (its number may be reused)
        self.pong = None
        previous = self.state
        if previous is not State.CLOSED:
            self.transition(State.CLOSED)
            self.owner.on_closed(self, previous)

    def _yield_reading(self) -> None:
        """This connection had its share of the pass: read it again after
        everyone else had theirs."""
        transport = self.transport
        if transport.is_closing():
            return
        self._read_slice = _READ_SLICE_UNITS
        transport.pause_reading()
        self.loop.call_soon(self._resume_reading)

    def _resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        # The fan-out checks buffer sizes itself after each write.
        pass

    def resume_writing(self) -> None:
        # The buffer drained: the Pong that waited (the latest one) may go.
        pong = self.pong
        if pong is not None:
            self.pong = None
            if self.state is State.OPEN:  # never after our Close
                self._send_pong(pong)

    # -- Writing ----------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> int:
        """Write *data* to the socket (frames, in order); return the bytes
        still unsent after it (the fan-out compares them with
        ``--send-buffer-limit``). Raises what a broken transport raises."""
        transport = self.transport
        transport.write(data)
        return transport.get_write_buffer_size()

    def unsent(self) -> int:
        """Bytes written but not sent yet."""
        return self.transport.get_write_buffer_size()

    # -- HTTP -----------------------------------------------------------------

    def respond(self, response: bytes) -> None:
        """Answer a plain HTTP request and close the connection.

        The response is followed by a FIN, and the socket is kept until the
        client closes its side or the handshake deadline passes (at least a
        second from now): then it is reset, so a client that never reads its
        response holds nothing for long (issue 19.1).
        """
        self._buffer = None
        self._cancel_timer()
        transport = self.transport
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        loop = self.loop
        settings = self.settings
        # The handshake deadline (from accept) bounds the whole exchange; a
        # response sent at the last moment still gets a second to leave.
        phase = self._http
        accepted = phase.accepted_at if phase is not None else loop.time()
        deadline = max(
            accepted + settings.handshake_timeout,
            loop.time() + min(1.0, settings.close_timeout),
        )
        self._timer = loop.call_at(deadline, self.abort)

    def respond_keep_alive(self, response: bytes) -> None:
        """Answer a plain HTTP request and keep the connection for the next
        one (HTTP/1.1 keep-alive; *response* says ``Connection: keep-alive``).

        The next request, head and body, must be whole within the handshake
        deadline from now: that bounds both the idle time and a client that
        sends its request a byte at a time. A client that does not read its
        answers is dropped once they pass :data:`KEEP_ALIVE_UNSENT` bytes.
        """
        if self._buffer is None or self.transport.is_closing():
            return  # gone (or answered and closed) meanwhile
        phase = self._phase()
        phase.in_request = False
        phase.served += 1
        transport = self.transport
        transport.write(response)
        if transport.get_write_buffer_size() > KEEP_ALIVE_UNSENT:
            self.abort()
            return
        self._cancel_timer()
        self._timer = self.loop.call_later(self.settings.handshake_timeout, self._idle_expired)
        if len(self._buffer) <= http.MAX_HEAD_SIZE:
            transport.resume_reading()  # else the pipeline is served first (below)
        if self._buffer:
            # On a later pass: a pipeline of many requests is served request
            # by request between other clients' work, not in one deep call.
            self.loop.call_soon(self._next_request)

    def _idle_expired(self) -> None:
        """A kept-alive connection's deadline for its next request passed."""
        self._timer = None
        if self.ws is not None or self.transport.is_closing():
            return
        phase = self._phase()
        if self._buffer or phase.body is not None or phase.in_request:
            self._handshake_expired()  # a request begun and not finished: as slow as Slowloris
        else:
            self.transport.close()  # idle: a quiet close, nothing to report

    def read_body(
        self,
        reader: http.BodyReader,
        then: Callable[[bytes], None],
        expect_continue: bool,
        *,
        refused: Callable[[http.HttpError], bytes] | None = None,
    ) -> None:
        """Read a request body with *reader* (bounded by the route), then call
        *then* with it. The handshake deadline covers the body too. A body
        refused (too large, malformed) is answered, and the connection closed,
        with ``refused(error)`` when given, else plain text."""
        phase = self._phase()
        phase.body = (reader, then)
        phase.refused_body = refused
        if expect_continue:
            self.transport.write(http.CONTINUE)
        self._body_received()
        if phase.body is not None and not self.transport.is_closing():
            self.transport.resume_reading()  # the rest of the body (reading may be paused)

    def _body_received(self) -> None:
        phase = self._phase()
        assert phase.body is not None
        buffer = self._buffer
        reader, then = phase.body
        if buffer is None:
            return
        try:
            del buffer[: reader.feed(buffer)]
        except http.HttpError as exc:
            phase.body = None
            self.owner.on_refused(self, exc.status, http.refusal_reason(exc.status), exc.body)
            refused = phase.refused_body
            if refused is not None:
                self.respond(refused(exc))
            else:
                self.respond(http.response(exc.status, exc.body + "\n", headers=exc.headers))
            return
        if reader.done:
            phase.body = None
            then(reader.body())

    def hold(self) -> None:
        """The upgrade is granted but its owner is not ready yet (a room
        whose cluster state is being read): keep the connection CONNECTING,
        what the client sends buffered, until :meth:`upgrade`."""
        self._phase().held = True

    def upgrade(
        self,
        owner: ConnectionOwner,
        connection_id: ConnectionId,
        response: bytes,
        extension: PerMessageDeflate | None,
        deflate: Deflate | None,
        now: float,
        *,
        rate_limited: bool = True,
    ) -> None:
        """Switch to WebSocket, with *owner* from now on (the room's hub).

        Without *rate_limited* (the conformance-test endpoint) every data
        frame is accepted."""
        if self.state is not State.CONNECTING or self.transport.is_closing():
            return  # gone while held
        self._cancel_timer()
        self._http = None  # the HTTP phase is over (see _HttpPhase)
        self.owner = owner
        self.id = connection_id
        if not rate_limited:
            self.limit = UNLIMITED  # the session's rate limit: none
        if extension is not None:
            limit = self.settings.max_message_size
            ws = _FrameProtocol(
                Side.SERVER,
                state=FrameState.OPEN,
                # The exact limit is checked on each whole message below. The
                # library gets some slack because with permessage-deflate it
                # checks the compressed size of a frame too, and incompressible
                # data grows a little when deflated.
                max_size=limit + limit // 1000 + 64,
                logger=_frames_logger,
            )
            ws.extensions = [extension]
            self.ws = ws
        else:
            self.ws = _IDLE_LIBRARY  # the library is set up when a frame needs it
        self.deflate = deflate
        self.opened_at = now
        self.opened(now)
        self.transport.write(response)
        leftover = bytes(self._buffer or b"")
        self._buffer = None
        owner.on_open(self)
        if leftover:
            self._receive_frames(leftover)

    def _handshake_expired(self) -> None:
        self._timer = None
        phase = self._http
        if phase is not None and (
            phase.queued
            or (
                phase.in_request
                and phase.body is None
                and not phase.held
                and self._buffer is not None
            )
        ):
            # The request came whole and its answer is on its way (an API
            # call asking the cluster, an upgrade waiting for its loop pass
            # in a storm): the wait is ours, not the client's.
            self._timer = self.loop.call_later(
                self.settings.handshake_timeout, self._handshake_expired
            )
            return
        if self.ws is None and not self.transport.is_closing():
            self.owner.on_refused(self, 408, "handshake_timeout", "handshake deadline passed")
            self.transport.abort()

    # -- Frames in --------------------------------------------------------------

    def _receive_frames(self, data: bytes) -> None:
        """Frames in: the common frame here, every other frame in the library
        (see :mod:`wshub.framescan`)."""
        ws = self.ws
        assert ws is not None
        state = self.state
        if state is State.CLOSED or ws.state is FrameState.CLOSED:
            return
        if state is State.CLOSING:
            # Our Close is out: a client answers it with little more than
            # what was in flight (at most a message). One that keeps sending
            # (a flood we just closed with 1008) would have every frame
            # parsed until --close-timeout. Past a message's worth its bytes
            # are read and dropped unparsed (no memory, little work) until it
            # closes its side or --close-timeout passes; not dropped at once:
            # closing on its unread bytes would make the kernel reset the
            # socket, and the reset can overtake our Close frame.
            closing = self._close_state()
            bound = self.settings.max_message_size + 65536
            if closing.received > bound:
                return
            closing.received += len(data)
            if closing.received > bound:
                # Its answer to our Close, if any, is lost among what we drop:
                # a FIN after our Close tells it the end has come, and its
                # client library then closes its side (eof_received).
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                return
        # Only a whole frame is a sign of life (decisions.md 6): a client that
        # trickles a frame it never finishes must not hold its slot for ever.
        # The read's time is noted first all the same, as the clock of the
        # rate limit (one float for both, docs/memory.md), and taken back
        # below if no frame completed (then nothing was charged at that time).
        previous = self.last_seen
        self.alive(self.loop.time())
        completed = False
        c_scan = ingest.scan
        if (
            c_scan is not None
            and not self.scan_carry
            and isinstance(self.owner, PlainRelayOwner)
            and self._fast_path_open()
        ):
            rest = self._ingest(c_scan, data)
            completed = len(rest) < len(data)  # it takes whole frames only
            data = rest
        try:
            for opcode, chunk in self.settings.scanner.scan(data, self, self._fast_path_open):
                if opcode is None:
                    if self._feed_library(chunk):
                        completed = True
                    continue
                completed = True
                self._receive_data_frame(_TEXT if opcode == 1 else _BINARY, chunk, True)
                if self._failed:  # the library queued our Close frame: send it
                    self._drain_library_output(self._library().data_to_send())
        except MalformedFrame as exc:  # a header the library would misjudge
            self.scan_carry = 0
            if self.state is State.OPEN:
                self._fail(CloseCode.PROTOCOL_ERROR, str(exc))
                self._drain_library_output(self._library().data_to_send())
        ws = self.ws
        if (
            isinstance(ws, _FrameProtocol)
            and not self._failed
            and self.state is State.OPEN
            and not self.scan_carry
            and ws.holds_nothing()
        ):
            ws.release()
            self.ws = _IDLE_LIBRARY  # a control frame set it up: let it go again
        if not completed:
            self.last_seen = previous

    def _ingest(self, c_scan: ingest.Scan, data: bytes) -> bytes:
        """The simple frames at the start of *data* in one C call; returns
        the rest, for the scanner. The same steps, in the same order, as the
        scanner's fast path would take (including asking before each frame
        whether it is still open): only a plain relay skips the str."""
        stop, items = c_scan(data, self.settings.max_message_size, True)
        owner = self.owner
        assert isinstance(owner, PlainRelayOwner)
        # The relays in a row come as one run (src/wshub/_ingest.c) and go
        # to the owner together (one publication, docs/rooms-perf.md
        # "Session 8"), before anything else of the read is answered, so the
        # order is kept. The run is charged to the rate limit at once
        # (admit_many: the same tokens as a call per frame, decisions.md 8);
        # the relays it refuses are charged one by one as before. Queuing
        # relays closes nothing (on_plain_relays), so the "still open?"
        # question after each accepted one had the answer it has after the run.
        for item in items:
            if item[0] == _RUN:
                _, kinds, contents, ends = cast(ingest.Run, item)
                count = len(kinds)
                accepted = self.admit_many(self.last_seen, count)
                if accepted == count:
                    owner.on_plain_relays(self, kinds, contents)
                    continue
                if accepted:
                    owner.on_plain_relays(self, kinds[:accepted], contents[:accepted])
                closed_at = self._refuse_relays(kinds, contents, accepted)
                if closed_at < 0:
                    continue
                # The fast path ended at one of them: the rest after it.
                stop = int.from_bytes(ends[8 * closed_at : 8 * closed_at + 8], "little")
                break
            code, body, end = cast(ingest.Item, item)
            self._receive_data_frame(_TEXT if code == ingest.TEXT else _BINARY, body, True)
            if self._failed:  # the library queued our Close frame: send it
                self._drain_library_output(self._library().data_to_send())
            if not self._fast_path_open():
                stop = end
                break
        return data[stop:] if stop else data

    def _refuse_relays(self, kinds: bytes, contents: list[bytes], first: int) -> int:
        """The relays of a run from *first* on, past the tokens: each charged
        (and refused, or its strike closes the connection) as a frame of its
        own, as :meth:`_receive_data_frame` would. Returns the index of the
        one after which the fast path ended, -1 if it did not."""
        owner = self.owner
        assert isinstance(owner, PlainRelayOwner)
        for i in range(first, len(kinds)):
            verdict = self.admit(self.last_seen)
            if verdict is _ACCEPT:  # not at the same time (no refill): kept exact all the same
                owner.on_plain_relays(self, kinds[i : i + 1], contents[i : i + 1])
                continue
            owner.on_rate_limited(self, disconnect=verdict is Admit.DISCONNECT)
            if self._failed:  # the library queued our Close frame: send it
                self._drain_library_output(self._library().data_to_send())
            if not self._fast_path_open():
                return i
        return -1

    def _fast_path_open(self) -> bool:
        ws = self.ws
        return (
            not self._failed
            and self.state is State.OPEN
            and ws is not None
            and ws.state is FrameState.OPEN
            and ws.current_size is None  # not inside a fragmented message
        )

    def _library(self) -> _FrameProtocol:
        """The connection's library protocol, set up now if it is not yet."""
        ws = self.ws
        assert ws is not None
        if not isinstance(ws, _FrameProtocol):
            ws = self.ws = _FrameProtocol(
                Side.SERVER,
                state=FrameState.OPEN,
                # the exact limit is checked on each whole message
                max_size=self.settings.max_message_size,
                logger=_frames_logger,
            )
        return ws

    def _feed_library(self, data: bytes) -> bool:
        """Give the library *data*; True if a whole frame came of it."""
        # *data* is one frame, or a part of one: the scanner feeds the library
        # frame by frame, so what one step allocates stays bounded (a read of
        # 1-byte fragments would otherwise make ~40,000 Frame objects at once).
        ws = self._library()
        if self.state is State.CLOSED or ws.state is FrameState.CLOSED:
            return False
        ws.receive_data(data)
        events = ws.events_received()
        # The library answered every Ping of this batch already: its output
        # is one Pong per Ping, in order (then a Close, if any). A Pong whose
        # Ping was refused is dropped; the others go to _send_pong, which
        # keeps only the latest one while the client is not reading.
        out = ws.data_to_send()
        pongs = 0
        for frame in cast(list[Frame], events):  # a server side receives frames only
            # Frames parsed before a failure or a Close are processed; after
            # we failed or closed the connection ourselves, the rest is dropped.
            if self._failed or self.state is not State.OPEN:
                break
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                # bytes() of the bytes the library gives is that same object.
                self._receive_data_frame(opcode, bytes(frame.data), frame.fin)
                continue
            # A control frame: charged like a data frame (decisions.md 18),
            # at its read's time (see _receive_data_frame).
            verdict = self.admit(self.last_seen)
            if opcode is _PING:
                pong = out[pongs] if pongs < len(out) else b""
                pongs += 1
                if verdict is _ACCEPT:
                    if pong:
                        self._send_pong(pong)
                    continue
            elif opcode is _CLOSE:
                # Charged, never refused: it ends the connection anyway.
                rcvd = ws.close_rcvd
                if self.close_code is None and rcvd is not None:
                    self._closed_with(rcvd.code, "client: " + rcvd.reason[:64])
                continue
            elif verdict is _ACCEPT:
                continue  # a Pong: a sign of life, noted already
            self.owner.on_rate_limited(self, disconnect=verdict is Admit.DISCONNECT)
        self._drain_library_output(out[pongs:] + ws.data_to_send())
        return bool(events)

    def _send_pong(self, pong: bytes) -> None:
        """Write *pong* now if nothing waits in the buffer; else let it wait
        in the slot, replacing an older one (RFC 6455 5.5.3)."""
        transport = self.transport
        if self.pong is None and not transport.get_write_buffer_size():
            transport.write(pong)
        else:
            self.pong = pong

    def _receive_data_frame(self, opcode: Opcode, data: bytes, fin: bool) -> None:
        owner = self.owner
        if opcode is not _CONT:
            # Charged at the time of its read, which _receive_frames just noted
            # (uvloop's clock moves once a loop pass anyway): the bucket's
            # time and the liveness are then one float, not two (docs/memory.md).
            verdict = self.admit(self.last_seen)
            if verdict is Admit.DISCONNECT:
                owner.on_rate_limited(self, disconnect=True)
                return
            refused = verdict is Admit.REFUSE
            if not fin:
                first = self._fragments = _Fragments(opcode, refused, data)
                if first.decoder is not None:
                    self._check_utf8(first.decoder, data, final=False)
                return
            message = data
        else:
            fragments = self._fragments
            assert fragments is not None  # the library refuses a stray continuation
            # Every frame costs a token, continuations too (decisions.md 8).
            # One over the budget refuses the whole message, answered once at
            # its end: its frames are still read (the stream stays in step),
            # the later ones paid for without adding a strike.
            if fragments.refused:
                self.charge(self.last_seen)
            else:
                verdict = self.admit(self.last_seen)
                if verdict is Admit.DISCONNECT:
                    self._fragments = None
                    owner.on_rate_limited(self, disconnect=True)
                    return
                fragments.refused = verdict is Admit.REFUSE
            fragments.parts += data
            fragments.frames += 1
            if fragments.frames > self.settings.max_message_frames:
                # Bytes alone do not bound the work: empty continuations
                # cost a parse each and add nothing (decisions.md 18).
                self._fragments = None
                self._fail(CloseCode.MESSAGE_TOO_BIG, "message has too many frames")
                return
            if fragments.decoder is not None and not self._check_utf8(
                fragments.decoder, data, final=fin
            ):
                return
            if not fin:
                return
            self._fragments = None
            message = bytes(fragments.parts)
            opcode = fragments.opcode
            refused = fragments.refused
        if len(message) > self.settings.max_message_size:
            self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return
        if refused:
            owner.on_rate_limited(self, disconnect=False)
            return
        if opcode is _BINARY:
            owner.on_binary(self, message)
            return
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
            return
        owner.on_text(self, text)

    def _check_utf8(self, decoder: codecs.IncrementalDecoder, data: bytes, *, final: bool) -> bool:
        """Validate a fragment as it arrives, to fail fast (RFC 6455 8.1)."""
        try:
            decoder.decode(data, final)
        except UnicodeDecodeError:
            self._fragments = None
            self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
            return False
        return True

    def _fail(self, code: CloseCode, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): Close frame, then TCP close."""
        ws = self._library()
        self._failed = True
        if ws.state is FrameState.OPEN:
            self._closed_with(code, reason)
            ws.fail(code, reason)

    def _drain_library_output(self, out: list[bytes]) -> None:
        """Send what the frame library produced: Close frames, EOF (its Pongs
        were taken by _feed_library)."""
        ws = self._library()
        if ws.state is FrameState.OPEN:
            for chunk in out:  # only Pong frames while open
                if chunk:
                    self._send_pong(chunk)
            return
        self.pong = None  # no Pong after a Close
        # Closing or closed: the client sent a Close, or the library failed
        # the connection (1002, 1007, 1009). What was queued for this client
        # in this pass goes first, then the Close frame; then no more data.
        if self.state is State.OPEN:
            if self.close_code is None and ws.close_sent is not None:
                self._closed_with(ws.close_sent.code, ws.close_sent.reason)
            self._leave_fanout()
        eof = False
        for chunk in out:
            if chunk is SEND_EOF or chunk == b"":
                eof = True
            elif chunk[0] & 0x0F != _PONG:  # no Pong after our Close
                self.transport.write(chunk)
        if eof:
            self._close_transport()
        elif self._timer is None and self.state is State.CLOSING:
            self._start_close_timer()

    # -- Closing from our side --------------------------------------------------

    def close(self, disconnect: Disconnect) -> None:
        """Start the closing handshake with *disconnect*'s code and reason.

        Frames already queued for this client go out first; the socket is
        dropped if the client has not finished the handshake within
        ``--close-timeout``.
        """
        ws = self.ws
        if ws is None or self.state is not State.OPEN or ws.state is not FrameState.OPEN:
            return
        self._closed_with(disconnect.code, disconnect.reason)
        self.pong = None  # no Pong after our Close
        ws = self._library()
        ws.send_close(disconnect.code, disconnect.reason)
        self._leave_fanout()
        for chunk in ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
        self._start_close_timer()

    def abort(self) -> None:
        """Drop the socket now, with whatever is still unsent."""
        self._cancel_timer()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:  # already closed
                pass
        self.transport.abort()

    def _close_transport(self) -> None:
        """The closing handshake is over: close once the buffer is sent.

        ``transport.close()`` waits for the write buffer to drain, for ever if
        the client stopped reading: the socket would stay in CLOSING with its
        admission slot and its buffer (issue 19.1). So the abort timer runs
        on (or starts) until the buffer is sent: a client that reads gets
        everything, then the TCP close; one that does not is dropped within
        ``--close-timeout``.

        A client may still be sending: one whose Close we have not read (we
        failed the connection: a frame too big, a protocol error), and one
        that sent its Close and data after it anyway (RFC 6455 5.5.1 says it
        must not; the data is ignored). Closing the socket on its unread
        bytes would make the kernel send a reset, which can reach the client
        before it reads our Close frame (its ``send`` or ``recv`` fails with
        ECONNRESET). So a plain socket gets a half close instead (a FIN once
        the buffer is sent), and what the client still sends is read and
        dropped (:meth:`_receive_frames`) until it closes its side
        (:meth:`eof_received`, one round trip for a client that behaves) or
        the abort timer fires.
        """
        transport = self.transport
        ws = self.ws
        if isinstance(ws, _FrameProtocol) and not self.gone and transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        if self._timer is None:
            self._start_close_timer()

    def _leave_fanout(self) -> None:
        self.transition(State.CLOSING)
        data = self.owner.on_closing(self)
        if data:
            self.transport.write(data)

    def _start_close_timer(self) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(self.settings.close_timeout, self.abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
