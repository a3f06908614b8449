"""Tools for the reliability tests and ``scripts/soak``.

* process introspection of a running server: resident memory (``VmRSS``) and
  open file descriptors, read from ``/proc``;
* :class:`Watchers`: a pair of clients that exchange sequenced messages, the
  "nothing lost" probe used around every bad input and fault;
* :class:`AsyncWs`: a light asyncio WebSocket client (an ``asyncio.Protocol``
  over a plain socket) for hundreds or thousands of connections in one
  process, with an optional "count bytes only" mode after the ``welcome``.

Everything here talks to 127.0.0.0/8 only, and every wait has an upper bound.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

# -- /proc --------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of *pid* in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of *pid*."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], p: float) -> float:
    """The *p*-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


# -- the "nothing lost" probe -------------------------------------------------


class Watchers:
    """Two clients of *server* exchanging sequenced messages.

    :meth:`exchange` sends *n* numbered messages each way and checks that each
    side receives exactly the other's, in order, with nothing else relayed in
    between (joins, leaves and heartbeats are skipped but recorded, so a test
    can ask what the watchers heard about a misbehaving client).
    """

    def __init__(self, server) -> None:  # noqa: ANN001 - tests.conftest.Server
        self.server = server
        self.a = server.client()
        self.b = server.client()
        self.serial = 0
        self.events: list[dict] = []
        self.relayed: list[dict] = []  # any message/broadcast not from the exchange
        # b's arrival is heard by a.
        self._expect_joined(self.a, self.b.id)

    def _expect_joined(self, client, conn_id: str) -> None:  # noqa: ANN001
        while True:
            message = client.recv()
            self.events.append(message)
            if message["type"] == "user_joined" and message["connectionId"] == conn_id:
                return

    @property
    def ids(self) -> set[str]:
        return {self.a.id, self.b.id}

    def exchange(self, n: int = 20) -> None:
        base = self.serial
        self.serial += n
        for i in range(base, base + n):
            self.a.send({"type": "message", "content": f"a{i}"})
            self.b.send({"type": "message", "content": f"b{i}"})
        for receiver, prefix in ((self.b, "a"), (self.a, "b")):
            got: list[str] = []
            while len(got) < n:
                message = receiver.recv()
                if (
                    message["type"] == "message"
                    and message["content"].startswith(prefix)
                    and message["connectionId"] in self.ids
                ):
                    got.append(message["content"])
                elif message["type"] in ("message", "broadcast"):
                    self.relayed.append(message)
                else:
                    self.events.append(message)
            assert got == [f"{prefix}{i}" for i in range(base, base + n)], got

    def heard(self, kind: str, conn_id: str) -> int:
        return sum(1 for e in self.events if e["type"] == kind and e.get("connectionId") == conn_id)

    def close(self) -> None:
        self.a.close()
        self.b.close()


# -- a light asyncio WebSocket client ---------------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    key = os.urandom(4)
    return header + key + _mask(payload, key)


class HandshakeRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"upgrade answered {status}")
        self.status = status


class AsyncWs(asyncio.Protocol):
    """One client connection. Text messages go to *on_text* (with the
    connection) or, without it, to :attr:`inbox`. Pings are answered, a Close
    is echoed. With ``count_only``, everything after the first text message
    (the ``welcome``) is only counted in :attr:`bytes_received`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str = "/websocket",
        on_text: Callable[[AsyncWs, bytes], None] | None = None,
        count_only: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.host, self.port, self.path = host, port, path
        self.on_text = on_text
        self.count_only = count_only
        self.headers = headers or {}
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[dict] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.buffer = bytearray()
        self.upgraded = False
        self.welcome: dict | None = None
        self.close_code: int | None = None
        self.close_sent = False
        self.bytes_received = 0
        self.status = 0
        _open.add(self)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # uvloop sets it already, and refuses setsockopt on its sockets
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self.count_only and self.welcome is not None:
            return
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            self.status = int(head.split(b" ", 2)[1])
            if self.status != 101:
                if not self.opened.done():
                    self.opened.set_exception(HandshakeRefused(self.status))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
        self._parse()

    def _parse(self) -> None:
        buf = self.buffer
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            n = second & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            self._frame(first & 0x0F, payload)
            if self.count_only and self.welcome is not None:
                pos = size
                break
        del buf[:pos]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            if self.welcome is None:
                self.welcome = json.loads(payload)
                if not self.opened.done():
                    self.opened.set_result(self.welcome)
                return
            if self.on_text is not None:
                self.on_text(self, payload)
            else:
                self.inbox.put_nowait(payload)
        elif opcode == 0x9:
            self._write(client_frame(0xA, payload))
        elif opcode == 0x8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if not self.close_sent:
                self.close_sent = True
                self._write(client_frame(0x8, payload[:2]))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before welcome: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code or 1006)

    # API
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, text: str | bytes) -> None:
        self._write(client_frame(0x1, text.encode() if isinstance(text, str) else text))

    def send_json(self, obj: dict) -> None:
        self.send_text(json.dumps(obj))

    async def recv(self, timeout: float) -> dict:
        return json.loads(await asyncio.wait_for(self.inbox.get(), timeout))

    async def close(self, code: int = 1000, timeout: float = 5.0) -> int:
        """Closing handshake: send Close, wait for the server's; drop after *timeout*."""
        if not self.close_sent and self.transport is not None and not self.transport.is_closing():
            self.close_sent = True
            self._write(client_frame(0x8, struct.pack("!H", code)))
        try:
            return await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.abort()
            return await self.closed

    def abort(self) -> None:
        """Drop the socket without a closing handshake (RST)."""
        if self.transport is not None:
            self.transport.abort()


_open: weakref.WeakSet[AsyncWs] = weakref.WeakSet()


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run *coro* on uvloop (as the server does) when available; whatever
    happens, drop every :class:`AsyncWs` connection it left open."""

    async def guarded() -> Any:
        try:
            return await coro
        finally:
            for ws in list(_open):
                ws.abort()

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(guarded())
    return uvloop.run(guarded())


async def ws_connect(
    host: str,
    port: int,
    *,
    timeout: float = 10.0,
    local_addr: tuple[str, int] | None = None,
    **kwargs: object,
) -> AsyncWs:
    """Open a connection and wait for its ``welcome``."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: AsyncWs(host, port, **kwargs),  # type: ignore[arg-type]
            host,
            port,
            local_addr=local_addr,
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(proto.opened), timeout)
    except BaseException:
        proto.abort()
        raise
    return proto


def raise_nofile(n: int) -> None:
    """Raise this process's open-file limit (children inherit it) to *n*,
    or as far as the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(n, hard) if hard != resource.RLIM_INFINITY else n
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
