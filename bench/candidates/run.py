#!/usr/bin/env python3
"""Compare the candidate WebSocket layers in one run: fan-out and idle memory.

For each run (3 by default) and each server (in a rotated order, so no server is
always first on a noisy machine): start the server pinned to core 0, run
``wshub bench fanout`` pinned to core 1, stop it; start a fresh one, run
``wshub bench idle`` with its pid, stop it. Then print and write the medians.

    .venv/bin/python bench/candidates/run.py            # everything, ~8 minutes
    .venv/bin/python bench/candidates/run.py --runs 1 --servers picows,uws

Writes bench/results/ws-layer.json (every run) and bench/results/ws-layer.md
(the medians table and the machine). Every step has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "bench"))
import shared  # noqa: E402  (bench/shared.py)

NODE_DIR = ROOT / "bench" / "servers"
PY = sys.executable

SERVERS = {
    "websockets": (
        "websockets 17.4 (`broadcast()`), uvloop",
        [PY, str(HERE / "websockets_relay.py")],
    ),
    "aiohttp": ("aiohttp 3.14, uvloop", [PY, str(HERE / "aiohttp_relay.py")]),
    "picows": ("picows 2.3, uvloop", [PY, str(HERE / "picows_relay.py")]),
    "node-ws": ("Node `ws` 8.23", ["node", str(NODE_DIR / "ws_relay.js")]),
    "uws": (
        "uWebSockets.js (npm `uwebsockets@3.0.6`, pub/sub)",
        ["node", str(NODE_DIR / "uws_relay.js")],
    ),
}


def pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().split("\n")[0]
    except OSError:
        return ""


class Server:
    def __init__(self, name: str, port: int, core: str) -> None:
        self.name = name
        self.cmd = ["taskset", "-c", core, *SERVERS[name][1], str(port)]
        self.port = port

    def __enter__(self) -> "Server":
        self.log = open(f"/tmp/wshub-bench-{self.name}.log", "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        shared.wait_port(self.port, timeout=15.0)
        time.sleep(0.5)  # let the process settle before the RSS baseline
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def bench(args: list[str], core: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = ["taskset", "-c", core, PY, "-m", "wshub.bench", *args, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"error": (p.stderr or p.stdout)[-500:], "rc": p.returncode}


def machine() -> dict:
    return {
        **shared.basics(),
        "websockets": shared.python_package(PY, "websockets"),
        "aiohttp": shared.python_package(PY, "aiohttp"),
        "picows": shared.python_package(PY, "picows"),
        "uvloop": shared.python_package(PY, "uvloop"),
        "ws": shared.npm_package("ws"),
        "uwebsockets": shared.npm_package("uwebsockets"),
    }


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def fmt(v, unit=""):
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M{unit}"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k{unit}"
    if v >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.2f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--fanout-connections", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--idle-connections", type=int, default=10000)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--port", type=int, default=9400)
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--client-core", default="1")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    names = [n.strip() for n in a.servers.split(",") if n.strip()]
    for n in names:
        if n not in SERVERS:
            ap.error(f"unknown server {n!r}; known: {', '.join(SERVERS)}")
    if any(SERVERS[n][1][0] == "node" for n in names) and not (NODE_DIR / "node_modules").exists():
        if not shutil.which("npm"):
            print("npm not found: install Node 20 + npm, or leave out node-ws,uws", file=sys.stderr)
            return 2
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300
        )

    info = machine()
    print(json.dumps(info), file=sys.stderr)
    results: list[dict] = []
    url = f"ws://127.0.0.1:{a.port}/websocket"
    for r in range(a.runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            for scen in ("fanout", "idle"):
                rec = {"run": r + 1, "server": n, "scenario": scen, "pressure_before": pressure()}
                try:
                    with Server(n, a.port, a.server_core) as srv:
                        if scen == "fanout":
                            args = [
                                "fanout",
                                "--protocol",
                                "raw",
                                "--url",
                                url,
                                "-n",
                                str(a.fanout_connections),
                                "--inflight",
                                str(a.inflight),
                                "--duration",
                                str(a.duration),
                                "--warmup",
                                str(a.warmup),
                                "--server-pid",
                                str(srv.proc.pid),
                            ]
                            timeout = a.duration + a.warmup + 120
                        else:
                            args = [
                                "idle",
                                "--protocol",
                                "raw",
                                "--url",
                                url,
                                "-n",
                                str(a.idle_connections),
                                "--duration",
                                "5",
                                "--settle",
                                "10",
                                "--server-pid",
                                str(srv.proc.pid),
                            ]
                            timeout = 240
                        rec["result"] = bench(args, a.client_core, timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    rec["result"] = {"error": str(e)}
                rec["pressure_after"] = pressure()
                res = rec["result"]
                if scen == "fanout":
                    short = (
                        f"{res.get('deliveries_per_s')} deliveries/s  server cpu {res.get('server_cpu')}  "
                        f"gen cpu {res.get('generator_cpu')}"
                    )
                else:
                    short = f"{res.get('rss_per_connection_kib')} KiB/conn  held {res.get('connections_held')}"
                print(
                    f"run {r + 1} {n:10} {scen:6} {short}  {res.get('error', '')}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(rec)
                time.sleep(1.0)

    # medians
    rows = {}
    for n in names:
        fo = [x["result"] for x in results if x["server"] == n and x["scenario"] == "fanout"]
        idl = [x["result"] for x in results if x["server"] == n and x["scenario"] == "idle"]
        rows[n] = {
            "deliveries_per_s": med([x.get("deliveries_per_s") for x in fo]),
            "server_cpu_us_per_delivery": med([x.get("server_cpu_us_per_delivery") for x in fo]),
            "server_cpu": med([x.get("server_cpu") for x in fo]),
            "generator_cpu": med([x.get("generator_cpu") for x in fo]),
            "latency_ms_p99": med([x.get("latency_ms_p99") for x in fo]),
            "rss_per_connection_kib": med([x.get("rss_per_connection_kib") for x in idl]),
            "runs": [x.get("deliveries_per_s") for x in fo],
            "rss_runs": [x.get("rss_per_connection_kib") for x in idl],
        }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ws-layer.json").write_text(
        json.dumps({"machine": info, "args": vars(a), "medians": rows, "runs": results}, indent=1)
    )

    ref_uws = rows.get("uws", {}).get("deliveries_per_s")
    ref_ws = rows.get("node-ws", {}).get("deliveries_per_s")
    lines = [
        f"Machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}; Python {info['python']}, "
        f"Node {info['node']}; websockets {info['websockets']}, aiohttp {info['aiohttp']}, picows {info['picows']}, "
        f"uvloop {info['uvloop']}, ws {info['ws']}, uwebsockets {info['uwebsockets']}.",
        "",
        f"Fan-out: {a.fanout_connections} connections, one sender, {a.inflight} in flight, "
        f"{a.duration:g} s measured after {a.warmup:g} s; idle: {a.idle_connections} connections. "
        f"Medians of {a.runs} runs; server on core {a.server_core}, load generator on core {a.client_core}.",
        "",
        "| server | fan-out deliveries/s | runs | server CPU µs/delivery | server CPU | generator CPU | p99 (closed loop) | idle RSS/conn | × uWS | × Node ws |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in names:
        x = rows[n]
        d = x["deliveries_per_s"]
        runs = " / ".join(fmt(v) for v in x["runs"])
        lines.append(
            f"| {SERVERS[n][0]} | {fmt(d)} | {runs} | {fmt(x['server_cpu_us_per_delivery'])} | "
            f"{fmt(x['server_cpu'])} | {fmt(x['generator_cpu'])} | {fmt(x['latency_ms_p99'], ' ms')} | "
            f"{fmt(x['rss_per_connection_kib'], ' KiB')} | "
            f"{d / ref_uws:.3f} |"
            if d and ref_uws
            else f"| {SERVERS[n][0]} | {fmt(d)} | {runs} | – | – | – | – | – | – |"
        )
        if d and ref_uws:
            lines[-1] += f" {d / ref_ws:.2f} |" if ref_ws else " – |"
    md = "\n".join(lines) + "\n"
    (out / "ws-layer.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
