"""The load generator's engine: connections, scenarios, measurement.

One asyncio (uvloop) process. Most connections count received messages with one
``bytes.count`` of a 2-byte marker per data chunk; a few *probe* connections parse
every frame and read the send timestamp carried in the content to measure latency.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import ssl
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .framing import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    check_handshake_response,
    encode_frame,
    handshake_request,
    make_key,
)

MARK = b"~#"
BIG = 1 << 62  # the count of a connection that must never be the slowest
M0, M1 = MARK[0], MARK[1]
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_now = time.monotonic_ns
_KEEPALIVE_PONG = encode_frame(OP_PONG, b"bench", mask_key=b"\x01\x02\x03\x04")
_CLOSE_FRAME = encode_frame(OP_CLOSE, b"\x03\xe8", mask_key=b"\x05\x06\x07\x08")


# --------------------------------------------------------------------------- config


@dataclass
class Config:
    scenario: str
    url: str = "ws://127.0.0.1:8787/websocket"
    urls: list[str] = field(default_factory=list)  # several servers (a cluster); url is the first
    placement: str = "round-robin"  # or "sender-alone": connection 0 alone on the first URL
    open_deadline: float = 0.0  # stop starting new connections after this many seconds (0: never)
    protocol: str = "wshub"
    connections: int = 1000
    inflight: int = 32
    rate: float = 50.0
    size: int = 100
    duration: float = 10.0
    warmup: float = 2.0
    source_ips: int = 0  # 0: auto
    connect_concurrency: int = 64
    connect_timeout: float = 15.0
    probes: int = 32
    server_pid: int | None = None
    settle: float = 30.0
    keepalive: float = 20.0
    nap_us: int = 0
    progress: bool = False
    json: bool = False
    ca_file: str = ""  # wss://: trust this CA file instead of the system's
    insecure: bool = False  # wss://: do not verify the certificate
    tls: ssl.SSLContext | None = field(init=False, default=None)  # set when a URL is wss://
    # the native engine's reading client and rooms (native.py; the Python engine refuses them)
    reader: str = "peek"  # or "full": every frame read whole, its JSON type parsed
    rooms: int = 0  # fanout: connection i in room r<i % rooms>, path PATH/r<i % rooms>
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)
    path: str = field(init=False, default="/")
    targets: list[tuple[str, int, str]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not self.urls:
            self.urls = [self.url]
        self.url = self.urls[0]
        for url in self.urls:
            u = urlsplit(url)
            if u.scheme not in ("ws", "wss", ""):
                raise ValueError(f"only ws:// and wss:// URLs are supported: {url}")
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            port = u.port or (443 if u.scheme == "wss" else 80)
            self.targets.append((u.hostname or "127.0.0.1", port, path))
        if any(url.startswith("wss:") for url in self.urls):
            if not all(url.startswith("wss:") for url in self.urls):
                raise ValueError("--url: all ws:// or all wss://")
            from ..client import tls_context

            self.tls = tls_context(self.ca_file, self.insecure)
        self.host, self.port, self.path = self.targets[0]
        if self.placement not in ("round-robin", "sender-alone"):
            raise ValueError("--placement is round-robin or sender-alone")
        if self.placement == "sender-alone" and len(self.targets) < 2:
            raise ValueError("--placement sender-alone needs at least two --url")
        if self.source_ips <= 0:
            # wshub allows 200 open connections per client IP by default
            self.source_ips = min(254, max(1, math.ceil(self.connections / 200)))


def room_path(path: str, room: int) -> str:
    """PATH/r<room>, the query string kept (as the native engine builds it)."""
    base, sep, query = path.partition("?")
    return f"{base.rstrip('/')}/r{room}{sep}{query}"


def source_addresses(k: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(1, k + 1)]


def target_of(cfg: Config, i: int) -> int:
    """Which URL connection ``i`` opens: round-robin, or the sender (connection 0)
    alone on the first URL and everyone else round-robin over the others."""
    n = len(cfg.targets)
    if n == 1:
        return 0
    if cfg.placement == "sender-alone":
        return 0 if i == 0 else 1 + (i - 1) % (n - 1)
    return i % n


# --------------------------------------------------------------------------- messages


class Encoder:
    """Builds the masked client frame for one bench message."""

    def __init__(self, protocol: str, size: int) -> None:
        self.protocol = protocol
        self.size = size
        self.key = b"\x11\x22\x33\x44"

    def content(self, sender: int, seq: int) -> bytes:
        # the marker, the send time in ns, then padding up to the requested size
        head = b"~#%d s%d c%d " % (_now(), seq, sender)
        pad = self.size - len(head)
        return head + b"x" * pad if pad > 0 else head

    def frame(self, sender: int, seq: int) -> bytes:
        c = self.content(sender, seq)
        if self.protocol == "wshub":
            payload = b'{"type":"message","content":"' + c + b'"}'
        else:
            payload = c
        return encode_frame(OP_TEXT, payload, mask_key=self.key)


# --------------------------------------------------------------------------- connections


class Hub:
    """State shared by every connection of a run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.conns: list[Conn] = []
        self.counts: list[int] = []  # messages received per connection (marker count)
        self.measuring = False
        # ns, probes only, while measuring; one list per URL
        self.latencies_by: list[list[int]] = [[] for _ in cfg.targets]
        # fanout: the slowest recipient's count and how many recipients are at it;
        # when the last of them moves on, ``wake`` runs (once per loop pass)
        self.min_count = -1
        self.at_min = 0
        self.wake = None
        self.excluded = 0  # entries of counts set to BIG
        self._wake_pending = False
        self.closed_early = 0
        self.errors: list[str] = []
        self.conn_class: type[Conn] | None = None  # a scenario's own connection class

    def total(self) -> int:
        return sum(self.counts) - self.excluded * BIG

    def latencies(self) -> list[int]:
        return [v for lst in self.latencies_by for v in lst]

    def latency_report(self) -> dict:
        out = latency_summary(self.latencies())
        if len(self.latencies_by) > 1:
            out["latency_by_url"] = {
                url: latency_summary(lst)
                for url, lst in zip(self.cfg.urls, self.latencies_by, strict=True)
            }
        return out

    def exclude(self, idx: int) -> None:
        if self.counts[idx] < BIG:
            self.counts[idx] = BIG
            self.excluded += 1

    def poke(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon(self._run_wake)

    def _run_wake(self) -> None:
        self._wake_pending = False
        if self.wake is not None:
            self.wake()


class Conn(asyncio.BaseProtocol):
    """A counting connection: after the handshake, one marker count per chunk."""

    probe = False

    def __init__(self, hub: Hub, idx: int, target: int = 0) -> None:
        self.hub = hub
        self.idx = idx
        self.target = target
        self.lats = hub.latencies_by[target]
        self.counts = hub.counts
        self.transport = None
        self.key = make_key()
        self.opened = hub.loop.create_future()
        self.is_open = False
        self.head = b""
        self.last = -1
        self.rx = 0
        self.t_start = 0
        self.t_open = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t_start = _now()
        host, port, path = self.hub.cfg.targets[self.target]
        rooms = self.hub.cfg.rooms
        if rooms:
            path = room_path(path, self.idx % rooms)
        transport.write(handshake_request(host, port, path, self.key))

    def data_received(self, data: bytes) -> None:
        if self.is_open:
            self.rx += len(data)
            n = data.count(MARK)
            if self.last == M0 and data[0] == M1:
                n += 1
            self.last = data[-1]
            if n:
                c = self.counts
                i = self.idx
                old = c[i]
                c[i] = old + n
                hub = self.hub
                if old == hub.min_count:
                    hub.at_min -= 1
                    if hub.at_min <= 0:
                        hub.poke()
            return
        self._handshake(data)

    def _handshake(self, data: bytes) -> None:
        self.head += data
        i = self.head.find(b"\r\n\r\n")
        if i < 0:
            if len(self.head) > 65536:
                self._fail("handshake response too long")
            return
        rest = self.head[i + 4 :]
        head = self.head[:i]
        self.head = b""
        try:
            check_handshake_response(head, self.key)
        except ValueError as e:
            self._fail(str(e))
            return
        self.is_open = True
        self.t_open = _now()
        if not self.opened.done():
            self.opened.set_result(None)
        if rest:
            self.data_received(rest)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        was_open = self.is_open
        self.is_open = False
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        elif was_open and not self.hub_closing():
            self.hub.closed_early += 1
            if self.hub.min_count >= 0:  # fanout: a dead recipient must not hold the window
                self.hub.exclude(self.idx)
                self.hub.poke()
        self.transport = None

    def hub_closing(self) -> bool:
        return getattr(self.hub, "closing", False)

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None:
            t.write(data)


_SHARED = bytearray(262144)


class BufConn(Conn, asyncio.BufferedProtocol):
    """Counting connection on ``asyncio.BufferedProtocol``: reads land in one shared
    buffer (the loop runs one callback at a time), so no bytes object per chunk."""

    def get_buffer(self, sizehint: int):
        if self.is_open:
            return _SHARED
        self._hsbuf = bytearray(65536)
        return self._hsbuf

    def buffer_updated(self, nbytes: int) -> None:
        if self.is_open:
            buf = _SHARED
            self.rx += nbytes
            n = buf.count(MARK, 0, nbytes)
            if self.last == M0 and buf[0] == M1:
                n += 1
            self.last = buf[nbytes - 1]
            if n:
                c = self.counts
                i = self.idx
                old = c[i]
                c[i] = old + n
                hub = self.hub
                if old == hub.min_count:
                    hub.at_min -= 1
                    if hub.at_min <= 0:
                        hub.poke()
            return
        self._handshake(bytes(self._hsbuf[:nbytes]))


class ProbeConn(BufConn):
    """A counting connection that also reads send timestamps for latency.

    It counts like the others and reads the stamp of the first and of the last
    message in each chunk (one, when the chunk holds one): at low rates that is
    every message; under a flood, a sample.
    """

    probe = True

    def buffer_updated(self, nbytes: int) -> None:
        if self.is_open:
            data = bytes(_SHARED[:nbytes])
            BufConn.buffer_updated(self, nbytes)
            self._stamps(data)
            return
        self._handshake(bytes(self._hsbuf[:nbytes]))

    def data_received(self, data: bytes) -> None:
        # only reached with the handshake's leftover bytes
        Conn.data_received(self, data)
        if self.is_open:
            self._stamps(data)

    def _stamps(self, data: bytes) -> None:
        hub = self.hub
        if not hub.measuring:
            return
        now = _now()
        i = data.find(MARK)
        if i < 0:
            return
        j = data.find(b" ", i)
        if j > 0:
            try:
                self.lats.append(now - int(data[i + 2 : j]))
            except ValueError:
                pass
        k = data.rfind(MARK)
        if k > i:
            j = data.find(b" ", k)
            if j > 0:
                try:
                    self.lats.append(now - int(data[k + 2 : j]))
                except ValueError:
                    pass


async def open_connections(
    hub: Hub, n: int, probe_every: int, progress: Progress | None = None
) -> dict:
    """Open ``n`` connections concurrently; returns connect-time figures."""
    cfg = hub.cfg
    loop = hub.loop
    ips = source_addresses(cfg.source_ips)
    sem = asyncio.Semaphore(cfg.connect_concurrency)
    hub.counts.extend([0] * n)
    conns: list[Conn | None] = [None] * n
    failures: list[str] = []
    skipped = [0]
    deadline = time.perf_counter() + cfg.open_deadline if cfg.open_deadline > 0 else None
    done = [0]

    async def one(i: int) -> None:
        async with sem:
            if deadline is not None and time.perf_counter() > deadline:
                skipped[0] += 1
                return
            probe = probe_every > 0 and i % probe_every == 0
            t = target_of(cfg, i)
            host, port, _ = cfg.targets[t]
            cls = hub.conn_class or (ProbeConn if probe else BufConn)
            proto = cls(hub, i, t)
            try:
                # out of descriptors (EMFILE) is a failed connection, not a failed run
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as e:
                failures.append(f"{type(e).__name__}: {e}")
                return
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                sock.bind((ips[i % len(ips)], 0))
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), cfg.connect_timeout)
                await loop.create_connection(
                    lambda: proto,
                    sock=sock,
                    ssl=cfg.tls,
                    server_hostname=host if cfg.tls else None,
                    ssl_handshake_timeout=cfg.connect_timeout if cfg.tls else None,
                )
                await asyncio.wait_for(proto.opened, cfg.connect_timeout)
            except (TimeoutError, OSError, ConnectionError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                if proto.transport is not None:
                    proto.transport.abort()
                else:
                    sock.close()
                return
            conns[i] = proto
            done[0] += 1

    async def show() -> None:
        while True:
            await asyncio.sleep(1.0)
            progress.show(
                f"connecting  open={done[0]}/{n}  failed={len(failures)}  "
                f"{time.perf_counter() - t0:.0f}s"
            )

    t0 = time.perf_counter()
    shower = asyncio.ensure_future(show()) if progress is not None and progress.enabled else None
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        if shower is not None:
            shower.cancel()
    elapsed = time.perf_counter() - t0
    hub.conns = [c for c in conns if c is not None]
    if failures:
        hub.errors.append(f"{len(failures)} connections failed, first: {failures[0]}")
    hs = sorted((c.t_open - c.t_start) / 1e6 for c in hub.conns)
    return {
        "connections_requested": n,
        "connections_open": len(hub.conns),
        "connect_failures": len(failures),
        "connect_time_s": round(elapsed, 3),
        "connects_per_s": round(len(hub.conns) / elapsed, 1) if elapsed > 0 else None,
        "handshake_ms_p50": round(pct(hs, 50), 2) if hs else None,
        "handshake_ms_p99": round(pct(hs, 99), 2) if hs else None,
        "source_ips": cfg.source_ips,
        **({"connections_not_attempted": skipped[0]} if skipped[0] else {}),
        **(
            {
                "connections_by_url": [
                    sum(1 for c in hub.conns if c.target == t) for t in range(len(cfg.targets))
                ]
            }
            if len(cfg.targets) > 1
            else {}
        ),
    }


async def close_all(hub: Hub) -> None:
    hub.closing = True
    for c in hub.conns:
        t = c.transport
        if t is not None:
            try:
                t.write(_CLOSE_FRAME)
                t.close()
            except Exception:
                pass
    await asyncio.sleep(0.2)
    for c in hub.conns:
        if c.transport is not None:
            c.transport.abort()


# --------------------------------------------------------------------------- measurement


def pct(sorted_vals: list, p: float):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    f = math.floor(k)
    c = min(f + 1, len(sorted_vals) - 1)
    return sorted_vals[f] + (sorted_vals[c] - sorted_vals[f]) * (k - f)


def latency_summary(lat_ns: list[int]) -> dict:
    if not lat_ns:
        return {"latency_samples": 0}
    s = sorted(lat_ns)
    ms = lambda v: round(v / 1e6, 3)  # noqa: E731
    return {
        "latency_samples": len(s),
        "latency_ms_p50": ms(pct(s, 50)),
        "latency_ms_p90": ms(pct(s, 90)),
        "latency_ms_p99": ms(pct(s, 99)),
        "latency_ms_max": ms(s[-1]),
    }


class ServerProbe:
    """RSS and CPU time of the server process, from /proc (Linux)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.tck = os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int | None:
        if not self.pid:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def cpu_s(self) -> float | None:
        if not self.pid:
            return None
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self.tck
        except (OSError, IndexError, ValueError):
            return None


class Progress:
    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[2K[{self.label}] {text}")
            sys.stderr.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fmt_rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


class Window:
    """Measures the measured window: received counts, time, CPU of both sides."""

    def __init__(self, hub: Hub, server: ServerProbe, recipients: list[int] | None = None) -> None:
        self.hub = hub
        self.server = server
        self.idx = recipients

    def total(self) -> int:
        c = self.hub.counts
        if self.idx is None:
            return self.hub.total()
        return sum(c[i] for i in self.idx if c[i] < BIG)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.n0 = self.total()
        self.cpu0 = time.process_time()
        self.scpu0 = self.server.cpu_s()
        self.hub.measuring = True

    def stop(self) -> dict:
        self.hub.measuring = False
        t = time.perf_counter() - self.t0
        n = self.total() - self.n0
        cpu = time.process_time() - self.cpu0
        out = {
            "measured_s": round(t, 3),
            "deliveries": n,
            "deliveries_per_s": round(n / t, 1) if t > 0 else 0.0,
            "generator_cpu": round(cpu / t, 3) if t > 0 else None,
        }
        s1 = self.server.cpu_s()
        if self.scpu0 is not None and s1 is not None:
            scpu = s1 - self.scpu0
            out["server_cpu"] = round(scpu / t, 3)
            if n:
                out["server_cpu_us_per_delivery"] = round(scpu / n * 1e6, 3)
        rss = self.server.rss_kib()
        if rss is not None:
            # The memory decisions.md 11 asks the report for, under the load just measured.
            out["server_rss_kib"] = rss
        return out


async def tick_loop(hub: Hub, seconds: float, progress: Progress, extra=None) -> None:
    """Sleep ``seconds`` in 1 s steps, updating the progress line."""
    end = time.perf_counter() + seconds
    last_n = hub.total()
    last_t = time.perf_counter()
    while True:
        left = end - time.perf_counter()
        if left <= 0:
            break
        await asyncio.sleep(min(1.0, left))
        if extra is not None:
            extra()
        now = time.perf_counter()
        n = hub.total()
        rate = (n - last_n) / (now - last_t) if now > last_t else 0.0
        last_n, last_t = n, now
        phase = "measuring" if hub.measuring else "warmup"
        open_n = sum(1 for c in hub.conns if c.transport is not None)
        progress.show(
            f"{phase} {max(0.0, end - now):5.1f}s left  conns={open_n}  "
            f"deliveries/s={fmt_rate(rate)}  total={n}"
        )


# --------------------------------------------------------------------------- keepalive


def start_keepalive(hub: Hub):
    """Send an unsolicited Pong on every counting connection now and then.

    Counting connections do not parse frames, so they cannot answer a server Ping;
    an unsolicited Pong (RFC 6455 5.5.3) is a sign of life for servers with a
    heartbeat timeout.
    """
    period = hub.cfg.keepalive
    if period <= 0:
        return None

    async def run() -> None:
        while True:
            await asyncio.sleep(period)
            for c in hub.conns:
                if not c.probe:
                    c.write(_KEEPALIVE_PONG)

    return asyncio.ensure_future(run())


# --------------------------------------------------------------------------- scenarios


def probe_spacing(n: int, probes: int) -> int:
    if probes <= 0:
        return 0
    return max(1, n // probes)


def start_nap(hub: Hub):
    """Block the loop for ``nap_us`` once per millisecond so data gathers in the
    socket buffers and each read takes several frames: fewer syscalls per frame
    counted, at the cost of up to ``nap_us`` of added latency. For throughput runs."""
    nap = hub.cfg.nap_us / 1e6
    if nap <= 0:
        return None
    loop = hub.loop
    state = {"on": True}

    def tick() -> None:
        if state["on"]:
            time.sleep(nap)
            loop.call_later(0.001, tick)

    loop.call_later(0.001, tick)
    return state


def too_few_open(hub: Hub, scenario: str) -> RuntimeError:
    """The error of a run that could not start, with why its connections
    failed (an untrusted certificate, a refusal): the only thing the person
    running it needs to know, which the bare count did not say."""
    why = f" ({hub.errors[-1]})" if hub.errors else ""
    if "CERTIFICATE_VERIFY_FAILED" in why:
        why += ": --ca-file FILE trusts a private CA, --insecure skips the check"
    opened = len(hub.conns)
    return RuntimeError(f"{scenario} needs at least 2 open connections, {opened} opened{why}")


async def scenario_fanout(hub: Hub, server: ServerProbe, progress: Progress) -> dict:
    cfg = hub.cfg
    conn_info = await open_connections(
        hub, cfg.connections, probe_spacing(cfg.connections, cfg.probes), progress
    )
    if len(hub.conns) < 2:
        raise too_few_open(hub, "fan-out")
    sender = hub.conns[0]
    ridx = [c.idx for c in hub.conns[1:]]
    counts = hub.counts
    enc = Encoder(cfg.protocol, cfg.size)
    K = cfg.inflight
    st = {"sent": 0, "offset": 0, "stalls": 0, "last_min": -1, "last_move": time.perf_counter()}
    sending = {"on": True}

    hub.exclude(sender.idx)  # the sender is never the slowest recipient
    open_idx = {c.idx for c in hub.conns}
    for i in range(len(counts)):
        if i not in open_idx:
            hub.exclude(i)  # failed connections neither

    def slowest() -> int:
        m = min(counts)
        hub.at_min = counts.count(m)
        hub.min_count = m
        return m

    def release() -> None:
        if not sending["on"]:
            return
        m = slowest()
        if m != st["last_min"]:
            st["last_min"] = m
            st["last_move"] = time.perf_counter()
        room = K - (st["sent"] - st["offset"] - m)
        if room > 0:
            base = st["sent"]
            sender.write(b"".join(enc.frame(0, base + j) for j in range(room)))
            st["sent"] = base + room

    def watchdog() -> None:
        # a message lost by the server (e.g. a rate limit) would stall the window
        if sending["on"] and time.perf_counter() - st["last_move"] > 2.0:
            m = slowest()
            st["stalls"] += 1
            st["offset"] = st["sent"] - m
            st["last_move"] = time.perf_counter()
            release()

    await asyncio.sleep(0.5)  # let join notifications drain
    ka = start_keepalive(hub)
    hub.wake = release
    nap = start_nap(hub)
    release()
    win = Window(hub, server, ridx)
    await tick_loop(hub, cfg.warmup, progress, watchdog)
    sent0 = st["sent"]
    win.start()
    await tick_loop(hub, cfg.duration, progress, watchdog)
    res = win.stop()
    res["messages_sent_per_s"] = round((st["sent"] - sent0) / res["measured_s"], 1)
    sending["on"] = False
    hub.wake = None
    hub.min_count = -1
    if nap:
        nap["on"] = False
    res["stalls"] = st["stalls"]
    res.update(hub.latency_report())
    if ka:
        ka.cancel()
    progress.done()
    return {**conn_info, "inflight": K, "recipients": len(ridx), **res}


async def _scheduled_sender(
    hub: Hub, senders: list[Conn], total_rate: float, stop_at: float, enc: Encoder, st: dict
) -> None:
    """Send ``total_rate`` messages per second round-robin over ``senders``."""
    loop = hub.loop
    t0 = loop.time()
    k = 0
    nsend = len(senders)
    interval = 1.0 / total_rate
    while True:
        now = loop.time()
        if now >= stop_at:
            break
        due = int((now - t0) / interval) + 1
        if due - k > 1:
            st["late"] = max(st["late"], now - (t0 + (k + 1) * interval))
        per: dict[int, list[bytes]] = {}
        while k < due:
            s = k % nsend
            per.setdefault(s, []).append(enc.frame(senders[s].idx, k))
            st["sent_by"][s] += 1
            k += 1
        for s, frames in per.items():
            senders[s].write(b"".join(frames))
        st["sent"] = k
        nxt = t0 + k * interval
        await asyncio.sleep(max(0.0, nxt - loop.time()))


async def _rate_like(
    hub: Hub, server: ServerProbe, progress: Progress, senders_n: int, total_rate: float
) -> dict:
    cfg = hub.cfg
    n = cfg.connections
    conn_info = await open_connections(hub, n, probe_spacing(n, cfg.probes), progress)
    conns = hub.conns
    if len(conns) < 2:
        raise too_few_open(hub, cfg.scenario)
    senders = conns[:senders_n]
    recips = len(conns) - 1  # every message goes to everyone but its sender
    enc = Encoder(cfg.protocol, cfg.size)
    st = {"sent": 0, "late": 0.0, "sent_by": [0] * len(senders)}
    await asyncio.sleep(0.5)
    ka = start_keepalive(hub)
    stop_at = hub.loop.time() + cfg.warmup + cfg.duration
    task = asyncio.ensure_future(_scheduled_sender(hub, senders, total_rate, stop_at, enc, st))
    win = Window(hub, server)
    await tick_loop(hub, cfg.warmup, progress)
    sent0 = st["sent"]
    win.start()
    await tick_loop(hub, cfg.duration, progress)
    res = win.stop()
    sent_in = st["sent"] - sent0
    expected_total = st["sent"] * recips
    backlog = expected_total - hub.total()
    offered = total_rate * recips
    res["messages_sent_per_s"] = round(sent_in / res["measured_s"], 1)
    res["offered_deliveries_per_s"] = round(offered, 1)
    res["achieved_ratio"] = round(res["deliveries_per_s"] / offered, 3) if offered else None
    res["backlog_at_end"] = backlog
    res["backlog_s"] = round(backlog / offered, 3) if offered else None
    res["sender_late_max_ms"] = round(st["late"] * 1e3, 2)
    res.update(hub.latency_report())
    res["fell_behind"] = bool(
        (res["achieved_ratio"] is not None and res["achieved_ratio"] < 0.95)
        or (res["backlog_s"] is not None and res["backlog_s"] > 1.0)
        or hub.closed_early
    )
    await task
    # give stragglers a moment so the server is not torn down mid-burst
    await asyncio.sleep(0.2)
    if ka:
        ka.cancel()
    progress.done()
    return {**conn_info, "senders": len(senders), **res}


async def scenario_rate(hub: Hub, server: ServerProbe, progress: Progress) -> dict:
    return {
        "rate_msgs_per_s": hub.cfg.rate,
        **await _rate_like(hub, server, progress, 1, hub.cfg.rate),
    }


async def scenario_chat(hub: Hub, server: ServerProbe, progress: Progress) -> dict:
    cfg = hub.cfg
    total = cfg.rate * cfg.connections
    return {
        "rate_per_connection": cfg.rate,
        **await _rate_like(hub, server, progress, cfg.connections, total),
    }


WELCOME = b'"type":"welcome"'


class IdleConn(BufConn):
    """A held connection of the idle scenario: it notes its welcome (wshub) and,
    while the broadcast is measured, the send time of every message it receives."""

    def __init__(self, hub: Hub, idx: int, target: int = 0) -> None:
        super().__init__(hub, idx, target)
        self.welcomed = hub.cfg.protocol != "wshub"  # raw relays send no welcome
        self.early = b""  # what came before the welcome (it may span reads)

    def buffer_updated(self, nbytes: int) -> None:
        if self.is_open:
            if not self.welcomed or self.hub.measuring:
                self._seen(bytes(_SHARED[:nbytes]))
            BufConn.buffer_updated(self, nbytes)
            return
        self._handshake(bytes(self._hsbuf[:nbytes]))

    def data_received(self, data: bytes) -> None:
        # only reached with the handshake's leftover bytes
        Conn.data_received(self, data)
        if self.is_open:
            self._seen(data)

    def _seen(self, data: bytes) -> None:
        if not self.welcomed:
            self.early = (self.early + data)[-4096:]
            if WELCOME in self.early:
                self.welcomed = True
                self.early = b""
        if self.hub.measuring:
            now = _now()
            i = data.find(MARK)
            while i >= 0:
                j = data.find(b" ", i)
                if j < 0:
                    break
                try:
                    self.lats.append(now - int(data[i + 2 : j]))
                except ValueError:
                    pass
                i = data.find(MARK, j)


class LoopWatch:
    """The server's event-loop lag while the scenario runs, two ways.

    Inside (wshub only): its ``wshub_event_loop_lag_seconds`` gauge, read from
    /metrics every ``period`` seconds. Outside (any server): the round trip of a
    Ping on one extra connection (its own room), every ``period`` seconds; a Pong
    comes back late when the server's loop is busy.
    """

    def __init__(self, hub: Hub, period: float = 0.25) -> None:
        self.hub = hub
        self.period = period
        self.phase = "open"
        self.lag: dict[str, list[float]] = {}
        self.rtt: dict[str, list[float]] = {}
        self.metrics_error = ""
        self.ping_error = ""
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if self.hub.cfg.protocol == "wshub":
            self.tasks.append(asyncio.ensure_future(self._scrape()))
        self.tasks.append(asyncio.ensure_future(self._ping()))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _scrape(self) -> None:
        host, port, _ = self.hub.cfg.targets[0]
        request = f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=self.hub.cfg.tls)
                writer.write(request.encode())
                body = await asyncio.wait_for(reader.read(-1), 30.0)
                writer.close()
                for line in body.split(b"\n"):
                    if line.startswith(b"wshub_event_loop_lag_seconds "):
                        self.lag.setdefault(self.phase, []).append(float(line.split()[1]))
                        break
                else:
                    self.metrics_error = "no wshub_event_loop_lag_seconds in /metrics"
            except (OSError, TimeoutError, ValueError) as e:
                self.metrics_error = f"/metrics: {type(e).__name__}: {e}"
            await asyncio.sleep(self.period)

    async def _ping(self) -> None:
        hub = self.hub
        host, port, path = hub.cfg.targets[0]
        conn = _PingConn(hub, path.partition("?")[0].rstrip("/") + "/loopwatch", self)
        try:
            await hub.loop.create_connection(
                lambda: conn,
                host,
                port,
                ssl=hub.cfg.tls,
                server_hostname=host if hub.cfg.tls else None,
            )
            await asyncio.wait_for(conn.opened, hub.cfg.connect_timeout)
        except (OSError, TimeoutError, ConnectionError) as e:
            self.ping_error = f"{type(e).__name__}: {e}"
            return
        try:
            while True:
                conn.ping()
                await asyncio.sleep(self.period)
        finally:
            if conn.transport is not None:
                conn.transport.abort()

    def report(self) -> dict:
        out: dict = {}
        for phase, vals in self.lag.items():
            s = sorted(vals)
            out[f"event_loop_lag_ms_{phase}_max"] = round(s[-1] * 1e3, 2)
            out[f"event_loop_lag_ms_{phase}_median"] = round(statistics.median(s) * 1e3, 2)
        for phase, vals in self.rtt.items():
            s = sorted(vals)
            out[f"ping_rtt_ms_{phase}_max"] = round(s[-1], 2)
            out[f"ping_rtt_ms_{phase}_p50"] = round(pct(s, 50), 2)
        if self.hub.cfg.protocol == "wshub" and not self.lag:
            out["event_loop_lag"] = self.metrics_error or "no sample"
        if self.ping_error:
            out["ping_rtt"] = self.ping_error
        return out


class _PingConn(Conn):
    """LoopWatch's connection: a Ping carrying its send time, the Pong parsed."""

    def __init__(self, hub: Hub, path: str, watch: LoopWatch) -> None:
        super().__init__(hub, -1, 0)
        self.path = path
        self.watch = watch
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        host, port, _ = self.hub.cfg.targets[0]
        transport.write(handshake_request(host, port, self.path, self.key))

    def ping(self) -> None:
        self.write(encode_frame(OP_PING, b"%019d" % _now(), mask_key=b"\x09\x08\x07\x06"))

    def data_received(self, data: bytes) -> None:
        if not self.is_open:
            self._handshake(data)
            return
        # server frames are unmasked; this connection gets little else than Pongs
        buf = self.buf + data
        pos = 0
        while len(buf) - pos >= 2:
            n = buf[pos + 1] & 0x7F
            head = 2 + (2 if n == 126 else 8 if n == 127 else 0)
            if len(buf) - pos < head:
                break
            if n == 126:
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif n == 127:
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if len(buf) - pos < head + n:
                break
            if buf[pos] & 0x0F == OP_PONG and n == 19:
                try:
                    sent = int(buf[pos + head : pos + head + n])
                    self.watch.rtt.setdefault(self.watch.phase, []).append((_now() - sent) / 1e6)
                except ValueError:
                    pass
            pos += head + n
        self.buf = buf[pos:]

    def connection_lost(self, exc) -> None:
        self.is_open = False
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        self.transport = None


async def scenario_idle(hub: Hub, server: ServerProbe, progress: Progress) -> dict:
    """Open and hold N connections (with --rooms, in N rooms), then one message in
    every room from one member of each: open time, RSS per connection, the
    broadcast's latency over every member, the server's loop lag all along."""
    cfg = hub.cfg
    rss0 = server.rss_kib()
    watch = LoopWatch(hub)
    watch.start()
    hub.conn_class = IdleConn
    try:
        conn_info = await open_connections(hub, cfg.connections, 0, progress)
        watch.phase = "hold"
        res = await _idle_hold(hub, server, progress, rss0)
        watch.phase = "broadcast"
        res.update(await _idle_broadcast(hub, progress))
    finally:
        await watch.stop()
    res.update(watch.report())
    progress.done()
    return {**conn_info, **res}


async def _idle_hold(hub: Hub, server: ServerProbe, progress: Progress, rss0: int | None) -> dict:
    cfg = hub.cfg
    ka = start_keepalive(hub)
    conns = cast_idle(hub.conns)
    # wait until every connection is welcomed and the server has stopped
    # talking (join notifications), bounded by --settle
    t_end = time.perf_counter() + cfg.settle
    last = -1
    quiet = 0
    while time.perf_counter() < t_end and quiet < 2:
        await asyncio.sleep(0.5)
        rx = sum(c.rx for c in conns)
        welcomed = sum(1 for c in conns if c.welcomed)
        quiet = quiet + 1 if rx == last and welcomed == len(conns) else 0
        last = rx
        progress.show(f"settling  conns={len(conns)}  welcomed={welcomed}  rx={rx} bytes")
    samples = []
    end = time.perf_counter() + cfg.duration
    while True:
        r = server.rss_kib()
        if r is not None:
            samples.append(r)
        left = end - time.perf_counter()
        open_n = sum(1 for c in conns if c.transport is not None)
        progress.show(f"holding {max(0.0, left):5.1f}s left  conns={open_n}  server RSS={r} KiB")
        if left <= 0:
            break
        await asyncio.sleep(min(1.0, left))
    open_n = sum(1 for c in conns if c.transport is not None)
    res: dict = {
        "rooms": cfg.rooms,
        "connections_welcomed": sum(1 for c in conns if c.welcomed),
        "connections_held": open_n,
        "closed_early": hub.closed_early,
    }
    if rss0 is not None and samples:
        rss1 = statistics.median(samples)
        res["server_rss_before_kib"] = rss0
        res["server_rss_after_kib"] = rss1
        if open_n:
            res["rss_per_connection_kib"] = round((rss1 - rss0) / open_n, 2)
    if ka:
        ka.cancel()
    return res


def cast_idle(conns: list[Conn]) -> list[IdleConn]:
    return [c for c in conns if isinstance(c, IdleConn)]


async def _idle_broadcast(hub: Hub, progress: Progress) -> dict:
    """One message in every room, from its first open member; every other open
    member should receive it (a message skips its sender, on wshub and on the
    raw relays alike)."""
    cfg = hub.cfg
    rooms = max(1, cfg.rooms)
    senders: dict[int, Conn] = {}
    expected = 0
    for c in hub.conns:
        if c.transport is None:
            continue
        r = c.idx % rooms
        if r in senders:
            expected += 1
        else:
            senders[r] = c
    if not expected:
        return {"broadcast_rooms": len(senders), "broadcast_expected": 0}
    enc = Encoder(cfg.protocol, cfg.size)
    counts = hub.counts
    base = sum(counts)
    hub.measuring = True
    t0 = time.perf_counter()
    for r, c in senders.items():
        c.write(enc.frame(c.idx, r))
    deadline = t0 + max(cfg.settle, 5.0)
    got = 0
    while time.perf_counter() < deadline:
        got = sum(counts) - base
        if got >= expected:
            break
        progress.show(f"broadcast  received={got}/{expected}")
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    # a grace period: what arrives now is more than the rooms should deliver
    # (rooms that leak into each other); and wshub's lag probe, which fires once
    # a second, reports the second that spanned the burst
    await asyncio.sleep(2.0)
    got = sum(counts) - base
    hub.measuring = False
    s = sorted(hub.latencies())
    ms = lambda v: round(v / 1e6, 3)  # noqa: E731
    out = {
        "broadcast_rooms": len(senders),
        "broadcast_expected": expected,
        "broadcast_received": got,
        "broadcast_missing": max(0, expected - got),
        "broadcast_extra": max(0, got - expected),
        "broadcast_s": round(elapsed, 3),
    }
    if s:
        out.update(
            {
                "broadcast_ms_p50": ms(pct(s, 50)),
                "broadcast_ms_p99": ms(pct(s, 99)),
                "broadcast_ms_max": ms(s[-1]),
            }
        )
    return out


async def scenario_sink(hub: Hub, server: ServerProbe, progress: Progress) -> dict:
    """Only count: for servers that send on their own (the ceiling server)."""
    cfg = hub.cfg
    conn_info = await open_connections(
        hub, cfg.connections, probe_spacing(cfg.connections, cfg.probes), progress
    )
    win = Window(hub, server)
    await tick_loop(hub, cfg.warmup, progress)
    win.start()
    await tick_loop(hub, cfg.duration, progress)
    res = win.stop()
    res.update(hub.latency_report())
    progress.done()
    return {**conn_info, **res}


SCENARIOS = {
    "fanout": scenario_fanout,
    "rate": scenario_rate,
    "chat": scenario_chat,
    "idle": scenario_idle,
    "sink": scenario_sink,
}


FD_RESERVE = 64
"""Descriptors the generator keeps for itself (stdio, the event loop, probes)."""


def raise_file_limit(wanted: int) -> dict:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit: the benchmark opens
    its own connections, the user should not have to ``ulimit -n`` first. Says
    when even the hard limit is too low for ``wanted`` sockets (raising the hard
    limit needs CAP_SYS_RESOURCE, which a container often lacks)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    out: dict = {"nofile_soft": soft, "nofile_hard": hard}
    if hard != resource.RLIM_INFINITY and hard < wanted + FD_RESERVE:
        out["nofile_too_low"] = (
            f"the hard open-files limit ({hard}) is below {wanted} connections + "
            f"{FD_RESERVE}: fewer than {hard} can open; raise it "
            "(ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) as root"
        )
    return out


async def run(cfg: Config) -> dict:
    limits = raise_file_limit(cfg.connections)
    hub = Hub(cfg)
    if "nofile_too_low" in limits:
        hub.errors.append(limits["nofile_too_low"])
    server = ServerProbe(cfg.server_pid)
    interactive = cfg.progress or sys.stderr.isatty()
    progress = Progress(interactive, cfg.scenario)
    t0 = time.perf_counter()
    try:
        res = await SCENARIOS[cfg.scenario](hub, server, progress)
    finally:
        progress.done()
        await close_all(hub)
    out = {
        "scenario": cfg.scenario,
        "protocol": cfg.protocol,
        "url": cfg.url,
        **({"urls": cfg.urls, "placement": cfg.placement} if len(cfg.urls) > 1 else {}),
        "size": cfg.size,
        **res,
        **limits,
        "closed_early": hub.closed_early,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if hub.errors:
        out["errors"] = hub.errors
    return out
