"""A read's plain relays published together (``Hub.on_plain_relays``, with
``wshub._ingest.stamp`` writing the envelopes) against the Python path, one
message at a time: the same bytes to every member, the same history, the
same counters (docs/rooms-perf.md "Session 8")."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wshub import _ingest, _runpack, gateway, ingest, protocol
from wshub.backplane import EventKind
from wshub.backplane.memory import MemoryBackplane, MemoryBroker
from wshub.config import Config
from wshub.history import Entry
from wshub.ids import ConnectionId, NodeId
from wshub.node import Node
from wshub.protocol import RelayKind
from wshub.rooms import RoomName
from wshub.wire import TextPayloads, is_text_frame, text_frame, text_payload

from ..rawws import encode_frame
from .test_hub import REQUEST, Client, FakeTransport, run

NOW = 1_764_112_345.678
ROOM = RoomName("r")

# What a client may put in one read: plain relays (escapes, non-ASCII, the
# content the Python path must judge), other commands, refusals, binary.
FRAMES = st.sampled_from(
    [
        (0x1, {"type": "message", "content": "hi"}),
        (0x1, {"type": "message", "content": 'q"uote\\ \u00e9 \U0001f600 \n'}),
        (0x1, {"type": "broadcast", "content": "all"}),
        (0x1, {"type": "broadcast", "content": "x" * 300}),
        (0x1, {"type": "message", "content": "   "}),  # refused: empty
        (0x1, {"type": "message", "content": "a", "extra": 1}),  # the Python path's
        (0x1, '{"type": "broadcast", "content": "spaced"}'),  # the Python path's
        (0x1, r'{"type":"message","content":"\u00e9\/"}'),  # escapes C leaves to Python
        (0x1, {"type": "ping"}),
        (0x1, {"type": "user_info"}),
        (0x1, {"type": "nope"}),
        (0x2, b"\x00binary"),
    ]
)
READS = st.lists(st.lists(FRAMES, min_size=1, max_size=12), min_size=1, max_size=6)


def encoded(opcode: int, message: object) -> bytes:
    # Compact, as JSON.stringify writes it: the form the C path takes (with
    # spaces, a relay is the Python path's: one of FRAMES is such a str).
    if isinstance(message, dict):
        message = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    payload = message.encode() if isinstance(message, str) else message
    assert isinstance(payload, bytes)
    return encode_frame(opcode, payload)


def play(
    reads: list[list[tuple[int, object]]], *, c_path: bool, **options: object
) -> tuple[list[bytes], list[Entry | int], dict[str, object]]:
    """Four members of one room (the first two sending, a read each in
    turn; the last with permessage-deflate); what each was written after its
    upgrade, the room's history (its entries, then the bytes accounted, the
    evictions, the entries of all rooms), and the outcome counters with the
    fan-out size histogram."""
    saved = ingest.scan, ingest.stamp
    # The extension itself, or nothing: also under WSHUB_NO_C_INGEST=1.
    ingest.scan, ingest.stamp = (_ingest.scan, _ingest.stamp) if c_path else (None, None)
    ids = (ConnectionId(f"ws-1-{n:09d}") for n in itertools.count())
    real_id, real_time = gateway.new_connection_id, time.time
    gateway.new_connection_id = lambda now_ms: next(ids)  # type: ignore[assignment]
    time.time = lambda: NOW
    loop = asyncio.new_event_loop()
    try:
        config = Config(**{"compression": "on", **options})  # type: ignore[arg-type]
        node = Node(config, loop, backplane=MemoryBackplane(NodeId("n1")))
        loop.run_until_complete(node.backplane.start(node))
        node.history._epochs = lambda: "epoch"
        clients = [Client(node, "/websocket/r") for _ in range(3)]
        clients.append(DeflateClient(node, "/websocket/r"))
        run(node)
        starts = [len(c.transport.out) for c in clients]
        for n, read in enumerate(reads):
            sender = clients[n % 2]
            if not sender.conn.transport.is_closing():
                sender.conn.data_received(b"".join(encoded(op, m) for op, m in read))
            run(node)
        written = [bytes(c.transport.out[s:]) for c, s in zip(clients, starts, strict=True)]
        history = node.history
        held = [*history.held(ROOM), history.bytes, history.evicted, history.entries]
        counters = node.counters
        # The outcomes, then the fan-out size histogram (its buckets and sum).
        outcomes = {**counters.outcomes, "sizes": list(counters.fanout_sizes.samples())}
        return written, held, outcomes
    finally:
        gateway.new_connection_id, time.time = real_id, real_time  # type: ignore[assignment]
        ingest.scan, ingest.stamp = saved
        loop.close()


class DeflateClient(Client):
    """A member with permessage-deflate: compressed from the pass's payloads."""

    def __init__(self, node: Node, path: str) -> None:
        self.transport = FakeTransport(node.loop)
        self.conn = node.new_connection()
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        request = REQUEST.format(path=path).replace(
            "\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
        self.conn.data_received(request.encode())
        self._read = 0


def check_same(reads: list[list[tuple[int, object]]], **options: object) -> None:
    c_written, c_held, c_outcomes = play(reads, c_path=True, **options)
    py_written, py_held, py_outcomes = play(reads, c_path=False, **options)
    assert c_written == py_written
    assert c_held == py_held
    assert c_outcomes == py_outcomes


@settings(max_examples=40, deadline=None)
@given(READS)
def test_history_on(reads: list[list[tuple[int, object]]]) -> None:
    check_same(reads)


@settings(max_examples=25, deadline=None)
@given(READS)
def test_history_off(reads: list[list[tuple[int, object]]]) -> None:
    check_same(reads, history_size=0)


@settings(max_examples=25, deadline=None)
@given(READS)
def test_a_full_room(reads: list[list[tuple[int, object]]]) -> None:
    # 3 entries a room: keep_run() drops the oldest inside the run as keep()
    # does entry by entry.
    check_same(reads, history_size=3)


@settings(max_examples=25, deadline=None)
@given(READS)
def test_the_memory_bound(reads: list[list[tuple[int, object]]]) -> None:
    # A bound that holds a handful of entries: evicted inside the run; then
    # one under the room's state and an entry: each entry goes as it comes.
    check_same(reads, history_memory=3000)
    check_same(reads, history_memory=1200)


@settings(max_examples=25, deadline=None)
@given(READS)
def test_the_rate_limit_counts_every_frame(reads: list[list[tuple[int, object]]]) -> None:
    # A burst of 5 that does not refill during the test; the third refusal
    # closes the sender: refusals and closes fall between the relays of a
    # run at the same places.
    check_same(reads, message_rate=0.0001, message_burst=5, rate_limit_refusals=3)


def test_the_c_path_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # Else the comparisons above would hold trivially.
    runs: list[int] = []
    stamp = _ingest.stamp

    def counting(*args: object) -> object:
        runs.append(len(args[0]))  # type: ignore[arg-type]  # the run's kinds
        return stamp(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_ingest, "stamp", counting)
    play([[(0x1, {"type": "message", "content": "a"})] * 4], c_path=True)
    assert runs == [4]


@given(
    st.lists(st.tuples(st.sampled_from([2, 3]), st.binary(max_size=300)), max_size=20),
    st.one_of(st.none(), st.text(max_size=20)),
    st.integers(-1, 2**40),
    st.floats(0, 4e9),
)
def test_stamp_is_encode_plain_relay(
    relays: list[tuple[int, bytes]], user_id: str | None, first: int, now: float
) -> None:
    sender = ConnectionId("ws-1-abcdefghi")
    conn = object()
    frames, excluded, message_count, blob, ends, flags = _ingest.stamp(
        bytes(code for code, _ in relays),
        [content for _, content in relays],
        protocol.plain_relay_head(RelayKind.MESSAGE, sender, user_id),
        protocol.plain_relay_head(RelayKind.BROADCAST, sender, user_id),
        protocol.plain_relay_tail(now),
        first,
        conn,
    )
    kinds = ingest.KINDS
    expected = [
        protocol.encode_plain_relay(
            kinds[code],  # type: ignore[arg-type]
            sender,
            content,
            now,
            None if first < 0 else first + n,
            user_id,
        )
        for n, (code, content) in enumerate(relays)
    ]
    messages = [code == ingest.MESSAGE for code, _ in relays]
    assert frames == [text_frame(p) for p in expected]
    assert [text_payload(frame) for frame in frames] == expected
    for e, is_message in zip(excluded, messages, strict=True):
        assert e is (conn if is_message else None)
    assert message_count == messages.count(True)
    if first < 0:
        assert blob is ends is flags is None
    else:
        # With offsets, the payloads as the history keeps a run: _runpack's.
        assert (blob, ends, flags) == _runpack.pack(expected, messages)


def test_stamp_frames_of_every_length_header() -> None:
    for size in (0, 125, 126, 65535, 65536, 70000):
        for first in (-1, 7):
            frames, _, _, blob, _, _ = _ingest.stamp(
                b"\x02", [b"x" * size], b"", b"", b"", first, None
            )
            payload = b"x" * size + (b"}" if first < 0 else b',"offset":7}')
            assert frames == [text_frame(payload)]
            assert text_payload(frames[0]) == payload
            assert blob == (None if first < 0 else payload)


def test_text_payloads_are_the_frames_payloads() -> None:
    # What a peer node is given for a run (Backplane.publish_relays): each
    # payload taken from its frame when asked for, whatever its header size.
    payloads = [b"", b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
    view = TextPayloads([text_frame(p) for p in payloads])
    assert len(view) == len(payloads)
    assert list(view) == payloads
    assert [view[i] for i in range(len(view))] == payloads
    assert view[-1] == payloads[-1] and view[1:3] == payloads[1:3]
    assert all(is_text_frame(text_frame(p)) for p in payloads)
    assert not is_text_frame(b"\x89\x00")  # a Ping: never compressed


def test_stamp_refuses_what_is_not_a_relay() -> None:
    with pytest.raises(ValueError):
        _ingest.stamp(b"\x00", [b"x"], b"", b"", b"", -1, None)
    with pytest.raises(ValueError):
        _ingest.stamp(b"\x02\x02", [b"x"], b"", b"", b"", -1, None)  # a kind without content
    with pytest.raises(TypeError):
        _ingest.stamp(b"\x02", ["x"], b"", b"", b"", -1, None)  # type: ignore[list-item]


def test_a_peer_that_subscribes_gets_every_later_run() -> None:
    # The lone node's run asks the broker once whether anyone else listens
    # (MemoryBackplane.publish_relays): a peer whose member joins between two
    # runs gets the whole of the next one, in order, and nothing before.
    broker = MemoryBroker()
    loop = asyncio.new_event_loop()
    try:
        nodes = []
        for name in ("a", "b"):
            node = Node(Config(), loop, backplane=MemoryBackplane(NodeId(name), broker))
            loop.run_until_complete(node.backplane.start(node))
            nodes.append(node)
        sent = []
        real_publish = broker.publish
        broker.publish = lambda envelope: (sent.append(envelope), real_publish(envelope))[1]  # type: ignore[method-assign]

        def relays(*contents: str) -> bytes:
            return b"".join(encoded(0x1, {"type": "broadcast", "content": c}) for c in contents)

        alone = Client(nodes[0], "/websocket/r")
        run(nodes[0])
        alone.messages()
        alone.conn.data_received(relays("1", "2", "3"))
        run(nodes[0])
        assert [m["content"] for m in alone.messages()] == ["1", "2", "3"]
        assert [e.kind for e in sent if e.kind is EventKind.RELAY] == []  # no one to tell
        peer = Client(nodes[1], "/websocket/r")
        for node in nodes:
            run(node)
        peer.messages()
        alone.conn.data_received(relays("4", "5", "6"))
        for node in nodes * 2:
            run(node)
        assert [m["content"] for m in peer.messages() if m["type"] == "broadcast"] == [
            "4",
            "5",
            "6",
        ]
    finally:
        loop.close()
