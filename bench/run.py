#!/usr/bin/env python3
"""wshub against Node ``ws`` and uWebSockets.js, side by side, in one run.

    .venv/bin/python bench/run.py                 # everything, ~35 minutes; writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick         # 1 short run of each, to try the script (~6 minutes)
    .venv/bin/python bench/run.py --render-only   # rewrite docs/benchmarks.md from bench/results/benchmarks.json

What one run does, every step bounded by a timeout:

1. waits (at most --wait-max s, polling every 30 s) for the 1-minute load average to
   fall below --wait-load, and records the load and /proc/pressure/cpu whatever they are;
2. measures the load generator's own ceiling (bench/ceiling_server.py floods pre-built
   frames, ``wshub bench sink`` counts them);
3. --runs times, the servers in a rotated order: for each server and each scenario
   (fanout, latency, chat, idle, idle-2k) starts a fresh server pinned to core 0
   (``taskset -c 0``), runs ``python -m wshub.bench`` pinned to core 1, stops the server;
   the ceiling, fanout, latency and the cluster runs use ``--engine native`` (the C
   engine, src/wshub/bench/native.c; ``--engine python`` here to go back), chat and
   idle the Python engine (the only one that has them);
4. cluster: a redis-server on a free port, wshub nodes with ``--redis-url``: fan-out
   on one node against two (connections split), and cross-node latency (sender on
   node A, every recipient on node B);
5. profiles with py-spy: wshub in the fan-out scenario ("after") and the minimal
   websockets relay (bench/candidates/websockets_relay.py, one send per recipient:
   the "before" baseline), saved as collapsed stacks under docs/profiles/;
6. writes bench/results/benchmarks.json (every run), docs/benchmarks.md and
   docs/benchmarks-results.png (matplotlib, installed into this venv when missing).

wshub runs as ``wshub serve --ip-connect-rate 0 --max-connections-per-ip 0
--message-rate 0 --max-connections 20000`` (the full protocol: validation, JSON
envelopes, ids, timestamps); the Node relays with ``--protocol raw``.
"""

from __future__ import annotations

import argparse
import collections
import re
import urllib.request
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import shared  # noqa: E402  (bench/shared.py, beside this script)

NODE_DIR = BENCH / "servers"
PY = sys.executable
RESULTS = BENCH / "results" / "benchmarks.json"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks-results.png"


def chart_path(doc: str) -> Path:
    """The chart beside the page: docs/benchmarks-results.png for the page,
    DOC.png for any other --doc (a side run must not replace the page's)."""
    return CHART if Path(doc).resolve() == DOC.resolve() else Path(doc).with_suffix(".png")


PROFILES = ROOT / "docs" / "profiles"
NOTES = BENCH / "benchmarks-notes.md"

WSHUB_FLAGS = [
    "--ip-connect-rate",
    "0",
    "--max-connections-per-ip",
    "0",
    "--message-rate",
    "0",
    "--max-connections",
    "20000",
]


def wshub_cmd(port: int, extra: list[str] = ()) -> list[str]:
    exe = Path(PY).with_name("wshub")
    base = [str(exe)] if exe.exists() else [PY, "-m", "wshub"]
    return [
        *base,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *WSHUB_FLAGS,
        "--log-level",
        "warning",
        *extra,
    ]


SERVERS = {
    # name: (label, protocol, command builder)
    "wshub": ("wshub (full protocol)", "wshub", lambda port: wshub_cmd(port)),
    "node-ws": (
        "Node `ws`",
        "raw",
        lambda port: ["node", str(NODE_DIR / "ws_relay.js"), str(port)],
    ),
    "uws": (
        "uWebSockets.js",
        "raw",
        lambda port: ["node", str(NODE_DIR / "uws_relay.js"), str(port)],
    ),
    # wshub writing every frame through the event loop's transport, as before
    # the compiled direct sends (docs/ws-layer.md): what they buy, same run.
    "wshub-transport": (
        "wshub, `--direct-send off`",
        "wshub",
        lambda port: wshub_cmd(port, ["--direct-send", "off"]),
    ),
    # wshub with history off (decisions.md 13): what keeping every room's
    # history (an offset per frame, a bounded buffer per room) costs, same run.
    "wshub-nohistory": (
        "wshub, `--history-size 0`",
        "wshub",
        lambda port: wshub_cmd(port, ["--history-size", "0"]),
    ),
    # wshub from another source tree ($WSHUB_BASE_SRC, e.g. made with
    # `git archive main src | tar -x -C /tmp/base` and pointing at /tmp/base/src):
    # the "before" of a change, measured in the same run as the "after".
    "wshub-base": (
        "wshub, base tree ($WSHUB_BASE_SRC)",
        "wshub",
        lambda port: base_wshub_cmd(port),
    ),
    # the same base tree with history off: the before of a change to the
    # rooms path measured against wshub-nohistory (docs/rooms-perf.md).
    "wshub-base-nohistory": (
        "wshub, base tree ($WSHUB_BASE_SRC), `--history-size 0`",
        "wshub",
        lambda port: base_wshub_cmd(port, ["--history-size", "0"]),
    ),
}
# A variant is run only through the scenarios where it can differ.
ONLY = {
    "wshub-transport": ("fanout", "latency", "chat"),
    "wshub-nohistory": ("fanout", "latency", "rooms"),
    "wshub-base-nohistory": ("fanout", "latency", "rooms"),
}


def base_wshub_cmd(port: int, extra: list[str] = ()) -> list[str]:
    base = os.environ.get("WSHUB_BASE_SRC")
    if not base or not (Path(base) / "wshub" / "__init__.py").exists():
        raise SystemExit("wshub-base: set WSHUB_BASE_SRC to a tree's src/ (with wshub/ in it)")
    cmd = wshub_cmd(port, extra)
    args = cmd[cmd.index("serve"):]
    return ["env", f"PYTHONPATH={base}", PY, "-m", "wshub", *args]

SCENARIOS = ["fanout", "latency", "chat", "rooms", "idle", "idle-2k"]
SCENARIO_TEXT = {
    "fanout": "fan-out: 1000 connections, one sender, closed loop, 32 in flight",
    "rooms": "rooms: 1000 connections in 100 rooms of 10 (/websocket/r0../websocket/r99), "
    "one sender per room, closed loop, 32 in flight each",
    "latency": "latency: 1000 connections, one sender at 50 msg/s",
    "chat": "chat: 100 connections × 10 msg/s each (99,000 deliveries/s offered)",
    "idle": "idle: 10,000 connections held",
    "idle-2k": "idle: 2,000 connections held",
}

# --reader full: a run whose generator was busy (on its CPU, or runnable and waiting
# for it) this much of the window or more may show the generator's ceiling, not the
# server's; it is flagged wherever it is shown
GENERATOR_BOUND = 0.9


def generator_busy(r: dict) -> float:
    """The share of the measured window the generator was not idle: its CPU time
    plus its time runnable but off its core (``generator_cpu_waiting``, from
    /proc/self/schedstat; absent in results from before it was recorded). On a
    shared machine a generator can want its whole core and get 0.6 of it: that is
    its limit too, and CPU time alone would not show it."""
    return (r.get("generator_cpu") or 0) + (r.get("generator_cpu_waiting") or 0)


def generator_bound(r: dict) -> bool:
    return generator_busy(r) >= GENERATOR_BOUND

_children: list[subprocess.Popen] = []


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pressure() -> dict:
    out = {}
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            kind, *kv = line.split()
            out[kind] = {k: float(v) for k, v in (x.split("=") for x in kv) if k != "total"}
    except OSError:
        pass
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        t = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / t, int(fields[12]) / t
    except (OSError, IndexError, ValueError):
        return None


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc in _children:
        _children.remove(proc)


# The latency scenario's server and generator run under SCHED_FIFO when the
# machine allows it (root or CAP_SYS_NICE): a p99 is set by a few messages' last
# deliveries, and on a shared machine those were the ones that waited for a core
# (the generator runnable but not running for 10-55 % of the window, and every
# latency 3-10 x the quiet one). Both processes use a fraction of their core
# here, so the others on the machine keep the rest (and the kernel's RT
# throttling keeps 5 % for them in any case). docs/latency.md.
REALTIME = ["chrt", "-f", "10"]
REALTIME_SCENARIOS = ("latency",)


