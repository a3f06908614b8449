"""Recovery when the node that replays is killed halfway (decisions.md 13: a
client recovers on any node, including after the node it was on died): real
``wshub serve`` nodes on a real redis-server, clients over real sockets. Not
covered by tests/test_cluster_recovery.py before, which kills the node a
client was on before it reconnects, not the one replaying to it.
"""

from __future__ import annotations

from .conftest import RedisServer
from .test_cluster_recovery import join, make_engine, new_room, offsets, relays


def test_a_node_killed_halfway_through_a_replay_the_client_recovers_the_rest_elsewhere(
    redis_server: RedisServer,
) -> None:
    eng = make_engine("redis", redis_server, "--history-size", "100")
    try:
        room = new_room()
        sender = eng.node(0).client(room)
        epoch = sender.welcome["epoch"]
        for i in range(1, 41):
            sender.send({"type": "broadcast", "content": f"m{i}"})
        assert offsets(relays(sender, 40)) == list(range(1, 41))
        # Reconnecting to node 1 from offset 0: read 15 of its 40 replayed frames.
        client = eng.node(1).client(f"{room}?since={epoch}:0")
        assert client.welcome["recovered"] is True and client.welcome["missed"] == 40
        got = relays(client, 15)
        assert offsets(got) == list(range(1, 16)) and all(f["replayed"] for f in got)
        eng.nodes[1].proc.kill()
        eng.nodes[1].proc.wait()
        # The room goes on meanwhile.
        for i in range(41, 46):
            sender.send({"type": "broadcast", "content": f"m{i}"})
        # Recorded once the sender has its own back (the offsets are Redis').
        assert offsets(relays(sender, 5)) == list(range(41, 46))
        position = got[-1]["offset"]
        again, frames = join(eng.node(0), room, f"since={epoch}:{position}")
        assert again.welcome["recovered"] is True and again.welcome["missed"] == 45 - position
        assert offsets(frames) == list(range(position + 1, 46))
        assert [f["content"] for f in frames] == [f"m{i}" for i in range(position + 1, 46)]
    finally:
        eng.stop()
