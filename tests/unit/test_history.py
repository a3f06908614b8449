"""wshub.history: offsets, the recovery window, bounds, and the join query."""

from __future__ import annotations

import gc
import itertools
import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wshub import _runpack, history, protocol
from wshub.history import (
    ENTRIES_OVERHEAD,
    ENTRY_OVERHEAD,
    ROOM_OVERHEAD,
    Entry,
    History,
    JoinQuery,
    Position,
    QueryRefusal,
    parse_join_query,
    would_receive,
)
from wshub.ids import ConnectionId
from wshub.protocol import RelayKind

M, B = RelayKind.MESSAGE, RelayKind.BROADCAST
A_ID, B_ID, C_ID = "ws-1-aaaaaaaaa", "ws-2-bbbbbbbbb", "ws-3-ccccccccc"


def epochs():
    counter = itertools.count(1)
    return lambda: f"e{next(counter)}"


def publish(
    h: History,
    room: str,
    kind: RelayKind,
    sender: str,
    now: float,
    exclude: str | None = None,
    content: str = "x",
) -> int:
    """What a room's hub does at publication."""
    offset = h.next_offset(room, now)
    payload = protocol.encode_relay(kind, ConnectionId(sender), content, now, offset)
    return h.append(room, Entry(offset, payload, sender, kind, exclude), now)


def offsets(entries: list[Entry]) -> list[int]:
    return [e.offset for e in entries]


def five(**kwargs: object) -> History:
    """Room r: 1 A message, 2 B broadcast, 3 A broadcast, 4 B message,
    5 server message excluding C; at t=0..4."""
    h = History(epochs=epochs(), **kwargs)  # type: ignore[arg-type]
    publish(h, "r", M, A_ID, 0)
    publish(h, "r", B, B_ID, 1)
    publish(h, "r", B, A_ID, 2)
    publish(h, "r", M, B_ID, 3)
    publish(h, "r", M, "server", 4, exclude=C_ID)
    return h


@pytest.mark.parametrize(
    ("name", "kwargs", "epoch", "offset", "previous", "now", "recovered", "missed"),
    [
        ("from the start", {}, "e1", 0, None, 5, True, [1, 2, 3, 4, 5]),
        ("from the middle", {}, "e1", 2, None, 5, True, [3, 4, 5]),
        ("from the top", {}, "e1", 5, None, 5, True, []),
        ("above the top", {}, "e1", 6, None, 5, False, []),
        ("wrong epoch", {}, "zzz", 2, None, 5, False, []),
        ("past the window", {"size": 3}, "e1", 1, None, 5, False, []),
        ("window edge: OFFSET itself gone", {"size": 3}, "e1", 2, None, 5, True, [3, 4, 5]),
        ("top with a small window", {"size": 3}, "e1", 5, None, 5, True, []),
        ("after TTL: entries gone", {"ttl": 10}, "e1", 2, None, 12.5, False, []),
        ("TTL: fresh part still held", {"ttl": 10}, "e1", 3, None, 12.5, True, [4, 5]),
        ("after TTL, from the top", {"ttl": 10}, "e1", 5, None, 100, True, []),
        ("previous A: own messages out", {}, "e1", 0, A_ID, 5, True, [2, 3, 4, 5]),
        ("previous B: own broadcast kept", {}, "e1", 0, B_ID, 5, True, [1, 2, 3, 5]),
        ("previous C: excluded message out", {}, "e1", 0, C_ID, 5, True, [1, 2, 3, 4]),
        ("previous, all missed are its own", {}, "e1", 3, B_ID, 5, True, [5]),
    ],
)
def test_recover(name, kwargs, epoch, offset, previous, now, recovered, missed) -> None:
    """recover() follows decisions.md 19 'Recovery window' and 'would have received'."""
    h = five(**kwargs)
    result = h.recover("r", epoch, offset, previous, now)
    assert (result.recovered, offsets(result.missed)) == (recovered, missed), name
    assert (result.epoch, result.offset) == ("e1", 5)


