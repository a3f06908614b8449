#!/usr/bin/env python3
"""Cross-node fan-out through one Redis against a 3-primary Redis Cluster, in one run.

    .venv/bin/python bench/redis_cluster_fanout.py            # 10 s per run, 3 rounds
    .venv/bin/python bench/redis_cluster_fanout.py --quick    # 4 s per run, 2 rounds

Starts one ``redis-server`` and a Redis Cluster of three primaries (no
replicas; ``redis-cli --cluster create``), then for each round and each
backplane two fresh ``wshub serve`` nodes on it (history off: the plain
backplane) and one ``python -m wshub.bench fanout`` (native engine) with
1,000 connections round-robin over the two nodes in 9 rooms: 9 is odd, so
every room has members on both nodes, and each message crosses Redis once to
the other node; the 9 rooms' channels spread over the cluster's shards.

Reported per run: client deliveries/s (the generator's), the two nodes' CPU
per client delivery, and Redis's own CPU (every redis-server process: user +
sys from /proc) per message Redis delivered to a node (the nodes'
``wshub_backplane_received_total``, probes included), both over the whole
run (connect, warm-up and measurement) so that the two are from one window.
Redis's CPU while no node is connected (its timers; a cluster's bus too) is
measured first over 5 s and given per second, and the per-message figure is
also given net of it. Medians of the rounds at the end. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SERVE = ["--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0"]
SERVE += ["--max-connections", "20000", "--log-level", "warning", "--history-size", "0"]
ROOMS = 9
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def redis_process(port: int, *extra: str) -> subprocess.Popen[bytes]:
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", *extra]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    for _ in range(200):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout:
            return proc
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not answer")


def start_cluster(workdir: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    ports = [free_port() for _ in range(3)]
    procs = []
    for port in ports:
        home = Path(workdir, str(port))
        home.mkdir()
        bus = str(free_port())
        extra = ["--cluster-enabled", "yes", "--cluster-port", bus, "--dir", str(home)]
        procs.append(redis_process(port, *extra))
    seeds = [f"127.0.0.1:{port}" for port in ports]
    subprocess.run(
        ["redis-cli", "--cluster", "create", *seeds, "--cluster-yes"],
        check=True,
        capture_output=True,
    )
    for _ in range(300):
        info = subprocess.run(
            ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True
        ).stdout
        if "cluster_state:ok" in info:
            break
        time.sleep(0.1)
    return procs, "redis+cluster://" + ",".join(seeds)


def start_node(url: str, name: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [PY, "-m", "wshub", "serve", "--port", "0", *SERVE, "--redis-url", url]
    cmd += ["--cluster-name", name]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    match = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
    assert match, "server did not start"
    return proc, int(match.group(1))


def received(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(r"^wshub_backplane_received_total\S* (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def run(url: str, redis_pids: list[int], name: str, duration: float) -> dict[str, float]:
    nodes = [start_node(url, name) for _ in range(2)]
    try:
        pids = [proc.pid for proc, _ in nodes]
        before = [received(port) for _, port in nodes]
        node_cpu = [cpu_seconds(pid) for pid in pids]
        redis_cpu = [cpu_seconds(pid) for pid in redis_pids]
        started = time.monotonic()
        cmd = [PY, "-m", "wshub.bench", "fanout", "-n", "1000", "--json", "--engine", "native"]
        cmd += ["--rooms", str(ROOMS), "--duration", str(duration), "--warmup", "2"]
        for _, port in nodes:
            cmd += ["--url", f"ws://127.0.0.1:{port}/websocket"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 180)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        result = json.loads(out.stdout)
        node_used = sum(cpu_seconds(pid) for pid in pids) - sum(node_cpu)
        redis_used = sum(cpu_seconds(pid) for pid in redis_pids) - sum(redis_cpu)
        crossed = sum(received(port) for _, port in nodes) - sum(before)
        seconds = time.monotonic() - started
        # The nodes' CPU and the deliveries of the whole run (connect and
        # warm-up too) are one window: the generator counts deliveries only in
        # its measured window, so the per-delivery figure uses its rate.
        return {
            "deliveries_per_s": float(result["deliveries_per_s"]),
            "node_cpu_s": node_used,
            "redis_cpu_s": redis_used,
            "crossed": crossed,
            "seconds": seconds,
            "redis_us_per_crossing": redis_used / crossed * 1e6 if crossed else float("nan"),
        }
    finally:
        for proc, _ in nodes:
            proc.terminate()
        for proc, _ in nodes:
            proc.wait(30)


def rounds_and_seconds() -> tuple[int, float]:
    """From the command line: how many rounds, how many seconds measured per run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=0, help="rounds (3; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 s")
    given = parser.parse_args()
    if given.quick:
        return given.runs or 2, 4.0
    return given.runs or 3, 10.0


def main() -> None:
    runs, duration = rounds_and_seconds()
    workdir = tempfile.mkdtemp(prefix="wshub-bench-rcluster-")
    single_port = free_port()
    single = redis_process(single_port)
    cluster, cluster_url = start_cluster(workdir)
    setups = [
        ("one Redis", f"redis://127.0.0.1:{single_port}/0", [single.pid]),
        ("Redis Cluster, 3 primaries", cluster_url, [proc.pid for proc in cluster]),
    ]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in setups}
    idle: dict[str, float] = {}
    try:
        for name, _, pids in setups:
            start, used = time.monotonic(), sum(cpu_seconds(pid) for pid in pids)
            time.sleep(5.0)
            used = sum(cpu_seconds(pid) for pid in pids) - used
            idle[name] = used / (time.monotonic() - start)
        for round_ in range(runs):
            for name, url, pids in setups:
                row = run(url, pids, f"bc{round_}{len(rows[name])}{name[:3]}", duration)
                net = row["redis_cpu_s"] - idle[name] * row["seconds"]
                row["redis_us_net"] = net / row["crossed"] * 1e6 if row["crossed"] else 0.0
                rows[name].append(row)
                print(json.dumps({"setup": name, **row}), file=sys.stderr)
    finally:
        for proc in [single, *cluster]:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; medians of {runs} rounds\n")
    print(
        "| backplane | client deliveries/s | Redis-delivered messages "
        "| Redis CPU s | Redis CPU µs per Redis-delivered message (net of idle) "
        "| Redis idle CPU ms/s | nodes' CPU s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, results in rows.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"| {name} | {median('deliveries_per_s'):,.0f} | {median('crossed'):,.0f} "
            f"| {median('redis_cpu_s'):.2f} | {median('redis_us_per_crossing'):.2f} "
            f"({median('redis_us_net'):.2f}) | {idle[name] * 1000:.1f} "
            f"| {median('node_cpu_s'):.2f} |"
        )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
