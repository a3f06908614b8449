"""The native engine's reading client (``--reader full``), its chat scenario and ``--rooms``.

``--reader full`` reads every data message whole and parses its JSON; only
``message``/``broadcast`` envelopes whose content has the size sent count. These
tests check that it really reads: its counts against what a real ``wshub serve``
says it routed and delivered, exactly; and, against a server of our own, a
stream of frames split everywhere in which every kind of frame that must not
count (another type, the wrong content size, broken JSON, binary, a stray
continuation) is present and counted where it belongs. ``--rooms`` runs against
a relay written here on the ``websockets`` library, one topic per path (wshub's
rooms are not on this branch yet), and against one that ignores rooms, whose
cross-room messages the reader must refuse.
"""

from __future__ import annotations

import asyncio
import json
import platform
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from wshub.bench import main as bench_main
from wshub.bench import native
from wshub.bench.framing import OP_BINARY, OP_CONT, OP_PING, OP_TEXT, encode_server_frame
from wshub.bench.runner import Config

from .conftest import TIMEOUT
from .test_bench_native import WSHUB_FLAGS, FrameServer, frame_server  # noqa: F401

SIZE = 100


def content(size: int = SIZE, sender: int = 0) -> bytes:
    head = b"~#%d s1 c%d " % (time.monotonic_ns(), sender)
    return head + b"x" * (size - len(head))


def envelope(kind: bytes, body: bytes, before: bytes = b"", after: bytes = b"") -> bytes:
    return (
        b'{"type":"' + kind + b'",' + before + b'"connectionId":"ws-1-abcdefghi",'
        b'"content":"' + body + b'","timestamp":"2026-01-01T00:00:00.000Z"' + after + b"}"
    )


def reader_stream() -> tuple[list[bytes], Counter[str]]:
    """Frames for the reading client, and what it must make of them."""
    frames: list[bytes] = []
    want: Counter[str] = Counter()

    def add(kind: str, op: int, payload: bytes, fin: bool = True) -> None:
        frames.append(encode_server_frame(op, payload, fin=fin))
        want[kind] += 1

    add("other", OP_TEXT, b'{"type":"welcome","connectionId":"ws-1-abc","connectionCount":3}')
    add("counted", OP_TEXT, envelope(b"message", content()))
    add("counted", OP_TEXT, envelope(b"broadcast", content()))
    # values of every kind before and after the fields that matter
    add(
        "counted",
        OP_TEXT,
        envelope(
            b"message",
            content(),
            before=b'"a":[1,-2.5e3,{"b":[true,false,null]},"\\"}"],"room":"r1",',
            after=b',"offset":12,"n":{"deep":[[[]]]}',
        ),
    )
    # escapes decode to the size sent: \u0041 is one byte, \u00e9 two, a pair four
    body = content()
    add("counted", OP_TEXT, envelope(b"message", body[:-7] + b"\\u0041\\u00e9\\ud83d\\ude00"))
    # the reader skips plain bytes eight at a time: whatever ends a plain run
    # (an escape, a multi-byte character, a raw control byte, a byte past
    # ASCII) is found at every position of a word, near the end of the string too
    for at in [*range(17), 80, 89, 90, 91, 92]:
        plain = content()
        add("counted", OP_TEXT, envelope(b"message", plain[:at] + b'\\"' + plain[at + 1 :]))
        add("counted", OP_TEXT, envelope(b"message", plain[:at] + b"\xc3\xa9" + plain[at + 2 :]))
        add("invalid", OP_TEXT, envelope(b"message", plain[:at] + b"\x1f" + plain[at + 1 :]))
        add("invalid", OP_TEXT, envelope(b"message", plain[:at] + b"\xff" + plain[at + 1 :]))
    # the last string of a message ends within 16 bytes of its end, where the
    # scan of plain bytes is stopped at the message's end: what ends it there
    # is found too
    add("counted", OP_TEXT, envelope(b"message", content(), after=b',"z":"a\\"b"'))
    add("counted", OP_TEXT, envelope(b"message", content(), after=b',"z":"a\xc3\xa9"'))
    add("invalid", OP_TEXT, envelope(b"message", content(), after=b',"z":"a\x01"'))
    add("invalid", OP_TEXT, envelope(b"message", content(), after=b',"z":"a\xff"'))
    add("wrong_size", OP_TEXT, envelope(b"message", content() + b"y"))
    add("wrong_size", OP_TEXT, envelope(b"message", content()[:-1]))
    add("wrong_size", OP_TEXT, b'{"type":"message","connectionId":"ws-1-abc"}')
    add("other", OP_TEXT, envelope(b"messages", content()))  # not a relay type
    add("other", OP_TEXT, envelope(b"error", content()))
    add("other", OP_TEXT, b'{"type":"user_joined","totalUsers":2}')
    # the last of duplicate keys counts, as in JSON.parse
    add("other", OP_TEXT, envelope(b"message", content(), after=b',"type":"ping"'))
    add("invalid", OP_TEXT, envelope(b"message", content())[:-1])  # no closing brace
    add("invalid", OP_TEXT, envelope(b"message", content()) + b"x")  # trailing data
    add("invalid", OP_TEXT, envelope(b"message", content()[:-1] + b"\x01"))  # a raw control char
    add("invalid", OP_TEXT, envelope(b"message", content()[:-2] + b"\xc3("))  # bad UTF-8
    add("invalid", OP_TEXT, b'{"type":7,"content":"x"}')  # a type that is not a string
    add("invalid", OP_TEXT, b"~#1 s0 c0 " + b"x" * 90)  # what a raw relay relays: not JSON
    add("invalid", OP_TEXT, b"")
    add("invalid", OP_BINARY, envelope(b"message", content()))  # binary: not an envelope
    # a fragmented message counts once, with a Ping between its fragments
    whole = envelope(b"message", content())
    frames.append(encode_server_frame(OP_TEXT, whole[:10], fin=False))
    frames.append(encode_server_frame(OP_PING, b"frag"))
    frames.append(encode_server_frame(OP_CONT, whole[10:50], fin=False))
    frames.append(encode_server_frame(OP_CONT, b"", fin=False))
    frames.append(encode_server_frame(OP_CONT, whole[50:], fin=True))
    want["counted"] += 1
    add("invalid", OP_CONT, b"xyz")  # a continuation out of place
    # 64-bit length, over many reads: a big message of another size
    add("wrong_size", OP_TEXT, envelope(b"broadcast", b"z" * 70000))
    add("counted", OP_TEXT, envelope(b"message", content()))
    return frames, want


