"""The TLS handshake of an accepted socket, counted from the accept on.

Handing the listening socket an ``ssl`` context makes the event loop run the
TLS handshake before the server's protocol hears of the socket: the caps on
sockets that have not finished their upgrade (``--max-handshakes-per-ip``,
``--max-handshakes``, the file descriptor budget; issue 19.2) would only begin
once the handshake is done, and a client that opens thousands of sockets and
never sends a ClientHello would hold each (a descriptor and ~50 KB) for the
whole handshake deadline, whatever its address's cap.

So the port listens in plain TCP, and :class:`TlsAccept` is its protocol: at
the accept it asks the :class:`HandshakeSlots` owner for a slot (refused: the
socket is closed at once, since no HTTP status can be said before TLS), runs
the handshake with ``loop.start_tls`` under the handshake deadline, gives the
slot back, and hands the TLS transport to a new connection, which counts
itself from there as a plain socket does from its accept. What the TLS layer
delivers between the handshake's end and the handoff is held by
:class:`_Handoff` and passed on in order.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Protocol, cast

__all__ = ["HandshakeSlots", "TlsAccept", "TlsAccepts"]

log = logging.getLogger("wshub")

_MAX_EARLY_BYTES = 64 * 1024
"""Most bytes taken before the TLS layer reads the socket (a ClientHello is
one TLS record, at most ~16 KiB, and a client sends nothing before it is
answered)."""


class HandshakeSlots(Protocol):
    """The pre-upgrade caps, as the TLS accept uses them."""

    def begin_tls(self, peer: str) -> bool:
        """Count a socket from *peer* as unfinished; False: refused (and counted so)."""
        ...

    def end_tls(self, peer: str) -> None:
        """The TLS handshake of a socket from *peer* is over (done or failed)."""
        ...


class _Handoff(asyncio.Protocol):
    """The protocol of the TLS transport until the connection takes it over:
    holds data, EOF and loss, then passes each on, in order, once *target* is set."""

    def __init__(self) -> None:
        self.target: asyncio.Protocol | None = None
        self._held: list[Callable[[asyncio.Protocol], object]] = []

    def _event(self, event: Callable[[asyncio.Protocol], object]) -> object:
        if self.target is not None:
            return event(self.target)
        self._held.append(event)
        return None

    def data_received(self, data: bytes) -> None:
        self._event(lambda target: target.data_received(data))

    def eof_received(self) -> None:
        # Under TLS the answer is ignored: the transport closes after an EOF.
        self._event(lambda target: target.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._event(lambda target: target.connection_lost(exc))

    def hand_over(self, target: asyncio.Protocol) -> None:
        self.target = target
        held, self._held = self._held, []
        for event in held:
            event(target)


class TlsAccepts:
    """The TLS accepts of one listening port: their protocol factory, and the
    handshakes in progress (cancelled when the server stops)."""

    def __init__(
        self,
        slots: HandshakeSlots,
        context: Callable[[], ssl.SSLContext],
        connection: Callable[[], asyncio.Protocol],
        *,
        handshake_timeout: float,
        shutdown_timeout: float,
    ) -> None:
        self.slots = slots
        self.context = context
        self.connection = connection
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> TlsAccept:
        return TlsAccept(self)

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class TlsAccept(asyncio.Protocol):
    """One accepted socket until its TLS handshake is over."""

    __slots__ = ("_accepts", "_early", "_transport")

    def __init__(self, accepts: TlsAccepts) -> None:
        self._accepts = accepts
        self._early = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is no subclass of asyncio.Transport).
        stream = self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"
        accepts = self._accepts
        if not accepts.slots.begin_tls(address):
            stream.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(stream, address))
        accepts.tasks.add(task)
        task.add_done_callback(accepts.tasks.discard)
        # The loop starts reading once this returns, and the task's first
        # step (where start_tls takes the transport over) comes a loop pass
        # later: the first bytes of the ClientHello may reach data_received
        # below meanwhile. This runs right after that step, before the TLS
        # protocol starts its handshake (start_tls schedules that next), and
        # gives it those bytes first.
        asyncio.get_running_loop().call_soon(self._hand_over_early_bytes, stream)

    def data_received(self, data: bytes) -> None:
        self._early += data
        if len(self._early) > _MAX_EARLY_BYTES and self._transport is not None:
            self._transport.abort()  # its handshake fails, and the slot is given back

    def _hand_over_early_bytes(self, transport: asyncio.Transport) -> None:
        early, self._early = self._early, bytearray()
        tls = transport.get_protocol()
        if not early or tls is self:
            return  # nothing came early, or the handshake never began (cancelled)
        # The TLS protocol reads as a buffered protocol (asyncio's and
        # uvloop's; uvloop's is no registered subclass of BufferedProtocol).
        buffered = cast(asyncio.BufferedProtocol, tls)
        view = memoryview(early)
        while view:
            buffer = memoryview(buffered.get_buffer(len(view))).cast("B")
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            buffered.buffer_updated(size)
            view = view[size:]

    async def _handshake(self, transport: asyncio.Transport, peer: str) -> None:
        accepts = self._accepts
        handoff = _Handoff()
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                transport,
                handoff,
                accepts.context(),  # the certificate loaded now (SIGHUP swaps it)
                server_side=True,
                ssl_handshake_timeout=accepts.handshake_timeout,
                ssl_shutdown_timeout=accepts.shutdown_timeout,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception:
            # A handshake that failed or timed out: the loop has closed the
            # TLS transport; the plain one goes too (nothing was served).
            transport.abort()
            return
        finally:
            accepts.slots.end_tls(peer)
        if tls_transport is None or tls_transport.is_closing():
            handoff.hand_over(asyncio.Protocol())  # lost meanwhile: no one to tell
            return
        connection = accepts.connection()
        tls_transport.set_protocol(connection)
        connection.connection_made(tls_transport)
        handoff.hand_over(connection)
