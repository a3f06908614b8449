"""wshub.fanout: an audience's direct-ready roster, kept as members join,
leave, close and change state, and the pass that hands it to the C send path
and handles only the exceptions it reports.

``send_ready`` is a stand-in here that answers as the C function does (it is
tested itself against real sockets in tests/test_directsend.py): these tests
are about what the engine keeps and what it does with the answers.
"""

from __future__ import annotations

from wshub.fanout import CHUNK, NOT_A_RECIPIENT, OWN_SHARE, Fanout
from wshub.wire import Deflate, text_frame

from .test_fanout import Conn, Loop, Room, make
from .test_fanout_slices import Ticking


class ReadySends:
    """``send_ready`` as the C function answers: skips the non-recipients,
    reports a share of their own, leaves a busy transport or a closed socket
    to the writer, sends to the rest (at most ``accepts[name]`` bytes)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.calls = 0
        self.accepts: dict[str, int] = {}

    def __call__(self, ready: list, data: bytes, start: int, stop: int) -> list | None:
        self.calls += 1
        left = []
        for i in range(start, stop):
            conn = ready[i]
            if not conn.is_recipient:
                left.append((i, NOT_A_RECIPIENT))
            elif conn.sealed is not None:
                left.append((i, OWN_SHARE))
            elif conn.direct_fd < 0 or conn.transport.get_write_buffer_size():
                left.append((i, 0))
            else:
                sent = min(len(data), self.accepts.get(conn.name, len(data)))
                self.sent.append((conn.name, data[:sent]))
                if sent < len(data):
                    left.append((i, sent))
        return left or None

    def received(self, conn: Conn) -> bytes:
        return b"".join(data for name, data in self.sent if name == conn.name)


def direct(name: str, backlog: int = 0, deflate: Deflate | None = None) -> Conn:
    conn = Conn(name, backlog=backlog, deflate=deflate)
    conn.direct_fd = 3  # never used as one: send_ready is a stand-in
    return conn


def everything(sends: ReadySends, conn: Conn) -> bytes:
    return sends.received(conn) + b"".join(bytes(data) for data in conn.transport.writes)


def test_the_roster_a_member_joins_depends_on_its_compression_and_socket() -> None:
    plain, compressed, tls = direct("plain"), direct("deflate", deflate=Deflate(15)), Conn("tls")
    room, _, _, _ = make([plain, compressed, tls], send_ready=ReadySends())
    assert list(room.audience.ready) == [plain]
    assert list(room.audience.others) == [compressed, tls]


def test_without_the_c_extension_everyone_is_in_the_python_roster() -> None:
    a, b = direct("a"), direct("b")
    room, _, _, _ = make([a, b], send_ready=None)
    assert not room.audience.ready and list(room.audience.others) == [a, b]


def test_leaving_takes_a_member_out_and_an_empty_roster_holds_nothing() -> None:
    a, b, c = direct("a"), direct("b"), Conn("c")
    room, _, _, _ = make([a, b, c], send_ready=ReadySends())
    room.leave(a)
    assert list(room.audience.ready) == [b]
    room.leave(b)
    room.leave(c)
    # the shared empty tuple again, not two empty dicts per idle audience
    assert room.audience.ready == () and room.audience.others == ()
    room.fanout.dismiss(room.audience, c)  # twice: nothing happens


def test_the_c_call_sends_to_the_ready_and_python_writes_only_the_others() -> None:
    a, b, c = direct("a"), direct("b"), direct("c", deflate=Deflate(15))
    sends = ReadySends()
    room, loop, _, _ = make([a, b, c], send_ready=sends)
    room.to_all(b"1")
    room.to_all(b"2")
    loop.run()
    common = text_frame(b"1") + text_frame(b"2")
    assert sends.sent == [("a", common), ("b", common)] and sends.calls == 1
    assert a.transport.writes == b.transport.writes == []
    assert c.transport.writes == [common]  # too small to compress: the same bytes
    fanout = room.fanout
    assert fanout.writes == 3 and fanout.direct_sends == 2 and fanout.deliveries == 6


def test_the_sender_and_a_member_with_private_frames_get_their_own_share() -> None:
    sender, private, plain = direct("sender"), direct("private"), direct("plain")
    sends = ReadySends()
    room, loop, _, _ = make([sender, private, plain], send_ready=sends)
    room.to_all(b"1", exclude=sender)
    room.fanout.to_one(private, b"err")
    room.to_all(b"2")
    loop.run()
    one, two = text_frame(b"1"), text_frame(b"2")
    assert sends.sent == [("plain", one + two)]  # the others were reported back
    assert sender.transport.writes == [two]
    assert private.transport.writes == [one + text_frame(b"err") + two]
    assert room.fanout.direct_sends == 1 and room.fanout.deliveries == 5


def test_a_member_joined_mid_pass_gets_only_what_was_queued_after() -> None:
    a, late = direct("a"), direct("late")
    sends = ReadySends()
    room, loop, _, _ = make([a], send_ready=sends)
    room.to_all(b"before")
    room.add(late)
    room.to_all(b"after")
    loop.run()
    assert everything(sends, a) == text_frame(b"before") + text_frame(b"after")
    assert everything(sends, late) == text_frame(b"after")


def test_a_busy_transport_is_written_through_its_writer_and_may_be_slow() -> None:
    keeps_up, busy, full = direct("keeps_up"), direct("busy", backlog=10), direct("full", 5000)
    sends = ReadySends()
    room, loop, slow, _ = make([keeps_up, busy, full], limit=1000, send_ready=sends)
    room.to_all(b"x")
    loop.run()
    frame = text_frame(b"x")
    assert sends.sent == [("keeps_up", frame)]
    assert busy.transport.writes == [frame] and full.transport.writes == [frame]
    assert slow == [full]  # over its limit after that write: 1008, as before
    assert room.fanout.buffered_total == 5010 and room.fanout.direct_sends == 1


def test_a_partial_send_leaves_the_rest_to_the_writer() -> None:
    a, b = direct("a"), direct("b")
    sends = ReadySends()
    sends.accepts["a"] = 3
    room, loop, _, _ = make([a, b], send_ready=sends)
    room.to_all(b"hello world")
    loop.run()
    frame = text_frame(b"hello world")
    assert [bytes(data) for data in a.transport.writes] == [frame[3:]]
    assert everything(sends, a) == frame and everything(sends, b) == frame
    assert room.fanout.writes == 2 and room.fanout.direct_sends == 1


def test_a_failed_write_closes_one_and_the_others_still_get_theirs() -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise RuntimeError("transport gone")

        def get_write_buffer_size(self) -> int:
            return 1  # busy: send_ready leaves it to the writer

    a, b, c = direct("a"), direct("b"), direct("c")
    b.transport = Broken()  # type: ignore[assignment]
    sends = ReadySends()
    loop = Loop()
    failed: list[Conn] = []
    room: Room

    def on_failed(conn: Conn, exc: BaseException) -> None:
        failed.append(conn)
        room.leave(conn)  # the node closes it at once: the roster shrinks mid-pass

    fanout = Fanout(
        loop,  # type: ignore[arg-type]
        send_buffer_limit=1000,
        on_slow_consumer=lambda conn: None,
        on_send_failed=on_failed,
        send_each=None,
        send_ready=sends,
    )
    room = Room(fanout, [a, b, c])
    room.to_all(b"x")
    loop.run()
    assert failed == [b]
    assert sends.sent == [("a", text_frame(b"x")), ("c", text_frame(b"x"))]
    assert list(room.audience.ready) == [a, c] and fanout.writes == 2


def sliced(n: int):  # noqa: ANN201
    """*n* direct members and a Fanout whose slice ends after every chunk."""
    loop = Loop()
    sends = ReadySends()
    conns = [direct(f"c{i}") for i in range(n)]
    fanout = Fanout(
        loop,  # type: ignore[arg-type]
        send_buffer_limit=1 << 20,
        on_slow_consumer=lambda conn: None,
        on_send_failed=lambda conn, exc: None,
        send_each=None,
        send_ready=sends,
        slice_seconds=0.5,
        clock=Ticking(),
    )
    return Room(fanout, conns), loop, conns, sends


def test_a_long_pass_over_the_ready_roster_is_time_sliced() -> None:
    room, loop, members, sends = sliced(2 * CHUNK + 5)
    ready = list(members)
    others = [Conn("tls0"), Conn("tls1")]
    for conn in others:
        room.add(conn)
    room.to_all(b"m1")
    loop.run()
    assert len(sends.sent) == CHUNK and sends.calls == 1  # one chunk, then the slice ran out
    passes = 1
    while loop.callbacks:
        loop.run()
        passes += 1
    # three chunks of the ready ones (a look at the clock after each), then the others
    assert passes == 4
    frame = text_frame(b"m1")
    assert all(sends.received(conn) == frame for conn in ready)
    assert all(conn.transport.writes == [frame] for conn in others)
    assert room.fanout.deliveries == len(ready) + len(others)


def test_a_ready_member_closing_mid_pass_gets_its_share_once() -> None:
    room, loop, conns, sends = sliced(2 * CHUNK + 5)
    written, waiting = conns[0], conns[-1]
    room.to_all(b"m1")
    loop.run()  # the first chunk only
    room.to_all(b"m2")
    m1, m2 = text_frame(b"m1"), text_frame(b"m2")
    assert room.fanout.take(waiting) == m1 + m2  # not reached yet: both
    assert room.fanout.take(written) == m2
    for conn in (written, waiting):
        room.leave(conn)
    while loop.callbacks:
        loop.run()
    assert sends.received(written) == m1 and waiting.transport.writes == []
    assert sends.received(waiting) == b""
    assert everything(sends, conns[1]) == m1 + m2 and everything(sends, conns[-2]) == m1 + m2


def test_a_compressed_member_is_never_in_the_ready_roster() -> None:
    """The roster is chosen at admit(): deflate is negotiated before the
    connection opens, so a deflate member goes to the Python loop, whose
    compressed copy it needs."""
    big = b"compress me " * 40
    a, b = direct("a"), direct("b", deflate=Deflate(15))
    sends = ReadySends()
    room, loop, _, _ = make([a, b], limit=1 << 20, send_ready=sends)
    room.to_all(big)
    loop.run()
    assert sends.sent == [("a", text_frame(big))]
    assert b.transport.writes == [Deflate(15).text_frame(big)]