@pytest.fixture(params=["simd", "portable"])
def scan(request, monkeypatch):
    """The reader as built here (SSE2 on x86-64) and without SSE2 (the 8-byte
    scan every other machine gets): both must read alike."""
    if request.param == "portable":
        monkeypatch.setattr(native, "CFLAGS", [*native.CFLAGS, "-U__SSE2__"])
    return request.param


@pytest.mark.parametrize("read_size", [1, 3, 131, None])
def test_full_reader_counts_only_what_a_client_would(frame_server, read_size, scan):  # noqa: F811
    srv = frame_server(blocks=1)
    frames, want = reader_stream()
    srv.frames, srv.pings, srv.expected = frames, [b"frag"], want["counted"]
    cfg = Config(
        scenario="sink",
        url=srv.url,
        protocol="raw",
        connections=1,
        warmup=0.0,
        duration=3.0 if read_size == 1 else 1.0,
        probes=1,
        keepalive=0,
        reader="full",
    )
    res = native.run(cfg, read_size=read_size)
    assert srv.done.is_set(), f"the last Ping was not answered within the run: {srv.failure}"
    assert res["reader"] == "full" and res["content_size"] == SIZE
    assert res["deliveries"] == want["counted"] == res["read_counted"]
    assert res["read_other_type"] == want["other"]
    assert res["read_wrong_size"] == want["wrong_size"]
    assert res["read_invalid"] == want["invalid"]
    # every message was read; the stray continuation is invalid but no message
    assert res["read_messages"] == sum(want.values()) - 1
    assert srv.pongs == [b"start", b"frag", b"done"]
    assert res["latency_samples"] >= 1  # the probe read send times out of the content


