"""What a full memory history costs the garbage collector.

    .venv/bin/python bench/history_gc.py [--rooms 2000] [--memory BYTES] [--runs 7]

Fills a History (the server's defaults: 100 entries a room, a 64 MiB bound)
with chat frames of 100-byte content spread over --rooms rooms until the bound
evicts, with the server's collector settings (``gc.freeze()`` after start-up,
a young threshold of 50,000), then prints the objects the collector tracks and
the time of a full collection (median and best of --runs). For a "before",
``PYTHONPATH`` at another commit's ``src`` (e.g. a ``git worktree`` of it).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

# The venv's wshub (this worktree's src), or PYTHONPATH's: no sys.path edit here.
from wshub.history import Entry, History
from wshub.ids import ConnectionId
from wshub.protocol import RelayKind, encode_relay
from wshub.server import GC_YOUNG_THRESHOLD

SENDER = ConnectionId("ws-1764600000000-abcdefghi")
CONTENT = "x" * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", type=int, default=2000)
    ap.add_argument("--memory", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    gc.collect()
    gc.freeze()  # as serve() does once started
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    history = History(memory=a.memory)
    appended = 0
    started = time.perf_counter()
    while history.evicted == 0:
        room = f"room{appended % a.rooms}"
        offset = history.next_offset(room, 1.0)
        payload = encode_relay(RelayKind.MESSAGE, SENDER, CONTENT, 1.0, offset)
        history.append(room, Entry(offset, payload, SENDER, RelayKind.MESSAGE, None), 1.0)
        appended += 1
    filled = time.perf_counter() - started
    gc.collect()
    tracked = len(gc.get_objects())
    pauses = []
    for _ in range(a.runs):
        start = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - start) * 1000)
    print(
        f"{history.entries} entries in {a.rooms} rooms ({history.bytes / 2**20:.1f} MiB accounted; "
        f"{appended} appended, {filled / appended * 1e6:.2f} µs each with the encoding)\n"
        f"objects tracked by the collector: {tracked}\n"
        f"a full collection: {statistics.median(pauses):.1f} ms (median of {a.runs}; "
        f"best {min(pauses):.1f} ms)"
    )


if __name__ == "__main__":
    main()
