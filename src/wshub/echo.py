"""``/echo``: every message sent back as it came, outside every room.

The Autobahn conformance cases run against it (``--echo-endpoint on``); it
shares the connection's WebSocket layer and nothing of the protocol.
"""

from __future__ import annotations

from . import http
from .connection import Connection
from .fanout import Audience, Fanout
from .hub import HubHost
from .session import State
from .wire import OP_BINARY, OP_TEXT
from .wire import frame as wire_frame

__all__ = ["EchoEndpoint"]


class EchoEndpoint:
    """The owner of every /echo connection."""

    def __init__(self, *, host: HubHost, fanout: Fanout[Connection]) -> None:
        self._host = host
        self._fanout = fanout
        # Its connections share no frames: an audience without members.
        self._audience: Audience[Connection] = Audience()

    def on_open(self, conn: Connection) -> None:
        self._host.member_opened(conn)
        self._fanout.joined(self._audience, conn)

    def on_text(self, conn: Connection, text: str) -> None:
        self._echo(conn, OP_TEXT, text.encode("utf-8"))

    def on_binary(self, conn: Connection, data: bytes) -> None:
        self._echo(conn, OP_BINARY, data)

    def _echo(self, conn: Connection, opcode: int, message: bytes) -> None:
        deflate = conn.deflate
        frame = wire_frame(opcode, message) if deflate is None else deflate.frame(opcode, message)
        self._fanout.raw_to_one(conn, frame)

    def on_rate_limited(self, conn: Connection, *, disconnect: bool) -> None:
        raise AssertionError("/echo is not rate limited")

    def on_closing(self, conn: Connection) -> bytes:
        data = self._fanout.take(conn)
        self._host.member_closing(conn)
        return data

    def on_closed(self, conn: Connection, previous: State) -> None:
        self._fanout.forget(conn)
        self._host.member_closed(conn, previous)

    def on_connect(self, conn: Connection) -> bytes | None:
        raise AssertionError("a connection is accepted by the gateway")

    def on_request(self, conn: Connection, request: http.Request) -> None:
        raise AssertionError("an upgraded connection makes no HTTP request")

    def on_refused(self, conn: Connection, status: int, reason: str, detail: str) -> None:
        self._host.member_refused(conn, status, reason, detail)
