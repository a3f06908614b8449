#!/usr/bin/env python3
"""Where wshub's CPU goes per delivery in the fan-out, read by the reading client.

    .venv/bin/python bench/profile_fanout.py            # ~1.5 minutes; bench/results/profile-reader.json

wshub (``bench/run.py``'s flags) on core 0, ``wshub bench fanout --engine native
--reader full`` (1000 connections, one sender, 32 in flight, 100-byte content) on
core 1. After the connections opened and the warm-up, three windows one after
the other, each with its own deliveries from ``/metrics``:

1. **counters**, nothing attached: server CPU per delivery (user and system from
   ``/proc/PID/stat``), socket writes and direct sends per delivery, passes, the
   frame's size (the reader's bytes per message);
2. **perf** (``perf record -e cpu-clock -g``; software clock: this VM has no PMU),
   which sees the kernel: its samples by symbol, grouped (sending, copying bytes,
   receiving, epoll, the interpreter, ...);
3. **py-spy** (``--native``), which sees Python: samples grouped by what they were
   doing (the per-recipient loop of ``Fanout.flush``, the C send path, envelope
   building, frames in, ...).

Shares of samples times the CPU per delivery of window 1 give µs per delivery per
part. The profilers slow the server down (py-spy pauses it for each sample), so
only window 1's figures are throughput; the windows' shares are of CPU time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run as bench_run  # noqa: E402  (bench/run.py: server command, /metrics, CPU)
import shared  # noqa: E402

PY = sys.executable
OUT = ROOT / "bench" / "results" / "profile-reader.json"
PROFILES = ROOT / "docs" / "profiles"

# perf: the kernel's and the libraries' symbols, by what they do
PERF_GROUPS = [
    ("copying bytes (user to kernel, kernel to user)", r"copy_user|copy_from_iter|copy_to_iter|"
     r"rep_movs|memcpy|memmove|skb_copy|csum_partial_copy|copyin|copyout"),
    ("TCP send path (tcp_sendmsg, segments, loopback xmit)", r"tcp_sendmsg|tcp_write_xmit|"
     r"tcp_push|__tcp_transmit|ip_|dev_hard_start|loopback_xmit|__dev_queue|skb_|tcp_skb|"
     r"sk_stream|tcp_stream|__alloc_skb|kmalloc|kmem_cache|__kfree|kfree|page_frag"),
    ("TCP receive path (loopback delivery, ACKs)", r"tcp_v4_rcv|tcp_rcv|tcp_ack|tcp_data|"
     r"__netif|netif_|process_backlog|net_rx|tcp_recvmsg|tcp_clean|tcp_event|sock_def_readable|"
     r"__wake_up|try_to_wake|ttwu|sk_filter|tcp_queue"),
    ("syscall entry and exit, fd lookup", r"entry_SYSCALL|do_syscall|syscall_exit|__fget|fdget|"
     r"__sys_|sock_sendmsg|sock_recvmsg|__x64_sys|security_socket|__fdget|apparmor|"
     r"exit_to_user|syscall_return"),
    ("epoll", r"epoll|ep_poll|ep_send|ep_item"),
    ("the interpreter (libpython)", r"_PyEval|PyObject|_Py|PyList|PyTuple|PyLong|PyUnicode|"
     r"PyBytes|Py[A-Z]|list_|tuple_|dict_|unicode_|bytes_|long_|gc_|method_vectorcall|cfunction"),
    ("uvloop and libuv", r"uvloop|__pyx|uv_|uv__"),
    ("wshub's C send path (_directsend, apart from send)", r"send_each|directsend"),
    ("scheduler, interrupts, timers", r"schedule|finish_task|irq|hrtimer|tick_|rcu|"
     r"asm_sysvec|native_|__softirq|do_softirq|idle"),
]

# py-spy: (group, test on the stack's frames, leaf first)
FLUSH_LOOP = (0, 0)  # line range of the per-recipient loop in Fanout.flush, read from the source


def fanout_loop_lines() -> tuple[int, int]:
    src = (ROOT / "src" / "wshub" / "fanout.py").read_text().splitlines()
    start = next(i for i, line in enumerate(src, 1) if "for conn in recipients:" in line)
    end = next(
        i for i, line in enumerate(src, 1) if i > start and line.strip() == "if direct:"
    )
    return start, end - 1


def spy_group(frames: list[str], loop: tuple[int, int]) -> str:
    """What one py-spy sample was doing (frames leaf first)."""
    text = ";".join(frames)
    if re.search(r"\b(__)?send(to|msg)? \(libc", text) and "send_each" in text:
        return "send() from the C send path (the kernel's share is perf's)"
    if "send_each" in text:
        return "the C send path apart from send() (checks, the list walk)"
    if re.search(r"\b(write|writev|send|sendmsg) \(libc", text):
        return "write()/send() through uvloop's transport"
    if re.search(r"\b(recv|read|recvmsg) \(libc", text):
        return "reading the sockets (recv/read)"
    if "epoll" in text:
        return "epoll_wait"
    for f in frames:
        m = re.match(r"(\S+) \((.+?\.py):(\d+)\)", f)
        if not m:
            continue
        func, path, line = m.group(1), m.group(2), int(m.group(3))
        if path.endswith("wshub/fanout.py") and func.endswith("flush"):
            if loop[0] <= line <= loop[1]:
                return "Python per recipient (the loop over the recipients in Fanout.flush)"
            return "Fanout.flush apart from the loop (joining the frames, counting)"
        if func.endswith(("encode_relay", "iso_timestamp", "text_frame", "frame", "_payload")) or (
            path.endswith(("wshub/wire.py",))
        ):
            return "envelope building (encode_relay, the timestamp, the frame header)"
        if path.endswith(("framescan.py", "protocol.py")) or func.endswith(
            ("_receive_data_frame", "_receive_frames", "data_received", "on_text")
        ):
            return "frames in: scan, unmask, parse, validate, route"
        if path.endswith("fanout.py"):
            return "other fan-out Python (queueing)"
        if "/wshub/" in path:
            return f"other wshub Python ({func})"
    return "other (interpreter, uvloop, GC, idle)"


def collapsed_groups(path: Path, loop: tuple[int, int]) -> tuple[int, collections.Counter]:
    groups: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        frames.reverse()  # leaf first
        groups[spy_group(frames, loop)] += int(cnt)
        total += int(cnt)
    return total, groups


def perf_groups(data: Path) -> tuple[float, dict, list]:
    """Self-time shares from perf by group, and the top symbols."""
    rep = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio",
         "--percent-limit", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    rows = []
    for line in rep.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+)", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
    groups: dict[str, float] = collections.defaultdict(float)
    kernel = 0.0
    for share, dso, kind, sym in rows:
        if kind == "k":
            kernel += share
        for name, pattern in PERF_GROUPS:
            if re.search(pattern, sym) or re.search(pattern, dso):
                groups[name] += share
                break
        else:
            groups["other" + (" (kernel)" if kind == "k" else f" ({dso})")] += share
    top = sorted(rows, reverse=True)[:25]
    return kernel, dict(groups), top


def counters(port: int, pid: int, seconds: float) -> dict:
    m0, us0, t0 = bench_run.wshub_metrics(port), bench_run.cpu_split(pid), time.monotonic()
    time.sleep(seconds)
    m1, us1, t1 = bench_run.wshub_metrics(port), bench_run.cpu_split(pid), time.monotonic()
    d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
    deliveries = d.get("wshub_deliveries_total", 0)
    user, system = us1[0] - us0[0], us1[1] - us0[1]
    out = {
        "seconds": round(t1 - t0, 2),
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / (t1 - t0)),
        "server_cpu": round((user + system) / (t1 - t0), 3),
        "server_user_s": round(user, 2),
        "server_system_s": round(system, 2),
    }
    if deliveries:
        out["server_cpu_us_per_delivery"] = round((user + system) / deliveries * 1e6, 4)
        out["user_us_per_delivery"] = round(user / deliveries * 1e6, 4)
        out["system_us_per_delivery"] = round(system / deliveries * 1e6, 4)
        for k in ("wshub_socket_writes_total", "wshub_direct_sends_total"):
            if k in d:
                out[k.replace("wshub_", "").replace("_total", "") + "_per_delivery"] = round(
                    d[k] / deliveries, 4
                )
        messages = d.get("wshub_fanout_recipients_count", 0)
        writes = d.get("wshub_socket_writes_total", 0)
        if messages and writes:
            out["messages"] = messages
            out["frames_per_write"] = round(deliveries / writes, 2)
            out["recipients_per_message"] = round(deliveries / messages, 1)
            # a pass writes once to every recipient: passes = writes / recipients
            out["messages_per_pass"] = round(messages / (writes / (deliveries / messages)), 2)
    return out


def micro_costs(recipients: int = 999) -> dict:
    """The Python parts of a pass, timed alone (best of 200): the loop that collects
    the recipients for the C send path, and building one message's envelope."""
    import timeit

    sys.path.insert(0, str(ROOT / "src"))
    from wshub.protocol import RelayKind, encode_relay
    from wshub.wire import text_frame

    class Conn:  # the attributes Fanout.flush reads, slotted like Connection
        __slots__ = ("marked", "deflate", "direct_fd", "transport")

        def __init__(self, i: int) -> None:
            self.marked, self.deflate, self.transport = False, None, None
            self.direct_fd = i

    conns = [Conn(i) for i in range(recipients)]

    def collect() -> None:
        direct = []
        for conn in conns:
            if conn.marked:
                continue
            elif conn.deflate is None:
                if conn.direct_fd >= 0:
                    direct.append(conn)
                    continue

    content = "~#1764620000000000000 s1 c0 " + "x" * 72
    sender = "ws-1764620000000-abcdefghi"

    def envelope() -> None:
        text_frame(encode_relay(RelayKind.MESSAGE, sender, content, 1764620000.123))

    frames = [text_frame(encode_relay(RelayKind.MESSAGE, sender, content, 1.0))] * 32

    def join() -> None:
        b"".join(frames)

    best = lambda f, n: min(timeit.repeat(f, number=n, repeat=200)) / n  # noqa: E731
    loop_s = best(collect, 10)
    env_s = best(envelope, 100)
    join_s = best(join, 100)
    return {
        "recipients": recipients,
        "collect_loop_us_per_pass": round(loop_s * 1e6, 2),
        "collect_loop_ns_per_recipient": round(loop_s / recipients * 1e9, 1),
        "envelope_us_per_message": round(env_s * 1e6, 2),
        "join_32_frames_us_per_pass": round(join_s * 1e6, 2),
        "frame_bytes": len(frames[0]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="each window (8)")
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--client-core", default="1")
    ap.add_argument("--out", default=None, help="(bench/results/profile-reader[-rooms].json)")
    ap.add_argument("--rooms", type=int, default=0,
                    help="the rooms scenario: the 1000 connections in N rooms, one sender in each (0: fan-out)")
    ap.add_argument("--history-size", type=int, default=None, help="wshub's --history-size (its default)")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro timings")
    a = ap.parse_args()
    suffix = f"-rooms{a.rooms}" if a.rooms else ""
    if a.history_size is not None:
        suffix += f"-history{a.history_size}"
    if a.out is None:
        a.out = str(OUT.with_name(f"profile-reader{suffix}.json"))
    spy = str(Path(PY).with_name("py-spy"))
    loop = fanout_loop_lines()
    port = bench_run.free_port()
    rec: dict = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_before": bench_run.loadavg(),
                 "pressure_before": bench_run.pressure(), "flush_loop_lines": loop,
                 "commit": shared.output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])}
    PROFILES.mkdir(parents=True, exist_ok=True)
    scenario = f"rooms{a.rooms}" if a.rooms else "fanout"
    spy_out = PROFILES / f"{scenario}-wshub-reader{suffix.replace(f'-rooms{a.rooms}', '')}.collapsed.txt"
    cmd = bench_run.wshub_cmd(port)
    if a.history_size is not None:
        cmd += ["--history-size", str(a.history_size)]
    rec["scenario"] = scenario
    rec["server_cmd"] = cmd
    perf_data = Path("/tmp/wshub-profile-perf.data")
    with bench_run.Server(cmd, port, a.server_core, "profile-reader") as srv:
        total = 3 * a.seconds + 20
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        gen = subprocess.Popen(
            ["taskset", "-c", a.client_core, PY, "-m", "wshub.bench", "fanout", "--engine", "native",
             "--reader", "full", "--content-size", "100", "-n", "1000", "--inflight", "32",
             "--warmup", "2", "--duration", str(total), *(["--rooms", str(a.rooms)] if a.rooms else []), "--url", f"ws://127.0.0.1:{port}/websocket",
             "--server-pid", str(srv.pid), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        try:
            end = time.monotonic() + 60
            while time.monotonic() < end and len(os.listdir(f"/proc/{srv.pid}/fd")) < 1000:
                time.sleep(0.25)
            time.sleep(4)  # the drain and the warm-up
            rec["counters"] = counters(port, srv.pid, a.seconds)
            perf = subprocess.run(
                ["taskset", "-c", a.client_core, "perf", "record", "-e", "cpu-clock", "-F", "999",
                 "-g", "-p", str(srv.pid), "-o", str(perf_data), "--", "sleep", str(a.seconds)],
                capture_output=True, text=True, timeout=a.seconds + 60,
            )
            rec["perf_rc"] = perf.returncode
            rec["load_mid"] = bench_run.loadavg()
            sp = subprocess.run(
                ["taskset", "-c", a.client_core, spy, "record", "--pid", str(srv.pid), "--rate", "200",
                 "--duration", str(int(a.seconds)), "--native", "--format", "raw", "--output",
                 str(spy_out)],
                capture_output=True, text=True, timeout=a.seconds + 60,
            )
            rec["py_spy_rc"] = sp.returncode
            out, _ = gen.communicate(timeout=total + 60)
            rec["generator"] = json.loads(out)
        finally:
            if gen.poll() is None:
                gen.kill()
    rec["load_after"] = bench_run.loadavg()
    if perf_data.exists():
        kernel, groups, top = perf_groups(perf_data)
        rec["perf"] = {"kernel_share": round(kernel, 2), "groups": groups, "top": top}
    if spy_out.exists():
        n, groups = collapsed_groups(spy_out, loop)
        rec["py_spy"] = {"samples": n, "groups": dict(groups.most_common()), "file": str(spy_out.relative_to(ROOT))}
    cpd = rec["counters"].get("server_cpu_us_per_delivery")
    if cpd:
        for part in ("perf", "py_spy"):
            if part in rec:
                tot = sum(rec[part]["groups"].values())
                rec[part]["us_per_delivery"] = {
                    k: round(v / tot * cpd, 4) for k, v in rec[part]["groups"].items()
                }
    if not a.no_micro:
        rec["micro"] = micro_costs()
    Path(a.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: rec[k] for k in ("counters", "micro") if k in rec}, indent=1))
    for part in ("perf", "py_spy"):
        if part in rec:
            print(part)
            for k, v in sorted(rec[part].get("us_per_delivery", {}).items(), key=lambda x: -x[1]):
                print(f"  {v:8.4f} µs  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
