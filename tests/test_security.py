"""Issue 19: each finding of the security review, as an attack on a real server.

Every test starts real ``wshub serve`` processes (and, for the backplane, a
real ``redis-server``), attacks them over loopback sockets the way the
reviewer did, and asserts the outcome; each also checks that a well-behaved
client loses nothing. With ``-s`` the figures quoted in docs/reliability.md
are printed on lines starting ``[figure]``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import redis

from .conftest import TIMEOUT, RedisServer, Server
from .loadtools import fd_count
from .rawws import RawClient, encode_frame
from .waiting import wait_until

CLOSE_TIMEOUT = 2.0
OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")
CONTROL_CONTENT = "\u0001" * 1000  # 1000 characters, 6000 bytes once JSON-escaped


def figure(text: str) -> None:
    print(f"[figure] {text}")


def counts(srv: Server) -> dict:
    return srv.stats()["connections"]


def stalled_client(srv: Server, rcvbuf: int | None = 2048) -> RawClient:
    """An upgraded raw client; with *rcvbuf* it advertises a tiny window."""
    client, status, _ = RawClient.open(srv.host, srv.port, rcvbuf=rcvbuf)
    assert status == 101
    return client


def echo_broadcasts(client: RawClient, n: int = 40) -> None:
    """*n* broadcasts that come back to the sender: ~6 KB each on the wire."""
    frame = json.dumps({"type": "broadcast", "content": CONTROL_CONTENT})
    for _ in range(n):
        client.send_text(frame)


# -- 1. a closing connection with unsent data ------------------------------------------


TRIGGERS = {
    "client Close": lambda c: c.send_frame(0x8, struct.pack("!H", 1000)),
    "half-close": lambda c: c.sock.shutdown(socket.SHUT_WR),
    "1002 (unmasked frame)": lambda c: c.send(encode_frame(0x1, b"x", mask=False)),
    "1007 (invalid UTF-8)": lambda c: c.send_frame(0x1, b"\xff"),
    "1009 (frame too big)": lambda c: c.send(encode_frame(0x2, b"", length=70_000)),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_a_closing_client_that_never_reads_is_dropped_within_the_close_timeout(
    make_server, trigger: str
) -> None:
    """Unsent data does not keep a closing socket: gone within --close-timeout,
    its fd and its admission slot back (--max-connections 1: the next client
    gets in)."""
    srv = make_server(*OPEN, "--close-timeout", str(CLOSE_TIMEOUT), "--max-connections", "1")
    baseline = fd_count(srv.proc.pid)
    client = stalled_client(srv)
    echo_broadcasts(client)
    srv.wait_for(lambda: srv.stats()["messages"]["ROUTED"] >= 40, "40 broadcasts routed")
    start = time.monotonic()
    TRIGGERS[trigger](client)
    try:
        took = wait_until(
            lambda: counts(srv)["node"] == 0 and counts(srv)["closing"] == 0,
            "the closing socket dropped",
            CLOSE_TIMEOUT + 3.0,
        )
    finally:
        figure(f"1. {trigger}: held {time.monotonic() - start:.2f} s (--close-timeout 2)")
    assert took < CLOSE_TIMEOUT + 1.5
    wait_until(lambda: fd_count(srv.proc.pid) <= baseline, "fd back", TIMEOUT)
    srv.client().close()  # the slot is free again
    client.close()


def test_a_slow_consumer_answering_our_close_is_dropped_within_the_close_timeout(
    make_server,
) -> None:
    """The 1008 slow-consumer close, answered by a Close from a client that
    never reads: dropped within --close-timeout of our close."""
    srv = make_server(*OPEN, "--close-timeout", str(CLOSE_TIMEOUT), "--send-buffer-limit", "65536")
    client = stalled_client(srv)
    echo_broadcasts(client)
    srv.wait_for(lambda: srv.metric("wshub_slow_consumer_closes_total") == 1, "1008 close")
    start = time.monotonic()
    client.send_frame(0x8, struct.pack("!H", 1000))
    try:
        took = wait_until(
            lambda: counts(srv)["closing"] == 0 and counts(srv)["node"] == 0,
            "the slow consumer dropped",
            CLOSE_TIMEOUT + 3.0,
        )
    finally:
        figure(f"1. slow consumer answering: held {time.monotonic() - start:.2f} s")
    assert took < CLOSE_TIMEOUT + 1.5
    client.close()


@pytest.mark.parametrize("trigger", ["client Close", "1007 (invalid UTF-8)"])
def test_a_closing_client_that_reads_gets_everything_then_the_close(
    make_server, trigger: str
) -> None:
    """No truncation: a client that reads (from a small window, a little late)
    gets all 40 broadcasts, in order, then the Close frame."""
    srv = make_server(*OPEN, "--close-timeout", str(CLOSE_TIMEOUT))
    client = stalled_client(srv)
    welcome = json.loads(client.recv_frame()[1])
    assert welcome["type"] == "welcome"
    echo_broadcasts(client)
    srv.wait_for(lambda: srv.stats()["messages"]["ROUTED"] >= 40, "40 broadcasts routed")
    TRIGGERS[trigger](client)
    got = 0
    while True:
        opcode, payload, _ = client.recv_frame()
        if opcode == 0x8:
            break
        message = json.loads(payload)
        assert message["type"] == "broadcast" and message["content"] == CONTROL_CONTENT
        got += 1
    assert got == 40
    code = struct.unpack("!H", payload[:2])[0]
    assert code == (1000 if trigger == "client Close" else 1007)
    client.wait_closed()
    client.close()


def _unsent_server_sockets(port: int) -> int:
    """Sockets of the server's port (any state but LISTEN) with unsent bytes
    in the kernel: what a client that never reads pins there."""
    held = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                tx_queue = int(fields[4].split(":")[0], 16)
                if local_port == port and fields[3] != "0A" and tx_queue > 0:
                    held += 1
    return held


def test_http_clients_that_never_read_are_dropped_at_the_handshake_deadline(make_server) -> None:
    """50 clients ask for the page and never read it: their sockets (and what
    the kernel holds for them) are gone by the handshake deadline; a client
    that reads gets the whole page."""
    deadline = 2.0
    srv = make_server(*OPEN, "--handshake-timeout", str(deadline))
    page = srv.get("/")[2]
    baseline = fd_count(srv.proc.pid)
    socks = []
    start = time.monotonic()
    for _ in range(50):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect((srv.host, srv.port))
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n\r\n".encode())
        socks.append(sock)
    wait_until(lambda: _unsent_server_sockets(srv.port) >= 50, "50 pages stuck", TIMEOUT)
    try:
        took = wait_until(
            lambda: _unsent_server_sockets(srv.port) == 0 and fd_count(srv.proc.pid) <= baseline,
            "the never-readers dropped",
            deadline + 3.0,
        )
    finally:
        figure(
            f"1. HTTP never-readers: {_unsent_server_sockets(srv.port)} server sockets still "
            f"holding unsent bytes {time.monotonic() - start:.2f} s after the requests "
            f"(--handshake-timeout {deadline})"
        )
    assert took < deadline + 1.5
    for sock in socks:
        sock.close()
    # A slow but reading client: asks, waits a second, then reads it all.
    sock = socket.create_connection((srv.host, srv.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n\r\n".encode())
    time.sleep(1.0)  # the point of the test: a client that reads late
    sock.settimeout(TIMEOUT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.endswith(page) and b"Content-Length: %d" % len(page) in data


# -- 2. sockets that never finish the upgrade --------------------------------------------

PARTIAL = b"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def _partial(source: str, srv: Server) -> socket.socket:
    """A socket from *source* that sends half an upgrade request."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((srv.host, srv.port))
    sock.sendall(PARTIAL)
    return sock


