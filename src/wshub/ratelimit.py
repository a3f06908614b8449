"""Rate limits as pure arithmetic: the caller passes the time in.

* :class:`TokenBucket`: *rate* tokens per second up to *burst*; each event
  takes one. Used per client IP (new connections) and per kind of log line.
  A connection keeps the same arithmetic (:func:`refill`) in two slots of its
  :class:`~wshub.session.Session` instead, with the shared
  :class:`MessageLimit`: a bucket object per connection cost 88 B
  (docs/memory.md).
* :class:`Strikes`: counts refusals in a sliding window, to escalate from an
  ``error`` reply to a 1008 close (decisions.md 8).
* :class:`KeyedBuckets`: one bucket per key (client IP), forgetting buckets
  that have refilled so memory follows the active clients only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["UNLIMITED", "KeyedBuckets", "MessageLimit", "Strikes", "TokenBucket", "refill"]


def refill(tokens: float, burst: float, elapsed: float, rate: float) -> float:
    """The tokens of a bucket *elapsed* seconds after it held *tokens*.

    Capped at *burst* itself: a full bucket's tokens are then the *burst*
    value given (an int for a connection), and one token taken leaves a small
    int, which CPython shares: an idle connection's bucket holds no float."""
    return min(burst, tokens + elapsed * rate)


@dataclass(frozen=True, slots=True)
class MessageLimit:
    """A connection's message rate limit (decisions.md 8), one object shared
    by every connection with the same settings: *rate* frames per second up
    to *burst* at once (``rate == 0``: unlimited); *strike_limit* refusals
    within *strike_window* seconds close the connection (0: never)."""

    rate: float
    burst: int
    strike_limit: int
    strike_window: float


UNLIMITED = MessageLimit(rate=0, burst=1, strike_limit=0, strike_window=1.0)
"""Every frame accepted (the conformance-test endpoint)."""


class TokenBucket:
    """*rate* events per second on average, *burst* at once. ``rate == 0``
    means unlimited."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Take one token at time *now*; False when the bucket is empty."""
        if self.rate == 0:
            return True
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = refill(self.tokens, self.burst, elapsed, self.rate)
            self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def is_full(self, now: float) -> bool:
        return self.tokens + max(0.0, now - self.updated) * self.rate >= self.burst


class Strikes:
    """Refusals within a sliding *window*; :meth:`add` says when *limit* is
    reached. ``limit == 0`` never escalates."""

    __slots__ = ("limit", "window", "times")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: deque[float] = deque()

    def add(self, now: float) -> bool:
        """Record a refusal at *now*; True when the limit is reached."""
        if self.limit == 0:
            return False
        times = self.times
        times.append(now)
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) > self.limit:
            times.popleft()
        return len(times) >= self.limit


class KeyedBuckets:
    """A :class:`TokenBucket` per key, created on first use."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[Hashable, TokenBucket] = {}

    def take(self, key: Hashable, now: float) -> bool:
        if self.rate == 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def purge(self, now: float) -> int:
        """Forget buckets that are full again (they behave like new ones)."""
        full = [key for key, bucket in self._buckets.items() if bucket.is_full(now)]
        for key in full:
            del self._buckets[key]
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)
