"""``wshub serve`` with probes on what could hold a message back, for the latency scenario.

    LATENCY_PROBE_OUT=/tmp/probe.json .venv/bin/python bench/latency_probe.py serve ARGS...
    .venv/bin/python bench/latency_probe.py --summary /tmp/probe.json

The first form runs the server as ``wshub serve ARGS`` does, recording every
garbage collection (``gc.callbacks``: when, how long, which generation), every
``Fanout.flush`` (wall and thread CPU time, deliveries, slices) and every
``Hub.on_text`` (its thread CPU time and the young generation's count), and
writes them as JSON when the server exits (SIGTERM). The second prints what
happened during the rate phase (from the first message in to the last): the
collections, the passes' CPU per delivery and slices, the per-message CPU.

The probes wrap methods from outside; nothing in ``src/`` knows of them. Used
for the p99 investigation on docs/benchmarks-history.md.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
from time import monotonic, perf_counter, thread_time
from typing import Any


def install(out: str) -> None:
    from wshub import fanout, hub

    collections: list[tuple[float, float, int]] = []
    flushes: list[tuple[float, float, float, int, int]] = []
    messages: list[tuple[float, float, int]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = perf_counter()
        else:
            collections.append((monotonic(), perf_counter() - started[0], info["generation"]))

    gc.callbacks.append(on_gc)
    flush = fanout.Fanout.flush
    on_text = hub.Hub.on_text

    def probed_flush(self: Any) -> None:
        when, cpu, wall = monotonic(), thread_time(), perf_counter()
        slices, deliveries = self.slices, self.deliveries
        flush(self)
        flushes.append(
            (
                when,
                perf_counter() - wall,
                thread_time() - cpu,
                self.slices - slices,
                self.deliveries - deliveries,
            )
        )

    def probed_on_text(self: Any, conn: Any, text: str) -> None:
        when, cpu = monotonic(), thread_time()
        on_text(self, conn, text)
        messages.append((when, thread_time() - cpu, gc.get_count()[0]))

    fanout.Fanout.flush = probed_flush  # type: ignore[method-assign]
    hub.Hub.on_text = probed_on_text  # type: ignore[method-assign]

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(
                {
                    "collections": collections,
                    "flushes": flushes,
                    "messages": messages,
                    "threshold": gc.get_threshold(),
                },
                f,
            )

    atexit.register(dump)


def _q(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))]


def summary(path: str) -> None:
    with open(path) as f:
        d = json.load(f)
    messages = d["messages"]
    if not messages:
        print("no message came in")
        return
    first, last = messages[0][0], messages[-1][0]
    during = [c for c in d["collections"] if first <= c[0] <= last + 0.1]
    passes = [f for f in d["flushes"] if first <= f[0] <= last + 0.5]
    deliveries = sum(f[4] for f in passes) or 1
    cpu = sorted(m[1] * 1e6 for m in messages)
    counts = [m[2] for m in messages]
    print(
        f"rate phase {last - first:.1f} s, {len(messages)} messages in; collections during it: "
        f"{len(during)} {[(c[2], round(c[1] * 1000, 2)) for c in during][:10]}; young count "
        f"{min(counts)}-{max(counts)} (threshold {d['threshold'][0]})"
    )
    print(
        f"passes: {len(passes)}, {sum(1 for f in passes if f[3])} ran out of their slice, "
        f"CPU per delivery {sum(f[2] for f in passes) / deliveries * 1e6:.3f} µs, "
        f"longest {max(f[1] for f in passes) * 1000:.1f} ms wall"
    )
    print(f"on_text CPU per message: p50 {_q(cpu, 0.5):.1f} µs, p99 {_q(cpu, 0.99):.1f} µs")


def main() -> None:
    if sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2])
        return
    out = os.environ.get("LATENCY_PROBE_OUT")
    if not out:
        raise SystemExit("set LATENCY_PROBE_OUT to the JSON file to write")
    install(out)
    from wshub.cli import main as wshub_main

    sys.exit(wshub_main())


if __name__ == "__main__":
    main()
