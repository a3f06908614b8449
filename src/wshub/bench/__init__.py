"""``wshub bench``: a load generator for WebSocket relay servers.

Scenarios: ``fanout`` (closed loop, one sender), ``rate`` (one sender at a fixed
rate), ``chat`` (every connection sends at a fixed rate), ``idle`` (held
connections, server memory) and ``sink`` (count only; for the ceiling server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .runner import SCENARIOS, Config, run

__all__ = ["main", "build_parser"]

DEFAULTS = {
    # scenario: (connections, rate)
    "fanout": (1000, 0.0),
    "rate": (1000, 50.0),
    "chat": (100, 10.0),
    "idle": (10000, 0.0),
    "sink": (100, 0.0),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wshub bench",
        description="Load generator for wshub and for minimal relay servers.",
    )
    p.add_argument("scenario", choices=sorted(SCENARIOS), help="what to run")
    p.add_argument("--url", default="ws://127.0.0.1:8787/websocket", help="server URL (ws:// only)")
    p.add_argument(
        "--protocol",
        choices=("wshub", "raw"),
        default="wshub",
        help="wshub: JSON messages of the wshub protocol; raw: any text frame is relayed verbatim",
    )
    p.add_argument("-n", "--connections", type=int, help="connections (fanout 1000, rate 1000, chat 100, idle 10000)")
    p.add_argument("--inflight", type=int, default=32, help="fanout: messages in flight, released by the slowest recipient")
    p.add_argument("--rate", type=float, help="rate: messages/s of the one sender (50); chat: per connection (10)")
    p.add_argument("--size", type=int, default=100, help="content bytes per message (default 100)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (idle: seconds held)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument(
        "--source-ips",
        type=int,
        default=0,
        help="bind source addresses 127.0.0.1..127.0.0.K round-robin (default: one per 200 connections)",
    )
    p.add_argument("--connect-concurrency", type=int, default=64, help="handshakes in progress at once")
    p.add_argument("--connect-timeout", type=float, default=15.0)
    p.add_argument("--probes", type=int, default=32, help="connections that parse every frame for latency")
    p.add_argument("--server-pid", type=int, help="read the server's RSS and CPU time from /proc")
    p.add_argument("--settle", type=float, default=30.0, help="idle: wait at most this long for the server to go quiet")
    p.add_argument("--keepalive", type=float, default=20.0, help="seconds between unsolicited Pongs (0: never)")
    p.add_argument(
        "--nap-us",
        type=int,
        default=0,
        help="fanout: block the loop this many µs each ms so reads take several frames (fewer syscalls)",
    )
    p.add_argument("--progress", action="store_true", help="progress line on stderr even when it is not a terminal")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p


def format_table(res: dict) -> str:
    rows = []
    for k, v in res.items():
        if isinstance(v, float):
            v = f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1e5 else f"{v:,.0f}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        elif isinstance(v, list):
            v = "; ".join(map(str, v))
        rows.append((k, str(v)))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n_def, r_def = DEFAULTS[args.scenario]
    try:
        cfg = Config(
            scenario=args.scenario,
            url=args.url,
            protocol=args.protocol,
            connections=args.connections if args.connections is not None else n_def,
            inflight=args.inflight,
            rate=args.rate if args.rate is not None else r_def,
            size=args.size,
            duration=args.duration,
            warmup=args.warmup,
            source_ips=args.source_ips,
            connect_concurrency=args.connect_concurrency,
            connect_timeout=args.connect_timeout,
            probes=args.probes,
            server_pid=args.server_pid,
            settle=args.settle,
            keepalive=args.keepalive,
            nap_us=args.nap_us,
            progress=args.progress,
            json=args.json,
        )
    except ValueError as e:
        print(f"wshub bench: {e}", file=sys.stderr)
        return 2
    if cfg.scenario in ("rate", "chat") and cfg.rate <= 0:
        print("wshub bench: --rate must be positive", file=sys.stderr)
        return 2
    if cfg.connections < 1 or cfg.inflight < 1 or cfg.duration <= 0 or cfg.warmup < 0:
        print("wshub bench: --connections, --inflight, --duration must be positive", file=sys.stderr)
        return 2
    if args.no_uvloop:
        runner = asyncio.run
    else:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
    try:
        res = runner(run(cfg))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a failed run still says why
        print(f"wshub bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table(res))
    ok = res.get("connections_open", 0) > 0 and not res.get("closed_early")
    return 0 if ok else 1
