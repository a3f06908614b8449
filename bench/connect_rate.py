"""Connections per second into a real ``wshub serve``, without and with tokens.

For each mode (``off``: no token; ``anon``: ``--auth optional`` and no token,
the wiring without a signature check; ``hs256``: ``--auth required
--auth-secret``; ``es256``: ``--auth required --auth-public-key``;
``hs256-cluster``: hs256 on a node with ``--redis-url`` (a redis-server of its
own) and ``--max-connections-per-user``, so each connect also asks Redis;
``off-cluster``: its baseline, no token on a node with ``--redis-url``) the script
starts its own server, then opens ``--connections`` WebSocket connections as
fast as ``--concurrency`` asyncio workers can: each worker connects, sends the
upgrade request (with its pre-minted token in ``Sec-WebSocket-Protocol: wshub,
bearer.TOKEN``), reads the 101 and the ``welcome``, closes with a Close frame
and waits for the server to end the TCP connection, then starts the next one.
Each worker uses a room of its own, so no connection's presence is fanned out
to the others: what is measured is the upgrade, the token check and the
close. Tokens are minted before the clock starts (a distinct ``sub`` each),
so the client's signing is not counted.

Reported per round: connections per second (wall clock), the server's CPU
time per connection (utime + stime from ``/proc``: the figure a token changes)
and the client's own CPU (so a saturated client is visible). The median of
``--rounds`` rounds is the line to quote.

    .venv/bin/python bench/connect_rate.py [--connections 3000] [--concurrency 16]
        [--rounds 3] [--modes off,anon,hs256,es256] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SECRET = "a-benchmark-secret-of-at-least-32-bytes"
_CLOSE = bytes((0x88, 0x82, 0, 0, 0, 0)) + (1000).to_bytes(2, "big")  # masked, key 0
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    mode: str
    connections: int
    seconds: float
    per_second: float
    server_cpu_us: float  # server CPU per connection, microseconds
    client_cpu_s: float


def server_cpu(pid: int) -> float:
    """utime + stime of *pid*, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def start_server(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "warning"]
    cmd += ["--ip-connect-rate", "0", "--max-connections-per-ip", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    match = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit(f"server did not start: {' '.join(cmd)}")
    return proc, int(match.group(1))


def mode_flags(mode: str, workdir: Path) -> tuple[list[str], object, str | None]:
    """The server's flags, the signing key and the algorithm for *mode*."""
    if mode == "off":
        return [], None, None
    if mode == "anon":  # --auth on, no token sent: the wiring without a signature check
        return ["--auth", "optional", "--auth-secret", SECRET], None, None
    if mode == "hs256":
        return ["--auth", "required", "--auth-secret", SECRET], SECRET, "HS256"
    if mode == "es256":
        key = ec.generate_private_key(ec.SECP256R1())
        public = workdir / "es256.pem"
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return ["--auth", "required", "--auth-public-key", str(public)], key, "ES256"
    if mode == "off-cluster":  # no token, on a node with --redis-url: the baseline of the next
        return ["--redis-url", start_redis(workdir)], None, None
    if mode == "hs256-cluster":  # and the per-user count on Redis (one node of a cluster)
        redis_url = start_redis(workdir)
        return (
            ["--auth", "required", "--auth-secret", SECRET, "--redis-url", redis_url]
            + ["--max-connections-per-user", "5"],
            SECRET,
            "HS256",
        )
    raise SystemExit(f"unknown mode {mode!r} (off, anon, hs256, es256, off-cluster, hs256-cluster)")


_redis: list[subprocess.Popen[bytes]] = []


def start_redis(workdir: Path) -> str:
    """A redis-server of the script's own on a free port (stopped at exit)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    _redis.append(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    raise SystemExit("redis-server did not start")


def requests(port: int, n: int, workers: int, key: object, alg: str | None) -> list[bytes]:
    """One upgrade request per connection, each with its own token."""
    now = int(time.time())
    out = []
    for i in range(n):
        lines = [
            f"GET /websocket/bench-{i % workers} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if alg is not None:
            claims = {"sub": f"user-{i}", "iat": now, "exp": now + 3600}
            token = jwt.encode(claims, key, algorithm=alg)  # type: ignore[arg-type]
            lines.append(f"Sec-WebSocket-Protocol: wshub, bearer.{token}")
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode())
    return out


async def one(port: int, request: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise RuntimeError(f"upgrade refused: {head[:80]!r}")
    first, size = await reader.readexactly(2)
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    welcome = await reader.readexactly(size)
    if first != 0x81 or b'"welcome"' not in welcome:
        raise RuntimeError(f"no welcome: {welcome[:80]!r}")
    writer.write(_CLOSE)
    while await reader.read(65536):  # the server's Close, then its end of the TCP stream
        pass
    writer.close()


async def run_round(port: int, todo: list[bytes], concurrency: int) -> float:
    queue = list(reversed(todo))

    async def worker() -> None:
        while queue:
            await one(port, queue.pop())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="off,anon,hs256,es256")
    parser.add_argument("--json", metavar="FILE", help="also write every round as JSON")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            flags, key, alg = mode_flags(mode, Path(tmp))
            proc, port = start_server(flags)
            try:
                # A warm-up round, not reported: imports, caches, the rooms' hubs.
                asyncio.run(run_round(port, requests(port, 200, args.concurrency, key, alg), 16))
                for _ in range(args.rounds):
                    todo = requests(port, args.connections, args.concurrency, key, alg)
                    cpu0, client0 = server_cpu(proc.pid), time.process_time()
                    seconds = asyncio.run(run_round(port, todo, args.concurrency))
                    cpu1, client1 = server_cpu(proc.pid), time.process_time()
                    result = Round(
                        mode,
                        args.connections,
                        seconds,
                        args.connections / seconds,
                        (cpu1 - cpu0) / args.connections * 1e6,
                        client1 - client0,
                    )
                    rounds.append(result)
                    print(
                        f"{mode:6} {result.per_second:8.0f} conn/s  server "
                        f"{result.server_cpu_us:6.0f} µs CPU/conn  client CPU "
                        f"{result.client_cpu_s:5.2f} s of {seconds:5.2f} s",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(10)
                for redis in _redis:
                    redis.terminate()
                    redis.wait(10)
                _redis.clear()
    print("\nmedian of", args.rounds, "rounds:")
    for mode in args.modes.split(","):
        mine = [r for r in rounds if r.mode == mode]
        print(
            f"{mode:6} {statistics.median(r.per_second for r in mine):8.0f} conn/s  server "
            f"{statistics.median(r.server_cpu_us for r in mine):6.0f} µs CPU/conn"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rounds], indent=1))


if __name__ == "__main__":
    main()
