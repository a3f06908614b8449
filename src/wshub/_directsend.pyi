# The C extension of src/wshub/_directsend.c (see wshub.fanout).
from collections.abc import Sequence
from typing import Any

# Each of *outs* has ``transport`` (is_closing(), get_write_buffer_size())
# and ``direct_fd`` (its socket's descriptor, >= 0).
def send_each(outs: Sequence[Any], data: bytes, /) -> list[tuple[int, int]] | None: ...

# ready[start:stop] (each with ``is_recipient``, ``sealed``, ``direct_fd``
# and ``transport``); the exceptions as (index, sent): -2 not a recipient,
# -1 a share of its own, else the bytes sent.
def send_ready(
    ready: list[Any], data: bytes, start: int, stop: int, /
) -> list[tuple[int, int]] | None: ...

# True (the default): a chunk's sends through io_uring where the kernel
# offers it; False: send(2) only (--io-uring off).
def use_io_uring(on: bool, /) -> None: ...

# ("io_uring" | "send", why) for this thread's sends; makes the ring now
# when it is to be used and not made yet.
def send_path() -> tuple[str, str]: ...
