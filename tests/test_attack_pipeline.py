"""Attacks on the API's keep-alive (decisions.md 14, 18): what a pipeline of
HTTP requests may hold of the server's memory.

The API keeps a connection for the next request and serves a pipeline in
order, one request a loop pass. Reading was paused past a head's worth only
while a request was being answered; a request answered at once (a publish, a
``401``) never is, so a client that pipelines faster than one request a read
had its whole pipeline buffered, without any key. Each test runs a real
server over loopback sockets; with ``-s`` the figures quoted in
docs/reliability.md are printed on ``[figure]`` lines.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from .conftest import TIMEOUT
from .loadtools import rss_kib
from .waiting import wait_until

KEY = "attack-key"


def figure(text: str) -> None:
    print(f"[figure] {text}")


class PeakRss:
    """Samples the server's resident memory in a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_kib(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib(self.pid) - self.baseline)

    def stop(self) -> float:
        """The peak growth in MiB."""
        self._stop.set()
        self._thread.join(TIMEOUT)
        return self.peak / 1024


def pipeline(host: str, port: int, data: bytes, done: list[str], held: list[socket.socket]) -> None:
    """A client with a 4 KiB receive window that sends *data* in one go and
    never reads; kept open (in *held*) for the caller to close."""
    sock = socket.socket()
    held.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.settimeout(TIMEOUT)
    try:
        sock.sendall(data)
        done.append("sent")
    except OSError as exc:  # the server may drop a client that does not read
        done.append(type(exc).__name__)


def settled(rss: PeakRss) -> None:
    """Until the server's memory stops growing (it has read what it will)."""
    last = [rss_kib(rss.pid)]

    def steady() -> bool:
        now = rss_kib(rss.pid)
        calm = abs(now - last[0]) < 256
        last[0] = now
        return calm

    wait_until(steady, "the server's RSS to settle", interval=0.2)


def test_a_pipeline_of_unauthorized_requests_costs_bounded_memory(make_server) -> None:
    """8 clients each pipeline 999 ``GET /api/rooms`` with a wrong key and
    15 KB of headers (15 MB each, no key needed) and never read. Before: the
    server buffered the pipelines, RSS +129 MiB at the peak and +105 MiB
    after. After: reading pauses while more than a head waits: +5.6 MiB."""
    srv = make_server("--api-keys", KEY)
    request = (
        b"GET /api/rooms HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong\r\nX-Pad: "
        + b"a" * 15_000
        + b"\r\n\r\n"
    )
    rss = PeakRss(srv.proc.pid)
    done: list[str] = []
    held: list[socket.socket] = []
    threads = [
        threading.Thread(target=pipeline, args=(srv.host, srv.port, request * 999, done, held))
        for _ in range(8)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 6)
    settled(rss)
    peak = rss.stop()
    for sock in held:
        sock.close()
    figure(
        f"8 x 999 pipelined 15 KB wrong-key requests, never read: server RSS peak +{peak:.1f} MiB "
        f"({time.monotonic() - started:.2f} s; senders: {sorted(done)})"
    )
    assert peak < 32, f"RSS grew {peak:.1f} MiB at the peak"
    # The server still serves: a probe, and a real API call.
    status, _, _ = srv.get("/api/rooms", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200


def test_a_pipeline_of_publications_is_served_whole_and_in_order(make_server) -> None:
    """1,000 publications with bodies near 64 KiB pipelined in one write (the
    most one connection serves): every one answered 200, in order, offsets
    1..1000, the last answer closing the connection; while 4 other clients
    pipeline the same and never read, RSS stays bounded (before: +72 MiB)."""
    srv = make_server("--api-keys", KEY)

    def publication(room: str) -> bytes:
        body = json.dumps({"content": "x", "room": room, "pad": "a" * 65_000}).encode()
        return (
            b"POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )

    request = publication("p")
    rss = PeakRss(srv.proc.pid)
    done: list[str] = []
    held: list[socket.socket] = []
    stalled = [
        threading.Thread(target=pipeline, args=(srv.host, srv.port, request * 999, done, held))
        for _ in range(4)
    ]
    for thread in stalled:
        thread.start()
    for thread in stalled:
        thread.join(TIMEOUT * 6)
    settled(rss)
    peak = rss.stop()
    for sock in held:
        sock.close()
    figure(f"4 x 999 pipelined 64 KiB publications, never read: server RSS peak +{peak:.1f} MiB")
    assert peak < 32, f"RSS grew {peak:.1f} MiB at the peak"

    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT * 6) as sock:
        sender = threading.Thread(target=sock.sendall, args=(publication("q") * 1000,))
        sender.start()
        received = bytearray()
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            received += data
        sender.join(TIMEOUT)
    answers = bytes(received).split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1000
    assert all(answer.startswith(b"200 ") for answer in answers)
    offsets = [json.loads(answer.split(b"\r\n\r\n", 1)[1])["offset"] for answer in answers]
    assert offsets == list(range(1, 1001))
    assert b"Connection: close" in answers[-1] and b"Connection: close" not in answers[-2]
