# The C extension of src/wshub/_directsend.c (see wshub.fanout).
import asyncio
from typing import Any

def send_each(
    outs: list[tuple[asyncio.Transport, int, Any]], data: bytes, /
) -> list[tuple[int, int]] | None: ...
