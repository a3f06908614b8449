# The C extension of src/wshub/_ingest.c (see wshub.ingest).
from typing import Final

TEXT: Final[int]
BINARY: Final[int]
MESSAGE: Final[int]
BROADCAST: Final[int]
MAX_CONTENT_CHARS: Final[int]

# (stop, [(code, body, end), ...]): the simple frames at the start of *data*.
def scan(data: bytes, limit: int, /) -> tuple[int, list[tuple[int, bytes, int]]]: ...
