"""Close codes and the exception root.

Two families of outcomes exist for a client frame (decisions.md 5 and 8):

* a *refusal* (:class:`wshub.protocol.Refusal`) answers with an ``error``
  message and leaves the connection open;
* a *disconnect* (:class:`Disconnect`) closes the connection with a WebSocket
  close code and a short reason.

::

    WshubError
     └── ConfigError        (wshub.config: a refused option value)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "FORBIDDEN_ROOM",
    "HEARTBEAT_TIMEOUT",
    "RATE_LIMIT_EXCEEDED",
    "SHUTTING_DOWN",
    "SLOW_CONSUMER",
    "TOKEN_EXPIRED",
    "TOO_MANY_CONNECTIONS",
    "UNAUTHORIZED",
    "CloseCode",
    "Disconnect",
    "WshubError",
]


class WshubError(Exception):
    """Root of wshub's own exceptions."""


class CloseCode(enum.IntEnum):
    """The close codes wshub sends (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    PROTOCOL_ERROR = 1002  # malformed frame (unmasked, reserved bits, ...)
    INVALID_DATA = 1007  # invalid UTF-8 in a text message
    POLICY_VIOLATION = 1008  # rate limit escalation, slow consumer
    MESSAGE_TOO_BIG = 1009  # over --max-message-size
    INTERNAL_ERROR = 1011  # heartbeat timeout, unexpected server error
    SERVICE_RESTART = 1012  # rejoining a cluster that announced our clients gone
    # 4400-4499: "not without new credentials or a change on your side"; a client
    # should not retry these blindly (decisions.md 15 and 19).
    UNAUTHORIZED = 4401  # token refused, missing when required, or expired
    FORBIDDEN_ROOM = 4403  # the token's rooms claim does not open this room
    TOO_MANY_CONNECTIONS = 4429  # over --max-connections-per-user


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection with *code* and *reason*."""

    code: CloseCode
    reason: str


HEARTBEAT_TIMEOUT = Disconnect(CloseCode.INTERNAL_ERROR, "heartbeat timeout")
SLOW_CONSUMER = Disconnect(CloseCode.POLICY_VIOLATION, "slow consumer")
RATE_LIMIT_EXCEEDED = Disconnect(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
SHUTTING_DOWN = Disconnect(CloseCode.GOING_AWAY, "server shutting down")
UNAUTHORIZED = Disconnect(CloseCode.UNAUTHORIZED, "unauthorized")
TOKEN_EXPIRED = Disconnect(CloseCode.UNAUTHORIZED, "token expired")
FORBIDDEN_ROOM = Disconnect(CloseCode.FORBIDDEN_ROOM, "forbidden room")
TOO_MANY_CONNECTIONS = Disconnect(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
