"""The parts of ``websockets``' sans-I/O layer that wshub.connection leans on
beyond its documented API, checked so an upgrade that changes them fails here
first (pyproject.toml also caps websockets below its next major version).

Used by wshub.connection: ``Protocol(side, state=, max_size=, logger=)``; the
attributes ``current_size`` (bytes of the fragmented message being received,
None outside one), ``close_rcvd``, ``close_sent``, ``extensions``, ``state``;
``recv_frame(frame)``, called once per parsed frame (wshub overrides it);
``receive_data``, ``receive_eof``, ``events_received``, ``data_to_send`` (one
Pong per Ping, in order, before a Close; ``SEND_EOF`` to close the socket);
``fail`` and ``send_close``.
"""

from __future__ import annotations

import inspect
import logging

from websockets.frames import Close, Frame, Opcode
from websockets.protocol import SEND_EOF, Protocol, Side, State

from wshub.connection import _FrameProtocol

from ..rawws import encode_frame


def server(cls: type[Protocol] = Protocol) -> Protocol:
    return cls(Side.SERVER, state=State.OPEN, max_size=1024, logger=logging.getLogger("t"))


def test_constructor_and_attributes() -> None:
    params = inspect.signature(Protocol.__init__).parameters
    for name in ("side", "state", "max_size", "logger"):
        assert name in params, name
    ws = server()
    assert ws.state is State.OPEN
    assert ws.current_size is None and ws.close_rcvd is None and ws.close_sent is None
    assert ws.extensions == []
    assert SEND_EOF == b""


def test_recv_frame_is_called_once_per_frame() -> None:
    seen: list[Opcode] = []

    class Recording(Protocol):
        def recv_frame(self, frame: Frame) -> None:
            seen.append(frame.opcode)
            super().recv_frame(frame)

    assert list(inspect.signature(Protocol.recv_frame).parameters) == ["self", "frame"]
    ws = server(Recording)
    ws.receive_data(encode_frame(0x1, b"a", fin=False) + encode_frame(0x9, b"p"))
    ws.receive_data(encode_frame(0x0, b"b"))
    assert seen == [Opcode.TEXT, Opcode.PING, Opcode.CONT]
    assert [e.opcode for e in ws.events_received()] == seen


def test_current_size_follows_a_fragmented_message() -> None:
    ws = server()
    ws.receive_data(encode_frame(0x1, b"abc", fin=False))
    assert ws.current_size == 3
    ws.receive_data(encode_frame(0x0, b"de", fin=False))
    assert ws.current_size == 5
    ws.receive_data(encode_frame(0x0, b"f"))
    assert ws.current_size is None


def test_one_pong_per_ping_in_order_then_the_close_and_eof() -> None:
    ws = server()
    ws.receive_data(
        encode_frame(0x9, b"1") + encode_frame(0x9, b"") + encode_frame(0x8, b"\x03\xe8bye")
    )
    out = ws.data_to_send()
    assert [chunk[0] & 0x0F for chunk in out[:3]] == [0xA, 0xA, 0x8]
    assert out[0][2:] == b"1" and out[-1] == SEND_EOF
    assert ws.close_rcvd == Close(1000, "bye") and ws.state is State.CLOSING


def test_fail_and_send_close_queue_a_close_frame() -> None:
    ws = server()
    ws.fail(1009, "too big")
    assert ws.close_sent == Close(1009, "too big") and ws.state is State.CLOSING
    assert ws.data_to_send()[0][:2] == b"\x88\x09"
    ws2 = server()
    ws2.send_close(1001, "bye")
    assert ws2.close_sent == Close(1001, "bye")


def test_wshub_override_lets_a_close_end_a_fragmented_message() -> None:
    """Autobahn 7.1.5: the library alone fails with 1002; wshub's subclass
    drops the unfinished message and echoes the Close (1000)."""
    plain, ours = server(), server(_FrameProtocol)
    data = encode_frame(0x1, b"a", fin=False) + encode_frame(0x8, b"\x03\xe8")
    for ws in (plain, ours):
        ws.receive_data(data)
    assert plain.close_sent is not None and plain.close_sent.code == 1002
    assert ours.close_sent is not None and ours.close_sent.code == 1000
