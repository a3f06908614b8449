"""RoomStream: continuity of a room's recorded frames and the seam of a join
(pure, synchronous)."""

from __future__ import annotations

import pytest

from wshub import protocol
from wshub.history import Entry
from wshub.ids import ConnectionId
from wshub.protocol import RelayKind
from wshub.roomstream import Continuity, Recorded, RoomStream, from_entry, offset_of

J, K = ConnectionId("ws-1-aaaaaaaaa"), ConnectionId("ws-2-bbbbbbbbb")


def frame(offset: int) -> Recorded:
    return Recorded(offset, b'{"offset":%d}' % offset, None)


def test_offset_of_reads_what_the_script_splices() -> None:
    payload = protocol.encode_relay(RelayKind.BROADCAST, J, 'a "quoted": 7}', 0.0)
    assert offset_of(protocol.with_offset(payload, 12345)) == 12345
    with pytest.raises(ValueError):
        offset_of(b"no offset here")


@pytest.mark.parametrize(
    ("heard", "verdicts"),
    [
        ([1, 2, 3], ["in_order"] * 3),
        ([5, 6, 8], ["in_order", "in_order", "gap"]),  # 7 lost on the way
        ([5, 6, 1], ["in_order", "in_order", "restarted"]),  # history restarted
        ([5, 6, 6], ["in_order", "in_order", "restarted"]),  # never twice
    ],
)
def test_continuity(heard: list[int], verdicts: list[str]) -> None:
    stream = RoomStream()
    assert [stream.heard(frame(o)).value for o in heard] == verdicts


def test_continuity_after_a_join_read_the_top() -> None:
    stream = RoomStream()
    stream.begin(J)
    assert stream.finish(J, "e1", 10) == ([], False)
    assert stream.heard(frame(11)) is Continuity.IN_ORDER
    assert stream.heard(frame(13)) is Continuity.GAP
    # The last offset delivered: the gap's read starts there.
    assert stream.top == 11 and stream.filling is not None


def test_seam_frames_above_the_read_top_follow_the_replay() -> None:
    """Heard while the read was on its way: 4 and 5 (at or below the read's
    top 5, so in the replay) and 6, 7 (after it): the join gets 6, 7."""
    stream = RoomStream()
    stream.begin(J)
    for offset in (4, 5, 6, 7):
        stream.heard(frame(offset))
    after, stale = stream.finish(J, "e1", 5)
    assert after is not None and [f.offset for f in after] == [6, 7] and not stale
    assert stream.top == 7 and stream.epoch == "e1"


def test_two_joins_at_once_each_get_their_own_seam() -> None:
    stream = RoomStream()
    stream.begin(J)
    stream.heard(frame(1))
    stream.begin(K)
    stream.heard(frame(2))
    stream.heard(frame(3))
    after_k, _ = stream.finish(K, "e1", 2)
    after_j, _ = stream.finish(J, "e1", 0)
    assert after_k is not None and [f.offset for f in after_k] == [3]
    assert after_j is not None and [f.offset for f in after_j] == [1, 2, 3]
    assert stream.joining == 0


def test_a_join_swamped_by_a_flood_starts_over() -> None:
    stream = RoomStream(join_buffer_limit=3)
    stream.begin(J)
    for offset in range(1, 6):
        stream.heard(frame(offset))
    assert stream.finish(J, "e1", 0) == (None, False)


def test_a_join_in_another_epoch_makes_the_members_stale() -> None:
    stream = RoomStream()
    stream.begin(J)
    stream.finish(J, "old", 7)
    stream.begin(K)
    after, stale = stream.finish(K, "new", 0)
    assert after == [] and stale and stream.epoch == "new" and stream.top == 0


def test_published_epochs() -> None:
    stream = RoomStream()
    assert stream.published("e1") and stream.epoch == "e1"
    assert stream.published("e1")
    assert not stream.published("e2")
    stream.reset("e2")
    assert stream.published("e2") and stream.top is None


def test_cancelled_join_keeps_nothing() -> None:
    stream = RoomStream()
    stream.begin(J)
    stream.cancel(J)
    stream.heard(frame(1))
    assert stream.joining == 0


