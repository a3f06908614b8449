"""wshub.fanout: a pass longer than its time slice goes on in the next loop
passes (decisions.md 18), and no recipient's frames change order.

The clock is passed in: every read advances it one second, the slice is half
a second, so each loop pass writes exactly one chunk of recipients.
"""

from __future__ import annotations

from wshub.fanout import BATCH_FRAMES, CHUNK, Fanout
from wshub.wire import Deflate, text_frame

from .test_fanout import Conn, Loop, Room


class Ticking:
    """A clock that moves one second at every read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make(n: int, deflate: Deflate | None = None):  # noqa: ANN201
    loop = Loop()
    slow: list[Conn] = []
    conns = [Conn(f"c{i}", deflate=deflate) for i in range(n)]
    fanout = Fanout(
        loop,  # type: ignore[arg-type]
        send_buffer_limit=1 << 20,
        on_slow_consumer=slow.append,
        on_send_failed=lambda c, e: None,
        send_each=None,
        slice_seconds=0.5,
        clock=Ticking(),
    )
    return Room(fanout, conns), loop, conns


def received(conn: Conn) -> bytes:
    return b"".join(conn.transport.writes)


def test_a_long_pass_is_written_over_several_loop_passes() -> None:
    room, loop, conns = make(3 * CHUNK + 10)
    room.to_all(b"m1")
    loop.run()
    written = [c for c in conns if c.transport.writes]
    assert written == conns[:CHUNK]  # one chunk, then the slice ran out
    assert len(loop.callbacks) == 1  # and it goes on in the next loop pass
    passes = 1
    while loop.callbacks:
        loop.run()
        passes += 1
    assert passes == 4
    assert all(c.transport.writes == [text_frame(b"m1")] for c in conns)
    assert room.fanout.slices == 3
    assert room.fanout.deliveries == len(conns)
    assert room.fanout.pass_seconds_max == 2.0  # one slice: two clock reads apart


def test_frames_queued_meanwhile_come_after_the_batch_for_everyone() -> None:
    room, loop, conns = make(2 * CHUNK + 5)
    early, late = conns[0], conns[-1]
    room.to_all(b"m1")
    loop.run()  # the first chunk has m1; the rest wait
    room.fanout.to_one(late, b"private-late")
    room.fanout.to_one(early, b"private-early")
    room.to_all(b"m2", exclude=conns[1])
    room.to_all(b"m3")
    while loop.callbacks:
        loop.run()
    m1, m2, m3 = (text_frame(m) for m in (b"m1", b"m2", b"m3"))
    assert received(late) == m1 + text_frame(b"private-late") + m2 + m3
    assert received(early) == m1 + text_frame(b"private-early") + m2 + m3
    assert received(conns[1]) == m1 + m3
    for conn in conns[2:-1]:
        assert received(conn) == m1 + m2 + m3
    assert all(c.sealed is None and not c.marked and c.pending is None for c in conns)


def test_marked_connections_sealed_in_a_batch_keep_their_order() -> None:
    room, loop, conns = make(2 * CHUNK)
    last = conns[-1]
    room.to_all(b"m1")
    room.fanout.to_one(last, b"private")  # between m1 and m2, for the last one only
    room.to_all(b"m2", exclude=last)
    room.to_all(b"m3")
    while loop.callbacks:
        loop.run()
    m1, m2, m3 = (text_frame(m) for m in (b"m1", b"m2", b"m3"))
    assert received(last) == m1 + text_frame(b"private") + m3
    assert received(conns[0]) == m1 + m2 + m3


def test_a_connection_closing_mid_batch_takes_its_unwritten_share() -> None:
    room, loop, conns = make(2 * CHUNK + 5)
    written, waiting = conns[0], conns[-1]
    room.to_all(b"m1")
    loop.run()
    room.to_all(b"m2")
    m1, m2 = text_frame(b"m1"), text_frame(b"m2")
    # Not reached yet: m1 and m2; reached already: m2 only.
    assert room.fanout.take(waiting) == m1 + m2
    assert room.fanout.take(written) == m2
    for conn in (written, waiting):
        room.leave(conn)
    while loop.callbacks:
        loop.run()
    assert written.transport.writes == [m1]
    assert waiting.transport.writes == []
    assert received(conns[1]) == m1 + m2 and received(conns[-2]) == m1 + m2


def test_a_connection_gone_mid_batch_is_skipped() -> None:
    room, loop, conns = make(2 * CHUNK + 5)
    gone = conns[-1]
    room.to_all(b"m1")
    loop.run()
    room.leave(gone)
    while loop.callbacks:
        loop.run()
    assert gone.transport.writes == []
    assert received(conns[-2]) == text_frame(b"m1")


def test_a_newcomer_mid_batch_gets_only_what_was_queued_after_it() -> None:
    room, loop, conns = make(2 * CHUNK + 5)
    last = conns[-1]
    room.to_all(b"m1")
    loop.run()
    newcomer = Conn("new")
    room.add(newcomer)
    room.to_all(b"joined", exclude=newcomer)
    room.to_all(b"m2")
    while loop.callbacks:
        loop.run()
    assert received(newcomer) == text_frame(b"m2")
    assert received(last) == text_frame(b"m1") + text_frame(b"joined") + text_frame(b"m2")


def test_compressed_recipients_get_each_batch_compressed_once() -> None:
    room, loop, conns = make(2 * CHUNK + 5, deflate=Deflate(15))
    room.to_all(b"m1" * 50)
    loop.run()
    room.to_all(b"m2" * 50)
    while loop.callbacks:
        loop.run()
    first = conns[0].transport.writes
    last = conns[-1].transport.writes
    assert len(first) == len(last) == 2
    assert first[0] is last[0]  # the batch's compressed bytes, shared across slices
    assert first[1] is last[1]


def test_a_pass_within_its_slice_is_one_loop_pass() -> None:
    loop = Loop()
    conns = [Conn(f"c{i}") for i in range(CHUNK - 1)]
    fanout = Fanout(
        loop,  # type: ignore[arg-type]
        send_buffer_limit=1 << 20,
        on_slow_consumer=lambda c: None,
        on_send_failed=lambda c, e: None,
        send_each=None,
        slice_seconds=0.5,
        clock=Ticking(),
    )
    room = Room(fanout, conns)
    room.to_all(b"m1")
    loop.run()
    assert not loop.callbacks and fanout.slices == 0
    assert all(c.transport.writes == [text_frame(b"m1")] for c in conns)


def test_a_connection_whose_peer_is_gone_is_built_nothing() -> None:
    room, loop, conns = make(2 * CHUNK + 5)
    gone, taken = conns[-1], conns[-2]
    room.to_all(b"m1")
    loop.run()  # gone and taken are not reached yet
    room.to_all(b"m2")
    gone.gone = True
    assert room.fanout.take(gone) == b""
    assert room.fanout.take(taken) == text_frame(b"m1") + text_frame(b"m2")
    for conn in (gone, taken):
        room.leave(conn)
    while loop.callbacks:
        loop.run()
    assert gone.transport.writes == [] and taken.transport.writes == []
    assert received(conns[0]) == text_frame(b"m1") + text_frame(b"m2")


def test_more_than_a_batch_of_frames_goes_over_several_loop_passes_in_order() -> None:
    """10,000 clients leaving at once queued 1.1 MB of user_left for each member:
    in one write, more than --send-buffer-limit, and a bystander that read
    everything was closed 1008. At most BATCH_FRAMES go per loop pass."""
    loop = Loop()
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    fanout = Fanout(
        loop,  # type: ignore[arg-type]
        send_buffer_limit=1 << 20,
        on_slow_consumer=lambda conn: None,
        on_send_failed=lambda conn, e: None,
        send_each=None,
    )
    room = Room(fanout, [a, b])
    total = 2 * BATCH_FRAMES + 10
    expected: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    for i in range(total):
        payload = f"m{i}".encode()
        if i == BATCH_FRAMES + 5:
            room.add(c)  # a newcomer after the first cut gets what follows only
            room.fanout.to_one(c, b"welcome")
            expected["c"].append(text_frame(b"welcome"))
        if i == BATCH_FRAMES - 1 or i == BATCH_FRAMES + 1:
            fanout.to_one(a, f"private{i}".encode())  # on both sides of the cut
            expected["a"].append(text_frame(f"private{i}".encode()))
        exclude = b if i in (3, BATCH_FRAMES + 2) else None
        room.to_all(payload, exclude=exclude)
        for conn in (a, b, c):
            if conn is not exclude and (conn is not c or i >= BATCH_FRAMES + 5):
                expected[conn.name].append(text_frame(payload))
    loop.run()
    assert len(a.transport.writes) == 1 and len(a.transport.writes[0]) < 8 * BATCH_FRAMES + 64
    assert c.transport.writes == []  # joined after the first batch's frames
    passes = 1
    while loop.callbacks:
        loop.run()
        passes += 1
    assert passes == 3
    for conn in (a, b, c):
        assert received(conn) == b"".join(expected[conn.name]), conn.name
        assert conn.sealed is None and not conn.marked and conn.pending is None
