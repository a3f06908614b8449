"""What ``--redis-url`` names is what a node uses (decisions.md 9): real
``wshub serve`` nodes on a real redis-server.

Found by the cluster audit: Redis keeps keys per database but pub/sub
channels for the whole server, so two clusters of the default name on
databases 1 and 2 of one Redis heard each other's messages and presence.
"""

from __future__ import annotations

from .conftest import RedisServer
from .test_audit_cluster_presence import frames_until_pong


def test_clusters_on_two_databases_of_one_redis_hear_nothing_of_each_other(
    make_server, redis_server: RedisServer
) -> None:
    base = redis_server.url.rsplit("/", 1)[0]
    one = make_server("--redis-url", f"{base}/1")
    two = make_server("--redis-url", f"{base}/2")
    first, second = one.client(), two.client()
    assert second.welcome["connectionCount"] == 1
    for client, content in ((first, "database 1 only"), (second, "database 2 only")):
        client.send({"type": "broadcast", "content": content})
        # Its own broadcast and nothing else: no user_joined, no broadcast of
        # the other cluster (before it, or up to a ping's answer after it).
        while (frame := client.recv())["type"] == "ping":
            pass
        assert (frame["type"], frame.get("content")) == ("broadcast", content)
        assert [f for f in frames_until_pong(client) if f["type"] != "ping"] == []
    first.close()
    second.close()
