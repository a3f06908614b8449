"""The pure parts of the Redis Cluster backplane: its URL, and the key layout
that puts every key a script touches in one slot (checked with redis-py's
own slot function, the one Redis Cluster uses)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from wshub.backplane.redis_cluster import (
    ClusterAddress,
    ClusterKeys,
    is_cluster_url,
    parse_cluster_url,
    seed_url,
)
from wshub.backplane.redis_history import RedisHistory
from wshub.cli import build_config
from wshub.config import ConfigError
from wshub.usercount import user_key


def slot(key: str) -> int:
    return key_slot(key.encode())


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis+cluster://a:7000", ClusterAddress([("a", 7000)], False, None, None)),
        (
            "redis+cluster://10.0.0.1:7000, 10.0.0.2:7001,h",
            ClusterAddress(
                [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("h", 6379)], False, None, None
            ),
        ),
        (
            "rediss+cluster://:s%40cret@h:6380/0",
            ClusterAddress([("h", 6380)], True, None, "s@cret"),
        ),
        ("redis+cluster://u:p@[::1]:7000", ClusterAddress([("::1", 7000)], False, "u", "p")),
    ],
)
def test_seed_urls_parse(url: str, address: ClusterAddress) -> None:
    assert is_cluster_url(url)
    assert parse_cluster_url(url) == address


def test_a_plain_url_is_not_a_cluster_and_seed_url_names_the_first_seed() -> None:
    assert not is_cluster_url("redis://h:6379/0")
    with pytest.raises(ValueError):
        parse_cluster_url("redis://h:6379/0")
    with pytest.raises(ValueError):
        parse_cluster_url("redis+cluster://:7000")
    assert seed_url("rediss+cluster://:pw@h1:7000,h2:7001") == "rediss://:pw@h1:7000/0"
    assert seed_url("redis+cluster://[::1]:7000") == "redis://[::1]:7000/0"


@pytest.mark.parametrize("room", ["", "lobby", "r.1_~-", "x" * 64])
def test_a_rooms_channel_presence_and_history_share_one_slot(room: str) -> None:
    keys = ClusterKeys("wshub")
    history = RedisHistory(aioredis.Redis(), prefix="wshub", sharded=True)  # never connects
    slots = {slot(keys.room(room)), slot(keys.presence(room)), *map(slot, history.keys(room))}
    assert len(slots) == 1


def test_a_nodes_keys_share_one_slot_and_rooms_spread() -> None:
    keys = ClusterKeys("wshub")
    node = "node-abc123"
    assert len({slot(k(node)) for k in (keys.alive, keys.conns, keys.reaped, keys.probe)}) == 1
    # Different rooms land on many slots (the cluster's shards share them out).
    assert len({slot(keys.room(f"r{i}")) for i in range(100)}) > 90


def test_cluster_urls_are_options_and_take_the_per_user_limit() -> None:
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    assert build_config(["--redis-url", url], {}).redis_url == url
    with pytest.raises(ConfigError, match="--redis-url"):
        build_config(["--redis-url", "redis+cluster://"], {})
    config = build_config(
        [
            "--redis-url",
            url,
            "--auth",
            "optional",
            "--auth-secret",
            "s" * 32,
            "--max-connections-per-user",
            "3",
        ],
        {},
    )
    assert (config.redis_url, config.max_connections_per_user) == (url, 3)


@pytest.mark.parametrize("user", ["alice", "é:*{x}\n' -- ]]", "}", "{", "{}", ""])
def test_a_users_counts_are_one_key_of_its_own_slot(user: str) -> None:
    """Every script of usercount.py touches one key: a user's, tagged by the
    user id, so users spread over the shards and any id is a key of its own."""
    assert user_key("wshub", user) == "wshub:user:{u." + user + "}"
    assert user_key("wshub", user) != user_key("wshub", user + "x")
    assert len({slot(user_key("wshub", f"user{i}")) for i in range(100)}) > 90