def test_entries_are_the_frames_as_first_sent() -> None:
    """Offsets grow by one per publication; the stored payload is the frame sent."""
    h = five()
    sent = [json.loads(e.payload) for e in h.held("r")]
    assert [m["offset"] for m in sent] == [1, 2, 3, 4, 5]
    assert [m["type"] for m in sent] == ["message", "broadcast", "broadcast", "message", "message"]
    replay = json.loads(protocol.replayed(h.held("r")[0].payload))
    assert replay == {**sent[0], "replayed": True}


def test_rooms_are_independent() -> None:
    h = History(epochs=epochs())
    assert publish(h, "a", M, A_ID, 0) == 1
    assert publish(h, "b", M, A_ID, 0) == 1
    assert publish(h, "a", M, A_ID, 0) == 2
    assert h.state("a", 0) == ("e1", 2) and h.state("b", 0) == ("e2", 1)
    assert h.recover("a", "e2", 0, None, 0).recovered is False


def test_append_refuses_a_wrong_offset() -> None:
    h = History()
    payload = protocol.encode_relay(M, ConnectionId(A_ID), "x", 0, 7)
    with pytest.raises(ValueError):
        h.append("r", Entry(7, payload, A_ID, M, None), 0)


@pytest.mark.parametrize(
    ("count", "expected"), [(0, []), (2, [4, 5]), (5, [1, 2, 3, 4, 5]), (10**9, [1, 2, 3, 4, 5])]
)
def test_recent(count: int, expected: list[int]) -> None:
    """?history=N gives the last N, oldest first, capped at what is held."""
    result = five().recent("r", count, 5)
    assert offsets(result.missed) == expected and (result.epoch, result.offset) == ("e1", 5)


def test_recent_is_capped_at_the_history_size() -> None:
    h = five(size=3)
    assert offsets(h.recent("r", 100, 5).missed) == [3, 4, 5]
    assert offsets(five(ttl=2.5).recent("r", 100, 5).missed) == [4, 5]


def test_history_off() -> None:
    """--history-size 0: no offsets, nothing kept, since never recovers."""
    h = History(size=0)
    assert not h.enabled and h.next_offset("r", 0) == 0
    payload = protocol.encode_relay(M, ConnectionId(A_ID), "x", 0)
    assert h.append("r", Entry(0, payload, A_ID, M, None), 0) == 0
    assert h.held("r") == () and h.bytes == 0
    result = h.recover("r", "e1", 0, None, 0)
    assert (result.recovered, result.missed) == (False, [])
    assert h.recent("r", 5, 0).missed == []


def test_a_quiet_room_keeps_its_epoch_while_held_and_for_meta_ttl() -> None:
    """Entries expire after ttl; the epoch and offset stay while a member holds
    the room, and meta_ttl after it is idle; then the epoch changes."""
    h = History(ttl=10, meta_ttl=100, epochs=epochs())
    h.hold("r", 0)
    publish(h, "r", M, A_ID, 0)
    assert h.state("r", 1000) == ("e1", 1)  # held: kept, though its entry expired
    h.release("r", 1000)
    assert h.recover("r", "e1", 1, None, 1050) == (True, [], "e1", 1)
    assert h.state("r", 1101) == ("e2", 0)  # forgotten: a new epoch, never a reuse
    assert h.recover("r", "e1", 1, None, 1101).recovered is False


def test_a_sweep_frees_expired_entries_without_new_publications() -> None:
    """expire(now) alone (the hub's periodic sweep) gives the bytes back."""
    h = History(ttl=10, meta_ttl=20, epochs=epochs())
    for i in range(50):
        publish(h, f"r{i % 5}", B, A_ID, 0, content="z" * 500)
    assert h.bytes > 50 * 500
    h.expire(10)
    assert all(h.held(r) == () for r in h.rooms()) and h.bytes == accounted(h)
    assert h.bytes == 5 * (ROOM_OVERHEAD + 2)  # the rooms' states: idle, not yet forgotten
    h.expire(30)
    assert h.bytes == 0 and list(h.rooms()) == []


def test_new_process_new_epoch() -> None:
    """Two histories (two processes) never share an epoch by default."""
    assert History().state("r", 0)[0] != History().state("r", 0)[0]