def _answered(sock: socket.socket, timeout: float = 0.5) -> bytes:
    """What the server sent within *timeout* (b'' while it holds the socket)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return b""
    except ConnectionResetError:
        return b"RESET"


def test_unfinished_upgrades_are_capped_per_ip_and_per_node(make_server) -> None:
    """300 half-requests from one IP (per-IP limit 2) hold 2 sockets; 2 each
    from 4 more IPs fill the node cap of 5; the rest get 429/503 at once,
    counted and logged (rate limited); a real client gets in after."""
    srv = make_server(
        "--max-connections-per-ip",
        "2",
        "--max-connections",
        "5",
        "--ip-connect-rate",
        "0",
        "--handshake-timeout",
        "30",
        "--sweep-interval",
        "1",
        "--log-level",
        "info",
    )
    socks = [_partial("127.0.0.2", srv) for _ in range(300)]
    answers = [_answered(s, 0.05) for s in socks]
    srv.wait_for(
        lambda: srv.metric("wshub_connections_refused_total", 'reason="handshake_limit"') >= 298,
        "298 refused at accept",
    )
    # /stats, a plain HTTP request, is not counted as connecting.
    held_one_ip = counts(srv)["connecting"]
    refused_429 = sum(a.startswith(b"HTTP/1.1 429 ") for a in answers)
    # Two more each from four more addresses: the node's 5 are full after 3.
    more = [_partial(f"127.0.0.{i}", srv) for i in range(3, 7) for _ in range(2)]
    more_answers = [_answered(s, 0.3) for s in more]
    held_more = more_answers.count(b"")
    refused_503 = sum(a.startswith(b"HTTP/1.1 503 ") for a in more_answers)
    figure(
        f"2. 300 half-requests from one IP (per-IP 2, node 5): {held_one_ip} held, "
        f"{refused_429} answered 429; 8 more from 4 IPs: {held_more} held, {refused_503} "
        "answered 503"
    )
    assert held_one_ip == 2 and refused_429 == 298
    assert held_more == 3 and refused_503 == 5
    for sock in socks + more:
        sock.close()
    srv.wait_for(lambda: counts(srv)["connecting"] == 0, "half-requests gone")
    srv.client().close()
    lines = [line for line in srv.stderr_lines if "reason=handshake_limit" in line]
    assert 1 <= len(lines) <= 40, len(lines)  # 303 refusals, a bounded number of lines
    # The count of suppressed lines is reported: on the next refusal line that
    # passes, or by the periodic sweep (--sweep-interval 1 here).
    srv.wait_for(
        lambda: any(
            "suppressed=" in line or "refused_suppressed" in line for line in srv.stderr_lines
        ),
        "the suppressed lines counted",
    )


def test_under_a_low_fd_limit_every_refusal_is_answered_and_logged(tmp_path) -> None:
    """ulimit -n 96: 150 half-requests; the server keeps a reserve, answers
    the excess 503 (no silent EMFILE resets), logs it, and serves again after."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    cmd = [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "info"]
    err = open(tmp_path / "err", "w")  # noqa: SIM115 - closed after the process
    proc = subprocess.Popen(
        [*cmd, *OPEN, "--max-handshakes", "0"],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        preexec_fn=limit,
    )
    try:
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)\s*$", line).group(1))
        srv = Server(proc, "127.0.0.1", port, [])
        socks = [_partial("127.0.0.1", srv) for _ in range(150)]
        answers = [_answered(s, 0.3) for s in socks]
        held = sum(1 for a in answers if a == b"")
        refused = sum(1 for a in answers if a.startswith(b"HTTP/1.1 503 "))
        log = (tmp_path / "err").read_text()
        figure(f"2. ulimit -n 96, 150 half-requests: {held} held, {refused} answered 503")
        assert held + refused == 150  # none reset without an answer
        assert refused > 0 and "reason=fd_limit" in log and "fd_limit_low" in log
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        proc.stdout.close()
        err.close()


