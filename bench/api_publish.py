"""Publications per second through the backend API (``POST /api/publish``).

Starts real ``wshub serve`` processes (one node, or two nodes on a
redis-server it starts on a free port), connects ``--members`` WebSocket
members to the room (split across the nodes, each drained by a reader that
discards what it gets), then runs ``--connections`` kept-alive HTTP
connections, each sending one publication after another (the next when the
answer to the last is in), spread over the nodes, for ``--seconds``.

Reports requests per second, the latency median and p99, the CPU seconds
per second of this load generator and of each server, and checks that the
members received every publication.

    .venv/bin/python bench/api_publish.py [--nodes 1|2] [--connections 8]
        [--members 10] [--seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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

KEY = "bench-key-0123456789abcdef"
ROOM = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process *pid* so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_node(*args: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "warning"]
    cmd += ["--api-keys", KEY, "--ip-connect-rate", "0", "--max-connections-per-ip", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    match = re.search(r"listening on \S+?:(\d+)", proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, int(match.group(1))


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--nodes 2 needs redis-server")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="wshub-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


async def member(port: int, counts: list[int], index: int, ready: asyncio.Event) -> None:
    """A WebSocket member of the room that counts the publications it gets."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /websocket/{ROOM} HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    ready.set()
    marker = b'"content":"p'
    tail = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            return
        chunk = tail + data
        counts[index] += chunk.count(marker)
        tail = chunk[-len(marker) + 1 :]


async def publisher(
    port: int, stop_at: float, latencies: list[float], errors: list[int], number: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sequence = 0
    clock = time.perf_counter
    while clock() < stop_at:
        body = json.dumps({"room": ROOM, "content": f"p{number}-{sequence}"}).encode()
        writer.write(
            (
                f"POST /api/publish HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        start = clock()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        latencies.append(clock() - start)
        if not head.startswith(b"HTTP/1.1 200"):
            errors.append(int(head[9:12]))
        if b"Connection: close" in head:  # the connection's request bound: open another
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sequence += 1
    writer.close()


async def run(ports: list[int], pids: list[int], args: argparse.Namespace) -> dict[str, object]:
    counts = [0] * args.members
    readies = [asyncio.Event() for _ in range(args.members)]
    members = [
        asyncio.create_task(member(ports[i % len(ports)], counts, i, readies[i]))
        for i in range(args.members)
    ]
    for ready in readies:
        await asyncio.wait_for(ready.wait(), 10)
    await asyncio.sleep(0.5)  # the joins' presence settles across the nodes
    latencies: list[float] = []
    errors: list[int] = []
    cpu_before = [cpu_seconds(pid) for pid in pids]
    own_before = time.process_time()
    start = time.perf_counter()
    stop_at = start + args.seconds
    await asyncio.gather(
        *(
            publisher(ports[i % len(ports)], stop_at, latencies, errors, i)
            for i in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - start
    own_cpu = time.process_time() - own_before
    server_cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    sent = len(latencies) - len(errors)
    # Every member gets every publication (the room's members, on every node).
    deadline = time.monotonic() + 10
    while min(counts, default=sent) < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for task in members:
        task.cancel()
    latencies.sort()
    return {
        "nodes": len(ports),
        "connections": args.connections,
        "members": args.members,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_second": round(len(latencies) / elapsed),
        "latency_median_ms": round(statistics.median(latencies) * 1000, 3),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "client_cpu_per_second": round(own_cpu / elapsed, 2),
        "server_cpu_per_second": [round(cpu / elapsed, 2) for cpu in server_cpu],
        "every_member_got_every_publication": min(counts, default=sent) >= sent,
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    procs: list[subprocess.Popen[str]] = []
    redis = None
    try:
        extra: list[str] = []
        if args.nodes == 2:
            redis, url = start_redis()
            extra = ["--redis-url", url, "--cluster-name", f"bench{os.getpid()}"]
        ports = []
        for _ in range(args.nodes):
            proc, port = start_node(*extra)
            procs.append(proc)
            ports.append(port)
        result = asyncio.run(run(ports, [proc.pid for proc in procs], args))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
