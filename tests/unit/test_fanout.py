"""wshub.fanout: order, exclusions and one write per connection per pass.

The engine's seam is the recipient's writer: these tests give it recipients
that record their writes, and a loop whose call_soon they run by hand.
"""

from __future__ import annotations

from wshub.fanout import Audience, Fanout
from wshub.wire import Deflate, text_frame


class Transport:
    def __init__(self, backlog: int = 0) -> None:
        self.writes: list[bytes] = []
        self.backlog = backlog

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.backlog


class Conn:
    """A recipient whose writer records what it is given."""

    def __init__(self, name: str, deflate: Deflate | None = None, backlog: int = 0) -> None:
        self.name = name
        self.pending = None
        self.joined_at = 0
        self.marked = False
        self.sealed = None
        self.gone = False
        self.is_recipient = True
        self.audience = None
        self.direct_fd = -1
        self.deflate = deflate
        self.transport = Transport(backlog)
        self.buffered = 0
        self.aborted = False

    def write(self, data) -> int:
        self.transport.write(data)
        return self.transport.get_write_buffer_size()

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    def abort(self) -> None:
        self.aborted = True
        self.transport.backlog = 0


class Room:
    """An audience over a list of recipients, every one joined to it."""

    def __init__(self, fanout: Fanout, conns: list[Conn]) -> None:
        self.fanout, self.conns = fanout, conns
        self.audience = Audience()
        for conn in conns:
            self.add(conn)

    def add(self, conn: Conn) -> None:
        """What a hub does when *conn* opens."""
        if conn not in self.conns:
            self.conns.append(conn)
        self.fanout.joined(self.audience, conn)
        self.fanout.admit(self.audience, conn)

    def leave(self, conn: Conn) -> None:
        """What a hub does when *conn* leaves (after take())."""
        self.conns.remove(conn)
        conn.is_recipient = False
        self.fanout.dismiss(self.audience, conn)

    def to_all(self, payload: bytes, exclude: Conn | None = None, *, urgent: bool = True) -> None:
        self.fanout.to_all(self.audience, payload, exclude, urgent=urgent)


