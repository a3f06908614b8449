"""A failover behind Redis Sentinel: how long cross-node delivery stops, and
how much of a steady flow is lost (issue 17 item 3).

Each round starts its own primary, replica and three sentinels
(``tests/sentinels.py``: quorum 2, ``down-after-milliseconds`` 1000,
``failover-timeout`` 5000), two ``wshub serve`` nodes with
``--redis-sentinels`` (history off: with it on, the members of a room that
lost frames are asked to reconnect with ``since``, which is the recovery's
figure, not the backplane's), one client on node A sending a numbered
``message`` every 1/RATE s and one on node B receiving. After WARMUP seconds
the primary is SIGKILLed. Per round:

* ``promoted_s``: SIGKILL to every sentinel naming the replica (Sentinel's own
  part: down-after plus the election and the promotion);
* ``first_delivery_s``: SIGKILL to the moment B receives the first message
  that A sent after the SIGKILL (what a user sees);
* ``lost``: messages sent that B never received, of ``sent`` (at most once:
  nothing is delivered twice or late; the script checks order and
  duplicates and counts deliveries slower than 1 s as ``late``).

    .venv/bin/python bench/sentinel_failover.py [--rounds 5] [--rate 50] [--json FILE]

Medians over the rounds are the lines to quote; on the shared machine say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402
from tests.sentinels import SentinelGroup  # noqa: E402

WARMUP = 2.0
AFTER = 3.0  # seconds of flow kept after the first delivery past the kill


def start_node(group: SentinelGroup, cluster: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "error"]
        + ["--redis-sentinels", group.sentinels, "--redis-master", group.name]
        + ["--cluster-name", cluster, "--history-size", "0", "--node-ttl", "10"]
        + ["--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    match = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("wshub serve did not start")
    return proc, int(match.group(1))


async def one_round(rate: float, timeout: float) -> dict[str, float]:
    group = SentinelGroup(f"bench{int(time.time() * 1000) % 100000}", timeout=timeout)
    group.start()
    nodes: list[subprocess.Popen[str]] = []
    try:
        cluster = f"fo{time.monotonic_ns() % 10**9}"
        ports = []
        for _ in range(2):
            proc, port = start_node(group, cluster)
            nodes.append(proc)
            ports.append(port)
        return await _flow(group, ports, rate, timeout)
    finally:
        for proc in nodes:
            proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        group.stop()


async def _welcomed(port: int) -> websockets.ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/websocket/flow", max_queue=None)
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    return ws


async def _flow(
    group: SentinelGroup, ports: list[int], rate: float, timeout: float
) -> dict[str, float]:
    sender = await _welcomed(ports[0])
    receiver = await _welcomed(ports[1])
    sent: dict[int, float] = {}
    got: list[tuple[int, float]] = []
    stop = asyncio.Event()

    async def send() -> None:
        seq = 0
        next_at = time.monotonic()
        while not stop.is_set():
            sent[seq] = time.monotonic()
            await sender.send(json.dumps({"type": "message", "content": f"seq:{seq}"}))
            seq += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def receive() -> None:
        async for raw in receiver:
            message = json.loads(raw)
            content = message.get("content", "")
            if message["type"] == "message" and content.startswith("seq:"):
                got.append((int(content[4:]), time.monotonic()))

    async def drain() -> None:  # the sender's own incoming (joins, pings)
        async for _ in sender:
            pass

    tasks = [asyncio.create_task(f()) for f in (send, receive, drain)]
    loop_deadline = time.monotonic() + timeout
    # Flow established (both nodes subscribed) before the clock starts.
    while len(got) < 5:
        if time.monotonic() > loop_deadline:
            raise SystemExit("no delivery from A to B before the failover")
        await asyncio.sleep(0.01)
    await asyncio.sleep(WARMUP)
    killed_at = await asyncio.to_thread(group.kill_primary)
    promoted_s = await asyncio.to_thread(group.wait_promoted)
    first = None
    while first is None:
        after = [at for seq, at in got if sent[seq] > killed_at]
        first = min(after) if after else None
        if time.monotonic() > killed_at + timeout:
            raise SystemExit("no delivery from A to B after the failover")
        await asyncio.sleep(0.005)
    await asyncio.sleep(AFTER)
    stop.set()
    await tasks[0]
    await asyncio.sleep(1.0)  # the last ones in flight
    for task in tasks[1:]:
        task.cancel()
    await sender.close()
    await receiver.close()
    seqs = [seq for seq, _ in got]
    if seqs != sorted(set(seqs)):
        raise SystemExit("a duplicate or a reordering: " + repr(seqs))
    late = sum(1 for seq, at in got if at - sent[seq] > 1.0)
    return {
        "promoted_s": round(promoted_s, 3),
        "first_delivery_s": round(first - killed_at, 3),
        "sent": len(sent),
        "lost": len(sent) - len(seqs),
        "late": late,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", help="write the rounds and medians here")
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        result = asyncio.run(one_round(args.rate, args.timeout))
        rounds.append(result)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:g}" for k, v in result.items()), flush=True)
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print("median: " + ", ".join(f"{k} {v:g}" for k, v in medians.items()))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rate": args.rate, "rounds": rounds, "median": medians}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
