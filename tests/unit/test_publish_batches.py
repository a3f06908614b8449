"""wshub.backplane.redis: how a queued batch becomes pipeline commands."""

from __future__ import annotations

from wshub.backplane.redis import _group_publications


def test_runs_of_envelopes_become_one_command_and_presence_keeps_its_place() -> None:
    batch = [
        ("publish", ("p:room:a", b"1")),
        ("join", ("ws-a", "a")),
        ("publish", ("p:room:a", b"2")),
        ("publish", ("p:room:b", b"3")),
    ]
    assert _group_publications(batch, stale=False) == [
        ("publish", [("p:room:a", b"1")]),
        ("join", ("ws-a", "a")),
        ("publish", [("p:room:a", b"2"), ("p:room:b", b"3")]),
    ]


def test_a_stale_batch_keeps_only_its_presence_updates() -> None:
    batch = [
        ("publish", ("p:room:", b"1")),
        ("leave", ("ws-a", "")),
        ("publish", ("p:room:", b"2")),
    ]
    assert _group_publications(batch, stale=True) == [("leave", ("ws-a", ""))]