def prefix_stream() -> tuple[list[bytes], Counter[str]]:
    """Frames where `message` is the type only to a prefix or substring match,
    beside frames that count although no prefix compare would find them."""
    body = content()
    frames: list[bytes] = []
    want: Counter[str] = Counter()

    def add(kind: str, payload: bytes) -> None:
        frames.append(encode_server_frame(OP_TEXT, payload))
        want[kind] += 1

    add("other", b'{"type":"messages","content":"' + body + b'"}')
    add("other", b'{"type":"messag","content":"' + body + b'"}')
    add("other", b'{"type":"message ","content":"' + body + b'"}')
    # the text of a matching envelope inside a string, the real type after it
    add("other", b'{"x":"\\"type\\":\\"message\\"","type":"pong"}')
    quoted = b'\\"type\\":\\"message\\",\\"content\\":\\"' + body + b'\\"'
    add("other", b'{"x":"' + quoted + b'","type":"pong"}')
    # a matching envelope one object down: not this message's type
    add("other", b'{"inner":{"type":"message","content":"' + body + b'"},"type":"pong"}')
    add("invalid", b'{"types":"message","content":"' + body + b'"}')  # no type at all
    add("invalid", b'{"type":"message","content":"' + body + b'"')  # unterminated object
    # a string still open at the end of the message; what follows in the read
    # (the next frame, which would close it) is not part of it
    add("invalid", b'{"type":"message","content":"' + body)
    add("invalid", b'"}')
    # counted: the type last, whitespace everywhere JSON allows it
    add("counted", b'{"content":"' + body + b'","type":"message"}')
    add("counted", b' { "type" : "message" ,\n\t"content" : "' + body + b'" } ')
    add("counted", b'{"type":"message","content":"' + body + b'"}')
    return frames, want


@pytest.mark.parametrize("read_size", [1, 5, 64, None])
def test_full_reader_finds_the_type_by_a_json_walk(frame_server, read_size, scan):  # noqa: F811
    """`message` must be the object's own `type`: a prefix, a quoted copy inside
    another string, or a nested object's type does not count; frames split at
    every read size count the same."""
    srv = frame_server(blocks=0)
    frames, want = prefix_stream()
    srv.frames, srv.expected = frames, want["counted"]
    cfg = Config(
        scenario="sink",
        url=srv.url,
        protocol="raw",
        connections=1,
        warmup=0.0,
        duration=1.5 if read_size == 1 else 1.0,
        probes=1,
        keepalive=0,
        reader="full",
    )
    res = native.run(cfg, read_size=read_size)
    assert srv.done.is_set(), f"the last Ping was not answered within the run: {srv.failure}"
    assert res["read_messages"] == sum(want.values())
    assert res["deliveries"] == res["read_counted"] == want["counted"]
    assert res["read_other_type"] == want["other"]
    assert res["read_invalid"] == want["invalid"]
    assert res["read_wrong_size"] == 0


def io_uring_expected() -> bool:
    """Whether the reader should get io_uring here: Linux 6.1 or later (multishot
    recv, provided-buffer rings, DEFER_TASKRUN), io_uring not disabled by sysctl."""
    release = platform.release().split(".")
    try:
        if (int(release[0]), int(release[1].split("-")[0])) < (6, 1):
            return False
    except (IndexError, ValueError):
        return False
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return f.read().strip() == "0"
    except OSError:
        return True


@pytest.fixture(params=["io_uring", "epoll"])
def read_io(request, monkeypatch):
    """The reader on io_uring (its default where the kernel has it) and on its
    fallback, epoll (WSHUB_NATIVE_IO=epoll): both must read alike. The value is
    what the run must report as its read_io."""
    if request.param == "epoll":
        monkeypatch.setenv("WSHUB_NATIVE_IO", "epoll")
        return "epoll"
    monkeypatch.delenv("WSHUB_NATIVE_IO", raising=False)
    return "io_uring" if io_uring_expected() else "epoll"


def deflated(payload: bytes) -> bytes:
    """A text frame as a server with permessage-deflate sends it (RSV1 set, the
    payload raw DEFLATE without its final empty block): the reader negotiates no
    extension, so such a frame is no message it can read."""
    z = zlib.compressobj(wbits=-15)
    body = z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH)
    frame = bytearray(encode_server_frame(OP_TEXT, body[:-4]))
    frame[0] |= 0x40
    return bytes(frame)