def test_the_memory_bound_holds_under_a_flood_into_10000_rooms() -> None:
    """--history-memory: bytes accounted never pass the bound; the oldest go first;
    what is still held still recovers, what is gone does not."""
    bound = 2 * 1024 * 1024
    h = History(memory=bound, epochs=epochs())
    h.hold("room9999", 0)  # a room with a member: its offsets never restart
    content = "y" * 200
    for i in range(60_000):
        room = f"room{i % 10_000}"
        publish(h, room, B, A_ID, i * 0.001, content=content)
        assert h.bytes <= bound
    assert h.evicted > 0
    per_entry = ENTRY_OVERHEAD + 200 + 150
    assert h.bytes > bound - 2 * per_entry - 1000  # it fills up to the bound, not far below
    held = sum(len(h.held(r)) for r in h.rooms())
    assert held < 60_000
    # The room written last still has its newest entries and recovers from
    # just before them; from before what was dropped it does not.
    last = h.held("room9999")
    assert last and last[-1].offset == 6 and h.state("room9999", 60) == ("e1", 6)
    assert h.recover("room9999", "e1", last[0].offset - 1, None, 60).recovered
    assert len(last) < 6 and not h.recover("room9999", "e1", 0, None, 60).recovered
    # A room without members whose entries all went was forgotten: a new
    # epoch, so the old position can't recover across the gap.
    assert h.state("room0", 60)[0] != "e2"
    assert h.recover("room0", "e2", 0, None, 60).recovered is False


def test_stale_records_stay_bounded_in_one_hot_room() -> None:
    """A flood into one room (cap 100) keeps the global order compact."""
    h = History(size=100)
    for _ in range(50_000):
        publish(h, "hot", M, A_ID, 0)
    assert len(h.held("hot")) == 100
    assert len(h._order) <= 100 + 1024 + 1


def test_a_room_holds_its_deque_only_while_it_holds_entries() -> None:
    """Rooms whose members never spoke (issue 17's idle node) hold no deque:
    ~150 B a room state, not ~900; the deque comes with the first entry and
    goes with the last, in real memory and in the bytes accounted."""
    names = [f"room{i:04d}" for i in range(1_000)]
    h = History(ttl=10, epochs=epochs())
    gc.collect()
    tracemalloc.start()
    try:
        for name in names:
            h.hold(name, 0)
        gc.collect()
        per_room = tracemalloc.get_traced_memory()[0] / len(names)
    finally:
        tracemalloc.stop()
    assert per_room < 400  # 930 B with a deque made per room state
    state = ROOM_OVERHEAD + len("room0000")
    assert h.bytes == len(names) * state
    offset = publish(h, "room0000", M, A_ID, 0)
    (entry,) = h.held("room0000")
    size = len(entry.payload) + len(A_ID) + ENTRY_OVERHEAD
    assert h.bytes == len(names) * state + ENTRIES_OVERHEAD + size == accounted(h)
    h.expire(10)  # its one entry expired: the deque goes with it
    assert h.held("room0000") == () and h.bytes == len(names) * state == accounted(h)
    assert h.state("room0000", 10) == ("e1", offset)  # a member holds it: kept
    assert h.recover("room0000", "e1", offset, None, 10).recovered
    assert h.recent("room0000", 5, 10) == (True, [], "e1", offset)
    publish(h, "room0000", B, A_ID, 11)  # and a new one with the next entry
    assert [e.offset for e in h.held("room0000")] == [offset + 1]