def realtime_allowed() -> bool:
    try:
        return subprocess.run([*REALTIME, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def spawn(
    cmd: list[str], core: str, logname: str, realtime: bool = False
) -> subprocess.Popen:
    logf = open(f"/tmp/wshub-bench-{logname}.log", "w")
    proc = subprocess.Popen(
        [*(REALTIME if realtime else []), "taskset", "-c", core, *cmd],
        stdout=logf,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    logf.close()
    _children.append(proc)
    return proc


class Server:
    """One server process pinned to a core, stopped on exit."""

    def __init__(
        self, cmd: list[str], port: int, core: str, name: str, realtime: bool = False
    ) -> None:
        self.cmd, self.port, self.core, self.name = cmd, port, core, name
        self.realtime = realtime

    def __enter__(self) -> "Server":
        self.proc = spawn(self.cmd, self.core, self.name, self.realtime)
        self.pid = self.proc.pid
        try:
            shared.wait_port(self.port, self.proc)
        except RuntimeError:
            stop(self.proc)
            raise
        time.sleep(0.5)  # settle before the RSS baseline
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)


def bench(args: list[str], core: str, timeout: float, realtime: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [
        *(REALTIME if realtime else []),
        "taskset",
        "-c",
        core,
        PY,
        "-m",
        "wshub.bench",
        *args,
        "--json",
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"generator timed out after {timeout:.0f}s"}
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"error": (p.stderr or p.stdout)[-500:], "rc": p.returncode}


def scenario_args(scen: str, a) -> tuple[list[str], float]:
    """Generator arguments (without --url/--protocol/--server-pid) and a timeout."""
    d, w = str(a.duration), str(a.warmup)
    eng = [
        "--engine",
        getattr(a, "engine", "python"),
    ]  # results from before the native engine: python
    full = getattr(a, "reader", "peek") == "full"  # results from before --reader: peek
    if full:  # the reading client: native, every frame read whole, --content-size
        eng += ["--reader", "full", "--content-size", str(getattr(a, "content_size", 100))]
    if scen in ("fanout", "rooms"):
        return [
            "fanout",
            *eng,
            "-n",
            "1000",
            *(["--rooms", "100"] if scen == "rooms" else []),
            "--inflight",
            "32",
            "--warmup",
            w,
            "--duration",
            d,
        ], a.duration + a.warmup + 120
    if scen == "latency":
        return [
            "rate",
            *eng,
            "-n",
            "1000",
            "--rate",
            "50",
            "--warmup",
            w,
            "--duration",
            d,
        ], a.duration + a.warmup + 120
    if scen == "chat":
        return [
            "chat",
            *(eng if full else []),  # the Python engine unless the reading client
            "-n",
            "100",
            "--rate",
            "10",
            "--warmup",
            w,
            "--duration",
            d,
        ], a.duration + a.warmup + 90
    if scen == "idle":
        return (
            [
                "idle",
                "-n",
                str(a.idle_connections),
                "--duration",
                "5",
                "--settle",
                "20",
                "--open-deadline",
                str(a.idle_open_deadline),
            ],
            a.idle_open_deadline + 180,
        )
    if scen == "idle-2k":
        return [
            "idle",
            "-n",
            "2000",
            "--duration",
            "5",
            "--settle",
            "20",
            "--open-deadline",
            str(a.idle_open_deadline),
        ], a.idle_open_deadline + 180
    raise ValueError(scen)


def machine() -> dict:
    return {
        **shared.basics(),
        "wshub": shared.python_package(PY, "wshub"),
        "wshub_commit": shared.output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "uvloop": shared.python_package(PY, "uvloop"),
        "websockets": shared.python_package(PY, "websockets"),
        "redis_py": shared.python_package(PY, "redis"),
        "ws": shared.npm_package("ws"),
        "uwebsockets": shared.npm_package("uwebsockets"),
        "redis_server": shared.output(["redis-server", "--version"]).split(" sha=")[0],
        "py_spy": shared.output([str(Path(PY).with_name("py-spy")), "--version"]),
        "cc": (shared.output(["cc", "--version"]).splitlines() or ["?"])[0],
    }


def wait_for_quiet(limit: float, max_wait: float) -> dict:
    t0 = time.monotonic()
    first = loadavg()
    while True:
        la = loadavg()
        if la[0] < limit:
            break
        if time.monotonic() - t0 >= max_wait:
            log(f"load {la[0]:.2f} still ≥ {limit} after {max_wait:.0f}s: running anyway")
            break
        log(
            f"load average {la[0]:.2f} ≥ {limit}: waiting (at most {max_wait - (time.monotonic() - t0):.0f}s more)"
        )
        time.sleep(30)
    return {
        "waited_s": round(time.monotonic() - t0),
        "load_at_first_check": first,
        "load_at_start": loadavg(),
        "pressure_at_start": pressure(),
    }


def ensure_native() -> None:
    """Build the native generator now (cc, cached), so no measured run pays for it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run(
        [PY, "-m", "wshub.bench.native"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    if p.returncode:
        raise SystemExit(f"the native generator does not build: {p.stderr[-2000:]}")
    log(f"native generator: {p.stdout.strip()}")


def ensure_tools(need_chart: bool, need_spy: bool) -> None:
    if (
        not (NODE_DIR / "node_modules" / "uwebsockets").exists()
        or not (NODE_DIR / "node_modules" / "ws").exists()
    ):
        if not shutil.which("npm"):
            raise SystemExit("npm not found: install Node 20 + npm")
        log("npm ci in bench/servers")
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300
        )
    pkgs = []
    if need_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            pkgs.append("matplotlib")
    if need_spy and not Path(PY).with_name("py-spy").exists():
        pkgs.append("py-spy")
    if pkgs:
        log(
            f"pip install {' '.join(pkgs)} into {sys.prefix} (benchmark tools only, not project dependencies)"
        )
        subprocess.run([PY, "-m", "pip", "install", "-q", *pkgs], check=True, timeout=600)


# --------------------------------------------------------------------------- parts


def measure_ceiling(a, runs: int) -> list[dict]:
    out = []
    for r in range(runs):
        for rate in (0, 2_000_000):
            port = free_port()
            cmd = [
                PY,
                str(BENCH / "ceiling_server.py"),
                str(port),
                "--rate",
                str(rate),
                "--batch",
                "32",
                "--duration",
                str(a.warmup + 5 + 30),
            ]
            rec = {
                "run": r + 1,
                "offered": rate or "max",
                "pressure_before": pressure(),
                "load_before": loadavg(),
            }
            try:
                with Server(cmd, port, a.server_core, "ceiling") as srv:
                    rec["result"] = bench(
                        [
                            "sink",
                            "--engine",
                            a.engine,
                            "--protocol",
                            "raw",
                            "-n",
                            "1000",
                            "--probes",
                            "0",
                            "--url",
                            f"ws://127.0.0.1:{port}/",
                            "--warmup",
                            str(a.warmup),
                            "--duration",
                            "5",
                            "--server-pid",
                            str(srv.pid),
                        ],
                        a.client_core,
                        90,
                    )
            except RuntimeError as e:
                rec["result"] = {"error": str(e)}
            res = rec["result"]
            log(
                f"ceiling run {r + 1} offered {rec['offered']}: counted {res.get('deliveries_per_s')}/s "
                f"gen cpu {res.get('generator_cpu')} {res.get('error', '')}"
            )
            out.append(rec)
    return out


def wshub_source() -> str:
    """HEAD and a hash of the server's sources as they are now (the tree is shared and
    the server may change during a long run: each wshub measurement records what ran)."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((ROOT / "src" / "wshub").rglob("*.py")):
        if "bench" not in f.parts:
            h.update(f.read_bytes())
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        head = "?"
    return f"{head}+src:{h.hexdigest()[:8]}"


def run_one(server: str, scen: str, a, run: int) -> dict:
    label, proto, build = SERVERS[server]
    port = free_port()
    rec = {
        "run": run,
        "server": server,
        "scenario": scen,
        "pressure_before": pressure(),
        "load_before": loadavg(),
    }
    if server.startswith("wshub"):
        rec["wshub_source"] = wshub_source()
    args, timeout = scenario_args(scen, a)
    realtime = scen in REALTIME_SCENARIOS and getattr(a, "realtime_ok", False)
    rec["realtime"] = realtime
    try:
        with Server(build(port), port, a.server_core, server, realtime) as srv:
            path = "/websocket"
            rec["result"] = bench(
                [
                    *args,
                    "--protocol",
                    proto,
                    "--url",
                    f"ws://127.0.0.1:{port}{path}",
                    "--server-pid",
                    str(srv.pid),
                ],
                a.client_core,
                timeout,
                realtime,
            )
    except RuntimeError as e:
        rec["result"] = {"error": str(e)}
    rec["pressure_after"] = pressure()
    return rec


def gen_ns(r: dict) -> str:
    """The generator's CPU per counted frame in ns (its own clock), for the log."""
    us = r.get("generator_cpu_us_per_delivery")
    return "?" if us is None else f"{us * 1000:.0f}"


def short(rec: dict) -> str:
    r = rec["result"]
    if "error" in r:
        return f"ERROR {r['error'][:200]}"
    s = rec["scenario"]
    bound = " GENERATOR-BOUND" if generator_bound(r) else ""
    if s in ("fanout", "rooms"):
        return (
            f"{r.get('deliveries_per_s', 0):,.0f}/s  {r.get('server_cpu_us_per_delivery')} µs/delivery  "
            f"server cpu {r.get('server_cpu')}  gen cpu {r.get('generator_cpu')} "
            f"(+{r.get('generator_cpu_waiting')} waiting, {gen_ns(r)} ns/frame){bound}  "
            f"p99 {r.get('latency_ms_p99')} ms  read: counted {r.get('read_counted')} other "
            f"{r.get('read_other_type')} wrong size {r.get('read_wrong_size')} misrouted "
            f"{r.get('read_misrouted')} invalid {r.get('read_invalid')}"
        )
    if s in ("latency", "chat"):
        return (
            f"{r.get('deliveries_per_s', 0):,.0f}/s of {r.get('offered_deliveries_per_s', 0):,.0f}  "
            f"p50 {r.get('latency_ms_p50')} p99 {r.get('latency_ms_p99')} max {r.get('latency_ms_max')} ms  "
            f"fell behind: {r.get('fell_behind')}  gen cpu {r.get('generator_cpu')}{bound}"
        )
    return (
        f"{r.get('rss_per_connection_kib')} KiB/conn  held {r.get('connections_held')}  "
        f"connect {r.get('connect_time_s')} s  failed {r.get('connect_failures')}"
    )


def run_cluster(a, runs: int) -> dict:
    rport = free_port()
    redis = spawn(
        [
            "redis-server",
            "--port",
            str(rport),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--client-output-buffer-limit",
            "pubsub 256mb 64mb 60",
        ],
        a.server_core,
        "redis",
    )
    out = {"redis_port": rport, "runs": []}
    try:
        shared.wait_port(rport, redis)
        url = f"redis://127.0.0.1:{rport}/0"
        configs = [("fanout-1", 1), ("fanout-2", 2), ("latency-cross", 2), ("latency-1", 1)]
        for r in range(runs):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for name, nodes in order:
                ports = [free_port() for _ in range(nodes)]
                procs = [
                    spawn(
                        wshub_cmd(p, ["--redis-url", url, "--node-id", f"bench-{name}-{r}-{i}"]),
                        a.server_core,
                        f"node{i}",
                    )
                    for i, p in enumerate(ports)
                ]
                rec = {
                    "run": r + 1,
                    "config": name,
                    "nodes": nodes,
                    "pressure_before": pressure(),
                    "load_before": loadavg(),
                }
                try:
                    for p, proc in zip(ports, procs):
                        shared.wait_port(p, proc)
                    time.sleep(1.0)
                    urls = []
                    for p in ports:
                        urls += ["--url", f"ws://127.0.0.1:{p}/websocket"]
                    cpu0 = [cpu_s(p.pid) for p in procs] + [cpu_s(redis.pid)]
                    if name.startswith("fanout"):
                        args, timeout = scenario_args("fanout", a)
                    else:
                        args, timeout = scenario_args("latency", a)
                    if name == "latency-cross":
                        args += ["--placement", "sender-alone"]
                    rec["result"] = bench(
                        [*args, *urls, "--protocol", "wshub", "--server-pid", str(procs[0].pid)],
                        a.client_core,
                        timeout,
                    )
                    cpu1 = [cpu_s(p.pid) for p in procs] + [cpu_s(redis.pid)]
                    rec["cpu_s_whole_run"] = [
                        round(y - x, 2) if x is not None and y is not None else None
                        for x, y in zip(cpu0, cpu1)
                    ]
                except RuntimeError as e:
                    rec["result"] = {"error": str(e)}
                finally:
                    for p in procs:
                        stop(p)
                res = rec["result"]
                log(
                    f"cluster run {r + 1} {name:14} {res.get('deliveries_per_s', 0):,.0f}/s  "
                    f"p50 {res.get('latency_ms_p50')} p99 {res.get('latency_ms_p99')} ms  "
                    f"by url {res.get('connections_by_url')}  {res.get('error', '')}"
                )
                out["runs"].append(rec)
                time.sleep(1.0)
    finally:
        stop(redis)
    return out


def collapse_top(path: Path, n: int = 40) -> dict:
    """Top functions (self and inclusive) from py-spy's collapsed stacks."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        c = int(cnt)
        total += c
        frames = stack.split(";")
        # skip the thread/process header frames py-spy puts first
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]  # by function, not by line
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return {"samples": total, "self": self_c.most_common(n), "inclusive": incl.most_common(n + 8)}


def wshub_metrics(port: int) -> dict:
    """The counters of wshub's /metrics (name -> value, unlabelled series only)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, _, v = line.partition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def profile(a) -> dict:
    """py-spy (--native) on wshub in the fan-out scenario ("after"), on the websockets
    relay ("before"), and on wshub while 3000 connections open ("connect storm")."""
    spy = str(Path(PY).with_name("py-spy"))
    PROFILES.mkdir(parents=True, exist_ok=True)
    out = {}
    cases = [
        ("after", "wshub", SERVERS["wshub"][2], "wshub", "fanout"),
        (
            "before",
            "websockets-relay",
            lambda p: [PY, str(BENCH / "candidates" / "websockets_relay.py"), str(p)],
            "raw",
            "fanout",
        ),
        ("storm", "wshub", SERVERS["wshub"][2], "wshub", "storm"),
    ]
    for tag, name, build, proto, scen in cases:
        port = free_port()
        # the reading client's profiles beside the header-peeking generator's
        suffix = "-reader" if getattr(a, "reader", "peek") == "full" else ""
        dest = PROFILES / (
            f"fanout-{tag}-{name}{suffix}.collapsed.txt"
            if scen == "fanout"
            else f"connect-storm-wshub{suffix}.collapsed.txt"
        )
        rec = {"server": name, "scenario": scen}
        try:
            with Server(build(port), port, a.server_core, f"profile-{name}") as srv:
                if scen == "fanout":
                    args, timeout = scenario_args("fanout", a)
                    i = args.index("--duration")
                    args[i + 1] = str(a.profile_seconds + 6)
                else:
                    args = [
                        "idle",
                        "-n",
                        "3000",
                        "--duration",
                        "1",
                        "--settle",
                        "10",
                        "--open-deadline",
                        "90",
                    ]
                env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
                gen = subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        a.client_core,
                        PY,
                        "-m",
                        "wshub.bench",
                        *args,
                        "--protocol",
                        proto,
                        "--url",
                        f"ws://127.0.0.1:{port}/websocket",
                        "--server-pid",
                        str(srv.pid),
                        "--json",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
                _children.append(gen)
                # fan-out: wait until the 1000 connections are open (the server's fds), then
                # the warm-up; storm: wait until 500 are open
                want = 1000 if scen == "fanout" else 500
                end = time.monotonic() + 90
                while time.monotonic() < end and gen.poll() is None:
                    try:
                        if len(os.listdir(f"/proc/{srv.pid}/fd")) >= want:
                            break
                    except OSError:
                        pass
                    time.sleep(0.25)
                if scen == "fanout":
                    time.sleep(a.warmup + 1)
                m0 = wshub_metrics(port) if name == "wshub" else {}
                c0, t0, us0 = cpu_s(srv.pid), time.monotonic(), cpu_split(srv.pid)
                spy_run = subprocess.run(
                    [
                        "taskset",
                        "-c",
                        a.client_core,
                        spy,
                        "record",
                        "--pid",
                        str(srv.pid),
                        "--rate",
                        "200",
                        "--duration",
                        str(int(a.profile_seconds)),
                        "--native",
                        "--format",
                        "raw",
                        "--output",
                        str(dest),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=a.profile_seconds + 60,
                )
                if spy_run.returncode:
                    rec["error"] = f"py-spy: {spy_run.stderr[-300:]}"
                rec["server_cpu_during_profile"] = round(
                    (cpu_s(srv.pid) - c0) / (time.monotonic() - t0), 3
                )
                us1 = cpu_split(srv.pid)
                if us0 and us1:
                    u, k = us1[0] - us0[0], us1[1] - us0[1]
                    rec["server_user_s"], rec["server_system_s"] = round(u, 2), round(k, 2)
                    rec["system_share"] = round(k / (u + k), 3) if u + k else None
                m1 = wshub_metrics(port) if name == "wshub" else {}
                d = m1.get("wshub_deliveries_total", 0) - m0.get("wshub_deliveries_total", 0)
                w = m1.get("wshub_socket_writes_total", 0) - m0.get("wshub_socket_writes_total", 0)
                if d and w:
                    rec["deliveries_in_window"] = d
                    rec["writes_in_window"] = w
                    rec["frames_per_write"] = round(d / w, 2)
                    rec["server_cpu_us_per_delivery_in_window"] = round(
                        (cpu_s(srv.pid) - c0) / d * 1e6, 3
                    )
                try:
                    so, se = gen.communicate(timeout=a.profile_seconds + 200)
                    rec["bench"] = json.loads(so)
                except (subprocess.TimeoutExpired, json.JSONDecodeError):
                    gen.kill()
                    rec["bench"] = {"error": "generator failed during profile"}
                if gen in _children:
                    _children.remove(gen)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rec["error"] = str(e)
        if dest.exists():
            rec["file"] = str(dest.relative_to(ROOT))
            rec["size"] = dest.stat().st_size
            rec["top"] = collapse_top(dest)
        b = rec.get("bench", {})
        log(
            f"profile {tag} {name}: {b.get('deliveries_per_s')}/s {b.get('server_cpu_us_per_delivery')} µs/delivery "
            f"samples {rec.get('top', {}).get('samples')} {rec.get('error', '')}"
        )
        out[tag] = rec
    return out


# --------------------------------------------------------------------------- report


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def fmt(v, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M{unit}"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.0f}k{unit}"
    if abs(v) >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.{digits}f}{unit}"


def ratio(x, y) -> str:
    if x is None or y is None or y == 0:
        return "–"
    r = x / y
    return f"{r:.2f} ×" if r < 100 else f"{r:.0f} ×"


def summarize(data: dict) -> dict:
    flood = [c["result"] for c in data["ceiling"] if c["offered"] == "max"]
    ceiling_2m = [c["result"] for c in data["ceiling"] if c["offered"] != "max"]
    # frames counted per second of generator CPU: what one full core of the generator counts
    per_core = [
        c["result"]["deliveries_per_s"] / c["result"]["generator_cpu"]
        for c in data["ceiling"]
        if c["result"].get("generator_cpu") and c["result"].get("deliveries_per_s")
    ]
    summ = {
        "ceiling": med(per_core),
        "ceiling_runs": per_core,
        "flood_counted": med([r.get("deliveries_per_s") for r in flood]),
        "flood_runs": [r.get("deliveries_per_s") for r in flood],
        "ceiling_gen_cpu": med([r.get("generator_cpu") for r in flood]),
        "ceiling_2m": med([r.get("deliveries_per_s") for r in ceiling_2m]),
        "ceiling_2m_gen_cpu": med([r.get("generator_cpu") for r in ceiling_2m]),
        "cells": {},
    }
    for srv in data["servers"]:
        for scen in SCENARIOS:
            rs = [x["result"] for x in data["runs"] if x["server"] == srv and x["scenario"] == scen]
            if not rs:
                continue
            keys = [
                "deliveries_per_s",
                "server_cpu_us_per_delivery",
                "server_cpu",
                "generator_cpu",
                "latency_ms_p50",
                "latency_ms_p90",
                "latency_ms_p99",
                "latency_ms_max",
                "offered_deliveries_per_s",
                "achieved_ratio",
                "backlog_s",
                "rss_per_connection_kib",
                "connections_held",
                "connect_time_s",
                "connects_per_s",
            ]
            cell = {k: med([r.get(k) for r in rs]) for k in keys}
            cell["n"] = len(rs)
            cell["errors"] = [r["error"] for r in rs if "error" in r]
            cell["runs_deliveries"] = [r.get("deliveries_per_s") for r in rs]
            cell["runs_p99"] = [r.get("latency_ms_p99") for r in rs]
            cell["fell_behind_runs"] = sum(1 for r in rs if r.get("fell_behind"))
            for k in (
                "generator_cpu_user",
                "generator_cpu_sys",
                "generator_cpu_us_per_delivery",
                "generator_cpu_waiting",
                "server_cpu_sched",
                "server_cpu_sched_us_per_delivery",
            ):
                cell[k] = med([r.get(k) for r in rs])
            cell["runs_server_cpu_us"] = [r.get("server_cpu_us_per_delivery") for r in rs]
            cell["runs_server_sched_us"] = [r.get("server_cpu_sched_us_per_delivery") for r in rs]
            cell["runs_generator_cpu"] = [r.get("generator_cpu") for r in rs]
            cell["generator_bound_runs"] = sum(1 for r in rs if generator_bound(r))
            if scen in ("fanout", "rooms") and full_reader(data):
                # no flood ceiling for the reading client: a run is at the generator's
                # limit when the generator was (nearly) never idle
                cell["at_ceiling_runs"] = cell["generator_bound_runs"]
                cell["at_ceiling"] = cell["generator_bound_runs"] * 2 > len(rs)
            elif scen == "fanout":
                at = []
                for r in rs:
                    d, g, s = (
                        r.get("deliveries_per_s") or 0,
                        r.get("generator_cpu") or 0,
                        r.get("server_cpu") or 0,
                    )
                    at.append(
                        bool(
                            (summ["ceiling"] and d >= 0.8 * summ["ceiling"])
                            or (g >= 0.75 and g > s)
                        )
                    )
                cell["at_ceiling_runs"] = sum(at)
                cell["at_ceiling"] = sum(at) * 2 > len(at)
            summ["cells"][(srv, scen)] = cell
    return summ


def goal_lines(summ: dict) -> list[str]:
    c = summ["cells"]
    g = lambda s, k, f: (c.get((s, k)) or {}).get(f)  # noqa: E731
    lines = []
    w, u, n = (
        g("wshub", "fanout", "deliveries_per_s"),
        g("uws", "fanout", "deliveries_per_s"),
        g("node-ws", "fanout", "deliveries_per_s"),
    )
    wc, uc = g("wshub", "fanout", "at_ceiling"), g("uws", "fanout", "at_ceiling")
    if w and u:
        wcpu = g("wshub", "fanout", "server_cpu_us_per_delivery")
        ucpu = g("uws", "fanout", "server_cpu_us_per_delivery")
        cpu = f"CPU per delivery {fmt(wcpu)} vs {fmt(ucpu)} µs ({ratio(wcpu, ucpu)})"
        # A figure at the generator's ceiling is a lower bound of that server:
        # it still decides the goal when it is the one ahead.
        if not (wc or uc):
            verdict = ("**met**" if w >= u else "**not met**") + f"; {cpu}"
        elif wc and not uc and w >= u:
            verdict = (
                f"**met**: wshub reached the generator's ceiling, so its figure is a lower bound; "
                f"{cpu}"
            )
        elif uc and not wc and w < u:
            verdict = (
                f"**not met**: uWebSockets.js reached the generator's ceiling, so its figure is a "
                f"lower bound; {cpu}"
            )
        else:
            hit = ", ".join(x for x, y in (("wshub", wc), ("uWebSockets.js", uc)) if y)
            verdict = f"**undecided**: {hit} at the generator's ceiling; compare the {cpu}"
        lines.append(
            f"| fan-out ≥ 1.0 × uWebSockets.js | {ratio(w, u)} ({fmt(w)} vs {fmt(u)} deliveries/s) | "
            + verdict
            + " |"
        )
    if w and n:
        valid = not (wc or g("node-ws", "fanout", "at_ceiling"))
        lines.append(
            f"| fan-out ≥ 5 × Node `ws` | {ratio(w, n)} ({fmt(w)} vs {fmt(n)}) | "
            + ("**met**" if w >= 5 * n else "**not met**")
            + ("" if valid else " (wshub at the generator's ceiling: a lower bound)")
            + " |"
        )
    wp, up = g("wshub", "latency", "latency_ms_p99"), g("uws", "latency", "latency_ms_p99")
    if wp and up:
        lines.append(
            f"| p99 at 50 msg/s ≤ uWebSockets.js's | {fmt(wp, ' ms')} vs {fmt(up, ' ms')} ({ratio(wp, up)}) | "
            + ("**met**" if wp <= up else "**not met**")
            + " |"
        )
    wp, up = g("wshub", "chat", "latency_ms_p99"), g("uws", "chat", "latency_ms_p99")
    wf = g("wshub", "chat", "fell_behind_runs")
    if wp and up:
        ok = wp <= 1.5 * up and not wf
        lines.append(
            f"| chat sustained, p99 ≤ 1.5 × uWebSockets.js's | {fmt(wp, ' ms')} vs {fmt(up, ' ms')} "
            f"({ratio(wp, up)}); fell behind in {wf} of {g('wshub', 'chat', 'n')} runs | "
            + ("**met**" if ok else "**not met**")
            + " |"
        )
    for scen, label in (("idle", "10,000"), ("idle-2k", "2,000")):
        wr, nr = (
            g("wshub", scen, "rss_per_connection_kib"),
            g("node-ws", scen, "rss_per_connection_kib"),
        )
        held = g("wshub", scen, "connections_held")
        if wr and nr:
            want = 10000 if scen == "idle" else 2000
            partial = held is not None and held < want
            lines.append(
                f"| idle RSS per connection ≤ Node `ws`'s ({label}) | {fmt(wr, ' KiB')} vs {fmt(nr, ' KiB')} "
                f"({ratio(wr, nr)}); wshub held {fmt(held)} of {want:,} | "
                + (
                    "**not met: wshub could not open them all** (see below)"
                    if partial
                    else ("**met**" if wr <= nr else "**not met**")
                )
                + " |"
            )
    return lines


def full_reader(data: dict) -> bool:
    """Whether a run used the reading client (--reader full; older results: peek)."""
    return data["args"].get("reader", "peek") == "full"


def every_delivery(data: dict) -> bool:
    """Whether the latency runs' percentiles are over every delivery (the
    reading client since 2026-12-03) and not over the probe connections alone."""
    return any(
        (r.get("result") or {}).get("latency_of") == "every delivery"
        for r in data["runs"]
        if r.get("scenario") == "latency"
    )


def realtime_runs(data: dict) -> bool:
    """Whether the latency runs ran their server and generator under SCHED_FIFO."""
    return any(r.get("realtime") for r in data["runs"] if r.get("scenario") == "latency")


def _engine(a: dict) -> str:
    """The generator engine of a run (results saved before --engine existed: python)."""
    return a.get("engine", "python")


def figure_tables(data: dict, summ: dict) -> list[str]:
    """The figures, ratios and goals of issue 4 for a run of the header-peeking generator."""
    c = summ["cells"]
    names = data["servers"]
    label = {k: v[0] for k, v in SERVERS.items()}
    L: list[str] = []
    add = L.append
    add("## Figures (medians)\n")
    add(
        "| server | fan-out deliveries/s | the runs | server CPU µs/delivery | server / generator CPU | at ceiling? "
        "| p99 at 50 msg/s (p50 / p90 / max) | chat 100 × 10/s | chat p99 (p50) | idle RSS/conn, 10k (held, connect time) | idle RSS/conn, 2k |"
    )
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in names:
        f, l, ch, i, i2 = (
            c.get((s, k), {}) for k in ("fanout", "latency", "chat", "idle", "idle-2k")
        )
        chat_state = "–"
        if ch:
            chat_state = (
                f"fell behind ({ch['fell_behind_runs']} of {ch['n']} runs)"
                if ch["fell_behind_runs"]
                else "sustained"
            ) + f", {fmt(ch.get('deliveries_per_s'))}/s"
        add(
            f"| {label[s]} | {fmt(f.get('deliveries_per_s'))} | {' / '.join(fmt(v) for v in f.get('runs_deliveries', []))} "
            f"| {fmt(f.get('server_cpu_us_per_delivery'))} | {fmt(f.get('server_cpu'))} / {fmt(f.get('generator_cpu'))} "
            f"| {'**yes**' if f.get('at_ceiling') else 'no'} ({f.get('at_ceiling_runs', 0)} of {f.get('n', 0)}) "
            f"| {fmt(l.get('latency_ms_p99'), ' ms')} ({fmt(l.get('latency_ms_p50'))} / {fmt(l.get('latency_ms_p90'))} / {fmt(l.get('latency_ms_max'))}) "
            f"| {chat_state} | {fmt(ch.get('latency_ms_p99'), ' ms')} ({fmt(ch.get('latency_ms_p50'))}) "
            f"| {fmt(i.get('rss_per_connection_kib'), ' KiB')} ({fmt(i.get('connections_held'))}, {fmt(i.get('connect_time_s'), ' s', 1)}) "
            f"| {fmt(i2.get('rss_per_connection_kib'), ' KiB')} |"
        )
    errs = [(s, k, e) for (s, k), cell in c.items() for e in cell["errors"]]
    if errs:
        add("\nErrors: " + "; ".join(f"{s} {k}: {e[:160]}" for s, k, e in errs) + "\n")
    add(
        '\n"p99 at 50 msg/s" is the `latency` scenario; fan-out latency (closed loop, 32 in flight) measures a '
        "full round of the window, not a latency at a given rate, and is only in the JSON.\n"
    )

    add("### Ratios (medians)\n")
    variant = "wshub-transport" in names
    add(
        "| | wshub / uWebSockets.js | wshub / Node `ws` |"
        + (" wshub / wshub `--direct-send off` |" if variant else "")
    )
    add("| --- | --- | --- |" + (" --- |" if variant else ""))
    g = lambda s, k, f: (c.get((s, k)) or {}).get(f)  # noqa: E731
    rows = [
        ("fan-out deliveries/s", "fanout", "deliveries_per_s"),
        ("server CPU per delivery", "fanout", "server_cpu_us_per_delivery"),
        ("p99 at 50 msg/s", "latency", "latency_ms_p99"),
        ("p50 at 50 msg/s", "latency", "latency_ms_p50"),
        ("chat p99", "chat", "latency_ms_p99"),
        ("chat deliveries/s", "chat", "deliveries_per_s"),
        ("idle RSS per connection (10k)", "idle", "rss_per_connection_kib"),
        ("idle RSS per connection (2k)", "idle-2k", "rss_per_connection_kib"),
    ]
    for title, scen, key in rows:
        add(
            f"| {title} | {ratio(g('wshub', scen, key), g('uws', scen, key))} | {ratio(g('wshub', scen, key), g('node-ws', scen, key))} |"
            + (
                f" {ratio(g('wshub', scen, key), g('wshub-transport', scen, key))} |"
                if variant
                else ""
            )
        )
    add("")
    if variant:
        add(
            "`wshub, --direct-send off` is wshub writing every frame through the event loop's transport, as it did "
            "before the compiled direct sends (`src/wshub/_directsend.c`, see docs/ws-layer.md); it runs only "
            f"through {', '.join(ONLY['wshub-transport'])}, where the two can differ.\n"
        )
    add("### The goals of issue 4\n")
    add("| goal | measured | |")
    add("| --- | --- | --- |")
    L.extend(goal_lines(summ))
    add("")
    return L

def reader_ceiling_text(data: dict) -> list[str]:
    return [
        "## The generator's own limit\n",
        "The reading client has no flood ceiling to measure against (a flood of pre-built frames says little "
        "about a reader whose cost grows with every byte it parses). Instead every run records the generator's "
        "own CPU over the measured window (user + system time of its process, as a fraction of its core, "
        "`generator_cpu`, `generator_cpu_user`, `generator_cpu_sys`; per delivery, "
        "`generator_cpu_us_per_delivery`) and the time it was runnable but waiting for its core "
        "(`generator_cpu_waiting`, from `/proc/self/schedstat`: on a shared machine a generator can want "
        "its whole core and get less), and a run where the two together reached "
        f"**≥ {GENERATOR_BOUND:.0%} of the window is flagged as generator-bound**: its figure may be the "
        "generator's limit and not the server's. Such a run counts as at the generator's ceiling in the goals "
        "below; where the server used its whole core and the generator did not, the figure is the server's.\n",
    ]


def figure_tables_full(data: dict, summ: dict) -> list[str]:
    """The figures, ratios and goals of issue 18 for a run of the reading client."""
    c = summ["cells"]
    names = data["servers"]
    label = {k: v[0] for k, v in SERVERS.items()}
    g = lambda s, k, f: (c.get((s, k)) or {}).get(f)  # noqa: E731
    L: list[str] = []
    add = L.append

    def gen(cell: dict) -> str:
        if not cell or cell.get("generator_cpu") is None:
            return "–"
        bound = cell.get("generator_bound_runs", 0)
        us = cell.get("generator_cpu_us_per_delivery")
        wait = cell.get("generator_cpu_waiting")
        return (
            f"{fmt(cell.get('generator_cpu'))} ({fmt(cell.get('generator_cpu_user'))} user + "
            f"{fmt(cell.get('generator_cpu_sys'))} sys"
            + (f", +{fmt(wait)} waiting for its core" if wait is not None else "")
            + (f"; {us * 1000:.0f} ns per delivery" if us is not None else "")
            + ")"
            + (f" **bound in {bound} of {cell['n']}**" if bound else "")
        )

    add("## Figures (medians): the reading client\n")
    add(
        "| server | fan-out deliveries/s | the runs | server CPU µs/delivery (runs) "
        "| the same, scheduler's clock (runs) | server CPU | generator CPU "
        "| rooms deliveries/s (runs) | rooms server CPU µs/delivery | rooms generator CPU "
        "| p99 at 50 msg/s (p50 / p90 / max) | chat 100 × 10/s | chat p99 (p50) |"
    )
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in names:
        f, r, l, ch = (c.get((s, k), {}) for k in ("fanout", "rooms", "latency", "chat"))
        chat_state = "–"
        if ch and ch.get("deliveries_per_s"):
            chat_state = (
                f"fell behind ({ch['fell_behind_runs']} of {ch['n']} runs)"
                if ch["fell_behind_runs"]
                else "sustained"
            ) + f", {fmt(ch.get('deliveries_per_s'))}/s"
        rooms = (
            f"{fmt(r.get('deliveries_per_s'))} ({' / '.join(fmt(v) for v in r.get('runs_deliveries', []))})"
            if r and r.get("deliveries_per_s")
            else ("failed (see Errors)" if r and r.get("errors") else "–")
        )
        add(
            f"| {label[s]} | {fmt(f.get('deliveries_per_s'))} | {' / '.join(fmt(v) for v in f.get('runs_deliveries', []))} "
            f"| {fmt(f.get('server_cpu_us_per_delivery'), '', 3)} ({' / '.join(fmt(v, '', 3) for v in f.get('runs_server_cpu_us', []))}) "
            f"| {fmt(f.get('server_cpu_sched_us_per_delivery'), '', 3)} ({' / '.join(fmt(v, '', 3) for v in f.get('runs_server_sched_us', []))}) "
            f"| {fmt(f.get('server_cpu'))} | {gen(f)} "
            f"| {rooms} | {fmt(r.get('server_cpu_us_per_delivery'), '', 3)} | {gen(r)} "
            f"| {fmt(l.get('latency_ms_p99'), ' ms')} ({fmt(l.get('latency_ms_p50'))} / {fmt(l.get('latency_ms_p90'))} / {fmt(l.get('latency_ms_max'))}) "
            f"| {chat_state} | {fmt(ch.get('latency_ms_p99'), ' ms')} ({fmt(ch.get('latency_ms_p50'))}) |"
        )
    errs = collections.Counter(
        f"{s} {k}: {e[:200].strip()}".replace("\n", " ")
        for (s, k), cell in c.items()
        for e in cell["errors"]
    )
    if errs:
        add(
            "\nErrors: "
            + "; ".join(f"{e} ({n} of the runs)" if n > 1 else e for e, n in errs.items())
            + "\n"
        )
    add("")
    others = [s for s in names if s != "wshub"]
    add("### Ratios (medians)\n")
    add("| | " + " | ".join(f"wshub / {label[o]}" for o in others) + " |")
    add("| --- |" + " --- |" * len(others))
    rows = [
        ("fan-out deliveries/s", "fanout", "deliveries_per_s"),
        ("fan-out server CPU per delivery", "fanout", "server_cpu_us_per_delivery"),
        ("the same, scheduler's clock", "fanout", "server_cpu_sched_us_per_delivery"),
        ("latency server CPU per delivery (scheduler's clock)", "latency", "server_cpu_sched_us_per_delivery"),
        ("chat server CPU per delivery (scheduler's clock)", "chat", "server_cpu_sched_us_per_delivery"),
        ("rooms deliveries/s", "rooms", "deliveries_per_s"),
        ("rooms server CPU per delivery", "rooms", "server_cpu_us_per_delivery"),
        ("p99 at 50 msg/s", "latency", "latency_ms_p99"),
        ("p50 at 50 msg/s", "latency", "latency_ms_p50"),
        ("chat p99", "chat", "latency_ms_p99"),
        ("chat deliveries/s", "chat", "deliveries_per_s"),
    ]
    for title, scen, key in rows:
        add(
            f"| {title} | "
            + " | ".join(ratio(g("wshub", scen, key), g(o, scen, key)) for o in others)
            + " |"
        )
    add("")
    add("### The goals of issue 18 (and of issue 12 item 4), against uWebSockets.js\n")
    add("| goal | measured | |")
    add("| --- | --- | --- |")

    def goal(title: str, scen: str, key: str, limit: float, higher: bool, unit: str = "") -> None:
        exact = key.replace("server_cpu_us", "server_cpu_sched_us")
        if exact != key and g("wshub", scen, exact) and g("uws", scen, exact):
            key = exact  # the scheduler's clock where both runs have it (utime/stime: ticks)
            title += " (scheduler's clock)"
        w, u = g("wshub", scen, key), g("uws", scen, key)
        if w is None or u is None:
            why = "; ".join(e[:160].strip().replace("\n", " ") for e in (g("wshub", scen, "errors") or [])[:1])
            add(f"| {title} | wshub {fmt(w, unit)}, uWebSockets.js {fmt(u, unit)} | **not measured**"
                + (f" ({why})" if why else "") + " |")
            return
        r = w / u if u else None
        ok = r is not None and (r >= limit if higher else r <= limit)
        bound = [x for x in ("wshub", "uws") if g(x, scen, "generator_bound_runs")]
        note = (
            f" (generator-bound runs: {', '.join(bound)}: a lower bound there)" if bound else ""
        )
        if key == "deliveries_per_s":
            sc = [g(x, scen, "server_cpu") for x in ("wshub", "uws")]
            if any(v is not None and v < 0.85 for v in sc):
                note += (
                    f" (server CPU {fmt(sc[0])} / {fmt(sc[1])} of a core: not both server-bound, "
                    "so compare the CPU per delivery)"
                )
        add(
            f"| {title} | {ratio(w, u)} ({fmt(w, unit)} vs {fmt(u, unit)}) | "
            + ("**met**" if ok else "**not met**")
            + note
            + " |"
        )

    goal("fan-out ≥ 1.0 × uWebSockets.js", "fanout", "deliveries_per_s", 1.0, True)
    goal("fan-out server CPU per delivery ≤ 1.0 ×", "fanout", "server_cpu_us_per_delivery", 1.0, False, " µs")
    goal("p99 at 50 msg/s ≤ 1.0 ×", "latency", "latency_ms_p99", 1.0, False, " ms")
    goal("chat p99 ≤ 1.2 ×", "chat", "latency_ms_p99", 1.2, False, " ms")
    goal("rooms ≥ 1.0 × uWebSockets.js", "rooms", "deliveries_per_s", 1.0, True)
    goal("rooms server CPU per delivery ≤ 1.0 ×", "rooms", "server_cpu_us_per_delivery", 1.0, False, " µs")
    goal("stretch: fan-out ≥ 1.2 ×", "fanout", "deliveries_per_s", 1.2, True)
    add("")
    return L


OLDER = BENCH / "results" / "benchmarks-peek-1126.json"


def older_figures() -> list[str]:
    """The last full run of the header-peeking generator, labelled as such."""
    if not OLDER.exists():
        return []
    old = json.loads(OLDER.read_text())
    L = [
        "## Earlier figures: the header-peeking generator (`--reader peek`)\n",
        f"Measured {old['started']} (UTC) at commit `{old['machine'].get('wshub_commit')}`, "
        f"`{OLDER.relative_to(ROOT)}`: **the generator looked at the first bytes of each frame only** "
        "(`--engine native`, no `--reader`; chat and idle with the Python engine), the raw relays were sent "
        "bare content (no envelope), and its ceiling (3.5M frames per CPU-second) was reached in most fan-out "
        "runs. These figures are kept for the record; they are not comparable with the reading client's above.\n",
    ]
    for line in figure_tables(old, summarize(old)):
        L.append("#" + line if line.startswith("## ") or line.startswith("### ") else line)
    return L


def render(data: dict, chart_file: Path = CHART) -> str:
    a = data["args"]
    m = data["machine"]
    q = data["quiet"]
    summ = summarize(data)
    c = summ["cells"]
    g = lambda s, k, f: (c.get((s, k)) or {}).get(f)  # noqa: E731
    L: list[str] = []
    add = L.append
    add("# Benchmarks: wshub against Node `ws` and uWebSockets.js\n")
    if full_reader(data):
        add(
            f"**Generator: the reading client** (`wshub bench --engine native --reader full --content-size "
            f"{a.get('content_size', 100)}`) produced every figure of this run, down to the goals of issue 18. "
            "It reads every frame whole and parses its JSON as a client would, and counts only `message`/"
            "`broadcast` envelopes whose content is the size it sent; it reports its own CPU, and a run where it "
            f"was busy ≥ {GENERATOR_BOUND:.0%} of the window (on its core, or runnable and waiting for it) is "
            "flagged (its figure may be the generator's limit). "
            "The figures of the header-peeking generator (`--reader peek`, which looks at the first bytes of "
            "each frame only, 2026-11-26) follow under **Earlier figures**, labelled; they are not comparable "
            "with these.\n"
        )
    add(
        f"Measured {data['started']} (UTC) by `bench/run.py`; generated from `bench/results/benchmarks.json`. "
        "Every figure is the **median of "
        f"{a['runs']} runs**; the runs interleave the servers in a rotated order. This machine is shared and noisy: "
        "read the ratios, not the absolute figures.\n"
    )
    add("## The command\n")
    add(
        "```sh\n.venv/bin/python bench/run.py            # about 20 minutes on 2 cores; rewrites this page\n"
        ".venv/bin/python bench/run.py --quick    # one short run of everything, to try it\n"
        ".venv/bin/python bench/run.py --render-only   # this page again from bench/results/benchmarks.json\n```\n"
    )
    flags = [f"--runs {a['runs']}", f"--duration {a['duration']:g}", f"--warmup {a['warmup']:g}"]
    flags += [f"--servers {','.join(data['servers'])}", f"--scenarios {','.join(data['scenarios'])}"]
    flags += [f"--{k.replace('_', '-')}" for k in ("no_ceiling", "no_cluster", "no_profile", "no_realtime") if a.get(k)]
    if "reader" in a:
        flags.append(f"--reader {a['reader']}")
    add(f"This page's run: `.venv/bin/python bench/run.py {' '.join(flags)}`.\n")
    add(
        "It installs what it needs that is missing (`npm ci` in `bench/servers`; matplotlib and py-spy into the "
        "venv, as benchmark tools, not project dependencies). Each server is started fresh for each scenario, "
        f"pinned to core {a['server_core']} (`taskset -c {a['server_core']}`); the load generator "
        f"(`python -m wshub.bench`, the same for all) is pinned to core {a['client_core']}. "
        + (
            f"**The generator's engine**: `--engine native` (a C program, `src/wshub/bench/native.c`, built with "
            f"the system's `cc` on first use: epoll, one 256 KiB read buffer, it walks frame headers and looks only "
            f"at the first bytes of each frame's payload, so its cost per frame hardly depends on the frame's size: no byte is scanned) "
            f"for the ceiling, fan-out, latency and the cluster runs; the Python engine (asyncio + uvloop) for chat "
            f"and idle, which the native engine does not have. See `docs/benchmarks-native-generator.md` for what "
            f"the native engine changes. "
            if _engine(a) == "native" and not full_reader(data)
            else "**The generator**: `--engine native --reader full` (the C program `src/wshub/bench/native.c`, "
            "built with the system's `cc` on first use: io_uring where the kernel has it (one multishot recv per "
            "connection into 64 provided 256 KiB buffers; else epoll and one 256 KiB read buffer); every data message is "
            "read whole, across reads and fragments, and parsed as JSON: every string byte checked, escapes "
            "decoded, UTF-8 validated, every value walked; it counts a `message` or `broadcast` whose content "
            "has the size sent, and with `--rooms` only when the content names its room's sender) for fan-out, "
            "rooms, latency and chat. It sends `{\"type\":\"message\",\"content\":\"...\"}` to every "
            "server, so the raw relays relay that envelope and the reader parses JSON from every server alike. "
            "See `docs/benchmarks-native-generator.md`. "
            + (
                "The latency scenario's percentiles are over every delivery in the window (each read of "
                "any connection stamped on arrival), not over the 32 probe connections alone, whose place "
                "in a server's order of recipients decided part of the figure (docs/latency.md). "
                if every_delivery(data)
                else ""
            )
            + (
                "The latency runs' server and generator ran under SCHED_FIFO (`chrt -f 10`), so "
                "that the others' work on the machine did not make them wait for their cores. "
                if realtime_runs(data)
                else ""
            )
            if full_reader(data)
            else "The generator's engine: Python (asyncio + uvloop) throughout. "
        )
        + "wshub runs as\n"
    )
    add(
        "```sh\nwshub serve --host 127.0.0.1 --port PORT --ip-connect-rate 0 --max-connections-per-ip 0 \\\n"
        "    --message-rate 0 --max-connections 20000 --log-level warning\n```\n"
    )
    add(
        "with its full protocol (validation, JSON envelopes with ids and timestamps, `welcome`, `user_joined`/"
        "`user_left` to everyone, heartbeat, per-connection buffer limit); the generator speaks `--protocol wshub` "
        "to it. The comparison servers are the minimal relays in `bench/servers/` (`ws_relay.js`: `client.send()` "
        "per recipient; `uws_relay.js`: one topic per URL path, `ws.subscribe()`/`ws.publish()`), driven with `--protocol raw`. The generator "
        "commands, per scenario:\n"
    )
    add("```sh")
    for s in [x for x in SCENARIOS if x in data.get("scenarios", SCENARIOS)]:
        args, _ = scenario_args(s, argparse.Namespace(**a))
        add(f"# {SCENARIO_TEXT[s]}")
        add(
            f"python -m wshub.bench {' '.join(args)} --protocol wshub|raw --url ws://127.0.0.1:PORT/websocket --server-pid PID"
        )
    add("```\n")
    add("## The machine\n")
    add(
        f"{m['nproc']} cores (`{m['cpu']}`), Linux {m['kernel']}; Python {m['python']}, uvloop {m['uvloop']}, "
        f"websockets {m['websockets']} (wshub's frame parser), redis-py {m['redis_py']}; Node {m['node']}, "
        f"ws {m['ws']}, uwebsockets {m['uwebsockets']}; {m['redis_server']}; wshub {m['wshub']} at commit "
        f"`{m['wshub_commit']}`; {m['py_spy']}"
        + (
            f"; the native generator built with `{m['cc']}`"
            if m.get("cc") and _engine(a) == "native"
            else ""
        )
        + ".\n"
    )
    pa = [x.get("pressure_before", {}).get("some", {}).get("avg10") for x in data["runs"]]
    pa = [v for v in pa if v is not None]
    la = [x.get("load_before", [None])[0] for x in data["runs"]]
    la = [v for v in la if v is not None]
    ps = q.get("pressure_at_start", {}).get("some", {})
    add(
        f"**Load and CPU pressure.** The run waited {q['waited_s']} s for the 1-minute load average to fall below "
        f"{a['wait_load']} (it was {q['load_at_first_check'][0]:.2f} at the first check, "
        f"{q['load_at_start'][0]:.2f} at the start). `/proc/pressure/cpu` at the start: some avg10 "
        f"{ps.get('avg10', '–')} %, avg60 {ps.get('avg60', '–')} %, avg300 {ps.get('avg300', '–')} %. "
        + (
            f"Before each measurement (some avg10): median {statistics.median(pa):.1f} %, range {min(pa):.1f}–{max(pa):.1f} %; "
            f"1-minute load average median {statistics.median(la):.2f}, range {min(la):.2f}–{max(la):.2f}. "
            if pa and la
            else ""
        )
        + "Every run's figures, with the pressure and load before and after it, are in `bench/results/benchmarks.json`.\n"
    )

    # ceiling
    if full_reader(data) and not data.get("ceiling"):
        L.extend(reader_ceiling_text(data))
    else:
        add("## The generator's own ceiling\n")
        add(
            f"`bench/ceiling_server.py` (core {a['server_core']}) floods pre-built frames, 32 per write, round-robin over "
            f"1000 connections; `wshub bench sink --engine {_engine(a)}` (core 1) only counts them. As fast as the flood server could: "
            f"{fmt(summ['flood_counted'])} frames/s counted (runs {' / '.join(fmt(v) for v in summ['flood_runs'])}) at "
            f"generator CPU {fmt(summ['ceiling_gen_cpu'])}; offered 2M/s: {fmt(summ['ceiling_2m'])} counted at generator "
            f"CPU {fmt(summ['ceiling_2m_gen_cpu'])}. On this shared machine the flood server (one Python process) "
            "rarely outruns the generator, so the ceiling is stated as what the generator counts per second of its own "
            f"CPU: **{fmt(summ['ceiling'])} frames per CPU-second** (median of "
            f"{' / '.join(fmt(v) for v in summ['ceiling_runs'])}), i.e. "
            f"{fmt(1e6 / summ['ceiling'] if summ['ceiling'] else None)} µs of generator CPU per frame when reads are large.\n"
        )
        add(
            (
                "With the native engine the reads hold about 32 frames both in the flood (the flood server's batch) and "
                "in fan-out (a recipient never has more than the 32 messages in flight to read), so this figure is also "
                "what the generator can count in fan-out; its cost is almost all the kernel's (one `recv` and the ACK it "
                "sends per read), see `docs/benchmarks-native-generator.md`. "
                if _engine(a) == "native"
                else "In the fan-out scenario the reads are smaller than in the flood (fewer frames per `recv`), so the "
                "generator saturates earlier than that. "
            )
            + "A fan-out run counts as **at the generator's ceiling** when it "
            "reached 0.8 × the figure above, or when the generator used ≥ 0.75 of its core and more CPU than the "
            "server (the server had room left; the generator did not). Such a figure is a lower bound of the server, "
            "and **a comparison counts only where both servers stay below the ceiling**; where one does not, compare "
            "the server CPU per delivery instead (CPU time used ÷ deliveries, which depends much less on who was the "
            "bottleneck or on the noise).\n"
        )

    # figures
    if full_reader(data):
        L.extend(figure_tables_full(data, summ))
        L.extend(older_figures())
    else:
        L.extend(figure_tables(data, summ))
    if chart_file.exists():
        add(f"![deliveries per second and p99 latency per scenario]({chart_file.name})\n")

    # cluster
    cl = data.get("cluster")
    if cl and cl.get("runs"):
        add("## Cluster (issue 3)\n")
        add(
            "wshub nodes with `--redis-url` to a `redis-server` the script starts on a free port "
            "(`--save '' --appendonly no --client-output-buffer-limit 'pubsub 256mb 64mb 60'`). "
            f"**This machine has two cores**: every node and Redis share core {a['server_core']}, the generator has "
            f"core {a['client_core']}. So two nodes here do not show what two machines would give; they show what the "
            "backplane costs for the same CPU.\n"
        )
        add("```sh")
        add("redis-server --port RPORT --save '' --appendonly no &")
        add(
            "wshub serve --port P1 --redis-url redis://127.0.0.1:RPORT/0 ...benchmark flags... &   # node A"
        )
        add(
            "wshub serve --port P2 --redis-url redis://127.0.0.1:RPORT/0 ...benchmark flags... &   # node B"
        )
        add("# fan-out, two nodes: connections round-robin, the sender on node A")
        add(
            f"python -m wshub.bench fanout --engine {_engine(a)} -n 1000 --inflight 32 --url ws://127.0.0.1:P1/websocket --url ws://127.0.0.1:P2/websocket"
        )
        add("# cross-node latency: the sender alone on node A, the 999 recipients on node B")
        add(
            f"python -m wshub.bench rate --engine {_engine(a)} -n 1000 --rate 50 --placement sender-alone --url ws://127.0.0.1:P1/websocket --url ws://127.0.0.1:P2/websocket"
        )
        add("```\n")
        cells = {}
        for cfg in ("fanout-1", "fanout-2", "latency-cross", "latency-1"):
            rs = [x["result"] for x in cl["runs"] if x["config"] == cfg]
            cells[cfg] = {
                k: med([r.get(k) for r in rs])
                for k in (
                    "deliveries_per_s",
                    "latency_ms_p50",
                    "latency_ms_p90",
                    "latency_ms_p99",
                    "latency_ms_max",
                    "generator_cpu",
                    "server_cpu",
                )
            }
            cells[cfg]["runs"] = [r.get("deliveries_per_s") for r in rs]
            cells[cfg]["runs_p99"] = [r.get("latency_ms_p99") for r in rs]
            cells[cfg]["errors"] = [r["error"] for r in rs if "error" in r]
            cells[cfg]["fell"] = sum(1 for r in rs if r.get("fell_behind"))
        single = c.get(("wshub", "fanout"), {})
        single_l = c.get(("wshub", "latency"), {})
        add("| setup | fan-out deliveries/s | the runs | generator CPU |")
        add("| --- | --- | --- | --- |")
        add(
            f"| one node, no Redis (from the table above) | {fmt(single.get('deliveries_per_s'))} | "
            f"{' / '.join(fmt(v) for v in single.get('runs_deliveries', []))} | {fmt(single.get('generator_cpu'))} |"
        )
        for cfg, title in (
            ("fanout-1", "one node with `--redis-url`"),
            ("fanout-2", "two nodes, 500 connections each"),
        ):
            x = cells[cfg]
            add(
                f"| {title} | {fmt(x['deliveries_per_s'])} | {' / '.join(fmt(v) for v in x['runs'])} | {fmt(x['generator_cpu'])} |"
            )
        add(
            f"\nTwo nodes against one (both with Redis): **{ratio(cells['fanout-2']['deliveries_per_s'], cells['fanout-1']['deliveries_per_s'])}**.\n"
        )
        add("| latency at 50 msg/s, 1000 connections | p50 | p90 | p99 | max | the runs' p99 |")
        add("| --- | --- | --- | --- | --- | --- |")
        add(
            f"| one node, no Redis (from the table above) | {fmt(single_l.get('latency_ms_p50'), ' ms')} | "
            f"{fmt(single_l.get('latency_ms_p90'), ' ms')} | {fmt(single_l.get('latency_ms_p99'), ' ms')} | "
            f"{fmt(single_l.get('latency_ms_max'), ' ms')} | {' / '.join(fmt(v) for v in single_l.get('runs_p99', []))} |"
        )
        for cfg, title in (
            ("latency-1", "one node with `--redis-url`"),
            ("latency-cross", "**cross-node**: sender on node A, 999 recipients on node B"),
        ):
            x = cells[cfg]
            add(
                f"| {title} | {fmt(x['latency_ms_p50'], ' ms')} | {fmt(x['latency_ms_p90'], ' ms')} | "
                f"{fmt(x['latency_ms_p99'], ' ms')} | {fmt(x['latency_ms_max'], ' ms')} | {' / '.join(fmt(v) for v in x['runs_p99'])} |"
            )
        ce = [e for x in cells.values() for e in x["errors"]]
        if ce:
            add("\nErrors: " + "; ".join(e[:160] for e in ce))
        add("")

    # profiles
    pr = data.get("profile")
    if pr:
        add("## Where the time goes (py-spy)\n")
        add(
            f"`py-spy record --native --rate 200 --format raw` for {int(a['profile_seconds'])} s on the server "
            "(py-spy pinned to the generator's core), in the fan-out scenario after the connections opened and the "
            "warm-up. `--native` shows the C frames too, so time in the `write()` system call is visible; it pauses "
            "the process for each sample, so throughput under py-spy is lower than in the measured runs. The "
            "collapsed stacks are in `docs/profiles/` (open them in speedscope or `flamegraph.pl`).\n"
        )
        add(
            "**Before**: wshub has coalesced writes since its first version, so there is no per-recipient-send "
            "wshub to profile; the baseline is the minimal relay on the `websockets` library "
            "(`bench/candidates/websockets_relay.py`: `websockets.broadcast()`, one frame and one `send()` per "
            "message per recipient), the design wshub would have had with a library's send path. **After**: wshub "
            "at this commit. **Connect storm**: wshub while the `idle` generator opens 3000 connections (each "
            "newcomer's `user_joined` goes to every open connection).\n"
        )
        add(
            "| | server | deliveries/s (under py-spy) | server CPU µs per delivery | frames per `write()` | "
            "system share of server CPU | samples | profile |"
        )
        add("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for tag in ("before", "after", "storm"):
            x = pr.get(tag)
            if not x:
                continue
            b = x.get("bench", {})
            dps = b.get("deliveries_per_s") if x.get("scenario") == "fanout" else None
            cpd = (
                b.get("server_cpu_us_per_delivery")
                if x.get("scenario") == "fanout"
                else x.get("server_cpu_us_per_delivery_in_window")
            )
            add(
                f"| {tag} | {x.get('server')} | {fmt(dps)} | {fmt(cpd)} | {fmt(x.get('frames_per_write'))} | "
                f"{fmt(100 * x['system_share'] if x.get('system_share') is not None else None, ' %', 0)} | "
                f"{x.get('top', {}).get('samples', '–')} | `{x.get('file', '–')}` |"
            )
        add("")
        w = c.get(("wshub", "fanout"), {})
        add(
            f"Cost per delivery in the measured fan-out runs above (server utime + stime from `/proc/PID/stat` ÷ "
            f"deliveries, medians): **wshub {fmt(w.get('server_cpu_us_per_delivery'))} µs**, uWebSockets.js "
            f"{fmt(g('uws', 'fanout', 'server_cpu_us_per_delivery'))} µs, Node `ws` "
            f"{fmt(g('node-ws', 'fanout', 'server_cpu_us_per_delivery'))} µs.\n"
        )
        for tag in ("after", "before", "storm"):
            x = pr.get(tag, {})
            top = x.get("top")
            if not top or not top["samples"]:
                continue
            tot = top["samples"]
            add(
                f"**{tag}: {x.get('server')}**, top functions by own time (share of samples) and by inclusive "
                "time (Python and native frames):\n"
            )
            add("| own time | function | | inclusive | function |")
            add("| --- | --- | --- | --- | --- |")
            skip = (
                "<module>",
                "main (",
                "run (",
                "Runner.run",
                "_run_module",
                "_PyEval",
                "Py",
                "pymain",
                "__libc",
                "_start",
                "__pyx_f_6uvloop_4loop_4Loop__run",
                "uv_run",
                "uv__",
                "_run (",
                "Handle._run",
                "_PyObject",
                "cfunction",
                "method_vectorcall",
                "__pyx_pw",
                "__Pyx",
                "uvloop.loop",
                "0x",
                "Loop__",
                "run_forever",
                "run_until_complete",
                "loop_cb",
                "Handle__run",
                "task_step",
            )
            selfs = top["self"][:10]
            incl = [f for f in top["inclusive"] if not f[0].startswith(skip)][:10]
            for k in range(max(len(selfs), len(incl))):
                s1 = selfs[k] if k < len(selfs) else ("", 0)
                s2 = incl[k] if k < len(incl) else ("", 0)
                c1 = f"{100 * s1[1] / tot:.1f} % | `{s1[0]}`" if s1[0] else " | "
                c2 = f"{100 * s2[1] / tot:.1f} % | `{s2[0]}`" if s2[0] else " | "
                add(f"| {c1} | | {c2} |")
            add("")
    srcs = sorted({x["wshub_source"] for x in data["runs"] if x.get("wshub_source")})
    if len(srcs) > 1:
        add(
            f"**The server's code changed during this run** (the work tree is shared): the wshub measurements ran on "
            f"{len(srcs)} states of `src/wshub` ({', '.join(f'`{x}`' for x in srcs)}); each run's state is in the JSON.\n"
        )
    if NOTES.exists():
        add(NOTES.read_text().rstrip() + "\n")
    return "\n".join(L) + "\n"


def chart(data: dict, path: Path = CHART) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(data)
    c = summ["cells"]
    names = data["servers"]
    colors = {
        "wshub": "#2b6cb0",
        "node-ws": "#a0aec0",
        "uws": "#dd6b20",
        "wshub-transport": "#90cdf4",
        "wshub-nohistory": "#4299e1",
        "wshub-base": "#a0aec0",
        "wshub-base-nohistory": "#cbd5e0",
    }
    scen = [
        ("fanout", "fan-out\n(closed loop, 32 in flight)"),
        ("latency", "latency\n(1 sender, 50 msg/s)"),
        ("chat", "chat\n(100 × 10 msg/s)"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / len(names)
    for ax, key, title, unit in (
        (axes[0], "deliveries_per_s", "deliveries per second (log scale)", ""),
        (axes[1], "latency_ms_p99", "p99 latency, ms (log scale)", " ms"),
    ):
        for j, s in enumerate(names):
            vals = [(c.get((s, k)) or {}).get(key) or 0 for k, _ in scen]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(scen))]
            bars = ax.bar(
                xs, vals, width, label=SERVERS[s][0].replace("`", ""), color=colors.get(s)
            )
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(
                        fmt(v),
                        (b.get_x() + b.get_width() / 2, v),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_yscale("log")
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels([t for _, t in scen], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if summ["ceiling"]:
        axes[0].axhline(summ["ceiling"], color="red", linestyle="--", linewidth=0.8)
        axes[0].annotate(
            "generator ceiling: frames per CPU-second (flood)",
            (-0.4, summ["ceiling"] * 1.08),
            fontsize=7,
            color="red",
        )
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"wshub vs Node ws vs uWebSockets.js — medians of {data['args']['runs']} runs, "
        f"{data['machine']['nproc']} cores, server core 0, generator core 1",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--servers", default=",".join(s for s in SERVERS if not s.startswith("wshub-base")), help="comma-separated: " + ",".join(SERVERS)
    )
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per scenario (8)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--idle-connections", type=int, default=10000)
    ap.add_argument(
        "--idle-open-deadline",
        type=float,
        default=60.0,
        help="idle: open no new connection after this many seconds (60)",
    )
    ap.add_argument("--profile-seconds", type=float, default=8.0)
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--client-core", default="1")
    ap.add_argument(
        "--wait-load", type=float, default=1.5, help="wait for the 1-minute load average below this"
    )
    ap.add_argument("--wait-max", type=float, default=900.0, help="but at most this many seconds")
    ap.add_argument(
        "--engine",
        choices=("native", "python"),
        default="native",
        help="generator engine for the ceiling, fanout, latency and cluster runs (native); "
        "chat and idle always use the Python engine",
    )
    ap.add_argument(
        "--reader",
        choices=("full", "peek"),
        default="full",
        help="full (default): the reading client (native engine, every frame read and its JSON "
        "parsed; chat natively too; no flood ceiling, generator-bound runs flagged); peek: the "
        "header-peeking generator of the earlier runs",
    )
    ap.add_argument(
        "--content-size", type=int, default=100, help="content bytes per message (100)"
    )
    ap.add_argument(
        "--no-realtime",
        action="store_true",
        help="latency: do not run the server and the generator under SCHED_FIFO "
        "(chrt -f 10, used when allowed)",
    )
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="1 run, 3 s measured, no waiting: to try the script"
    )
    ap.add_argument(
        "--render-only", action="store_true", help="rewrite the doc and chart from the saved JSON"
    )
    ap.add_argument(
        "--results", default=str(RESULTS), help="where the JSON goes (and --render-only reads)"
    )
    ap.add_argument("--doc", default=str(DOC))
    a = ap.parse_args()
    if a.render_only:
        data = json.loads(Path(a.results).read_text())
        ensure_tools(True, False)
        chart(data, chart_path(a.doc))
        Path(a.doc).write_text(render(data, chart_path(a.doc)))
        log(f"wrote {a.doc} and {chart_path(a.doc)}")
        return 0
    if a.quick:
        a.runs, a.duration, a.warmup, a.wait_max, a.profile_seconds = 1, 3.0, 1.0, 0.0, 3.0
        a.idle_open_deadline = min(a.idle_open_deadline, 30.0)
    names = [n.strip() for n in a.servers.split(",") if n.strip()]
    scens = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    for n in names:
        if n not in SERVERS:
            ap.error(f"unknown server {n!r}; known: {', '.join(SERVERS)}")
    for s in scens:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    ensure_tools(True, not a.no_profile)
    if a.engine == "native":
        ensure_native()
    a.realtime_ok = not a.no_realtime and "latency" in scens and realtime_allowed()
    if "latency" in scens:
        log(
            "latency: server and generator under SCHED_FIFO (chrt -f 10)"
            if a.realtime_ok
            else "latency: SCHED_FIFO not used (--no-realtime, or chrt -f not allowed here)"
        )

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    data: dict = {"args": vars(a), "servers": names, "scenarios": scens, "runs": [], "ceiling": []}
    try:
        data["quiet"] = wait_for_quiet(a.wait_load, a.wait_max)
        data["started"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
        data["machine"] = machine()
        log(json.dumps(data["machine"]))
        t0 = time.monotonic()
        if not a.no_ceiling and a.reader == "peek":  # the flood ceiling is the peek reader's
            data["ceiling"] = measure_ceiling(a, a.runs)
        for r in range(a.runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for srv in order:
                for scen in scens:
                    if scen not in ONLY.get(srv, SCENARIOS):
                        continue
                    rec = run_one(srv, scen, a, r + 1)
                    log(f"run {r + 1} {srv:8} {scen:8} {short(rec)}")
                    data["runs"].append(rec)
                    time.sleep(1.0)
        if not a.no_cluster and "wshub" in names:
            data["cluster"] = run_cluster(a, a.runs)
        if not a.no_profile and "wshub" in names:
            data["profile"] = profile(a)
        data["elapsed_s"] = round(time.monotonic() - t0)
        data["quiet"]["load_at_end"] = loadavg()
        data["quiet"]["pressure_at_end"] = pressure()
    except KeyboardInterrupt:
        log("interrupted: stopping the servers")
        return 130
    finally:
        for p in list(_children):
            stop(p, signal.SIGKILL if p.poll() is None else signal.SIGTERM)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(data, indent=1, default=str))
    chart(data, chart_path(a.doc))
    Path(a.doc).write_text(render(data, chart_path(a.doc)))
    log(f"wrote {a.results}, {a.doc} and {chart_path(a.doc)} in {data['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
