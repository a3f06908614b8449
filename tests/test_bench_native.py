"""The native load generator (``wshub bench --engine native``, src/wshub/bench/native.c).

Against real ``wshub serve`` processes: fanout and rate, briefly, checked against
the closed loop's own arithmetic and the server's /metrics. Against a small
server written here: an exact count over a stream of frames split everywhere
(the engine's ``--read-size`` makes every read that short, down to one byte),
with extended lengths, pings to answer, fragments, frames that must not count,
and handshakes it must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from wshub.bench import main as bench_main
from wshub.bench import native
from wshub.bench.framing import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_for,
    encode_server_frame,
    mask,
    parse_header,
)
from wshub.bench.runner import Config

from .conftest import TIMEOUT

# --------------------------------------------------------------------- build


def test_accept_value_matches_python(tmp_path):
    exe = str(native.binary())
    keys = [b"dGhlIHNhbXBsZSBub25jZQ=="] + [base64.b64encode(os.urandom(16)) for _ in range(5)]
    for key in keys:
        out = subprocess.run(
            [exe, "--accept", key.decode()], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip().encode() == accept_for(key)


def test_built_once_per_source_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native.binary()
    assert first.parent == tmp_path / "wshub" and os.access(first, os.X_OK)
    mtime = first.stat().st_mtime_ns
    assert native.binary() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    src = native._source()
    monkeypatch.setattr(native, "_source", lambda: src + b"\n/* edited */\n")
    edited = native.binary()
    assert edited != first and edited.is_file()  # an edit means another build


def test_clear_error_without_a_compiler(monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-anywhere")
    with pytest.raises(native.NativeError, match="no C compiler"):
        native.binary()


def test_scenarios_it_does_not_run_are_refused(capsys):
    assert bench_main(["idle", "--engine", "native"]) == 2
    assert "--engine python" in capsys.readouterr().err


# --------------------------------------------------------------------- against wshub


WSHUB_FLAGS = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")


def test_fanout_against_wshub(make_server, capsys):
    srv = make_server(*WSHUB_FLAGS)
    rc = bench_main(
        [
            "fanout",
            "--engine",
            "native",
            "-n",
            "20",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--url",
            srv.ws_url,
            "--server-pid",
            str(srv.proc.pid),
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert rc == 0, res
    assert res["engine"] == "native" and res["scenario"] == "fanout" and res["protocol"] == "wshub"
    assert res["connections_open"] == 20 and res["connect_failures"] == 0
    assert res["closed_early"] == 0 and res["stalls"] == 0
    assert res["recipients"] == 19 and res["inflight"] == 32
    # the closed loop: every message sent in the window reaches the 19 recipients,
    # give or take the 32 in flight at either end of the window
    sent = round(res["messages_sent_per_s"] * res["measured_s"])
    assert sent > 0
    assert abs(res["deliveries"] - sent * 19) <= 2 * 32 * 19, (res["deliveries"], sent)
    # the server saw at least that much
    assert srv.metric("wshub_messages_total", 'outcome="INCOMING"') >= sent
    assert srv.metric("wshub_deliveries_total") >= res["deliveries"]
    assert res["server_cpu_us_per_delivery"] > 0 and 0 < res["generator_cpu"] < 2
    assert res["latency_samples"] > 0
    assert 0 < res["latency_ms_p50"] <= res["latency_ms_p99"] <= res["latency_ms_max"] < 5000


def test_rate_against_wshub(make_server):
    srv = make_server(*WSHUB_FLAGS)
    cfg = Config(
        scenario="rate", url=srv.ws_url, connections=20, rate=100.0, duration=1.0, warmup=0.3
    )
    res = native.run(cfg)
    assert res["connections_open"] == 20 and res["closed_early"] == 0
    assert res["rate_msgs_per_s"] == 100.0 and res["senders"] == 1
    sent = round(res["messages_sent_per_s"] * res["measured_s"])
    assert 50 <= sent <= 150
    assert abs(res["deliveries"] - sent * 19) <= 3 * 19, (res["deliveries"], sent)
    assert 0.8 <= res["achieved_ratio"] <= 1.2 and res["fell_behind"] is False
    assert 0 <= res["backlog_at_end"] <= 5 * 19
    # 20 connections, 32 probes: every one is a probe; at 100 msg/s most reads hold one message
    assert res["latency_samples"] >= 0.3 * res["deliveries"]
    assert 0 < res["latency_ms_p50"] < 200 and res["latency_ms_max"] < 5000
    assert srv.metric("wshub_messages_total", 'outcome="INCOMING"') >= sent


# --------------------------------------------------------------------- a server of our own


def stamped(extra: bytes = b"", pad: int = 60) -> bytes:
    return b"~#%d s1 c0 " % time.monotonic_ns() + extra + b"x" * pad


def stream_block(big: bool) -> tuple[list[bytes], int, list[bytes]]:
    """Frames to send, how many of them count, and the Ping payloads among them."""
    frames: list[bytes] = []
    pings: list[bytes] = []
    n = 0

    def add(op: int, payload: bytes, counts: bool = False, fin: bool = True) -> None:
        nonlocal n
        frames.append(encode_server_frame(op, payload, fin=fin))
        n += counts

    add(OP_TEXT, b'{"type":"welcome","connectionId":"ws-1-abc","users":[]}')
    add(OP_TEXT, stamped(), counts=True)  # raw relay: the marker first, 7-bit length
    for _ in range(3):  # wshub envelope, 16-bit length (> 125 bytes)
        add(
            OP_TEXT,
            b'{"type":"message","connectionId":"ws-1700000000000-abcdefghi","content":"'
            + stamped(pad=100)
            + b'","timestamp":"2026-01-01T00:00:00.000Z"}',
            counts=True,
        )
    pings.append(b"mid-%d" % len(frames))
    add(OP_PING, pings[-1])
    if big:
        add(OP_TEXT, stamped(pad=70000), counts=True)  # 64-bit length, payload over many reads
    add(OP_TEXT, b"y" * 200 + b"~#1 s0 c0 ", counts=False)  # the marker past the looked-at window
    add(OP_TEXT, b"~", counts=False)
    add(OP_TEXT, b"", counts=False)
    add(OP_TEXT, b'{"type":"ping","timestamp":1}', counts=False)
    add(OP_PONG, b"~#0 s0 c0 ", counts=False)  # a control frame never counts
    # a fragmented message counts once, with a Ping between its fragments
    add(OP_TEXT, stamped(pad=10), fin=False)
    pings.append(b"frag")
    add(OP_PING, pings[-1])
    add(OP_CONT, b"x" * 300, fin=False)
    add(OP_CONT, b"end", fin=True, counts=True)
    add(OP_BINARY, stamped(pad=5), counts=True)
    add(OP_TEXT, stamped(pad=126 - 11), counts=True)  # around the 125/126 border
    if big:
        add(OP_TEXT, stamped(pad=65536), counts=True)  # 64-bit length (65536 + head)
    return frames, n, pings


class FrameServer:
    """Accept WebSocket upgrades, then send a prepared stream in pieces and check
    that every Ping comes back as a masked Pong with its payload."""

    def __init__(self, mode: str = "ok", blocks: int = 3) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.frames: list[bytes] = []
        self.expected = 0
        self.pings: list[bytes] = []
        for b in range(blocks):
            f, n, p = stream_block(big=b == 0)
            self.frames += f
            self.expected += n
            self.pings += p
        self.pongs: list[bytes] = []
        self.requests: list[bytes] = []  # each upgrade request's head, as read
        self.unmasked = 0
        self.done = threading.Event()
        self.failure: list[str] = []
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _read_frames(self, conn: socket.socket, buf: bytearray) -> list[tuple[int, bytes]]:
        data = conn.recv(65536)
        if not data:
            raise ConnectionError("client closed")
        buf += data
        out = []
        while (h := parse_header(buf)) is not None:
            fin, op, masked, key, n, hl = h
            if len(buf) < hl + n:
                break
            payload = bytes(buf[hl : hl + n])
            del buf[: hl + n]
            if not masked:
                self.unmasked += 1
            out.append((op, mask(payload, key) if masked else payload))
        return out

    def _wait_pong(self, conn: socket.socket, buf: bytearray, payload: bytes) -> None:
        while True:
            for op, p in self._read_frames(conn, buf):
                if op == OP_PONG:
                    self.pongs.append(p)
                    if p == payload:
                        return

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT * 2)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            self.requests.append(head)
            key = b""
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"sec-websocket-key":
                    key = v.strip()
            guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            acc = base64.b64encode(hashlib.sha1(key + guid).digest())
            if self.mode == "refuse":
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            if self.mode == "bad-accept":
                acc = acc[:-2] + (b"A=" if acc[-2:] != b"A=" else b"B=")
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nsec-websocket-accept:  " + acc + b" \r\n\r\n"
            )
            buf = bytearray()
            # the client is open (and measuring, with --warmup 0) once it answers this
            conn.sendall(encode_server_frame(OP_PING, b"start"))
            self._wait_pong(conn, buf, b"start")
            for f in self.frames:
                # the header and the first bytes of the payload in pieces, the rest at once
                for i in range(min(len(f), 14)):
                    conn.sendall(f[i : i + 1])
                if len(f) > 14:
                    conn.sendall(f[14:])
            conn.sendall(encode_server_frame(OP_PING, b"done"))
            self._wait_pong(conn, buf, b"done")  # everything before it was read
            self.done.set()
            while True:  # until the client's Close (or the end of the stream)
                if any(op == OP_CLOSE for op, _ in self._read_frames(conn, buf)):
                    conn.sendall(encode_server_frame(OP_CLOSE, b"\x03\xe8"))
                    return
        except (OSError, ConnectionError) as e:
            if not self.done.is_set() and self.mode == "ok":
                self.failure.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for t in self.threads:
            t.join(TIMEOUT)


@pytest.fixture
def frame_server():
    servers: list[FrameServer] = []

    def make(**kw) -> FrameServer:
        s = FrameServer(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize("read_size", [1, 2, 3, 7, 131, None])
def test_exact_count_over_awkward_reads(frame_server, read_size):
    srv = frame_server()
    cfg = Config(
        scenario="sink",
        url=srv.url,
        protocol="raw",
        connections=1,
        warmup=0.0,
        duration=2.5 if read_size == 1 else 1.0,
        probes=1,
        keepalive=0,
    )
    res = native.run(cfg, read_size=read_size)
    assert srv.done.is_set(), f"the last Ping was not answered within the run: {srv.failure}"
    assert not srv.failure, srv.failure
    assert res["connections_open"] == 1 and res["closed_early"] == 0
    assert res["deliveries"] == srv.expected
    # every Ping answered, in order, masked, with its payload
    assert srv.pongs == [b"start", *srv.pings, b"done"]
    assert srv.unmasked == 0
    # the probe read the send times (this process's monotonic clock is the engine's)
    assert res["latency_samples"] >= 1
    assert 0 <= res["latency_ms_p50"] <= res["latency_ms_max"] < 10 * TIMEOUT * 1000


@pytest.mark.parametrize(
    "mode,why",
    [
        ("bad-accept", "bad Sec-WebSocket-Accept"),
        ("refuse", "handshake refused: HTTP/1.1 403 Forbidden"),
    ],
)
def test_handshake_checked(frame_server, mode, why):
    srv = frame_server(mode=mode)
    cfg = Config(
        scenario="sink", url=srv.url, protocol="raw", connections=3, warmup=0.0, duration=0.1
    )
    res = native.run(cfg)
    assert res["connections_open"] == 0 and res["connect_failures"] == 3
    assert why in res["errors"][0]
