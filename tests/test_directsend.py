"""wshub._directsend.send_each against real sockets.

Every test runs on both paths of the sends (``send_path``): io_uring (a
chunk's sends in one io_uring_enter) and send(2) one by one; their answers
must be the same. Each target is a stand-in for a connection (``send_each`` reads its
``transport`` and ``direct_fd``), its transport too (only ``is_closing`` and
``get_write_buffer_size`` are asked of it); the sockets are real, so what
arrives, what is refused and what a full or broken socket does are the
kernel's answers.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc

import pytest

# The test install has a C compiler: a build that silently fell back to the
# pure-Python path must fail here, not pass unnoticed.
from wshub._directsend import send_each, send_path, send_ready, use_io_uring

from .waiting import wait_until


@pytest.fixture(autouse=True, params=["io_uring", "send"])
def path(request):
    """Each test on each path (this machine's kernel has io_uring)."""
    use_io_uring(request.param == "io_uring")
    assert send_path()[0] == request.param, send_path()
    yield request.param
    use_io_uring(True)


class Transport:
    def __init__(self, closing: bool = False, queued: int = 0) -> None:
        self.closing = closing
        self.queued = queued
        self.asked = 0

    def is_closing(self) -> bool:
        self.asked += 1
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.queued


class Target:
    """What send_each reads of a connection: two slots, as on Connection."""

    __slots__ = ("transport", "direct_fd")

    def __init__(self, transport: object, direct_fd: object) -> None:
        self.transport = transport
        self.direct_fd = direct_fd


@pytest.fixture
def pairs():
    made: list[tuple[socket.socket, socket.socket]] = []

    def make(n: int, sndbuf: int | None = None) -> list[tuple[socket.socket, socket.socket]]:
        for _ in range(n):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            if sndbuf is not None:
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
            made.append((ours, theirs))
        return made[-n:]

    yield make
    for ours, theirs in made:
        ours.close()
        theirs.close()


def received(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_every_idle_socket_gets_the_bytes_and_none_is_returned(pairs) -> None:
    made = pairs(5)
    outs = [Target(Transport(), ours.fileno()) for ours, _ in made]
    assert send_each(outs, b"frame bytes") is None
    assert [received(theirs) for _, theirs in made] == [b"frame bytes"] * 5


def test_a_closing_or_busy_transport_is_left_to_the_caller(pairs) -> None:
    (a, ta), (b, tb), (c, tc) = pairs(3)
    outs = [
        Target(Transport(closing=True), a.fileno()),
        Target(Transport(), b.fileno()),
        Target(Transport(queued=10), c.fileno()),
    ]
    assert send_each(outs, b"x") == [(0, 0), (2, 0)]
    assert (received(ta), received(tb), received(tc)) == (b"", b"x", b"")


def test_a_full_socket_reports_how_much_went_out(pairs) -> None:
    ((ours, theirs),) = pairs(1, sndbuf=4096)
    data = bytes(range(256)) * 4096  # 1 MiB: far more than the buffers hold
    left = send_each([Target(Transport(), ours.fileno())], data)
    assert left is not None and len(left) == 1
    index, sent = left[0]
    assert index == 0 and 0 < sent < len(data)
    # Nothing more fits: the next attempt sends nothing and says so.
    assert send_each([Target(Transport(), ours.fileno())], data[sent:]) == [(0, 0)]
    assert received(theirs) == data[:sent]


def test_a_broken_socket_is_reported_without_sigpipe(pairs) -> None:
    (a, ta), (b, tb) = pairs(2)
    ta.close()  # the peer is gone: send() fails with EPIPE, not a signal
    outs = [Target(Transport(), a.fileno()), Target(Transport(), b.fileno())]
    assert send_each(outs, b"after") == [(0, 0)]
    assert received(tb) == b"after"


def test_an_empty_list_sends_nothing() -> None:
    assert send_each([], b"x") is None


@pytest.mark.parametrize(
    "args",
    [
        (),
        ([],),
        ((), b"x"),
        ([], "text"),
        ([], bytearray(b"x")),
        ([(Transport(), 3)], b"x"),  # a tuple, as before: no longer taken
        (["no attributes"], b"x"),
        ([Target(Transport(), "3")], b"x"),
        ([Target(Transport(), -1)], b"x"),
        ([Target(Transport(), 1 << 40)], b"x"),
    ],
)
def test_bad_arguments_raise_instead_of_crashing(args) -> None:
    with pytest.raises((TypeError, ValueError, OverflowError, AttributeError)):
        send_each(*args)


def test_a_transport_that_raises_is_handed_back_and_the_others_still_get_theirs(pairs) -> None:
    class Broken(Transport):
        def get_write_buffer_size(self) -> int:
            raise RuntimeError("transport bug")

    (a, ta), (b, tb), (c, tc) = pairs(3)
    outs = [
        Target(Transport(), a.fileno()),
        Target(Broken(), b.fileno()),
        Target(Transport(), c.fileno()),
    ]
    assert send_each(outs, b"x") == [(1, 0)]  # the caller's transport.write() meets the fault
    assert (received(ta), received(tb), received(tc)) == (b"x", b"", b"x")


def test_an_interrupt_in_a_transport_is_not_swallowed(pairs) -> None:
    class Interrupted(Transport):
        def is_closing(self) -> bool:
            raise KeyboardInterrupt

    ((a, _),) = pairs(1)
    with pytest.raises(KeyboardInterrupt):
        send_each([Target(Interrupted(), a.fileno())], b"x")


def test_many_sockets_in_several_chunks(pairs) -> None:
    made = pairs(200)  # more than one chunk of checks and sends
    outs = [Target(Transport(queued=i % 7 == 0), ours.fileno()) for i, (ours, _) in enumerate(made)]
    assert send_each(outs, b"z") == [(i, 0) for i in range(200) if i % 7 == 0]
    assert [received(theirs) for _, theirs in made] == [
        b"" if i % 7 == 0 else b"z" for i in range(200)
    ]


def test_a_list_changed_by_a_transport_is_refused(pairs) -> None:
    (a, _), (b, _) = pairs(2)
    outs: list = []

    class Meddling(Transport):
        def is_closing(self) -> bool:
            outs.clear()
            return False

    outs.extend([Target(Meddling(), a.fileno()), Target(Transport(), b.fileno())])
    with pytest.raises(RuntimeError, match="changed size"):
        send_each(outs, b"x")


def test_no_reference_is_leaked(pairs) -> None:
    made = pairs(3)
    transport = Transport(queued=1)  # every one comes back: the result list is built
    outs = [Target(transport, ours.fileno()) for ours, _ in made]
    data = b"y" * 100

    def run(times: int) -> None:
        for _ in range(times):
            assert send_each(outs, data) == [(0, 0), (1, 0), (2, 0)]

    run(100)
    before = sys.getrefcount(transport), sys.getrefcount(data), sys.getrefcount(outs[0])
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run(20_000)
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert (sys.getrefcount(transport), sys.getrefcount(data), sys.getrefcount(outs[0])) == before
    # One leaked (index, sent) pair per call would be ~1 MiB here.
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 20,000 calls"


# -- send_ready: an audience's ready roster, the exceptions reported ----------


class Member:
    """What send_ready reads of a connection: four slots, as on Connection."""

    __slots__ = ("transport", "direct_fd", "sealed", "is_recipient")

    def __init__(self, transport: object, direct_fd: int, sealed=None, recipient=True) -> None:
        self.transport = transport
        self.direct_fd = direct_fd
        self.sealed = sealed
        self.is_recipient = recipient


def test_send_ready_sends_to_the_range_and_reports_only_the_exceptions(pairs) -> None:
    made = pairs(7)
    fds = [ours.fileno() for ours, _ in made]
    ready = [
        Member(Transport(), fds[0]),  # outside the range: untouched
        Member(Transport(), fds[1]),
        Member(Transport(), fds[2], sealed=([], 0)),  # a share of its own
        Member(Transport(), fds[3], recipient=False),  # closing: skipped
        Member(Transport(queued=5), fds[4]),  # busy: the writer's
        Member(Transport(), -1),  # its socket is gone: the writer's
        Member(Transport(closing=True), fds[6]),
    ]
    assert send_ready(ready, b"frame", 1, 7) == [(2, -1), (3, -2), (4, 0), (5, 0), (6, 0)]
    assert [received(theirs) for _, theirs in made] == [b"", b"frame"] + [b""] * 5
    # Only the ones it meant to send to had their transports asked.
    assert [member.transport.asked for member in ready] == [0, 1, 0, 0, 1, 0, 1]


def test_send_ready_in_several_chunks_and_a_full_socket(pairs) -> None:
    made = pairs(150)
    ready = [Member(Transport(), ours.fileno()) for ours, _ in made]
    assert send_ready(ready, b"z", 0, 150) is None
    assert all(received(theirs) == b"z" for _, theirs in made)
    ((ours, theirs),) = pairs(1, sndbuf=4096)
    data = bytes(range(256)) * 4096
    left = send_ready([Member(Transport(), ours.fileno())], data, 0, 1)
    assert left is not None and left[0][0] == 0 and 0 < left[0][1] < len(data)
    assert received(theirs) == data[: left[0][1]]


@pytest.mark.parametrize(
    "args",
    [
        ([], b"x", 0),
        ((), b"x", 0, 0),
        ([], "x", 0, 0),
        ([], b"x", 0, 1),
        ([], b"x", -1, 0),
        ([Member(Transport(), 3)], b"x", 1, 0),
        (["no attributes"], b"x", 0, 1),
        ([Member(Transport(), "3")], b"x", 0, 1),  # type: ignore[arg-type]
    ],
)
def test_send_ready_bad_arguments_raise_instead_of_crashing(args) -> None:
    with pytest.raises((TypeError, ValueError, IndexError, AttributeError)):
        send_ready(*args)


def test_send_ready_leaks_no_reference(pairs) -> None:
    made = pairs(3)
    transport = Transport(queued=1)
    ready = [Member(transport, ours.fileno()) for ours, _ in made]
    data = b"y" * 100
    before = sys.getrefcount(transport), sys.getrefcount(data), sys.getrefcount(ready[0])
    for _ in range(20_000):
        assert send_ready(ready, data, 0, 3) == [(0, 0), (1, 0), (2, 0)]
    assert (sys.getrefcount(transport), sys.getrefcount(data), sys.getrefcount(ready[0])) == before


def test_send_ready_reads_slots_and_anything_else_alike(pairs) -> None:
    """Slots are read at their offsets (known per type); a property, a plain
    attribute, a slot left unset or a type changed since go through getattr."""

    class Plain:  # no slots: attributes in a dict
        def __init__(self, transport: object, fd: int) -> None:
            self.transport, self.direct_fd, self.sealed, self.is_recipient = (
                transport,
                fd,
                None,
                True,
            )

    class Sealed:  # slots, but sealed a property
        __slots__ = ("transport", "direct_fd", "is_recipient")

        def __init__(self, transport: object, fd: int) -> None:
            self.transport, self.direct_fd, self.is_recipient = transport, fd, True

        @property
        def sealed(self) -> tuple[list, int]:
            return ([], 0)

    (a, ta), (b, tb), (c, tc) = pairs(3)
    ready = [
        Member(Transport(), a.fileno()),
        Plain(Transport(), b.fileno()),
        Sealed(Transport(), c.fileno()),
    ]
    assert send_ready(ready, b"x", 0, 3) == [(2, -1)]
    assert (received(ta), received(tb), received(tc)) == (b"x", b"x", b"")
    unset = Member(Transport(), a.fileno())
    del unset.sealed
    with pytest.raises(AttributeError):
        send_ready([Member(Transport(), a.fileno()), unset], b"x", 0, 2)

    class Changing(Member):
        __slots__ = ()

    member = Changing(Transport(), a.fileno())
    assert send_ready([member], b"y", 0, 1) is None  # its offsets are known now
    Changing.sealed = property(lambda self: ([], 0))  # type: ignore[assignment]
    assert send_ready([member], b"z", 0, 1) == [(0, -1)]
    assert received(ta) == b"y"  # the refused call sent nothing


# -- the paths themselves: many sockets, order, failures, fallback -------------


def test_runs_of_sends_keep_each_socket_in_order(pairs) -> None:
    made = pairs(100)  # chunks of 64 and 36 sends
    outs = [Target(Transport(), ours.fileno()) for ours, _ in made]
    frames = [b"frame %03d;" % i for i in range(50)]
    for frame in frames:
        assert send_each(outs, frame) is None
    assert all(received(theirs) == b"".join(frames) for _, theirs in made)


def test_a_full_socket_among_many_reports_its_own_share(pairs) -> None:
    made = pairs(8)
    ((small, small_peer),) = pairs(1, sndbuf=4096)
    outs = [Target(Transport(), ours.fileno()) for ours, _ in made]
    outs.insert(3, Target(Transport(), small.fileno()))
    data = bytes(range(256)) * 128  # 32 KiB: more than the small socket holds
    left = send_each(outs, data)
    assert left is not None and len(left) == 1
    index, sent = left[0]
    assert index == 3 and 0 < sent < len(data)
    # Full now: EAGAIN, nothing sent, in the middle of a run of good sends.
    assert send_each(outs, data) == [(3, 0)]
    assert received(small_peer) == data[:sent]
    assert all(received(theirs) == data * 2 for _, theirs in made)


def test_broken_sockets_among_many_cost_the_others_nothing(pairs) -> None:
    made = pairs(130)
    for i, (_, theirs) in enumerate(made):
        if i % 10 == 3:
            theirs.close()  # EPIPE for these
    outs = [Target(Transport(), ours.fileno()) for ours, _ in made]
    assert send_each(outs, b"still here") == [(i, 0) for i in range(130) if i % 10 == 3]
    assert all(
        received(theirs) == b"still here" for i, (_, theirs) in enumerate(made) if i % 10 != 3
    )
    ready = [Member(Transport(), ours.fileno()) for ours, _ in made]
    assert send_ready(ready, b"!", 0, 130) == [(i, 0) for i in range(130) if i % 10 == 3]


def test_a_peer_reset_among_many_costs_the_others_nothing(pairs) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    clients, accepted = [], []
    try:
        for _ in range(6):
            clients.append(socket.create_connection(listener.getsockname()))
            conn, _ = listener.accept()
            conn.setblocking(False)
            accepted.append(conn)
        # The third client vanishes with a RST, no FIN: the next send to it fails.
        clients[2].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        clients[2].close()
        outs = [Target(Transport(), conn.fileno()) for conn in accepted]

        def reset_arrived() -> bool:  # tcpi_state, the first byte of TCP_INFO, is TCP_CLOSE
            return accepted[2].getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 7

        wait_until(reset_arrived, "the RST to arrive")
        assert send_each(outs, b"after the reset") == [(2, 0)]
        for i, client in enumerate(clients):
            if i != 2:
                client.settimeout(5)
                assert client.recv(100) == b"after the reset"
    finally:
        for sock in clients + accepted:
            sock.close()
        listener.close()


FALLBACK = """
import socket
from wshub._directsend import send_each, send_path

class Transport:
    def is_closing(self): return False
    def get_write_buffer_size(self): return 0

class Target:
    def __init__(self, fd):
        self.transport = Transport()
        self.direct_fd = fd

pairs = [socket.socketpair() for _ in range(10)]
path, detail = send_path()
assert path == "send" and "io_uring_setup" in detail, (path, detail)
assert send_each([Target(ours.fileno()) for ours, _ in pairs], b"by send(2)") is None
assert all(theirs.recv(100) == b"by send(2)" for _, theirs in pairs)
print("ok")
"""


def test_no_io_uring_means_send2_without_an_error() -> None:
    """Where io_uring_setup fails (seccomp, io_uring_disabled, old kernel),
    the sends go by send(2) and nobody is told of an error."""
    env = {**os.environ, "WSHUB_TEST_IO_URING_SETUP_FAILS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n" and done.stderr == "", done


def test_a_forked_child_sends_on_a_ring_of_its_own(pairs, path: str) -> None:
    made = pairs(10)
    outs = [Target(Transport(), ours.fileno()) for ours, _ in made]
    assert send_each(outs, b"parent;") is None  # the parent's ring is made and used
    pid = os.fork()
    if pid == 0:  # the child: its own ring (or send(2)), never the parent's
        try:
            ok = send_path()[0] == path and send_each(outs, b"child;") is None
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert send_each(outs, b"parent again;") is None
    assert send_path()[0] == path
    assert all(received(theirs) == b"parent;child;parent again;" for _, theirs in made)


def test_another_thread_sends_by_send2(pairs, path: str) -> None:
    made = pairs(10)
    outs = [Target(Transport(), ours.fileno()) for ours, _ in made]
    assert send_each(outs, b"one;") is None  # this thread's ring, if any
    seen: list[object] = []

    def other() -> None:
        seen.append(send_path())
        seen.append(send_each(outs, b"two;"))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(60)
    # A ring has one submitter (IORING_SETUP_SINGLE_ISSUER): the others send(2).
    assert seen[0] == ("send", "off") if path == "send" else seen[0][0] == "send"
    assert seen[1] is None
    assert all(received(theirs) == b"one;two;" for _, theirs in made)
