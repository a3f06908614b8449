"""A deliberately minimal WebSocket client over a plain socket.

Client libraries refuse to send malformed frames, and the tests need exactly
those: unmasked frames, reserved bits, invalid UTF-8, oversized headers, a
client that never reads. This module writes whatever bytes it is told to and
parses what the server sends back.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

from .conftest import TIMEOUT


class Closed(Exception):
    """The server closed the TCP connection."""


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A client frame; *length* overrides the announced payload length."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + xor(payload, key)


def xor(payload: bytes, key: bytes) -> bytes:
    """*payload* masked (or unmasked) with the 4-byte *key*, as RFC 6455 5.3."""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """Split ``data`` into pieces of the given sizes (cycled), the last one whatever is left."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


class RawClient:
    def __init__(self, host: str, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(), so the advertised window stays small: a
            # client that never reads then stalls the server quickly.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect((host, port))
        except BaseException:
            self.sock.close()
            raise
        self.buffer = b""

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        headers: dict[str, str] | None = None,
        path: str = "/websocket",
        rcvbuf: int | None = None,
    ) -> tuple[RawClient, int, bytes]:
        """Send an upgrade request; return the client, the status, the head."""
        client = cls(host, port, rcvbuf=rcvbuf)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        try:
            client.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = client.read_until(b"\r\n\r\n")
        except BaseException:
            client.close()
            raise
        status = int(head.split(b" ", 2)[1])
        return client, status, head

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Closed()
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes, **kwargs: object) -> None:
        self.send(encode_frame(opcode, payload, **kwargs))  # type: ignore[arg-type]

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(0x1, text.encode() if isinstance(text, str) else text)

    def recv_frame(self) -> tuple[int, bytes, bool]:
        """The next frame from the server: (opcode, payload, rsv1)."""
        first, second = self._take(2)
        assert second & 0x80 == 0, "server frames must not be masked"
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        return first & 0x0F, self._take(n), bool(first & 0x40)

    def recv_close(self) -> tuple[int, str]:
        """Skip data frames until a Close frame; return its code and reason."""
        while True:
            opcode, payload, _ = self.recv_frame()
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode()

    def wait_closed(self, timeout: float = TIMEOUT) -> float:
        """Read until the server closes the socket; return the seconds it took."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            while True:
                self._fill()
                self.buffer = b""
        except (Closed, ConnectionResetError):
            return time.monotonic() - start

    def close(self) -> None:
        self.sock.close()