@pytest.mark.parametrize("read_size", [1, 2, 7, 64, None])
def test_full_reader_reads_alike_on_io_uring_and_epoll(frame_server, read_size, read_io):  # noqa: F811
    """Every kind of frame that counts or must not (another type, the wrong content
    size either way, broken JSON, binary, a stray continuation, a deflated frame),
    each frame's header sent a byte at a time (split across reads), the payloads
    across reads of 1, 2, 7 and 64 bytes or whole: counted exactly alike whichever
    way the reader reads; and it offers no compression."""
    srv = frame_server(blocks=1)
    frames, want = reader_stream()
    frames.insert(3, deflated(envelope(b"message", content())))
    want["invalid"] += 1
    srv.frames, srv.pings, srv.expected = frames, [b"frag"], want["counted"]
    cfg = Config(
        scenario="sink",
        url=srv.url,
        protocol="raw",
        connections=1,
        warmup=0.0,
        duration=3.0 if read_size in (1, 2) else 1.0,
        probes=1,
        keepalive=0,
        reader="full",
    )
    res = native.run(cfg, read_size=read_size)
    assert srv.done.is_set(), f"the last Ping was not answered within the run: {srv.failure}"
    assert res["read_io"] == read_io
    assert res["deliveries"] == want["counted"] == res["read_counted"]
    assert res["read_other_type"] == want["other"]
    assert res["read_wrong_size"] == want["wrong_size"]
    assert res["read_invalid"] == want["invalid"]
    assert res["read_messages"] == sum(want.values()) - 1
    assert srv.pongs == [b"start", b"frag", b"done"]
    assert len(srv.requests) == 1
    assert b"sec-websocket-extensions" not in srv.requests[0].lower()


def test_peek_reader_counts_what_full_refuses(frame_server):  # noqa: F811
    """The same stream to the header-peeking reader: it counts every frame whose
    first bytes hold the marker, whatever its type or size (why both modes exist)."""
    srv = frame_server(blocks=1)
    frames, want = reader_stream()
    srv.frames, srv.pings = frames, [b"frag"]
    cfg = Config(
        scenario="sink", url=srv.url, protocol="raw", connections=1, warmup=0.0, duration=1.0
    )
    res = native.run(cfg)
    assert srv.done.is_set()
    assert res["reader"] == "peek" and "read_counted" not in res
    assert res["deliveries"] > want["counted"]


# --------------------------------------------------------------------- against wshub


def bench_json(capsys, *argv: str) -> dict:
    rc = bench_main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    return out


def test_full_reader_rate_matches_what_wshub_delivered(make_server, capsys):
    srv = make_server(*WSHUB_FLAGS)
    res = bench_json(
        capsys,
        "rate",
        "--engine",
        "native",
        "--reader",
        "full",
        "-n",
        "20",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--url",
        srv.ws_url,
        "--server-pid",
        str(srv.proc.pid),
    )
    routed = srv.metric("wshub_messages_total", 'outcome="ROUTED"')
    assert routed >= 50
    # every routed message reached the 19 others, and the reader counted each one
    # (the run waits for stragglers before it closes)
    assert res["read_counted"] == routed * 19, (res["read_counted"], routed)
    # it read the presence frames too, and did not count them: 20 welcomes and
    # the user_joined of each later joiner to those already there
    assert res["read_other_type"] == 20 + 19 * 20 // 2
    assert res["read_invalid"] == res["read_wrong_size"] == 0
    # and nothing else: every frame wshub's fan-out wrote was read (the 20 welcomes
    # are written by the upgrade, outside the fan-out's count, today)
    delivered = srv.metric("wshub_deliveries_total")
    assert res["read_messages"] - 20 <= delivered <= res["read_messages"], delivered
    assert res["bytes_read_per_message"] > SIZE + 100  # wshub's envelope around the content
    # the latency of every delivery in the window, not the probes' alone
    assert res["latency_of"] == "every delivery"
    assert res["latency_samples"] == res["deliveries"] > 0
    assert 0 < res["arrival_messages"] <= routed and 0 <= res["probe_rank_mean"] <= 1
    for k in ("generator_cpu", "generator_cpu_user", "generator_cpu_sys"):
        assert 0 <= res[k] < 2, res
    assert res["generator_cpu"] > 0


