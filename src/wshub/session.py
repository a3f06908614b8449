"""Per-connection state, without sockets or clocks.

Theory of operation: a connection is CONNECTING until its upgrade succeeds,
OPEN while it exchanges messages, CLOSING once either side has sent a Close
frame (or the server decided to drop it), and CLOSED when the socket is gone.
The table below lists every allowed transition; anything else is a bug and
raises :class:`AssertionError`.

A :class:`Session` also holds what the protocol needs to remember between
frames: the last sign of life (any frame counts, decisions.md 6) and the
message rate limit with its escalation (decisions.md 8).
"""

from __future__ import annotations

import enum
from typing import Final

from .ratelimit import MessageLimit, Strikes, refill

__all__ = ["Admit", "Session", "State", "TRANSITIONS"]


class State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.CONNECTING: frozenset({State.OPEN, State.CLOSED}),
    State.OPEN: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Admit(enum.Enum):
    """What to do with one incoming frame (data or control), rate-wise."""

    ACCEPT = "accept"
    REFUSE = "refuse"  # drop it and answer error rate_limited
    DISCONNECT = "disconnect"  # too many refusals: close with 1008


# Once per frame: a member looked up on its enum class costs ~100 ns on
# CPython 3.11, a module global ~10 (docs/rooms-perf.md "Session 8").
_ACCEPT: Final = Admit.ACCEPT


class Session:
    """One connection's state, its last sign of life and its rate limit.

    The token bucket is two slots here (``tokens``, ``updated``) with the
    limit shared by all connections (:class:`~wshub.ratelimit.MessageLimit`),
    not a bucket object per connection: this object exists once per idle
    connection, and each object costs its header besides (docs/memory.md).
    For the same reason :class:`~wshub.connection.Connection` is a Session
    (these slots are its own) rather than holding one."""

    __slots__ = ("state", "last_seen", "tokens", "updated", "strikes", "limit")

    def __init__(self, now: float, limit: MessageLimit) -> None:
        self.state = State.CONNECTING
        self.last_seen = now
        self.limit = limit
        self.tokens: float = limit.burst
        self.updated = now
        # Created on the first refusal: most connections never need one.
        self.strikes: Strikes | None = None

    def transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"invalid transition {self.state.name} -> {new.name}")
        self.state = new

    def opened(self, now: float) -> None:
        """The upgrade is done at *now*: the session is open."""
        self.transition(State.OPEN)
        self.last_seen = now
        if self.tokens >= self.limit.burst:
            # A full bucket is full whenever it was last topped up: the same
            # float as last_seen then, and the accept time's is freed (one
            # float fewer per idle connection, docs/memory.md). No frame is
            # charged before the upgrade, so this is every connection.
            self.updated = now

    def alive(self, now: float) -> None:
        """Record a sign of life: any frame from the client."""
        self.last_seen = now

    def silent_for(self, now: float) -> float:
        return now - self.last_seen

    def admit_many(self, now: float, count: int) -> int:
        """:meth:`admit` of *count* (>= 1) frames read at one time *now*, as far as
        they are accepted: how many from the first are. The same tokens are
        taken as by that many calls (one refill, then one token a frame: a
        float less an integer below 2**53 is exact, so ``tokens - k`` is what
        k subtractions of 1 leave); the first refused frame, and any after
        it, are the caller's to charge with :meth:`admit` (its strikes)."""
        if self.limit.rate == 0:
            return count
        self._refill(now)
        tokens = self.tokens
        taken = count if tokens >= count else int(tokens)  # tokens >= 0: int() is floor
        if taken:
            self.tokens = tokens - taken
        return taken

    def _refill(self, now: float) -> None:
        """The tokens earned since the last charge (the refill of :meth:`admit`,
        which keeps it inline: it runs once per frame)."""
        elapsed = now - self.updated
        if elapsed > 0:
            limit = self.limit
            self.tokens = refill(self.tokens, limit.burst, elapsed, limit.rate)
            self.updated = now

    def admit(self, now: float) -> Admit:
        """Charge one frame against the rate limit: every frame costs a token
        (decisions.md 8 and 18), a data frame (a continuation included) or a
        Ping, Pong or Close. One that finds none is refused, and the refusal
        counts toward the strikes that close the connection."""
        limit = self.limit
        if limit.rate == 0:
            return _ACCEPT
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = refill(self.tokens, limit.burst, elapsed, limit.rate)
            self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return _ACCEPT
        if self.strikes is None:
            self.strikes = Strikes(limit.strike_limit, limit.strike_window)
        if self.strikes.add(now):
            return Admit.DISCONNECT
        return Admit.REFUSE

    def charge(self, now: float) -> None:
        """Take a token for one more frame of a message already refused, if
        one is left: such frames are paid for like any other, but the
        message was refused once, so they add no strike (see
        docs/protocol.md, section 8)."""
        if self.limit.rate == 0:
            return
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
