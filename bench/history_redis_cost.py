#!/usr/bin/env python3
"""What history on Redis costs: fan-out and latency with history on and off,
on one node (memory history) and on Redis (the room's script), side by side.

    .venv/bin/python bench/history_redis_cost.py            # 10 s per run, 2 rounds
    .venv/bin/python bench/history_redis_cost.py --quick    # 4 s per run

For each setup it starts a fresh ``wshub serve`` (pinned to core 0 when
``taskset`` exists) and runs ``python -m wshub.bench`` (pinned to core 1)
twice: ``rate`` (1,000 connections, one sender at 50 msg/s: latency from the
send to each recipient, every recipient on the sender's node, so on Redis
with history on each frame makes the round trip to Redis that history off
skips), ``fanout`` (1,000 connections, closed loop: deliveries/s and
server CPU per delivery), and the sender's own round trip (a broadcast until
its sender gets its copy, one at a time, 10 other members). Prints one
Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SERVE = ["--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0"]
SERVE += ["--max-connections", "20000", "--log-level", "warning"]


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_node(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [*pinned(0), PY, "-m", "wshub", "serve", "--port", "0", *SERVE, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    match = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
    assert match, "server did not start"
    return proc, int(match.group(1))


def bench(scenario: str, port: int, pid: int, duration: float) -> dict[str, object]:
    cmd = [*pinned(1), PY, "-m", "wshub.bench", scenario, "-n", "1000", "--json"]
    cmd += ["--url", f"ws://127.0.0.1:{port}/websocket", "--server-pid", str(pid)]
    cmd += ["--duration", str(duration), "--warmup", "2"]
    cmd += ["--engine", "native"]  # the generator's own CPU out of the way
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def echo_round_trip(port: int, count: int) -> dict[str, float]:
    """The sender's own round trip: one client broadcasts and waits for its
    own copy, *count* times, with 10 other members in the room (sequential:
    the latency of one frame, not a throughput)."""
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{port}/websocket/echo"
    times = []
    with contextlib.ExitStack() as others:
        for _ in range(10):
            others.enter_context(connect(url, max_queue=None))
        ws = others.enter_context(connect(url))
        ws.recv(timeout=10)  # welcome
        for i in range(count + 100):
            start = time.perf_counter()
            ws.send(json.dumps({"type": "broadcast", "content": str(i)}))
            while json.loads(ws.recv(timeout=10))["type"] != "broadcast":
                pass
            if i >= 100:  # warm-up left out
                times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "echo_ms_p50": times[len(times) // 2],
        "echo_ms_p99": times[int(len(times) * 0.99)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=2, help="rounds over the setups (2)")
    options = parser.parse_args()
    duration = 4.0 if options.quick else 10.0
    redis, url = start_redis()
    setups = [
        ("one node, history off", ["--history-size", "0"]),
        ("one node, history on (memory)", []),
        ("Redis, history off", ["--redis-url", url, "--history-size", "0"]),
        ("Redis, history on (script)", ["--redis-url", url]),
    ]
    rows = []
    try:
        for name, args in setups * options.runs:
            row: dict[str, object] = {"setup": name}
            for scenario in ("echo", "rate", "fanout"):
                node, port = start_node([*args, "--cluster-name", f"b{len(rows)}{scenario}"])
                try:
                    if scenario == "echo":
                        row[scenario] = echo_round_trip(port, 500 if options.quick else 2000)
                    else:
                        row[scenario] = bench(scenario, port, node.pid, duration)
                finally:
                    node.terminate()
                    node.wait(30)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        redis.terminate()
        redis.wait(30)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print(
        "| setup | sender's round trip: p50 ms | p99 ms "
        "| 50 msg/s: p50 ms | p99 ms | CPU µs/delivery "
        "| fan-out: deliveries/s | CPU µs/delivery | p99 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        echo, rate, fanout = row["echo"], row["rate"], row["fanout"]
        assert isinstance(echo, dict) and isinstance(rate, dict) and isinstance(fanout, dict)
        print(
            f"| {row['setup']} | {_get(echo, 'echo_ms_p50')} | {_get(echo, 'echo_ms_p99')} "
            f"| {_get(rate, 'latency_ms_p50')} | {_get(rate, 'latency_ms_p99')} "
            f"| {_get(rate, 'server_cpu_us_per_delivery')} "
            f"| {_get(fanout, 'deliveries_per_s')} | {_get(fanout, 'server_cpu_us_per_delivery')} "
            f"| {_get(fanout, 'latency_ms_p99')} |"
        )


def _get(result: dict[str, object], key: str) -> str:
    value = result.get(key)
    if not isinstance(value, int | float):
        return "?"
    return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
