#!/usr/bin/env python3
"""Where one relayed message's server CPU goes, from a py-spy profile.

    .venv/bin/python bench/rooms_breakdown.py docs/profiles/rooms100-wshub-reader-before.collapsed.txt \
        [--us-per-delivery 2.26] [--recipients 9]

Reads collapsed stacks (``py-spy record --native --format raw``, as
bench/profile_fanout.py --rooms 100 writes them) and gives each sample to the
part of the message path nearest its leaf (its own code, not its callers'):
the first of the patterns below that one of its frames matches, walking from
the leaf up. With ``--us-per-delivery`` (the server CPU per delivery measured
without the profiler) and the recipients per message, the shares become µs
per message.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# (part, pattern on one frame "function (file:line)"), tried leaf first.
PARTS = [
    ("send() to the recipients (the syscall, libc side)", r"^(__)?send(msg|to)? \(libc|^writev? \(libc"),
    ("reading the sockets (recv/read)", r"^(recv|read|recvmsg) \(libc"),
    ("epoll_wait", r"epoll"),
    ("history: append, offset, trimming (history.py)", r"wshub/history\.py"),
    ("backplane hand-off (Envelope, MemoryBackplane.publish)", r"wshub/backplane/"),
    ("metrics (the fan-out size histogram)", r"wshub/metrics\.py"),
    ("envelope: encode_relay, timestamp, frame header", r"encode_relay|iso_timestamp|wshub/wire\.py"),
    ("parse and validate (JSON, content checks)", r"parse_client_text|_json_object|_check_content|"
     r"_plain_relay|_parse_full|scanstring|scanner_call|_parse_object"),
    ("rate limit (session.admit, token bucket)", r"wshub/session\.py|wshub/ratelimit\.py"),
    ("frame scan and unmask (framescan.py, apply_mask)", r"wshub/framescan\.py|apply_mask"),
    ("the pass: batch, join, the C send path", r"Fanout\.(flush|_flush_audience|_write_batch|_write_chunk|"
     r"_send_direct|_write)|_Batch|send_each"),
    ("fan-out queueing (to_all, _schedule)", r"wshub/fanout\.py"),
    ("hub routing (on_text, publish)", r"wshub/hub\.py"),
    ("connection: frames in, UTF-8 decode", r"wshub/connection\.py|unicode_decode_utf8"),
    ("event loop (uvloop), interpreter, GC", r"."),
]


def breakdown(path: Path) -> tuple[int, collections.Counter[str]]:
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    compiled = [(name, re.compile(pattern)) for name, pattern in PARTS]
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        frames.reverse()  # leaf first
        n = int(count)
        total += n
        for name, pattern in compiled:
            if any(pattern.search(frame) for frame in frames):
                parts[name] += n
                break
    return total, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("collapsed", nargs="+", type=Path)
    ap.add_argument("--us-per-delivery", type=float, nargs="*", default=None,
                    help="the server CPU per delivery of each profile's scenario, without the profiler")
    ap.add_argument("--recipients", type=float, default=9.0)
    a = ap.parse_args()
    results = [breakdown(p) for p in a.collapsed]
    names = [name for name, _ in PARTS]
    head = "| part | " + " | ".join(f"{p.name} share" for p in a.collapsed)
    if a.us_per_delivery:
        head += " | " + " | ".join("µs per message" for _ in a.collapsed)
    print(head + " |")
    print("|" + " --- |" * (1 + len(a.collapsed) * (2 if a.us_per_delivery else 1)))
    for name in names:
        row = [f"{parts[name] / total * 100:.1f} %" for total, parts in results]
        if a.us_per_delivery:
            row += [
                f"{parts[name] / total * us * a.recipients:.2f}"
                for (total, parts), us in zip(results, a.us_per_delivery, strict=True)
            ]
        print(f"| {name} | " + " | ".join(row) + " |")
    totals = [f"{total} samples" for total, _ in results]
    if a.us_per_delivery:
        totals += [f"{us * a.recipients:.2f}" for us in a.us_per_delivery]
    print("| total | " + " | ".join(totals) + " |")


if __name__ == "__main__":
    main()
