"""wshub.backplane.presence: every change announced once, stale snapshots held off."""

from __future__ import annotations

from wshub.backplane.base import joined_user
from wshub.backplane.presence import PresenceView
from wshub.ids import ConnectionId, NodeId
from wshub.protocol import encode_user_joined

A, B = NodeId("a"), NodeId("b")
X, Y, Z = ConnectionId("x"), ConnectionId("y"), ConnectionId("z")


def test_events_are_idempotent() -> None:
    view = PresenceView()
    assert view.joined(A, X, 0) and not view.joined(A, X, 1)
    assert view.count() == 1
    assert view.left(A, X, 2) and not view.left(A, X, 3)
    assert view.count() == 0
    assert not view.joined(A, X, 4)  # a tombstoned id never comes back


def test_snapshot_adds_missed_joins_and_removes_missed_leaves() -> None:
    view = PresenceView(grace=5)
    view.joined(A, X, 0)
    view.joined(A, Y, 0)
    change = view.resync({A: {X, Z}}, now=10)
    assert change.joined == [Z] and change.left == [Y]
    assert view.count() == 2


def test_stale_snapshot_does_not_undo_fresh_events() -> None:
    view = PresenceView(grace=5)
    view.joined(A, X, 100)  # joined just now: the snapshot may predate it
    view.joined(A, Y, 0)
    view.left(A, Y, 99)  # left just now: the snapshot may still list it
    change = view.resync({A: {Y}}, now=101)
    assert change.joined == [] and change.left == []
    assert view.count() == 1


def test_lost_node_announces_each_once() -> None:
    view = PresenceView()
    view.joined(A, X, 0)
    view.joined(A, Y, 0)
    view.joined(B, Z, 0)
    assert sorted(view.lost(A, [X], 1).left) == [X, Y]  # and whatever else A had
    assert view.lost(A, [X, Y], 2).left == []
    assert view.count() == 1


def test_tombstones_expire() -> None:
    view = PresenceView(tombstone_ttl=60)
    view.joined(A, X, 0)
    view.left(A, X, 0)
    view.resync({}, now=100)
    assert view.joined(A, X, 100)  # forgotten: (ids are unique, so this is moot in practice)


def test_rebuilt_presence_names_the_users_it_learned() -> None:
    view = PresenceView(grace=5)
    view.joined(A, X, 0, "alice")  # from a join event
    view.joined(A, Y, 0)  # anonymous
    found = view.resync({A: {X, Y}, B: {Z}}, now=1, users={Z: "bob"})
    assert found.joined == [Z] and found.users == {Z: "bob"}
    gone = view.lost(A, [Y], 2)
    assert sorted(gone.left) == [X, Y] and gone.users == {X: "alice"}
    missed = view.resync({}, now=100)  # Z's leave event never came
    assert missed.left == [Z] and missed.users == {Z: "bob"}
    assert view.user_of(Z) is None  # forgotten with the connection


def test_a_user_id_is_forgotten_when_its_connection_leaves() -> None:
    view = PresenceView()
    view.joined(A, X, 0, "alice")
    assert view.user_of(X) == "alice"
    users: dict[ConnectionId, str] = {}
    assert view.left(A, X, 1, users) and users == {X: "alice"}
    assert view.user_of(X) is None
    assert view.lost(A, [X], 2).users == {}


def test_joined_user_reads_the_user_joined_frame() -> None:
    alice = encode_user_joined(X, 1, 0.0, user_id="alice")
    assert joined_user(alice) == "alice"
    tricky = encode_user_joined(X, 1, 0.0, user_id='a|b\t"userId"\n')
    assert joined_user(tricky) == 'a|b\t"userId"\n'
    assert joined_user(encode_user_joined(X, 1, 0.0)) is None
    assert joined_user(b'{"userId": 7}') is None and joined_user(b'["userId"]') is None
    assert joined_user(b'"userId" not json') is None


def test_an_unsure_nodes_connections_are_added_but_not_removed() -> None:
    """A node not registered again yet in a Redis that came back empty: its
    absence from the snapshot says nothing about its connections."""
    view = PresenceView(grace=5)
    view.joined(A, X, 0)
    view.joined(B, Y, 0)
    change = view.resync({A: {Z}}, now=100, unsure={A, B})
    assert change.joined == [Z] and change.left == []
    assert view.count() == 3
    assert view.resync({A: {X, Z}}, now=200, unsure={A}).left == [Y]
