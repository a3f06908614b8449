"""RoomStream: continuity of a room's recorded frames and the seam of a join
(pure, synchronous)."""

from __future__ import annotations

import pytest

from wshub import protocol
from wshub.ids import ConnectionId
from wshub.protocol import RelayKind
from wshub.roomstream import Continuity, Recorded, RoomStream, offset_of

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
    assert stream.top == 13


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