def test_full_reader_chat_against_wshub(make_server, capsys):
    srv = make_server(*WSHUB_FLAGS)
    res = bench_json(
        capsys,
        "chat",
        "--engine",
        "native",
        "--reader",
        "full",
        "-n",
        "10",
        "--rate",
        "20",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--url",
        srv.ws_url,
    )
    assert res["senders"] == 10 and res["rate_per_connection"] == 20.0
    routed = srv.metric("wshub_messages_total", 'outcome="ROUTED"')
    sent = round(res["messages_sent_per_s"] * res["measured_s"])
    assert sent > 0 and routed >= sent
    assert res["read_counted"] == routed * 9
    assert res["fell_behind"] is False and 0.8 <= res["achieved_ratio"] <= 1.2
    assert res["latency_samples"] > 0 and res["latency_ms_p50"] < 1000


def test_full_reader_fanout_against_wshub(make_server, capsys):
    srv = make_server(*WSHUB_FLAGS)
    res = bench_json(
        capsys,
        "fanout",
        "--engine",
        "native",
        "--reader",
        "full",
        "--content-size",
        "300",
        "-n",
        "20",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--url",
        srv.ws_url,
        "--server-pid",
        str(srv.proc.pid),
    )
    assert res["content_size"] == 300 and res["size"] == 300
    sent = round(res["messages_sent_per_s"] * res["measured_s"])
    assert sent > 0 and res["stalls"] == 0
    assert abs(res["deliveries"] - sent * 19) <= 2 * 32 * 19, (res["deliveries"], sent)
    # at most the 32 in flight per recipient were left unread at the close
    routed = srv.metric("wshub_messages_total", 'outcome="ROUTED"')
    assert routed * 19 - 32 * 19 <= res["read_counted"] <= routed * 19
    assert res["read_wrong_size"] == res["read_invalid"] == 0
    assert res["read_other_type"] == 20 + 19 * 20 // 2
    assert res["server_cpu_us_per_delivery"] > 0
    # the server's CPU from the scheduler as well, every thread, in ns: the server
    # runs flat out here, so the two clocks agree within their tick-size error
    assert res["server_cpu_sched_us_per_delivery"] > 0 and 0 < res["server_cpu_sched"] <= 1.5
    assert abs(res["server_cpu_sched"] - res["server_cpu"]) <= 0.25, res


# --------------------------------------------------------------------- rooms