def test_held_entries_are_invisible_to_the_garbage_collector() -> None:
    """What the history keeps per entry is untracked by the GC once a
    collection has seen it: the tracked objects grow with the rooms, not with
    the entries, so no collection walks 150,000 entries of a full 64 MiB bound
    (and their churn never triggers a full collection)."""
    h = History(size=2_000, epochs=epochs())
    for room in ("a", "b"):
        publish(h, room, M, A_ID, 0)  # the rooms' own objects, before counting
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2_000):
        publish(
            h, "ab"[i % 2], (M, B)[i % 3 == 0], A_ID, i * 0.001, exclude=(None, C_ID)[i % 5 == 0]
        )
    gc.collect()
    assert h.entries == 2_002
    assert len(gc.get_objects()) - before < 100  # not 2 per entry (4,000) as NamedTuples were
    # Read back whole, kinds and exclusions included.
    held = h.held("a")
    assert len(held) == 1_001 and all(type(e) is Entry for e in held)
    assert [e.kind for e in held[1:4]] == [B, M, M] and held[3].exclude is None
    assert h.recover("a", "e1", 0, None, 2).missed == list(held)


def test_would_receive() -> None:
    e = Entry(1, b"{}", A_ID, M, C_ID)
    assert would_receive(e, None) and would_receive(e, B_ID)
    assert not would_receive(e, A_ID) and not would_receive(e, C_ID)
    assert would_receive(e._replace(kind=B), A_ID)


def accounted(h: History) -> int:
    """The bytes History says it holds, recounted from what it holds."""
    total = 0
    for name in h.rooms():
        total += ROOM_OVERHEAD + len(name)
        if h.held(name):
            total += ENTRIES_OVERHEAD  # the room's deque, made on its first entry
        total += sum(
            len(e.payload) + len(e.sender) + len(e.exclude or "") + ENTRY_OVERHEAD
            for e in h.held(name)
        )
    return total


# -- Property: never a gap ------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from([M, B]),
            st.sampled_from([A_ID, B_ID, "server"]),
            st.sampled_from([None, A_ID, C_ID]),
            st.integers(0, 300),
        ),
        st.tuples(st.just("time"), st.floats(0, 50)),
        st.tuples(st.just("hold"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("release"), st.sampled_from(["a", "b", "c"])),
        st.tuples(
            st.just("recover"),
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 40),
            st.sampled_from([None, A_ID, B_ID, C_ID]),
            st.booleans(),
        ),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    size=st.integers(1, 8),
    ttl=st.floats(1, 60),
    memory=st.integers(1500, 12000),
)
def test_recover_never_returns_a_gap(ops, size, ttl, memory) -> None:
    """Whatever happened (caps, TTL, the memory bound, rooms forgotten),
    recover() is either not recovered or exactly the entries after OFFSET that
    the former connection would have received, in order."""
    h = History(size=size, ttl=ttl, memory=memory, meta_ttl=30, epochs=epochs())
    log: dict[tuple[str, str], list[Entry]] = {}  # (room, epoch) -> every entry published
    now = 0.0
    holds: dict[str, int] = {}
    for op in ops:
        if op[0] == "append":
            _, room, kind, sender, exclude, length = op
            offset = h.next_offset(room, now)
            epoch = h.state(room, now)[0]
            payload = protocol.encode_relay(kind, ConnectionId(sender), "z" * length, now, offset)
            entry = Entry(offset, payload, sender, kind, exclude if kind is M else None)
            assert h.append(room, entry, now) == offset
            # Kept, or (a tiny bound, no member) the room was forgotten at once.
            state = h.state(room, now)
            assert state == (epoch, offset) or (state[0] != epoch and holds.get(room, 0) == 0)
            log.setdefault((room, epoch), []).append(entry)
            # Held rooms' states are never freed: the bound yields to them (and
            # to the room being touched) only.
            assert h.bytes <= max(memory, 4 * (ROOM_OVERHEAD + 1))
            assert h._stale >= 0 and h.bytes == accounted(h)
            # A record's room name always means the room's current state
            # (history.py: a room with records is never forgotten).
            assert {name for name, _, _ in h._order} <= set(h.rooms())
        elif op[0] == "time":
            now += op[1]
        elif op[0] == "hold":
            h.hold(op[1], now)
            holds[op[1]] = holds.get(op[1], 0) + 1
        elif op[0] == "release":
            h.release(op[1], now)
            holds[op[1]] = max(0, holds.get(op[1], 0) - 1)
        else:
            _, room, offset, previous, current = op
            epoch = h.state(room, now)[0] if current else "e0"
            result = h.recover(room, epoch, offset, previous, now)
            if not result.recovered:
                continue
            assert result.epoch == epoch
            published = log.get((room, epoch), [])
            expected = [e for e in published if e.offset > offset and would_receive(e, previous)]
            assert result.missed == expected  # every field, as published
            assert offset <= result.offset == (published[-1].offset if published else 0)


