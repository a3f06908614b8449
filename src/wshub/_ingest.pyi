# The C extension of src/wshub/_ingest.c (see wshub.ingest).
from typing import Any, Final

TEXT: Final[int]
BINARY: Final[int]
MESSAGE: Final[int]
BROADCAST: Final[int]
RUN: Final[int]
MAX_CONTENT_CHARS: Final[int]

# (stop, [(code, body, end), ...]): the simple frames at the start of *data*;
# with *runs*, each run of relays in a row is one (RUN, kinds, contents, ends).
def scan(
    data: bytes, limit: int, runs: bool = False, /
) -> tuple[int, list[tuple[int, bytes, int] | tuple[int, bytes, list[bytes], bytes]]]: ...

# (frames, excluded, message_count, blob, ends, flags): the text frames of a
# run of plain relays from scan(..., True) (its kinds and contents), *sender*
# for each message and None for each broadcast, and how many are messages;
# an offset each from *first_offset* up (none when < 0), and then, as
# History.keep_packed takes them, the payloads joined, where each ends (native
# 32-bit ints after a 0) and a flag byte each (1: a message); None without.
def stamp(
    kinds: bytes,
    contents: list[bytes],
    head_message: bytes,
    head_broadcast: bytes,
    tail: bytes,
    first_offset: int,
    sender: Any,
    /,
) -> tuple[list[bytes], list[Any], int, bytes | None, bytes | None, bytes | None]: ...
