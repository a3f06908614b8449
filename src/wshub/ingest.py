"""The C ingest path: a read's simple frames, and its plain relays, in one call.

:mod:`wshub._ingest` (src/wshub/_ingest.c) walks the whole, final, masked
text and binary frames at the start of a read (the frames
:mod:`wshub.framescan` hands to the connection itself), unmasks them, and
recognises the plain relay ``{"type":"message"|"broadcast","content":"..."}``
by the rule of ``protocol._plain_relay``, content checks included. A plain
relay comes back as its content's bytes already JSON-escaped the way the
envelope writes them (:func:`wshub.protocol.encode_plain_relay`), so the
message never becomes a str. Every other frame, and every relay the protocol
would refuse or needs to judge, comes back as the frame's payload for the
present Python path, so each refusal keeps one implementation.

The extension is optional (no compiler: :data:`scan` is None, and frames are
read by :mod:`wshub.framescan` alone). ``WSHUB_NO_C_INGEST=1`` in the
environment turns it off too, so that the Python path stays tested.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from .protocol import RelayKind

__all__ = ["BINARY", "BROADCAST", "KINDS", "MESSAGE", "RUN", "TEXT", "scan", "stamp"]

TEXT: Final = 0
BINARY: Final = 1
MESSAGE: Final = 2
BROADCAST: Final = 3
RUN: Final = 4
KINDS: Final = (None, None, RelayKind.MESSAGE, RelayKind.BROADCAST)
"""The relay kind of an item's code (2 and 3); None for TEXT and BINARY."""

Item = tuple[int, bytes, int]
"""``(code, body, end)``: see src/wshub/_ingest.c."""
Run = tuple[int, bytes, list[bytes], bytes]
"""``(RUN, kinds, contents, ends)``, the relays in a row of ``scan(data,
limit, True)``: their codes (one byte each), their contents, and their ends
(8 bytes little-endian each); see src/wshub/_ingest.c."""
Scan = Callable[[bytes, int, bool], tuple[int, list[Item | Run]]]
Stamped = tuple[list[bytes], list[Any], int, bytes | None, bytes | None, bytes | None]
"""``(frames, excluded, message_count, blob, ends, flags)``, the last three
(the payloads as the history keeps a run) only with offsets: see
src/wshub/_ingest.c."""
Stamp = Callable[[bytes, list[bytes], bytes, bytes, bytes, int, Any], Stamped]

scan: Scan | None
stamp: Stamp | None
"""The envelopes, frames and kinds of a run of plain relays, one sender's
(``Hub.on_plain_relays``); None exactly when :data:`scan` is."""
try:
    from ._ingest import scan, stamp
except ImportError:  # pragma: no cover (built without a compiler)
    scan = stamp = None
if os.environ.get("WSHUB_NO_C_INGEST"):
    scan = stamp = None