# -- A gap is filled from the room's stream --------------------------------------------


def synced(top: int) -> RoomStream:
    stream = RoomStream()
    stream.begin(J)
    stream.finish(J, "e1", top)
    return stream


def test_a_gap_is_filled_from_the_stream_then_the_held_frames_follow() -> None:
    """11 heard, 12 and 13 lost (the subscription was rebuilt), 14 and 15
    heard while the read of what follows 11 is on its way: 12-15 in order."""
    stream = synced(10)
    assert stream.heard(frame(11)) is Continuity.IN_ORDER
    assert stream.heard(frame(14)) is Continuity.GAP
    fill = stream.filling
    assert fill is not None and stream.top == 11
    assert stream.heard(frame(15)) is Continuity.HELD
    # The read saw 12-14 (15 was run after it): it fills 12 and 13.
    frames = stream.filled(fill, "e1", [frame(12), frame(13), frame(14)])
    assert frames is not None and [f.offset for f in frames] == [12, 13, 14, 15]
    assert stream.top == 15 and stream.filling is None
    assert stream.heard(frame(16)) is Continuity.IN_ORDER


@pytest.mark.parametrize(
    ("epoch", "missed"),
    [
        ("e1", None),  # the stream no longer reaches back (trimmed, expired), or Redis is down
        (None, None),
        ("e2", [frame(12)]),  # the room's history restarted meanwhile
        ("e1", []),  # 12 neither read nor held
    ],
)
def test_a_gap_that_cannot_be_filled(epoch: str | None, missed: list[Recorded] | None) -> None:
    stream = synced(11)
    assert stream.heard(frame(13)) is Continuity.GAP
    fill = stream.filling
    assert fill is not None
    assert stream.filled(fill, epoch, missed) is None
    assert stream.filling is None


def test_a_fill_overtaken_by_a_reset_or_a_restart_delivers_nothing() -> None:
    stream = synced(11)
    stream.heard(frame(13))
    fill = stream.filling
    assert fill is not None
    stream.reset()  # the members were closed meanwhile
    assert stream.filled(fill, "e1", [frame(12)]) == []
    stream = synced(11)
    stream.heard(frame(13))
    fill = stream.filling
    assert fill is not None
    assert stream.heard(frame(1)) is Continuity.RESTARTED
    assert stream.filled(fill, "e1", [frame(12)]) == [] and stream.top == 1
    # An older fill's late answer does not fill the one running now.
    stream = synced(11)
    stream.heard(frame(13))
    old = stream.filling
    assert old is not None
    stream.reset()
    stream.begin(K)
    stream.finish(K, "e1", 20)
    stream.heard(frame(22))
    assert stream.filling != old
    assert stream.filled(old, "e1", [frame(12)]) == []
    assert stream.filling is not None


def test_a_fill_that_holds_too_much_gives_up() -> None:
    stream = RoomStream(join_buffer_limit=2)
    stream.begin(J)
    stream.finish(J, "e1", 11)
    assert stream.heard(frame(13)) is Continuity.GAP
    assert stream.heard(frame(14)) is Continuity.HELD
    assert stream.heard(frame(15)) is Continuity.LOST
    assert stream.filling is None


def test_a_join_finishing_during_a_fill_starts_over() -> None:
    stream = synced(11)
    stream.begin(K)
    stream.heard(frame(13))
    assert stream.finish(K, "e1", 13) == (None, False)
    fill = stream.filling
    assert fill is not None
    frames = stream.filled(fill, "e1", [frame(12), frame(13)])
    assert frames is not None and [f.offset for f in frames] == [12, 13]


def test_a_stream_entry_is_heard_as_it_was_published() -> None:
    sender = ConnectionId("ws-3-ccccccccc")
    message = Entry(4, b"m", sender, RelayKind.MESSAGE, None)
    assert from_entry(message) == Recorded(4, b"m", sender)  # not back to its sender
    assert from_entry(Entry(5, b"b", sender, RelayKind.BROADCAST, None)) == Recorded(5, b"b", None)
    skipped = Entry(6, b"b", sender, RelayKind.BROADCAST, J)  # a backend's exclude
    assert from_entry(skipped) == Recorded(6, b"b", J)