# -- Property: a run kept at once is what keeping each entry leaves -----------

run_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("run"),
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.tuples(st.booleans(), st.integers(0, 300)), min_size=1, max_size=40),
        ),
        st.tuples(
            st.just("one"),
            st.sampled_from(["a", "d", "e"]),  # d and e have no member
            st.sampled_from([M, B]),
            st.sampled_from([None, C_ID]),
            st.integers(0, 300),
        ),
        st.tuples(st.just("time"), st.floats(0, 50)),
        st.tuples(st.just("recover"), st.sampled_from(["a", "b", "c"]), st.integers(0, 200)),
    ),
    max_size=60,
)


def everything(h: History) -> tuple[object, ...]:
    """What a History shows: every room's entries and place, the figures."""
    rooms = {name: (h.held(name), h._rooms[name].epoch, h._rooms[name].top) for name in h.rooms()}
    return rooms, h.bytes, h.evicted, h.entries, h.room_count


@settings(max_examples=300, deadline=None)
@given(
    ops=run_ops,
    size=st.integers(1, 60),
    ttl=st.floats(1, 60),
    memory=st.integers(1500, 60_000),
)
def test_a_run_kept_at_once_is_what_keeping_each_entry_leaves(ops, size, ttl, memory) -> None:
    """keep_run (one run, one record, the payloads joined) against keep()
    of each of its entries: the same entries held, the same bytes accounted,
    the same evictions, the same recoveries, whatever the caps, the TTL and
    the memory bound did in between (rooms a, b and c are held by a member,
    as a sender's room is)."""
    at_once = History(size=size, ttl=ttl, memory=memory, meta_ttl=30, epochs=epochs())
    one_by_one = History(size=size, ttl=ttl, memory=memory, meta_ttl=30, epochs=epochs())
    for h in (at_once, one_by_one):
        for room in "abc":
            h.hold(room, 0)
    now = 0.0
    for op in ops:
        if op[0] == "run":
            _, room, relays = op
            first = at_once.next_offset(room, now)
            assert one_by_one.next_offset(room, now) == first
            payloads = [
                protocol.encode_relay(
                    M if is_message else B, ConnectionId(A_ID), "z" * length, now, first + i
                )
                for i, (is_message, length) in enumerate(relays)
            ]
            messages = [is_message for is_message, _ in relays]
            at_once.keep_run(room, first, payloads, A_ID, messages, now)
            for i, (payload, is_message) in enumerate(zip(payloads, messages, strict=True)):
                one_by_one.keep(room, first + i, payload, A_ID, is_message, None, now)
        elif op[0] == "one":
            _, room, kind, exclude, length = op
            for h in (at_once, one_by_one):
                publish(h, room, kind, B_ID, now, exclude if kind is M else None, "y" * length)
        elif op[0] == "time":
            now += op[1]
        else:
            _, room, offset = op
            epoch = at_once.state(room, now)[0]
            assert at_once.recover(room, epoch, offset, A_ID, now) == one_by_one.recover(
                room, epoch, offset, A_ID, now
            )
            assert at_once.recent(room, offset, now) == one_by_one.recent(room, offset, now)
        assert everything(at_once) == everything(one_by_one)
        assert at_once.bytes == accounted(at_once) and at_once._stale >= 0
        assert {name for name, _, _ in at_once._order} <= set(at_once.rooms())