class Handle:
    def __init__(self, loop: Loop, callback) -> None:
        self.loop, self.callback, self.cancelled = loop, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self.callbacks: list = []
        self.timers: list[tuple[float, Handle]] = []

    def call_soon(self, callback) -> None:
        self.callbacks.append(callback)

    def call_later(self, delay: float, callback) -> Handle:
        handle = Handle(self, callback)
        self.timers.append((delay, handle))
        return handle

    def fire_timers(self) -> None:
        timers, self.timers = self.timers, []
        for _, handle in timers:
            if not handle.cancelled:
                handle.callback()

    def run(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


def make(conns: list[Conn], limit: int = 1000, send_each=None, total: int = 0, send_ready=None):
    loop = Loop()
    slow: list[Conn] = []
    failed: list[tuple[Conn, BaseException]] = []
    fanout = Fanout(
        loop,  # type: ignore[arg-type]
        send_buffer_limit=limit,
        send_buffer_total=total,
        on_slow_consumer=slow.append,
        on_send_failed=lambda c, e: failed.append((c, e)),
        send_each=send_each,
        send_ready=send_ready,
    )
    room = Room(fanout, conns)
    return room, loop, slow, failed


def test_one_write_per_connection_per_pass() -> None:
    a, b = Conn("a"), Conn("b")
    room, loop, _, _ = make([a, b])
    for i in range(5):
        room.to_all(f"m{i}".encode())
    assert len(loop.callbacks) == 1  # scheduled once
    loop.run()
    expected = b"".join(text_frame(f"m{i}".encode()) for i in range(5))
    assert a.transport.writes == [expected] and b.transport.writes == [expected]
    assert a.transport.writes[0] is b.transport.writes[0]  # the same bytes object
    assert room.fanout.deliveries == 10 and room.fanout.writes == 2


def test_exclusion_and_private_frames_keep_order() -> None:
    a, b = Conn("a"), Conn("b")
    room, loop, _, _ = make([a, b])
    room.to_all(b"1")
    room.fanout.to_one(a, b"private")
    room.to_all(b"2", exclude=a)
    room.to_all(b"3")
    loop.run()
    assert a.transport.writes == [text_frame(b"1") + text_frame(b"private") + text_frame(b"3")]
    assert b.transport.writes == [text_frame(b"1") + text_frame(b"2") + text_frame(b"3")]
    assert not a.marked and a.pending is None  # reset for the next pass


def test_an_audience_between_passes_holds_no_lists_of_its_own() -> None:
    # Every idle room's audience shares one empty placeholder (docs/memory.md):
    # the next pass, a private frame first, still gets everything in order.
    a, b = Conn("a"), Conn("b")
    room, loop, _, _ = make([a, b])
    other, other_loop, _, _ = make([Conn("c")])
    room.to_all(b"1")
    loop.run()
    audience = room.audience
    queues = (audience.frames, audience.excluded, audience.marked)
    assert all(queue == () for queue in queues)
    assert audience.frames is other.audience.frames  # shared, not one per audience
    room.fanout.to_one(b, b"private")  # marks b before any shared frame
    room.to_all(b"2", exclude=a)
    room.fanout.control_to_all(audience, b"\x89\x00")
    loop.run()
    assert a.transport.writes == [text_frame(b"1"), b"\x89\x00"]
    assert b.transport.writes == [
        text_frame(b"1"),
        text_frame(b"private") + text_frame(b"2") + b"\x89\x00",
    ]
    assert other.audience.frames == () and other_loop.callbacks == []  # untouched


def test_newcomer_gets_nothing_queued_before_it() -> None:
    a = Conn("a")
    room, loop, _, _ = make([a])
    room.to_all(b"before")
    b = Conn("b")
    room.add(b)
    room.fanout.to_one(b, b"welcome")
    room.to_all(b"joined", exclude=b)
    room.to_all(b"after")
    loop.run()
    assert b.transport.writes == [text_frame(b"welcome") + text_frame(b"after")]
    assert a.transport.writes == [
        text_frame(b"before") + text_frame(b"joined") + text_frame(b"after")
    ]


def test_take_hands_over_what_was_promised() -> None:
    a, b = Conn("a"), Conn("b")
    room, loop, _, _ = make([a, b])
    room.to_all(b"1")
    room.fanout.to_one(a, b"err")
    assert room.fanout.take(a) == text_frame(b"1") + text_frame(b"err")
    room.leave(a)
    room.to_all(b"2")
    loop.run()
    assert a.transport.writes == []
    assert b.transport.writes == [text_frame(b"1") + text_frame(b"2")]


def test_private_only_pass_writes_only_to_them() -> None:
    a, b = Conn("a"), Conn("b")
    room, loop, _, _ = make([a, b])
    room.fanout.to_one(a, b"pong")
    loop.run()
    assert a.transport.writes == [text_frame(b"pong")] and b.transport.writes == []


def test_audiences_share_a_pass_but_not_their_frames() -> None:
    """Two rooms in one pass: one flush, each member gets its own room's frames."""
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    room, loop, _, _ = make([a, b])
    other = Room(room.fanout, [c])
    room.to_all(b"to ab")
    other.to_all(b"to c")
    room.fanout.to_one(c, b"private c")
    room.to_all(b"again ab")
    assert len(loop.callbacks) == 1
    loop.run()
    assert (
        a.transport.writes == b.transport.writes == [text_frame(b"to ab") + text_frame(b"again ab")]
    )
    assert c.transport.writes == [text_frame(b"to c") + text_frame(b"private c")]
    assert room.fanout.deliveries == 5 and room.fanout.writes == 3


def test_slow_consumers_are_reported_after_the_pass() -> None:
    a, b = Conn("a", backlog=5000), Conn("b")
    room, loop, slow, _ = make([a, b], limit=1000)
    room.to_all(b"x")
    loop.run()
    assert slow == [a]
    assert b.transport.writes == [text_frame(b"x")]


def test_deflate_compresses_once_per_window() -> None:
    import zlib

    d = Deflate(15)
    a, b, c = Conn("a", d), Conn("b", d), Conn("c")
    room, loop, _, _ = make([a, b, c])
    big = b"y" * 1000
    room.to_all(big)
    loop.run()
    assert a.transport.writes[0] is b.transport.writes[0]
    frame = a.transport.writes[0]
    assert frame[0] == 0xC1  # FIN + RSV1 + text
    assert c.transport.writes == [text_frame(big)]
    header = 2 if frame[1] < 126 else 4
    assert zlib.decompressobj(wbits=-15).decompress(frame[header:] + b"\x00\x00\xff\xff") == big


def test_presence_waits_for_company_and_rides_along_with_urgent_frames() -> None:
    a, b = Conn("a"), Conn("b")
    room, loop, _, _ = make([a, b])
    room.to_all(b"joined-1", urgent=False)
    room.to_all(b"joined-2", urgent=False)
    assert loop.callbacks == [] and len(loop.timers) == 1  # one timer, no flush yet
    loop.fire_timers()
    assert a.transport.writes == [text_frame(b"joined-1") + text_frame(b"joined-2")]
    room.to_all(b"joined-3", urgent=False)
    room.to_all(b"message")  # urgent: flushes at once, the join first
    loop.run()
    assert b.transport.writes[-1] == text_frame(b"joined-3") + text_frame(b"message")
    loop.fire_timers()  # the join's timer was cancelled: nothing more
    assert len(b.transport.writes) == 2


class Broken(Transport):
    def write(self, data: bytes) -> None:
        raise RuntimeError("transport is closed")


def test_a_broken_transport_is_reported_and_the_others_still_get_theirs() -> None:
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    b.transport = Broken()
    room, loop, _, failed = make([a, b, c])
    room.to_all(b"x")
    loop.run()
    assert [conn for conn, _ in failed] == [b] and isinstance(failed[0][1], RuntimeError)
    assert a.transport.writes == c.transport.writes == [text_frame(b"x")]
    assert room.fanout.writes == 2


class DirectSends:
    """Stands in for ``wshub._directsend.send_each``: records what it was
    given and answers as told (the C function itself is tested against real
    sockets in tests/test_directsend.py)."""

    def __init__(self, left: list[tuple[int, int]] | None = None) -> None:
        self.calls: list[tuple[list[str], bytes]] = []
        self.left = left

    def __call__(self, outs: list, data: bytes) -> list[tuple[int, int]] | None:
        self.calls.append(([conn.name for conn in outs], data))
        return self.left


def direct_conn(name: str, transport: Transport | None = None, backlog: int = 0) -> Conn:
    conn = Conn(name, backlog=backlog)
    if transport is not None:
        conn.transport = transport
    conn.direct_fd = 3  # never used as one: send_each is a stand-in
    return conn


def test_direct_recipients_go_in_one_call_the_others_through_their_writers() -> None:
    a, b, c, d = direct_conn("a"), direct_conn("b"), Conn("c"), direct_conn("d")
    e = direct_conn("e")
    e.deflate = Deflate(15)
    sends = DirectSends()
    room, loop, _, _ = make([a, b, c, d, e], send_each=sends)
    room.to_all(b"1")
    room.fanout.to_one(b, b"private")
    room.to_all(b"2")
    loop.run()
    common = text_frame(b"1") + text_frame(b"2")
    # One call for the common bytes, in recipient order; one for the
    # compressed copy (these frames are too small to compress, so equal).
    assert sends.calls == [(["a", "d"], common), (["e"], common)]
    assert a.transport.writes == d.transport.writes == e.transport.writes == []
    # A marked connection gets bytes of its own, one without a socket the
    # common bytes: through their writers, as before.
    assert b.transport.writes == [text_frame(b"1") + text_frame(b"private") + text_frame(b"2")]
    assert c.transport.writes == [common]
    fanout = room.fanout
    assert fanout.writes == 5 and fanout.direct_sends == 3 and fanout.deliveries == 10


def test_compressed_direct_recipients_get_their_window_sizes_copy() -> None:
    big = b"compress me " * 40
    a, b, c = direct_conn("a"), direct_conn("b"), direct_conn("c")
    b.deflate, c.deflate = Deflate(15), Deflate(9)
    sends = DirectSends()
    room, loop, _, _ = make([a, b, c], limit=1 << 20, send_each=sends)
    room.to_all(big)
    loop.run()
    assert sends.calls == [
        (["a"], text_frame(big)),
        (["b"], Deflate(15).text_frame(big)),
        (["c"], Deflate(9).text_frame(big)),
    ]


def test_what_a_direct_send_left_goes_through_the_writer() -> None:
    a, b = direct_conn("a"), direct_conn("b", backlog=5000)
    c, d = direct_conn("c", transport=Broken()), direct_conn("d")
    sends = DirectSends(left=[(0, 3), (1, 0), (2, 0)])
    room, loop, slow, failed = make([a, b, c, d], send_each=sends)
    room.to_all(b"hello world")
    loop.run()
    frame = text_frame(b"hello world")
    assert [bytes(data) for data in a.transport.writes] == [frame[3:]]  # the rest of a partial send
    assert b.transport.writes == [frame]  # nothing went out: all of it
    assert slow == [b]  # over its limit after that write
    assert [conn for conn, _ in failed] == [c]
    assert d.transport.writes == []  # sent directly
    assert room.fanout.writes == 3 and room.fanout.direct_sends == 1


# -- the node-wide bound (send_buffer_total, decisions.md 18) -----------------


def test_the_node_budget_closes_the_connections_holding_the_most() -> None:
    """Each under its own limit, together over the node's: the biggest go, in
    order, until the rest fit; a client that keeps up is never touched."""
    conns = [Conn("a", backlog=300), Conn("b", backlog=500), Conn("c", backlog=400), Conn("d")]
    room, loop, slow, _ = make(conns, limit=1000, total=600)
    room.to_all(b'{"n":1}')
    loop.run()
    assert [c.name for c in slow] == ["b", "c"]  # 1200 - 500 - 400 = 300 <= 600
    assert room.fanout.buffered_total == 1200  # what they hold until they are gone
    assert room.fanout.held == {conns[0], conns[1], conns[2]}


def test_the_budget_is_the_nodes_across_rooms() -> None:
    """Two rooms, each under the bound alone: together over it, the biggest
    holder goes, whichever room it is in."""
    a, b = Conn("a", backlog=400), Conn("b", backlog=500)
    room, loop, slow, _ = make([a], limit=1000, total=600)
    other = Room(room.fanout, [b])
    room.to_all(b'{"n":1}')
    other.to_all(b'{"n":2}')
    loop.run()
    assert slow == [b] and room.fanout.buffered_total == 900


def test_connections_already_closing_are_dropped_first_when_still_over() -> None:
    conns = [Conn("a", backlog=300), Conn("b", backlog=500), Conn("c", backlog=400)]
    room, loop, slow, _ = make(conns, limit=1000, total=800)
    room.to_all(b'{"n":1}')
    loop.run()
    assert [c.name for c in slow] == ["b"]  # 1200 - 500 = 700 <= 800
    for conn in slow:
        conn.is_recipient = False  # what the node does when it closes them
    room.to_all(b'{"n":2}')
    loop.run()
    # the node was still over (a, b and c hold 1200): b (the biggest of those
    # closing) is dropped, which is enough; nobody else is closed
    assert [c.name for c in conns if c.aborted] == ["b"]
    assert [c.name for c in slow] == ["b"]
    assert room.fanout.buffered_total == 700 and room.fanout.budget_drops == 1


def test_a_stale_sum_is_counted_again_before_anyone_is_closed() -> None:
    """The sum sees a buffer drain only at the next write: over the bound on
    paper, the fan-out counts again and closes no one if the node is under."""
    a, b = Conn("a", backlog=600), Conn("b", backlog=600)
    room, loop, slow, _ = make([a, b], limit=1000, total=1000)
    room.fanout.raw_to_one(a, b"x")
    loop.run()
    a.transport.backlog = 0  # drained meanwhile, unseen
    room.fanout.raw_to_one(b, b"y")
    loop.run()
    assert slow == [] and room.fanout.buffered_total == 600 and room.fanout.held == {b}
    room.fanout.forget(b)  # its socket is gone
    assert room.fanout.buffered_total == 0 and room.fanout.held == set()


def test_clients_that_keep_up_cost_no_bookkeeping() -> None:
    conns = [Conn(str(i)) for i in range(10)]
    room, loop, _, _ = make(conns, limit=1000, total=100)
    for n in range(3):
        room.to_all(b'{"n":%d}' % n)
        loop.run()
    assert room.fanout.buffered_total == 0 and room.fanout.held == set()
