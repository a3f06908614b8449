"""The one way tests wait for something: poll a condition, bounded.

Tests wait for events, never for fixed sleeps (see conftest.py): when the
event is a state to observe (a count in /stats, a file descriptor gone, a
list filled by another task), :func:`wait_until` (or its asyncio twin) polls
it until it holds, and fails with *what* after *timeout* seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from .conftest import TIMEOUT

__all__ = ["wait_until", "wait_until_async"]


def _polls(predicate: Callable[[], bool], what: str, timeout: float) -> Iterator[float]:
    """Yield until *predicate* holds (the caller sleeps between); raise after *timeout*."""
    start = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        yield elapsed


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT, interval: float = 0.01
) -> float:
    """Poll *predicate* until it holds; return the seconds it took."""
    start = time.monotonic()
    for _ in _polls(predicate, what, timeout):
        time.sleep(interval)
    return time.monotonic() - start


async def wait_until_async(
    predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT, interval: float = 0.01
) -> float:
    """:func:`wait_until` inside an event loop: the loop runs between polls."""
    start = time.monotonic()
    for _ in _polls(predicate, what, timeout):
        await asyncio.sleep(interval)
    return time.monotonic() - start
