"""What an idle connection costs the server stays bounded (docs/memory.md).

A real server runs in a subprocess with ``tracemalloc`` on; hundreds of real
WebSocket connections are opened to it in rooms of 10 (as ``wshub bench idle
--rooms`` does) and held. The Python memory the server allocated for them,
divided by their number, must stay under a bound: it fails if what each
connection keeps grows back (a frame library kept per connection, a bucket
object, a buffer made before it is needed, a room's empty history block).
uvloop and libuv allocate through Python's allocators, so their share (~1.2
KiB, the largest) is in it too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .conftest import Server
from .rawws import RawClient
from .waiting import wait_until

PER_CONNECTION_BOUND = 2100
"""Bytes of Python allocations per idle connection. Measured by this test:
1,976 (1,941 / 1,976 / 2,040; uvloop's transport ~1,230 of it), 2,212 before
the cuts of docs/memory.md's third round (2,164 / 2,212 / 2,235) and 2,534
before the second's; a frame library kept per connection would add ~1,100,
the direct-send tuple 64, a frame scanner 56."""

# Started before the server module is imported, one frame per allocation (the
# cheapest tracing); SIGUSR1 writes the traced total, after a full collection.
_RUNNER = """
import gc, os, signal, sys, tracemalloc
tracemalloc.start(1)
out = sys.argv[1]
def report(*_):
    gc.collect()
    current = tracemalloc.get_traced_memory()[0]
    with open(out + ".tmp", "w") as f:
        f.write(str(current))
    os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, report)
from wshub.cli import main
sys.exit(main(["serve", *sys.argv[2:]]))
"""

FLAGS = ("--port", "0", "--log-level", "warning", "--ip-connect-rate", "0")
FLAGS += ("--max-connections-per-ip", "0", "--message-rate", "0")


def _start(report: Path) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(report), *FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server listens or dies
    match = re.search(r"listening on (\S+):(\d+)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.communicate()[1]}")
    server = Server(proc, match.group(1), int(match.group(2)), list(FLAGS))

    def pump() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            server.stderr_lines.append(text)

    server._pump = threading.Thread(target=pump, daemon=True)
    server._pump.start()
    return server


def _traced(server: Server, report: Path) -> int:
    """The server's traced Python memory now (bytes)."""
    report.unlink(missing_ok=True)
    os.kill(server.proc.pid, signal.SIGUSR1)
    wait_until(report.exists, "the server's tracemalloc report")
    return int(report.read_text())


def _open(server: Server, rooms: range, held: list[RawClient]) -> None:
    """Ten welcomed connections in each of *rooms*, kept in *held*."""
    for room in rooms:
        for _ in range(10):
            raw, status, _ = RawClient.open(server.host, server.port, path=f"/websocket/r{room}")
            held.append(raw)
            assert status == 101
            opcode, payload, _ = raw.recv_frame()
            assert opcode == 0x1 and json.loads(payload)["type"] == "welcome"


def test_an_idle_connection_costs_less_than_the_bound(tmp_path: Path) -> None:
    report = tmp_path / "traced"
    server = _start(report)
    held: list[RawClient] = []
    try:
        # The first connections and rooms set up what every later one shares
        # (code paths' caches, dicts' first sizes, the loop's read buffer).
        _open(server, range(0, 6), held)
        opened = 'wshub_connections{state="open"}'
        server.wait_for(lambda: server.metric(opened) == 60, "60 open")
        before = _traced(server, report)
        _open(server, range(6, 36), held)
        # the joins and welcomes are through: nothing is left in flight
        server.wait_for(lambda: server.metric(opened) == 360, "360 open")
        after = _traced(server, report)
        each = (after - before) / 300
        assert each < PER_CONNECTION_BOUND, f"{each:.0f} B of Python memory per idle connection"
        # a bound nothing could break would test nothing: the connections
        # themselves show (uvloop's transport alone is over 1 KiB)
        assert each > 1000, f"{each:.0f} B per connection: were the connections held?"
    finally:
        for raw in held:
            raw.close()
        server.stop()
    assert not [line for line in server.stderr_lines if "Traceback" in line], "".join(
        server.stderr_lines
    )