class RoomRelay:
    """A relay on the websockets library: one topic per request path, or (rooms=False)
    one topic for everyone, which a reader of rooms must catch."""

    def __init__(self, rooms: bool = True) -> None:
        self.rooms = rooms
        self.paths: Counter[str] = Counter()
        self.members: dict[str, set[ServerConnection]] = {}
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        self.port = fut.result(TIMEOUT)

    async def _start(self) -> int:
        self.server = await serve(self._handler, "127.0.0.1", 0, compression=None)
        return self.server.sockets[0].getsockname()[1]

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else "/"
        self.paths[path] += 1
        topic = path if self.rooms else "all"
        peers = self.members.setdefault(topic, set())
        peers.add(ws)
        try:
            async for msg in ws:
                for p in list(peers):
                    if p is not ws:
                        try:
                            await p.send(msg)
                        except Exception:
                            pass
        finally:
            peers.discard(ws)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def room_relay() -> Iterator[Callable[..., RoomRelay]]:
    made: list[RoomRelay] = []

    def make(**kw: bool) -> RoomRelay:
        r = RoomRelay(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def rooms_run(port: int, reader: str = "full") -> dict:
    cfg = Config(
        scenario="fanout",
        url=f"ws://127.0.0.1:{port}/websocket",
        protocol="raw",
        connections=20,
        rooms=4,
        inflight=4,
        duration=1.0,
        warmup=0.3,
        reader=reader,
    )
    return native.run(cfg)


def test_rooms_one_closed_loop_per_room(room_relay):
    relay = room_relay()
    res = rooms_run(relay.port)
    # connection i in room r<i % 4>: five connections per path
    assert relay.paths == {f"/websocket/r{r}": 5 for r in range(4)}
    assert res["rooms"] == 4 and res["senders"] == 4 and res["recipients"] == 16
    assert res["connections_open"] == 20 and res["stalls"] == 0
    sent = round(res["messages_sent_per_s"] * res["measured_s"])
    assert sent > 0
    # every room's message reaches its four recipients, give or take the window
    assert abs(res["deliveries"] - sent * 4) <= 2 * 4 * 16, (res["deliveries"], sent)
    assert res["read_misrouted"] == 0 and res["read_invalid"] == 0


def test_rooms_messages_from_another_room_are_not_counted(room_relay):
    relay = room_relay(rooms=False)  # every message to every connection
    res = rooms_run(relay.port)
    assert res["read_misrouted"] > 0
    # three quarters of what each recipient reads came from other rooms' senders,
    # and none of it counted
    assert res["read_counted"] + res["read_misrouted"] == res["read_messages"]
    assert res["read_misrouted"] >= 2 * res["read_counted"]


def test_cli_refuses_what_it_cannot_do(capsys):
    assert bench_main(["fanout", "--reader", "full"]) == 2  # the Python engine
    assert "--engine native" in capsys.readouterr().err
    assert bench_main(["rate", "--engine", "native", "--rooms", "3"]) == 2
    assert "fanout" in capsys.readouterr().err
    assert bench_main(["fanout", "--engine", "native", "--reader", "full", "--size", "20"]) == 2
    assert "at least 48" in capsys.readouterr().err


def test_a_run_without_connections_says_why(frame_server):  # noqa: F811
    srv = frame_server(mode="refuse")
    cfg = Config(
        scenario="fanout", url=srv.url, protocol="raw", connections=4, rooms=2, reader="full"
    )
    with pytest.raises(RuntimeError, match="4 of 4 connections failed.*HTTP/1.1 403 Forbidden"):
        native.run(cfg)


class LateRelay:
    """A relay on the websockets library that writes each message to the
    connections accepted in the positions of *early* at once and to the
    others *delay* seconds later: a server whose order of recipients puts
    the probes first."""

    def __init__(self, early: set[int], delay: float) -> None:
        self.early, self.delay = early, delay
        self.members: list[ServerConnection] = []
        self.sending: set[asyncio.Task[None]] = set()  # held until done
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(TIMEOUT)

    async def _start(self) -> int:
        self.server = await serve(self._handler, "127.0.0.1", 0, compression=None)
        return self.server.sockets[0].getsockname()[1]

    async def _send(self, peers: list[ServerConnection], msg: str | bytes) -> None:
        for p in peers:
            try:
                await p.send(msg)
            except Exception:
                pass

    async def _handler(self, ws: ServerConnection) -> None:
        self.members.append(ws)
        async for msg in ws:
            others = [p for p in self.members if p is not ws]
            await self._send([p for p in others if self.members.index(p) in self.early], msg)
            late = [p for p in others if self.members.index(p) not in self.early]
            # the same delay for every message: each connection's order is kept
            self.loop.call_later(self.delay, self._later, late, msg)

    def _later(self, peers: list[ServerConnection], msg: str | bytes) -> None:
        task = self.loop.create_task(self._send(peers, msg))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def test_rate_latency_counts_every_delivery_not_the_probes_alone():
    """The latency scenario's figures come from every delivery: a server that
    writes the probes first and everyone else 0.2 s later must not look fast."""
    # 4 connections opened one at a time (accepted in their order), 2 probes:
    # connections 0 (the sender) and 2; the relay writes to 2 at once, to 1 and 3 late
    relay = LateRelay(early={2}, delay=0.2)
    try:
        cfg = Config(
            scenario="rate",
            url=f"ws://127.0.0.1:{relay.port}/",
            protocol="raw",
            connections=4,
            connect_concurrency=1,
            probes=2,
            rate=20.0,
            duration=1.5,
            warmup=0.3,
            keepalive=0,
            reader="full",
        )
        res = native.run(cfg)
    finally:
        relay.close()
    assert res["connections_open"] == 4 and res["read_invalid"] == 0
    assert res["latency_of"] == "every delivery"
    assert res["latency_samples"] == res["deliveries"] > 0
    # two of every three deliveries waited 0.2 s: so did the median delivery
    assert res["latency_ms_p50"] >= 200, res
    # the probe alone saw none of it
    probes = res["probe_latency"]
    assert 0 < probes["latency_samples"] <= res["deliveries"] // 3 + 3
    assert probes["latency_ms_p50"] < 200, probes
    # the arrivals say why: the probe is read first of its message's three, and
    # each message's first and last deliveries are 0.2 s apart
    assert res["probe_rank_mean"] == 0.0
    assert res["arrival_messages"] > 0
    assert res["arrival_span_ms_p50"] >= 200
    assert res["arrival_first_ms_p50"] < 200 <= res["arrival_last_ms_p50"]
