"""Where an idle connection's bytes go: a tracemalloc diff inside a real server.

Starts ``wshub serve`` in a child process with tracemalloc on (10 frames), takes
a snapshot before and while ``wshub bench idle`` holds N connections, and prints
the difference per connection: by allocation site (the innermost wshub, websockets
or uvloop line), by object type (gc), and against the RSS growth, which also
holds what tracemalloc cannot see (the kernel's socket memory is not RSS at all;
C allocations made outside Python's allocators are).

    .venv/bin/python bench/memory_breakdown.py -n 10000 --rooms 1000
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

SERVE_FLAGS = [
    "--message-rate", "0", "--ip-connect-rate", "0", "--max-connections-per-ip", "0",
    "--max-connections", "0", "--max-rooms", "0", "--log-level", "warning",
]  # fmt: skip


OPEN = 'wshub_connections{state="open"}'


def child(port: int, out_dir: str) -> None:
    """The server, with a snapshot written on each SIGUSR1."""
    # imported before tracing: module set-up (logs.py walks every code point)
    # crawls under tracemalloc, and is not per connection anyway
    import wshub.logs  # noqa: F401
    import wshub.server  # noqa: F401
    from wshub.cli import main

    tracemalloc.start(10)
    count = [0]

    def snap(*_: object) -> None:
        gc.collect()
        count[0] += 1
        tracemalloc.take_snapshot().dump(f"{out_dir}/snap{count[0]}.bin")
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        Path(f"{out_dir}/types{count[0]}.json").write_text(json.dumps(types))
        Path(f"{out_dir}/done{count[0]}").write_text("")

    signal.signal(signal.SIGUSR1, snap)

    sys.exit(main(["serve", "--port", str(port), *SERVE_FLAGS]))


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _snapshot(pid: int, out: Path, k: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    while not (out / f"done{k}").exists():
        time.sleep(0.2)


def _site(tb: tracemalloc.Traceback) -> str:
    # the innermost frame in wshub, websockets or uvloop code; else the innermost
    for frame in reversed(tb):  # a Traceback lists the oldest frame first
        f = frame.filename
        if "/wshub/" in f or "/websockets/" in f or "uvloop" in f:
            return f"{f.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno}"
    return f"{tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--rooms", type=int, default=1000)
    p.add_argument("--port", type=int, default=18931)
    p.add_argument("--out", default="/tmp/wshub-memory")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(args.port), str(out)],
    )
    try:
        while True:
            try:
                _metric(args.port, OPEN)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.1)
        _snapshot(proc.pid, out, 1)
        rss0 = _rss(proc.pid)
        bench = subprocess.Popen(
            [sys.executable, "-m", "wshub.bench", "idle", "-n", str(args.n)]
            + ["--rooms", str(args.rooms), "--duration", "600", "--settle", "60", "--json"]
            + ["--connect-timeout", "120", "--connect-concurrency", "16"]
            + ["--url", f"ws://127.0.0.1:{args.port}/websocket"],
            stdout=subprocess.DEVNULL,
        )
        # until all are in, or no more come (the traced server is slow: some
        # handshakes may time out); then the joins are sent, buffers drained
        last, still = -1.0, 0
        while still < 6:
            now = _metric(args.port, OPEN)
            if now >= args.n:
                break
            still = still + 1 if now == last and now > 0 else 0
            print(f"\r{now:.0f} connections", end="", file=sys.stderr, flush=True)
            last = now
            time.sleep(0.5)
        time.sleep(3.0)
        rss1 = _rss(proc.pid)
        _snapshot(proc.pid, out, 2)
        n = int(_metric(args.port, OPEN))
        bench.send_signal(signal.SIGINT)
        bench.wait(60)
    finally:
        proc.terminate()
        proc.wait(30)
    report(out, n, args.top, (rss1 - rss0) / n)
    return 0


def report(out: Path, n: int, top: int, rss_each: float | None) -> None:
    """The difference of the two snapshots in *out*, per connection."""
    a = tracemalloc.Snapshot.load(str(out / "snap1.bin"))
    b = tracemalloc.Snapshot.load(str(out / "snap2.bin"))
    traced = sum(s.size for s in b.statistics("filename")) - sum(
        s.size for s in a.statistics("filename")
    )
    sites: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for stat in b.compare_to(a, "traceback"):
        site = _site(stat.traceback)
        sites[site] += stat.size_diff
        counts[site] += stat.count_diff
    t1 = json.loads((out / "types1.json").read_text())
    t2 = json.loads((out / "types2.json").read_text())
    if rss_each is not None:
        print(f"RSS +{rss_each:.2f} KiB per connection (tracemalloc's bookkeeping included)")
    print(f"connections {n}; Python allocations +{traced / n:.0f} B each")
    print(f"\nby allocation site (B per connection, blocks per connection), top {top}:")
    for site, size in sites.most_common(top):
        print(f"  {size / n:8.0f} B {counts[site] / n:6.2f}  {site}")
    print("\nobjects per connection (gc-tracked types, +0.5 or more):")
    for name in sorted(t2, key=lambda k: t1.get(k, 0) - t2[k]):
        d = (t2[name] - t1.get(name, 0)) / n
        if d >= 0.5:
            print(f"  {d:6.2f}  {name}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--report":  # --report DIR N: snapshots taken
        report(Path(sys.argv[2]), int(sys.argv[3]), 40, None)
    else:
        sys.exit(main())
