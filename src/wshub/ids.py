"""Identifiers: connection ids (decisions.md 2) and node ids."""

from __future__ import annotations

import secrets
from typing import Final, NewType

__all__ = ["ConnectionId", "NodeId", "new_connection_id", "new_node_id"]

ConnectionId = NewType("ConnectionId", str)
"""``ws-{unix_ms}-{9 chars of [a-z0-9]}``, unique among live connections."""

NodeId = NewType("NodeId", str)
"""Names one wshub process in a cluster."""

_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


def _random_chars(count: int) -> str:
    # secrets.choice draws from the OS's cryptographic source.
    return "".join(secrets.choice(_ALPHABET) for _ in range(count))


def new_connection_id(now_ms: int) -> ConnectionId:
    """A fresh id for a connection accepted at *now_ms* (Unix milliseconds)."""
    return ConnectionId(f"ws-{now_ms}-{_random_chars(9)}")


def new_node_id() -> NodeId:
    return NodeId(f"node-{_random_chars(12)}")
