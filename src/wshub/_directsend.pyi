# The C extension of src/wshub/_directsend.c (see wshub.fanout).
from collections.abc import Sequence
from typing import Any

# Each of *outs* has ``transport`` (is_closing(), get_write_buffer_size())
# and ``direct_fd`` (its socket's descriptor, >= 0).
def send_each(outs: Sequence[Any], data: bytes, /) -> list[tuple[int, int]] | None: ...
