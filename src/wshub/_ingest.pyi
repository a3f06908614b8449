# The C extension of src/wshub/_ingest.c (see wshub.ingest).
from typing import Final

TEXT: Final[int]
BINARY: Final[int]
MESSAGE: Final[int]
BROADCAST: Final[int]
MAX_CONTENT_CHARS: Final[int]

# (stop, [(code, body, end), ...]): the simple frames at the start of *data*.
def scan(data: bytes, limit: int, /) -> tuple[int, list[tuple[int, bytes, int]]]: ...

# (payloads, frames, messages): the envelopes of a run of plain relays from
# scan() (items of code MESSAGE or BROADCAST), their text frames, and which
# are messages; an offset each from *first_offset* up (none when < 0).
def stamp(
    relays: list[tuple[int, bytes, int]],
    head_message: bytes,
    head_broadcast: bytes,
    tail: bytes,
    first_offset: int,
    /,
) -> tuple[list[bytes], list[bytes], list[bool]]: ...
