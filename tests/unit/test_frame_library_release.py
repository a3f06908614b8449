"""A connection lets the frame library go between frames (docs/memory.md); what it
lets go must be freed at once, not left as a cycle for the garbage collector (the
server raises the GC's thresholds, so a cycle per Ping grew the soak's RSS)."""

from __future__ import annotations

import gc
import weakref

from websockets.protocol import Side, State

from wshub.connection import _FrameProtocol


def test_a_released_library_is_freed_by_its_reference_count() -> None:
    gc.disable()
    try:
        kept = _FrameProtocol(Side.SERVER, state=State.OPEN)
        unreleased = weakref.ref(kept)
        del kept
        assert unreleased() is not None  # the parser generator holds it: a cycle
        released = _FrameProtocol(Side.SERVER, state=State.OPEN)
        released.receive_data(b"\x89\x80abcd")  # a masked, empty Ping
        assert released.data_to_send() == [b"\x8a\x00"]  # answered: the parser ran
        released.release()
        ref = weakref.ref(released)
        del released
        assert ref() is None
    finally:
        gc.enable()
        gc.collect()