def _open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard open-files limits of process *pid*."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_soft_fd_limit_is_raised_as_far_as_the_limits_use(tmp_path) -> None:
    """ulimit -Sn 64 under a hard limit of 2,000 with --max-connections 100: the
    server raises its soft limit to what its limits can hold (100 open, 110
    handshaking, a reserve of 32), so it does not refuse a storm at 32 sockets
    and says nothing about a low limit."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 2000))

    cmd = [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "info"]
    err = open(tmp_path / "err", "w")  # noqa: SIM115 - closed after the process
    proc = subprocess.Popen(
        [*cmd, *OPEN, "--max-connections", "100"],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        preexec_fn=limit,
    )
    try:
        assert re.search(r":(\d+)\s*$", proc.stdout.readline())  # listening
        assert _open_files_limit(proc.pid) == (100 + 110 + 32, 2000)
        assert "fd_limit_low" not in (tmp_path / "err").read_text()
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        proc.stdout.close()
        err.close()


# -- 3. close codes as labels ----------------------------------------------------------


def test_client_close_codes_make_a_bounded_label_set(make_server) -> None:
    """2,000 connections closing with distinct codes 3000-4999: /metrics keeps
    a fixed set of series and its size."""
    srv = make_server(*OPEN)
    before = len(srv.get("/metrics")[2])
    for code in range(3000, 5000):
        client = stalled_client(srv, rcvbuf=None)
        client.send_frame(0x8, struct.pack("!H", code))
        client.recv_close()
        client.close()
    srv.wait_for(lambda: counts(srv)["node"] == 0, "all closed")
    body = srv.get("/metrics")[2].decode()
    series = re.findall(r'^wshub_closes_total\{code="([^"]+)"\}', body, re.MULTILINE)
    start = time.perf_counter()
    srv.get("/metrics")
    render_ms = (time.perf_counter() - start) * 1000
    figure(
        f"3. 2,000 distinct close codes: {len(series)} wshub_closes_total series, /metrics "
        f"{before / 1024:.1f} -> {len(body) / 1024:.1f} KB, one GET {render_ms:.1f} ms"
    )
    assert len(series) <= 25
    assert srv.metric("wshub_closes_total", 'code="3000-3999"') == 1000
    # 4401, 4403 and 4429 are wshub's own codes (decisions.md 19): named.
    assert srv.metric("wshub_closes_total", 'code="4000-4999"') == 997
    assert srv.metric("wshub_closes_total", 'code="4401"') == 1
    assert len(body) < before + 2048


# -- 4. log amplification ------------------------------------------------------------------


def test_refused_origins_are_clipped_escaped_once_and_rate_limited(make_server) -> None:
    """A 16 KB Origin of 0x85 bytes, 200 times in a row: each logged line is
    short, and only a bounded number of lines are written."""
    srv = make_server(*OPEN, "--log-level", "info", "--sweep-interval", "1")
    request = (
        b"GET /websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: http://" + b"\x85" * 16_000 + b"\r\n\r\n"
    )
    start = time.monotonic()
    for _ in range(200):
        sock = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 403 ")
        sock.close()
    took = time.monotonic() - start
    srv.client().close()  # a line after them: the pump has read everything before it
    srv.wait_for(lambda: any(" open " in line for line in srv.stderr_lines), "open logged")
    refused = [line for line in srv.stderr_lines if "reason=origin" in line]
    size = sum(len(line.encode()) for line in refused)
    figure(
        f"4. 200 refused 16 KB Origins in {took:.2f} s: {len(refused)} lines, {size / 1024:.1f} "
        f"KB of log ({size / 200:.0f} bytes per request)"
    )
    assert 1 <= len(refused) <= 40
    assert max(len(line) for line in refused) < 1500
    assert "\\u0085" in refused[0] and "\\\\u0085" not in refused[0]  # escaped once
    srv.wait_for(
        lambda: any(
            "suppressed=" in line or "refused_suppressed" in line for line in srv.stderr_lines
        ),
        "the suppressed lines counted",
    )


# -- 5. per-IP keys ------------------------------------------------------------------------


def test_ipv6_addresses_of_one_64_share_one_budget(make_server) -> None:
    """Connections from many addresses of one /64 (through a trusted proxy's
    X-Forwarded-For): the per-IP limit counts the /64; another /64 is apart."""
    srv = make_server(
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "20",
        "--ip-connect-rate",
        "0",
    )
    statuses = []
    clients = []
    for i in range(1, 101):
        client, status, _ = RawClient.open(
            srv.host, srv.port, headers={"X-Forwarded-For": f"2001:db8:1:2::{i:x}"}
        )
        statuses.append(status)
        clients.append(client)
    admitted = statuses.count(101)
    other, status, _ = RawClient.open(
        srv.host, srv.port, headers={"X-Forwarded-For": "2001:db8:1:3::1"}
    )
    figure(f"5. 100 addresses of one /64, per-IP limit 20: {admitted} admitted")
    assert admitted == 20 and statuses.count(429) == 80
    assert status == 101
    for c in [*clients, other]:
        c.close()


@pytest.mark.parametrize(
    ("hop", "expected"),
    [("6.6.6.6:51234", 101), ("[2001:db8::1]", 101), ("unknown", 400), ("6.6.6.6:x", 400)],
)
def test_a_forwarded_hop_that_does_not_parse_is_never_the_proxys_budget(
    make_server, hop: str, expected: int
) -> None:
    """Behind a trusted proxy, one client with an odd X-Forwarded-For hop
    cannot use up the budget of every client of the proxy."""
    srv = make_server(
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
        "--ip-connect-rate",
        "0",
    )
    greedy = []
    for _ in range(5):
        client, status, _ = RawClient.open(srv.host, srv.port, headers={"X-Forwarded-For": hop})
        greedy.append((client, status))
    assert [s for _, s in greedy].count(expected) >= 2
    # Other clients of the same proxy are untouched.
    for i in range(2):
        client, status, _ = RawClient.open(
            srv.host, srv.port, headers={"X-Forwarded-For": f"198.51.100.{i + 1}"}
        )
        assert status == 101
        client.close()
    for client, _ in greedy:
        client.close()


# -- 6. a malformed backplane envelope ----------------------------------------------------


def two_nodes(make_server, redis_server: RedisServer, name: str, ttl: str = "1") -> list[Server]:
    return [
        make_server(
            "--redis-url", redis_server.url, "--cluster-name", name, "--node-ttl", ttl, *OPEN
        )
        for _ in range(2)
    ]


@pytest.mark.parametrize(
    "payload",
    [b"node-zz|lost|node-yy|\xff\xfe", b"\xff\xfe", b"node-zz|nonsense|x|y", b"no pipes"],
)
def test_a_malformed_envelope_is_counted_and_skipped(
    make_server, redis_server: RedisServer, payload: bytes
) -> None:
    """A bad envelope on the channel: both nodes count it and go on relaying
    messages and presence across the cluster."""
    name = f"sec{os.getpid()}{abs(hash(payload)) % 10000}"
    a_srv, b_srv = two_nodes(make_server, redis_server, name)
    a = a_srv.client()
    # Both nodes in the default room (its channel is {name}:room:), B's
    # member counting A's (a room's presence is read when a node joins it).
    watcher = b_srv.client()
    assert watcher.welcome["connectionCount"] == 2
    assert a.recv_type("user_joined")["connectionId"] == watcher.id
    r = redis.Redis(port=redis_server.port)
    for _ in range(3):
        r.publish(f"{name}:room:", payload)
    r.close()
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.metric("wshub_backplane_malformed_total") == 3, "3")
    b = b_srv.client()
    assert a.recv_type("user_joined")["connectionId"] == b.id
    # Traffic across the window in which a dead subscriber would be noticed
    # (3 self-probes unheard: ~1.6 s at --node-ttl 1): every message arrives.
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < 2.5:
        b.send({"type": "message", "content": f"after {sent}"})
        assert a.recv_type("message")["content"] == f"after {sent}"
        sent += 1
        time.sleep(0.05)  # spread over the window, not a wait for an event
    for srv in (a_srv, b_srv):
        assert srv.get("/readyz")[0] == 200
        assert srv.metric("wshub_backplane_reconnects_total") == 0
    figure(f"6. {payload!r} x3: counted 3 on each node; cross-node message and join delivered")
    a.close()
    b.close()
    watcher.close()


# -- 7. same-host Origin: Host, scheme, server names ---------------------------------------


def test_origin_rule_compares_the_scheme_and_honours_server_names(make_server) -> None:
    """An https:// Origin does not match a plain-HTTP server; with
    --server-names a rebound Host (attacker's name in Host and Origin) is 403;
    the real name and a trusted proxy's X-Forwarded-Proto https pass."""
    srv = make_server(*OPEN)
    here = f"{srv.host}:{srv.port}"

    def status(s: Server, origin: str, host: str, **extra: str) -> int:
        client, code, _ = RawClient.open(s.host, s.port, headers={"Origin": origin, **extra})
        client.close()
        return code

    # RawClient sends Host: 127.0.0.1:port itself; override through a raw request.
    assert status(srv, f"http://{here}", here) == 101
    assert status(srv, f"https://{here}", here) == 403
    named = make_server(*OPEN, "--server-names", "hub.example", "--trusted-proxies", "127.0.0.1")
    assert raw_status(named, "http://attacker.example", "attacker.example") == 403
    assert raw_status(named, "http://hub.example", "hub.example") == 101
    assert raw_status(named, "https://hub.example", "hub.example") == 403
    assert raw_status(named, "https://hub.example", "hub.example", proto="https") == 101
    # Without --server-names the rebound host still matches (the documented default).
    assert raw_status(srv, "http://attacker.example", "attacker.example") == 101


def raw_status(srv: Server, origin: str, host: str, proto: str | None = None) -> int:
    sock = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    lines = [
        "GET /websocket HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        f"Origin: {origin}",
    ]
    if proto:
        lines.append(f"X-Forwarded-Proto: {proto}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    sock.close()
    return int(head.split(b" ", 2)[1])


# -- 8. log line injection -----------------------------------------------------------------


def test_no_character_a_client_sends_forges_a_log_line(make_server) -> None:
    """A close reason and an Origin holding U+2028, U+2029, U+0085, U+009B,
    CR/LF and ESC: every log line stays one printable line."""
    srv = make_server(*OPEN, "--log-level", "info")
    forged = "x\u2028INFO forged\u2029\u0085\u009b31m\r\n\x1b[2J"
    client = stalled_client(srv, rcvbuf=None)
    client.send_frame(0x8, struct.pack("!H", 4000) + forged.encode())
    client.recv_close()
    client.close()
    RawClient.open(srv.host, srv.port, headers={"Origin": "http://a" + forged[:-6]})[0].close()
    srv.client().close()
    srv.wait_for(lambda: sum(" close " in line for line in srv.stderr_lines) >= 2, "closes")
    srv.wait_for(lambda: any("reason=origin" in line for line in srv.stderr_lines), "403")
    for line in srv.stderr_lines:
        assert line.endswith("\n") and line[:-1].isprintable(), repr(line)
    assert any("\\u2028" in line and "\\u009b" in line for line in srv.stderr_lines)


# -- 9. public readiness text -----------------------------------------------------------


def test_readyz_and_stats_show_a_generic_reason_not_the_redis_error(make_server) -> None:
    """Redis unreachable (a port where something else answers): /readyz and
    /stats say "redis unreachable", the log has the details."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def answer() -> None:  # whatever answers there: an error with details, then close
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.sendall(b"-ERR secret internal detail 10.1.2.3\r\n")
            conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    srv = make_server(
        "--redis-url", f"redis://:s3cret@127.0.0.1:{port}/0", "--node-ttl", "6", *OPEN
    )
    srv.wait_for(lambda: srv.get("/readyz")[0] == 503, "503")
    body = srv.get("/readyz")[2].decode()
    detail = srv.stats()["backplane"]["detail"]
    figure(f"9. /readyz body {body.strip()!r}, /stats detail {detail!r}")
    assert body == "backplane: redis unreachable\n" or body == "backplane: connecting to Redis\n"
    assert detail in ("redis unreachable", "connecting to Redis")
    assert "10.1.2.3" not in body and "secret" not in detail
    stop.set()
    thread.join(TIMEOUT)
    listener.close()


# -- 11. the page's headers ----------------------------------------------------------------


def test_the_page_has_its_hardening_headers(server) -> None:
    """GET / carries CSP (hashes, frame-ancestors 'none'), X-Frame-Options,
    nosniff and Referrer-Policy (the browser check is in test_page.py)."""
    status, headers, _ = server.get("/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


# -- suspicion (a): the Redis publish queue --------------------------------------------


def test_a_frozen_redis_delivers_nothing_late(make_server, own_redis: RedisServer) -> None:
    """SIGSTOP the redis-server for 4 s while a node sends: after SIGCONT no
    message sent during the freeze reaches the other node late (at most once,
    never late); messages after it do."""
    name = f"frz{os.getpid()}"
    # A TTL longer than the freeze: nobody is reaped, only delivery is at stake.
    a_srv, b_srv = two_nodes(make_server, own_redis, name, ttl="12")
    a = a_srv.client()
    b = b_srv.client()  # its welcome counts a: the room's presence is read at join
    assert b.welcome["connectionCount"] == 2
    a.recv_type("user_joined")
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        for i in range(40):
            a.send({"type": "message", "content": f"frozen {i}"})
            a.roundtrip()
            time.sleep(0.1)  # the point: traffic spread over the freeze
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    thawed_at = time.monotonic()
    late = []
    for srv in (a_srv, b_srv):
        srv.wait_for(lambda srv=srv: srv.get("/readyz")[0] == 200, "ready again")
    b_srv.wait_for(lambda: counts(b_srv)["cluster"] == 2, "cluster healed")
    # And A heard Redis answer what it froze with: until then what A's
    # clients send is served on A only (it came during the stall).
    a_srv.wait_for(lambda: a_srv.metric("wshub_history_redis_stalled") == 0, "stall over")
    a.send({"type": "message", "content": "after"})
    while True:
        message = b.recv_type("message", timeout=TIMEOUT * 2)
        if message["content"] == "after":
            break
        late.append((message["content"], time.monotonic() - thawed_at))
    figure(
        f"(a) Redis frozen {thawed_at - frozen_at:.1f} s with 40 messages sent: "
        f"{len(late)} delivered late after SIGCONT: {late[:3]}"
    )
    assert late == []
    a.close()
    b.close()


# -- suspicion (b): escaping costs six bytes per control character ----------------------


def test_control_characters_cost_six_bytes_each_and_the_buffers_account_for_it(
    make_server,
) -> None:
    """True: 1000 U+0001 become ~6,000 bytes per recipient (JSON's \\u0001),
    six times the content limit; the send buffer limit counts those bytes, so
    readers at the default limit get all 100 such broadcasts, none closed."""
    srv = make_server(*OPEN)
    reader = srv.client()
    sender = srv.client()
    reader.recv_type("user_joined")
    raw = RawClient.open(srv.host, srv.port)[0]
    raw.recv_frame()  # welcome
    for _ in range(100):
        sender.send({"type": "broadcast", "content": CONTROL_CONTENT})
    for _ in range(100):
        assert reader.recv_type("broadcast")["content"] == CONTROL_CONTENT
    sizes = []
    while len(sizes) < 100:
        opcode, payload, _ = raw.recv_frame()
        if opcode == 0x1 and b'"broadcast"' in payload:
            sizes.append(len(payload))
    figure(
        f"(b) 1000 x U+0001 (1000 characters, 1000 bytes of UTF-8): {sizes[0]} bytes per "
        f"recipient on the wire ({sizes[0] / 1000:.1f}x)"
    )
    assert 6000 <= sizes[0] <= 6200
    assert srv.metric("wshub_slow_consumer_closes_total") == 0
    for c in (reader, sender):
        c.close()
    raw.close()


def test_the_page_works_under_its_csp_in_chromium(make_server) -> None:
    """Headless Chromium: the page connects and chats with its CSP on, no CSP
    violation is reported, and a page from another origin cannot frame it."""
    from playwright.sync_api import expect, sync_playwright

    from .test_page import CHROMIUM, CHROMIUM_ARGS, MS

    srv = make_server(*OPEN)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.add_init_script(
                "document.addEventListener('securitypolicyviolation', e => "
                "console.log('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))"
            )
            response = page.goto(srv.http_url + "/")
            assert response is not None
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            expect(page.locator("#state")).to_have_attribute("data-state", "open", timeout=MS)
            other = srv.client()
            page.get_by_label("Message", exact=True).fill("under CSP")
            page.get_by_role("button", name="Send").click()
            assert other.recv_type("message")["content"] == "under CSP"
            other.send({"type": "message", "content": "back"})
            expect(
                page.locator('#feed li[data-kind="message"]').filter(has_text="back")
            ).to_have_count(1, timeout=MS)
            other.close()
            # Framed by another origin (a data: page): the browser refuses to render it.
            framer = browser.new_page()
            blocked: list[str] = []
            framer.on("console", lambda message: blocked.append(message.text))
            framer.set_content(f'<iframe id="f" src="{srv.http_url}/"></iframe>')
            framer.wait_for_timeout(0)  # let the frame navigation start
            wait_until(
                lambda: (
                    any("frame" in text.lower() for text in blocked)
                    or framer.frames[-1].url.startswith("chrome-error")
                ),
                "the frame refused",
                TIMEOUT,
            )
            assert not any(
                "CSP violation" in text or "Content Security Policy" in text for text in console
            ), console
        finally:
            browser.close()


def test_the_subscriber_is_restarted_if_it_ever_ends(redis_server: RedisServer) -> None:
    """A bug that escapes the subscriber loop (here: an exception of its own
    from its registration, once) does not leave the node deaf: the task is restarted,
    counted, and envelopes arrive again."""
    import asyncio

    from wshub.backplane import Envelope, EventKind
    from wshub.backplane.redis import RedisBackplane
    from wshub.ids import ConnectionId, NodeId
    from wshub.rooms import DEFAULT_ROOM

    from .backplane.test_contract import Recorder, subscribe

    class Bug(Exception):
        """Not an error a lost link can raise (RuntimeError is one now:
        redis-py's reconnect onto a closed transport): a bug of our own."""

    class Buggy(RedisBackplane):
        failures = 1

        async def _register(self) -> None:
            if self.failures:
                self.failures -= 1
                raise Bug("a bug in envelope handling")
            await super()._register()

    async def body() -> None:
        recorders = [Recorder(), Recorder()]
        a = RedisBackplane(redis_server.url, NodeId("a"), node_ttl=3, prefix="restart")
        b = Buggy(redis_server.url, NodeId("b"), node_ttl=3, prefix="restart")
        await a.start(recorders[0])
        await b.start(recorders[1])
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not (b.metrics()["subscriber_restarts"] == 1 and b.ready()[0]):
            assert loop.time() - start < TIMEOUT, "subscriber never restarted"
            await asyncio.sleep(0.02)
        await subscribe(b, recorders[1], DEFAULT_ROOM)
        a.publish(
            Envelope(NodeId("a"), EventKind.RELAY, DEFAULT_ROOM, ConnectionId("ws-1"), b"heard")
        )
        await recorders[1].until(lambda: recorders[1].relays() == [b"heard"])
        await a.stop()
        await b.stop()

    asyncio.run(body())