@pytest.mark.parametrize(("size", "run"), [(100, 32), (100, 7), (1, 32), (10, 64)])
def test_what_runs_hold_is_no_more_than_what_is_accounted(size: int, run: int) -> None:
    """Runs of a read's relays into 100 rooms (their payloads joined, the
    entries a room's cap dropped maybe still in a run's bytes until they are
    worth a copy): tracemalloc's count of what the history holds stays under
    the bytes it accounts, so --history-memory bounds real memory."""
    h = History(size=size)
    names = [f"room{i:03d}" for i in range(100)]
    for name in names:
        h.hold(name, 0)
    gc.collect()
    tracemalloc.start()
    try:
        empty = tracemalloc.get_traced_memory()[0]
        for step in range(8):
            for name in names:
                first = h.next_offset(name, step)
                payloads = [
                    protocol.encode_relay(B, ConnectionId(A_ID), "m" * 100, 1.0, first + i)
                    for i in range(run)
                ]
                h.keep_run(name, first, payloads, A_ID, [False] * run, step)
        del payloads
        h._compact()  # stale records: bounded apart (test_stale_records_stay_bounded...)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - empty
    finally:
        tracemalloc.stop()
    assert h.entries == 100 * min(size, 8 * run)
    assert held < h.bytes - 100 * (ROOM_OVERHEAD + len(names[0]))


def test_runs_are_invisible_to_the_garbage_collector() -> None:
    """A run (and its record) is a plain tuple of atomic values too."""
    h = History(size=2_000, epochs=epochs())
    for room in ("a", "b"):
        publish(h, room, M, A_ID, 0)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(200):
        room, now = "ab"[i % 2], i * 0.001
        first = h.next_offset(room, now)
        payloads = [
            protocol.encode_relay(B, ConnectionId(A_ID), "r", now, first + j) for j in range(5)
        ]
        h.keep_run(room, first, payloads, A_ID, [j % 2 == 0 for j in range(5)], now)
    del payloads
    gc.collect()
    assert h.entries == 1_002
    assert len(gc.get_objects()) - before < 50
    held = h.held("a")
    assert [e.kind for e in held[1:4]] == [M, B, M] and held[-1].offset == 501


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.booleans()), max_size=50))
def test_a_run_is_packed_alike_in_c_and_in_python(relays) -> None:
    """wshub._runpack.pack (the build's) and the build without a compiler's."""
    payloads = [payload for payload, _ in relays]
    messages = [is_message for _, is_message in relays]
    blob, ends, flags = history._pack_in_python(payloads, messages)
    assert blob == b"".join(payloads) and flags == bytes(messages)
    assert list(memoryview(ends).cast("I")) == [0, *itertools.accumulate(map(len, payloads))]
    assert _runpack.pack(payloads, messages) == (blob, ends, flags)


def test_pack_refuses_what_is_not_a_run() -> None:
    with pytest.raises(TypeError):
        _runpack.pack([b"a", "b"], [True, False])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _runpack.pack([b"a"], [1])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        _runpack.pack([b"a"], [])


