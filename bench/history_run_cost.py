"""What keeping a read's run of relays costs the history, in the rooms scenario's shape.

    .venv/bin/python bench/history_run_cost.py [--rooms 100] [--run 32] [--seconds 3]
    PYTHONPATH=/tmp/base/src .venv/bin/python bench/history_run_cost.py   # another tree

``History.next_offset`` + ``History.keep_run`` as ``Hub.on_plain_relays`` calls
them: ``--rooms`` rooms, each held, sent runs of ``--run`` payloads of the
rooms scenario's size (~200 bytes) in turn, room after room, so that with the
default ``--history-size`` 100 every room is full and every run drops about a
run's worth of its oldest entries, and the whole history (100 rooms x 100
entries by default) is far from the CPU's caches by the time a room comes
round again, as in the server. The payloads are made fresh for each run (the
server's ``stamp`` does too). Prints the median of 7 timings of
``--seconds`` / 7 each: ns per message (thread CPU time), and the bytes the
history accounts against what tracemalloc sees it hold at the end.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

from wshub import protocol
from wshub.history import History
from wshub.ids import ConnectionId
from wshub.protocol import RelayKind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--run", type=int, default=32)
    parser.add_argument("--history-size", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    history = History(size=args.history_size)
    names = [f"room{i:03d}" for i in range(args.rooms)]
    senders = [f"ws-1-{i:09d}" for i in range(args.rooms)]
    for name in names:
        history.hold(name, 0.0)
    kinds = [RelayKind.BROADCAST] * args.run
    messages = [False] * args.run
    content = "m" * 100
    now = 0.0
    sent = 0

    def one_round() -> None:
        nonlocal now, sent
        for name, sender in zip(names, senders, strict=True):
            now += 0.0001
            first = history.next_offset(name, now)
            payloads = [
                protocol.encode_relay(kind, ConnectionId(sender), content, 1.0, first + i)
                for i, kind in enumerate(kinds)
            ]
            history.keep_run(name, first, payloads, sender, messages, now)
            sent += args.run

    def encode_only() -> None:
        for sender in senders:
            [
                protocol.encode_relay(kind, ConnectionId(sender), content, 1.0, 1000 + i)
                for i, kind in enumerate(kinds)
            ]

    for _ in range(5):
        one_round()  # fill every room
    share = args.seconds / 7
    timings = []
    for _ in range(7):
        rounds = 0
        start = time.thread_time()
        before = sent
        while time.thread_time() - start < share:
            one_round()
            rounds += 1
        spent = time.thread_time() - start
        base = time.thread_time()
        for _ in range(rounds):
            encode_only()
        encoding = time.thread_time() - base
        timings.append((spent - encoding) / (sent - before) * 1e9)
    gc.collect()
    tracemalloc.start()
    probe = History(size=args.history_size)
    history, kept = probe, history
    for name in names:
        history.hold(name, 0.0)
    gc.collect()
    empty = tracemalloc.get_traced_memory()[0]
    for _ in range(5):
        one_round()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - empty
    tracemalloc.stop()
    print(
        f"history per message (next_offset + keep_run, less the encoding): "
        f"{statistics.median(timings):.0f} ns (runs: {', '.join(f'{t:.0f}' for t in timings)}); "
        f"{kept.entries} entries held; memory {held:,} B held against "
        f"{probe.bytes:,} B accounted"
    )


if __name__ == "__main__":
    main()
