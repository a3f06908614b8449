"""The soak: mixed traffic with joins and leaves against a real ``wshub serve``.

``scripts/soak --minutes 10`` runs it (``tests/test_soak.py`` runs it for one
minute in CI). It starts a server, keeps ``--clients`` connections busy (each
session lives a random 5-40 s, sends ``message``/``broadcast`` frames with a
ping after each, now and then ``user_info``, an invalid frame or a binary one,
then closes cleanly or drops its socket), and replaces every session that
ends, so joins and leaves go on the whole time. One observer stays connected
throughout.

At the end every message is accounted for. For a message M sent by S (sent at
t_send, and known routed at t_conf, when the pong to the ping after it came
back), a session C:

* must receive M exactly once if C had its ``welcome`` before t_send and began
  closing after t_conf (and C is not S for a ``message``);
* must not receive it if C's life ended before t_send or began after t_conf;
* may receive it once otherwise (it joined or left while M was in flight).

It also checks per-sender order, the observer's view of joins and leaves
(each exactly once, in order), every ``error`` code against what was sent,
the server's own counters (INCOMING = every data frame sent) and its memory
(VmRSS at start, after warm-up, in the middle and at the end).

Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from array import array
from dataclasses import dataclass, field

from tests.loadtools import AsyncWs, raise_nofile, rss_kib, run_async, ws_connect


@dataclass
class Sent:
    sender: int  # session index
    kind: str
    t_send: float
    t_conf: float = 0.0


@dataclass
class Session:
    index: int
    t_connect: float
    t_welcome: float = 0.0
    t_close_start: float = float("inf")
    t_closed: float = float("inf")
    conn_id: str = ""
    received: array = field(default_factory=lambda: array("I"))  # message serials
    last_seq_from: dict[int, int] = field(default_factory=dict)
    order_errors: int = 0
    clean: bool = True


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sent: list[Sent] = []
        self.sessions: list[Session] = []
        self.errors: list[str] = []
        self.expected_errors: dict[str, int] = {}
        self.got_errors: dict[str, int] = {}
        self.data_frames = 0
        self.refused_connects = 0
        self.rss: list[tuple[float, int]] = []
        self.observer_joined: dict[str, int] = {}
        self.observer_left: dict[str, int] = {}
        self.stop_at = 0.0
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    # -- the server ---------------------------------------------------------------

    def start_server(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "wshub",
            "serve",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--ip-connect-rate",
            "0",
            "--max-connections-per-ip",
            "0",
            "--heartbeat-interval",
            str(self.args.heartbeat),
            *self.args.server_arg,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (\S+):(\d+)", line)
        if not match:
            raise SystemExit(f"server did not start: {line!r}")
        self.port = int(match.group(2))

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())

    # -- one session ------------------------------------------------------------------

    def on_text(
        self,
        session: Session,
        ws: AsyncWs,
        payload: bytes,
        pending: list[int],
        pong_waiters: list[asyncio.Future[None]],
    ) -> None:
        message = json.loads(payload)
        kind = message["type"]
        if kind in ("message", "broadcast"):
            content = message["content"]
            if not content.startswith("soak "):
                self.errors.append(f"unexpected content {content[:40]!r}")
                return
            _, serial, sender, seq = content.split(" ", 4)[:4]
            serial_i, sender_i, seq_i = int(serial), int(sender), int(seq)
            session.received.append(serial_i)
            last = session.last_seq_from.get(sender_i, -1)
            if seq_i <= last:
                session.order_errors += 1
            session.last_seq_from[sender_i] = seq_i
            if kind == "message" and sender_i == session.index:
                self.errors.append("a message came back to its sender")
        elif kind == "pong":
            now = time.monotonic()
            while pending:
                serial = pending.pop(0)
                if serial < 0:  # the ping itself
                    break
                self.sent[serial].t_conf = now
            if pong_waiters:
                pong_waiters.pop(0).set_result(None)
        elif kind == "error":
            code = message.get("code", "?")
            self.got_errors[code] = self.got_errors.get(code, 0) + 1
            if pending and pending[0] == -2:  # the expected error precedes its ping
                pending.pop(0)
        elif kind == "user_joined" and session.index == 0:
            self.observer_joined[message["connectionId"]] = (
                self.observer_joined.get(message["connectionId"], 0) + 1
            )
        elif kind == "user_left" and session.index == 0:
            cid = message["connectionId"]
            self.observer_left[cid] = self.observer_left.get(cid, 0) + 1
            if cid not in self.observer_joined:
                self.errors.append(f"observer: user_left before user_joined for {cid}")
        elif kind in ("ping", "user_joined", "user_left", "user_info_response"):
            pass
        else:
            self.errors.append(f"unexpected message type {kind}")

    async def session(self, index: int, lifetime: float) -> None:
        args = self.args
        session = Session(index, time.monotonic())
        self.sessions.append(session)
        pending: list[int] = []  # serials sent since the last ping; -1 marks a ping
        pong_waiters: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        try:
            ws = await ws_connect(
                "127.0.0.1",
                self.port,
                timeout=10,
                on_text=lambda w, p: self.on_text(session, w, p, pending, pong_waiters),
            )
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"connect failed: {exc!r}")
            session.t_close_start = session.t_closed = time.monotonic()
            self.refused_connects += 1
            return
        session.t_welcome = time.monotonic()
        session.conn_id = ws.welcome["connectionId"]  # type: ignore[index]
        end = min(session.t_connect + lifetime, self.stop_at) if index else float("inf")
        seq = 0
        try:
            while (
                time.monotonic() < end
                and not ws.closed.done()
                and not (index == 0 and self.observer_stop.is_set())
            ):
                await asyncio.sleep(
                    min(
                        self.rng.expovariate(args.rate),
                        end - time.monotonic() + 0.001,
                        0.5 if index == 0 else 3600,
                    )
                )
                if (
                    time.monotonic() >= end
                    or ws.closed.done()
                    or (index == 0 and self.observer_stop.is_set())
                ):
                    break
                roll = self.rng.random()
                if roll < 0.9:
                    kind = "broadcast" if self.rng.random() < 0.25 else "message"
                    serial = len(self.sent)
                    self.sent.append(Sent(index, kind, time.monotonic()))
                    body = "x" * self.rng.randint(0, 200)
                    ws.send_json({"type": kind, "content": f"soak {serial} {index} {seq} {body}"})
                    pending.append(serial)
                    seq += 1
                elif roll < 0.95:
                    ws.send_json({"type": "user_info"})
                elif roll < 0.98:
                    code = self.rng.choice(["unknown_type", "empty_content", "invalid_content"])
                    frame = {
                        "unknown_type": {"type": "nope"},
                        "empty_content": {"type": "message", "content": "  "},
                        "invalid_content": {"type": "broadcast", "content": 5},
                    }[code]
                    self.expected_errors[code] = self.expected_errors.get(code, 0) + 1
                    ws.send_json(frame)
                else:
                    self.expected_errors["binary_not_supported"] = (
                        self.expected_errors.get("binary_not_supported", 0) + 1
                    )
                    ws._write(b"\x82\x80\x00\x00\x00\x00")  # an empty binary frame
                ws.send_json({"type": "ping"})
                self.data_frames += 2
                pending.append(-1)
                waiter: asyncio.Future[None] = loop.create_future()
                pong_waiters.append(waiter)
            # Wait for every pong before leaving: all our messages are routed.
            if pong_waiters:
                await asyncio.wait_for(asyncio.gather(*pong_waiters), 10)
        except TimeoutError:
            self.errors.append(f"session {index}: pong not received within 10 s")
        session.t_close_start = time.monotonic()
        if ws.closed.done():
            self.errors.append(f"session {index}: closed by the server with {ws.closed.result()}")
        elif index and self.rng.random() < args.drop_ratio:
            # Drop the socket, but first one last ping: whatever was routed
            # to us before the server read it is ahead of its pong, so the
            # must-receive window ends when the ping was sent, not at the drop.
            session.clean = False
            session.t_close_start = time.monotonic()
            waiter = loop.create_future()
            pong_waiters.append(waiter)
            pending.append(-1)
            ws.send_json({"type": "ping"})
            self.data_frames += 1
            try:
                await asyncio.wait_for(waiter, 10)
            except TimeoutError:
                self.errors.append(f"session {index}: last pong not received within 10 s")
            ws.abort()
        else:
            code = await ws.close(1000, timeout=10)
            if code != 1000:
                self.errors.append(f"session {index}: close answered {code}")
        session.t_closed = time.monotonic()

    async def slot(self, index: int) -> None:
        """Keep one client slot busy until the end: sessions one after another."""
        first = True
        while time.monotonic() < self.stop_at - 1:
            lifetime = self.rng.uniform(self.args.min_life, self.args.max_life)
            if first:  # spread the first generation's ends
                lifetime *= self.rng.random()
                first = False
            await self.session(index * 100_000 + len(self.sessions), lifetime)

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> dict:
        args = self.args
        pid = self.proc.pid  # type: ignore[union-attr]
        start = time.monotonic()
        self.stop_at = start + args.minutes * 60
        self.observer_stop = asyncio.Event()
        before = self.stats()["messages"]
        observer = asyncio.create_task(self.session(0, args.minutes * 60))
        await asyncio.sleep(0.2)
        slots = []
        for i in range(args.clients):
            slots.append(asyncio.create_task(self.slot(i + 1)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        while time.monotonic() < self.stop_at:
            self.rss.append((time.monotonic() - start, rss_kib(pid)))
            await asyncio.sleep(min(1.0, max(0.0, self.stop_at - time.monotonic())))
        self.rss.append((time.monotonic() - start, rss_kib(pid)))
        await asyncio.wait_for(asyncio.gather(*slots), 60)
        # Let the observer hear the last leaves.
        ids = {s.conn_id for s in self.sessions if s.index and s.conn_id}
        deadline = time.monotonic() + 15
        while set(self.observer_left) < ids and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        stats_open = await loop.run_in_executor(None, self.stats)
        self.observer_stop.set()
        await asyncio.wait_for(observer, 30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats_end = await loop.run_in_executor(None, self.stats)
            if stats_end["connections"]["node"] == 0 and stats_end["connections"]["closing"] == 0:
                break
            await asyncio.sleep(0.05)
        return self.account(before, stats_open, stats_end, ids, time.monotonic() - start)

    def account(
        self, before: dict, stats_open: dict, stats_end: dict, ids: set[str], elapsed: float
    ) -> dict:
        sessions = sorted(self.sessions, key=lambda s: s.t_connect)
        by_index = {s.index: s for s in sessions}
        received: dict[int, dict[int, int]] = {}
        for s in sessions:
            counts: dict[int, int] = {}
            for serial in s.received:
                counts[serial] = counts.get(serial, 0) + 1
            received[s.index] = counts
        # Linear in deliveries: each session is checked against the messages
        # sent during its life (serials grow with t_send), and each serial it
        # received against the rule that says whether it could have.
        from bisect import bisect_left, bisect_right

        must = delivered = maybe = missing = dup = unexpected = 0
        unconfirmed = sum(1 for m in self.sent if not m.t_conf)
        send_times = [m.t_send for m in self.sent]
        for s in sessions:
            counts = received[s.index]
            dup += sum(1 for n in counts.values() if n > 1)
            if s.t_welcome:
                lo = bisect_right(send_times, s.t_welcome)
                hi = bisect_left(send_times, s.t_close_start)
                for serial in range(lo, hi):
                    m = self.sent[serial]
                    if not m.t_conf or m.t_conf >= s.t_close_start:
                        continue
                    if m.kind == "message" and m.sender == s.index:
                        continue
                    must += 1
                    n = counts.get(serial, 0)
                    if n == 1:
                        delivered += 1
                    elif n == 0:
                        missing += 1
                        if missing <= 5:
                            self.errors.append(
                                f"missing: message {serial} ({m.kind} from session {m.sender}, "
                                f"sent {m.t_send:.3f}, routed by {m.t_conf:.3f}) never reached "
                                f"session {s.index} (welcome {s.t_welcome:.3f}, closing "
                                f"{s.t_close_start:.3f}, {'clean' if s.clean else 'dropped'}, "
                                f"received {len(s.received)})"
                            )
            for serial in counts:
                m = self.sent[serial]
                own = m.kind == "message" and m.sender == s.index
                if own or s.t_closed < m.t_send or (m.t_conf and s.t_connect > m.t_conf):
                    unexpected += 1
                elif not (
                    s.t_welcome
                    and s.t_welcome < m.t_send
                    and m.t_conf
                    and s.t_close_start > m.t_conf
                ):
                    maybe += 1
        order_errors = sum(s.order_errors for s in sessions)
        joined_twice = sum(1 for v in self.observer_joined.values() if v != 1)
        left_twice = sum(1 for v in self.observer_left.values() if v != 1)
        not_joined = len(ids - set(self.observer_joined))
        not_left = len(ids - set(self.observer_left))
        incoming = stats_end["messages"]["INCOMING"] - before["INCOMING"]
        failed = stats_end["messages"]["FAILED"] - before["FAILED"]
        errors = list(self.errors)
        if self.got_errors != self.expected_errors:
            errors.append(f"error replies {self.got_errors} != expected {self.expected_errors}")
        if incoming != self.data_frames:
            errors.append(
                f"server counted {incoming} data messages, clients sent {self.data_frames}"
            )
        if failed != sum(self.expected_errors.values()):
            errors.append(
                f"server counted {failed} FAILED, expected {sum(self.expected_errors.values())}"
            )
        if stats_open["connections"]["node"] != 1:
            errors.append(
                f"{stats_open['connections']['node']} connections open with only the observer left"
            )
        if stats_end["connections"]["node"] != 0 or stats_end["connections"]["closing"] != 0:
            errors.append(f"connections at the end: {stats_end['connections']}")
        assert self.proc is not None
        warm = [r for t, r in self.rss if t >= self.args.warmup]
        rss = {
            "start_kib": self.rss[0][1],
            "warm_kib": warm[0] if warm else self.rss[-1][1],
            "middle_kib": self.rss[len(self.rss) // 2][1],
            "end_kib": self.rss[-1][1],
            "max_kib": max(r for _, r in self.rss),
        }
        return {
            "seconds": round(elapsed, 1),
            "clients": self.args.clients,
            "sessions": len(sessions),
            "clean_closes": sum(1 for s in sessions if s.clean and s.index),
            "dropped_sockets": sum(1 for s in sessions if not s.clean),
            "messages_sent": len(self.sent),
            "broadcasts_sent": sum(1 for m in self.sent if m.kind == "broadcast"),
            "data_frames_sent": self.data_frames,
            "server_incoming": incoming,
            "deliveries_required": must,
            "deliveries_received": delivered,
            "deliveries_in_join_leave_window": maybe,
            "missing": missing,
            "duplicates": dup,
            "unexpected": unexpected,
            "unconfirmed": unconfirmed,
            "out_of_order": order_errors,
            "observer": {
                "joined": len(self.observer_joined),
                "left": len(self.observer_left),
                "not_joined": not_joined,
                "not_left": not_left,
                "announced_twice": joined_twice + left_twice,
            },
            "expected_error_replies": self.expected_errors,
            "error_replies": self.got_errors,
            "rss": rss,
            "errors": errors[:20],
            "error_count": len(errors),
            "by_index_size": len(by_index),
        }


def summary_text(r: dict) -> str:
    rss = r["rss"]
    lines = [
        f"soak: {r['seconds']} s, {r['clients']} client slots, {r['sessions']} sessions "
        f"({r['clean_closes']} clean closes, {r['dropped_sockets']} dropped sockets)",
        f"messages sent: {r['messages_sent']} ({r['broadcasts_sent']} broadcasts); data frames "
        f"sent {r['data_frames_sent']}, counted by the server {r['server_incoming']}",
        f"deliveries: {r['deliveries_received']} of {r['deliveries_required']} required "
        f"received exactly once; {r['deliveries_in_join_leave_window']} more to sessions "
        f"joining or leaving meanwhile",
        f"accounted for: missing {r['missing']}, duplicates {r['duplicates']}, unexpected "
        f"{r['unexpected']}, unconfirmed {r['unconfirmed']}, out of order {r['out_of_order']}",
        f"observer: {r['observer']['joined']} joined, {r['observer']['left']} left, "
        f"{r['observer']['not_joined']} joins and {r['observer']['not_left']} leaves missed, "
        f"{r['observer']['announced_twice']} announced twice",
        f"error replies: {r['error_replies']} (expected {r['expected_error_replies']})",
        f"server RSS: start {rss['start_kib'] / 1024:.1f} MiB, after warm-up "
        f"{rss['warm_kib'] / 1024:.1f}, middle {rss['middle_kib'] / 1024:.1f}, end "
        f"{rss['end_kib'] / 1024:.1f}, max {rss['max_kib'] / 1024:.1f}",
        f"errors: {r['error_count']}" + "".join(f"\n  {e}" for e in r["errors"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=300, help="client slots (default 300)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.5,
        help="frames per second per client, on average (default 0.5)",
    )
    parser.add_argument("--min-life", type=float, default=5.0)
    parser.add_argument("--max-life", type=float, default=40.0)
    parser.add_argument(
        "--drop-ratio",
        type=float,
        default=0.1,
        help="share of sessions that drop their socket instead of closing",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=5.0,
        help="server --heartbeat-interval (default 5 s, so Pings are in the mix)",
    )
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="seconds before the memory baseline is taken"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for wshub serve (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    raise_nofile(4 * args.clients + 256)
    soak = Soak(args)
    soak.start_server()
    try:
        result = run_async(soak.run())
    finally:
        assert soak.proc is not None
        soak.proc.terminate()
        try:
            _, stderr = soak.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            soak.proc.kill()
            _, stderr = soak.proc.communicate()
    tracebacks = stderr.count("Traceback")
    result["server_tracebacks"] = tracebacks
    result["server_exit"] = soak.proc.returncode
    result["seed"] = args.seed
    if tracebacks:
        result["errors"].append(f"server logged {tracebacks} tracebacks")
        result["error_count"] += 1
    if args.json:
        print(json.dumps(result))
    else:
        print(summary_text(result))
        print(f"seed {args.seed}; server exit status {soak.proc.returncode}")
    bad = (
        result["error_count"]
        or result["missing"]
        or result["duplicates"]
        or result["unexpected"]
        or result["unconfirmed"]
        or result["out_of_order"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