# -- Query parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", JoinQuery()),
        ("since=abc123:0", JoinQuery(since=Position("abc123", 0))),
        ("since=abc123%3A42", JoinQuery(since=Position("abc123", 42))),
        ("since=e:" + str(2**63 - 1), JoinQuery(since=Position("e", 2**63 - 1))),
        ("history=" + str(2**63 - 1), JoinQuery(history=10**9)),  # capped anyway
        # An integer past what an offset is counted in parses (decisions.md 19:
        # only what does not parse is a 400), held at the bound: no history
        # reaches it (recovered: false), and history= is capped anyway.
        ("since=e:" + str(2**63), JoinQuery(since=Position("e", 2**63 - 1))),
        ("since=e:" + "9" * 40, JoinQuery(since=Position("e", 2**63 - 1))),
        ("history=" + str(2**63), JoinQuery(history=10**9)),
        ("history=" + "9" * 5000, JoinQuery(history=10**9)),  # no int() of it
        ("history=10", JoinQuery(history=10)),
        ("history=0", JoinQuery(history=0)),
        ("previous=ws-1764600000000-abc123xyz", JoinQuery(previous="ws-1764600000000-abc123xyz")),
        (
            "token=x&since=A.b_c~d-e:5&previous=ws-1-aaaaaaaaa&other",
            JoinQuery(since=Position("A.b_c~d-e", 5), previous="ws-1-aaaaaaaaa"),
        ),
        ("Since=bad&HISTORY=-1", JoinQuery()),  # names are case-sensitive: others ignored
        ("since=e:1&history=3", JoinQuery(since=Position("e", 1), history=3)),
        ("&" * 200, JoinQuery()),  # any number of other parameters: ignored
        ("x&" * 5000 + "history=2", JoinQuery(history=2)),
    ],
)
def test_parse_join_query_accepts(query: str, expected: JoinQuery) -> None:
    assert parse_join_query(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        "since=",
        "since=abc",
        "since=:5",
        "since=abc:",
        "since=abc:-1",
        "since=abc:1.5",
        "since=abc:+1",
        "since=abc: 1",
        "since=ab%20c:1",
        "since=a/b:1",
        "since=" + "e" * 65 + ":1",
        "since=abc:1&since=abc:2",
        "since=e:007",  # one spelling per number: no leading zero
        "since=e:00",
        "history=",
        "history=-1",
        "history=1.0",
        "history=ten",
        "history=%2B1",
        "history=1&history=2",
        "history=01",
        "history=+1",
        "history=%201",
        "previous=",
        "previous=server",
        "previous=ws-1-ABCDEFGHI",
        "previous=ws-1-abcdefgh",
        "previous=ws-x-abcdefghi",
        "previous=ws-1-abcdefghij",
        "previous=ws-1-abcdefghi%00",
        "since=e%3G:1",
        "since=%FF:1",
        "x=" + "a" * 20_000,
    ],
)
def test_parse_join_query_refuses(query: str) -> None:
    """Values that do not parse are a 400 with a short reason, never an exception."""
    result = parse_join_query(query)
    assert isinstance(result, QueryRefusal) and 0 < len(result.reason) < 80


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_parse_join_query_never_raises(query: str) -> None:
    assert isinstance(parse_join_query(query), JoinQuery | QueryRefusal)


# -- Protocol additions -------------------------------------------------------------


def test_relay_offset_and_splices() -> None:
    """The offset goes last; with_offset() and replayed() give the same JSON."""
    sender = ConnectionId(A_ID)
    plain = protocol.encode_relay(M, sender, 'é "q"', 1.5)
    at = protocol.encode_relay(M, sender, 'é "q"', 1.5, 12)
    assert protocol.with_offset(plain, 12) == at
    assert json.loads(at) == {**json.loads(plain), "offset": 12}
    assert list(json.loads(at))[-1] == "offset"
    assert json.loads(protocol.replayed(at)) == {**json.loads(at), "replayed": True}


def test_welcome_fields_are_additive() -> None:
    cid = ConnectionId(A_ID)
    assert "epoch" not in json.loads(protocol.encode_welcome(cid, 1, 0))
    w = json.loads(protocol.encode_welcome(cid, 1, 0, epoch="e1", offset=5))
    assert (w["epoch"], w["offset"]) == ("e1", 5) and "recovered" not in w
    w = json.loads(
        protocol.encode_welcome(cid, 1, 0, epoch="e1", offset=5, recovered=True, missed=2)
    )
    assert (w["recovered"], w["missed"]) == (True, 2)
    w = json.loads(protocol.encode_welcome(cid, 1, 0, recovered=False, missed=0))
    assert w["recovered"] is False and "epoch" not in w  # history off


def test_history_options() -> None:
    """The defaults of decisions.md 13/19; size 0 is off; a memory bound of 0 is refused."""
    from wshub.config import Config, ConfigError, load_config

    c = Config()
    assert (c.history_size, c.history_ttl, c.history_memory) == (100, 120.0, 67108864)
    assert load_config({"history_size": "0"}, {}).history_size == 0
    env = {"WSHUB_HISTORY_TTL": "30", "WSHUB_HISTORY_MEMORY": "1048576"}
    assert (load_config({}, env).history_ttl, load_config({}, env).history_memory) == (30, 1 << 20)
    for flag, value in (("history_memory", "0"), ("history_ttl", "0"), ("history_size", "-1")):
        with pytest.raises(ConfigError):
            load_config({flag: value}, {})
