"""The backplane a node's configuration asks for."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from ..ids import NodeId, new_node_id
from . import Backplane
from .memory import MemoryBackplane

__all__ = ["make_backplane"]


def make_backplane(config: Config, *, on_rejoined: Callable[[], None]) -> Backplane:
    """Redis with ``--redis-url`` (a Redis Cluster with ``redis+cluster://``)
    or ``--redis-sentinels``,
    else the embedded in-memory backplane.

    *on_rejoined* is called when the node comes back to a cluster that reaped
    it during an outage (its clients were announced gone)."""
    node_id = NodeId(config.node_id) if config.node_id else new_node_id()
    if config.redis_target:
        # The redis package only when asked for.
        from .redis import RedisBackplane
        from .redis_cluster import RedisClusterBackplane, is_cluster_url

        kind = RedisClusterBackplane if is_cluster_url(config.redis_target) else RedisBackplane
        return kind(
            config.redis_target,
            node_id,
            node_ttl=config.node_ttl,
            prefix=config.redis_prefix,
            on_rejoined_after_reap=on_rejoined,
        )
    return MemoryBackplane(node_id, node_ttl=config.node_ttl)
