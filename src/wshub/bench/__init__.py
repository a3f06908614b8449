"""``wshub bench``: a load generator for WebSocket relay servers.

Scenarios: ``fanout`` (closed loop, one sender), ``rate`` (one sender at a fixed
rate), ``chat`` (every connection sends at a fixed rate), ``idle`` (held
connections, server memory) and ``sink`` (count only; for the ceiling server).
Several ``--url`` spread the connections over the nodes of a cluster.
See ``wshub bench --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ..client import add_tls_arguments
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


SCENARIO_HELP = """\
scenarios:
  fanout  Closed-loop fan-out: N connections (default 1000); connection 0 sends,
          every other one receives. The sender keeps --inflight messages (32)
          ahead of the slowest recipient, so the server runs as fast as it can.
          Reports deliveries/s and, with --server-pid, server CPU µs per delivery.
  rate    Latency at a fixed rate: N connections (1000), one sender at --rate
          messages/s (50) to all the others. Reports latency p50/p90/p99/max
          from the send time carried in each message.
  chat    Everyone talks: N connections (100), each sending --rate messages/s (10)
          to all the others (N x rate x (N-1) deliveries/s offered). Reports
          whether the server sustained it or fell behind, and latency.
  idle    N connections (10000) opened and held for --duration seconds (with
          --rooms R, connection i in room r<i % R>), then one message in every
          room from one member of each. Reports how many were welcomed, the time
          to open them, with --server-pid the server's RSS per connection, the
          broadcast's p50/p99/max from send to receipt over every member, and
          the server's loop lag: wshub's wshub_event_loop_lag_seconds from
          /metrics, and for any server the round trip of a Ping on one more
          connection (PATH/loopwatch). The open-files limit is raised to the
          hard limit by the benchmark (it says when the hard limit is too low).
  sink    Only count what the server sends on its own (for bench/ceiling_server.py:
          the generator's own ceiling).

protocols:
  wshub   {"type":"message","content":...} as the wshub protocol wants; every
          connection also receives welcome/user_joined/user_left (not counted).
  raw     any text frame, relayed verbatim (the minimal comparison relays).

Every message carries the marker ~#, its send time and a sequence number in its
content (padded to --size bytes). Several --url spread the connections over
several servers (a cluster): round-robin, or with --placement sender-alone the
sender alone on the first URL and the recipients on the others.

examples:
  wshub bench fanout --url ws://127.0.0.1:8787/websocket --server-pid PID
  wshub bench rate --rate 50 -n 1000
  wshub bench chat -n 100 --rate 10
  wshub bench rate --url ws://127.0.0.1:8801/websocket --url ws://127.0.0.1:8802/websocket \\
      --placement sender-alone
  wshub bench idle -n 10000 --server-pid PID
  wshub bench idle -n 10000 --rooms 1000 --duration 60 --server-pid PID
  wshub bench fanout --engine native --url ws://127.0.0.1:8787/websocket --server-pid PID

--engine native (fanout, rate, chat, sink) is a C program compiled with the system's
cc on first use (cached in ~/.cache/wshub): same scenarios, same results, a fraction
of the CPU per frame. It answers server Pings. --reader peek (the default) counts a
data frame when the first bytes of its payload hold the marker; --reader full reads
every frame whole, parses its JSON and counts only message/broadcast envelopes whose
content is --content-size bytes, as a real client would (bench/run.py uses it).
--rooms N (fanout) spreads the connections over N rooms, PATH/r0 .. PATH/r<N-1>, one
sender and one closed loop per room.

  wshub bench fanout --engine native --reader full --rooms 100 --url ws://127.0.0.1:8787/websocket

Against wshub, raise its limits for a benchmark (the defaults rate-limit the
sender and cap connections per IP): wshub serve --message-rate 0
--ip-connect-rate 0 --max-connections-per-ip 0 --max-connections 20000.
Exit status: 0 when connections opened, none closed early and (fanout, rate,
chat) messages were delivered while measuring; 1 otherwise.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wshub bench",
        description="Load generator for wshub and for minimal relay servers: opens many "
        "WebSocket connections over 127.0.0.0/8 source addresses, runs one scenario, "
        "prints a table (or --json).",
        epilog=SCENARIO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenario",
        choices=sorted(SCENARIOS),
        metavar="SCENARIO",
        help="fanout, rate, chat, idle or sink (described below)",
    )
    g = p.add_argument_group("target")
    g.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="server URL (ws:// or wss://; default ws://127.0.0.1:8787/websocket); "
        "repeat for several servers",
    )
    g.add_argument(
        "--placement",
        choices=("round-robin", "sender-alone"),
        default="round-robin",
        help="with several --url: connections round-robin over them (the sender on the first), "
        "or the sender alone on the first and the rest on the others",
    )
    g.add_argument(
        "--protocol",
        choices=("wshub", "raw"),
        default="wshub",
        help="wshub: JSON messages of the wshub protocol; raw: any text frame is relayed verbatim",
    )
    g.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="read the server's RSS and CPU time from /proc "
        "(CPU per delivery; the server's RSS at the end of a python-engine run; "
        "memory per connection in idle)",
    )
    add_tls_arguments(p)  # --ca-file, --insecure: the same as wshub client's
    g = p.add_argument_group("load")
    g.add_argument(
        "-n",
        "--connections",
        type=int,
        metavar="N",
        help="connections (default: fanout 1000, rate 1000, chat 100, idle 10000, sink 100)",
    )
    g.add_argument(
        "--inflight",
        type=int,
        default=32,
        metavar="K",
        help="fanout: messages in flight, released by the slowest recipient (32)",
    )
    g.add_argument(
        "--rate",
        type=float,
        metavar="PER_S",
        help="rate: messages/s of the one sender (50); chat: per connection (10)",
    )
    g.add_argument(
        "--size", type=int, default=100, metavar="BYTES", help="content bytes per message (100)"
    )
    g.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="S",
        help="measured seconds (idle: seconds held) (10)",
    )
    g.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds of load before measuring (2)",
    )
    g = p.add_argument_group("connections")
    g.add_argument(
        "--source-ips",
        type=int,
        default=0,
        metavar="K",
        help="bind source addresses 127.0.0.1..127.0.0.K round-robin "
        "(default: one per 200 connections)",
    )
    g.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        metavar="N",
        help="handshakes in progress at once (64)",
    )
    g.add_argument(
        "--connect-timeout", type=float, default=15.0, metavar="S", help="per connection (15)"
    )
    g.add_argument(
        "--open-deadline",
        type=float,
        default=0.0,
        metavar="S",
        help="start no new connection after S seconds and go on with those open (0: no deadline)",
    )
    g.add_argument(
        "--probes",
        type=int,
        default=32,
        metavar="N",
        help="connections that also read send times for latency (32, spread evenly)",
    )
    g.add_argument(
        "--settle",
        type=float,
        default=30.0,
        metavar="S",
        help="idle: wait at most this long for the server to go quiet (30)",
    )
    g.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds between unsolicited Pongs from counting connections (0: never) (20)",
    )
    g.add_argument(
        "--nap-us",
        type=int,
        default=0,
        metavar="US",
        help="fanout: block the loop this many µs each ms so reads take several frames "
        "(fewer syscalls)",
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "--engine",
        choices=("python", "native"),
        default="python",
        help="python: asyncio/uvloop (every scenario); native: a C program built on first use "
        "with the system's cc (fanout, rate, chat and sink; see --reader; costs far less "
        "CPU per frame, so the generator is not the bottleneck)",
    )
    g = p.add_argument_group("reading and rooms (--engine native)")
    g.add_argument(
        "--reader",
        choices=("peek", "full"),
        default="peek",
        help="peek: count a data frame when the first bytes of its payload hold the marker; "
        "full: read every frame whole as a client would, parse its JSON, count only "
        "message/broadcast envelopes whose content is --content-size bytes (the same "
        "envelope is sent to raw relays, which relay it verbatim)",
    )
    g.add_argument(
        "--content-size",
        type=int,
        dest="size",
        metavar="BYTES",
        help="content bytes per message (100); the same as --size",
    )
    g.add_argument(
        "--rooms",
        type=int,
        default=0,
        metavar="N",
        help="fanout (native) and idle: spread the connections over N rooms (connection i in "
        "room r<i %% N>, path URL_PATH/r<i %% N>), the first connection of each room its sender",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--progress",
        action="store_true",
        help="progress line on stderr even when it is not a terminal",
    )
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return "; ".join(map(str, v))
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items())
    return "–" if v is None else str(v)


def _headline(res: dict) -> list[str]:
    out = []
    d = res.get("deliveries_per_s")
    if d is not None:
        line = f"deliveries/s {d:,.0f}"
        if "offered_deliveries_per_s" in res:
            line += f" of {res['offered_deliveries_per_s']:,.0f} offered"
            line += " (FELL BEHIND)" if res.get("fell_behind") else " (sustained)"
        if "server_cpu_us_per_delivery" in res:
            line += f"; server CPU {res['server_cpu_us_per_delivery']} µs per delivery"
        out.append(line)
    if res.get("latency_samples"):
        out.append(
            "latency ms p50 {} / p90 {} / p99 {} / max {} ({} samples)".format(
                res["latency_ms_p50"],
                res["latency_ms_p90"],
                res["latency_ms_p99"],
                res["latency_ms_max"],
                res["latency_samples"],
            )
        )
    if "server_rss_kib" in res and "rss_per_connection_kib" not in res:
        out.append(f"server RSS {res['server_rss_kib'] / 1024:,.1f} MiB at the end of the run")
    if "rss_per_connection_kib" in res:
        out.append(
            f"server RSS per connection {res['rss_per_connection_kib']} KiB "
            f"({res.get('connections_held')} connections held)"
        )
    if "generator_cpu" in res:
        out.append(
            f"CPU used: generator {res['generator_cpu']}, "
            f"server {res.get('server_cpu', '–')} (cores)"
        )
    return out


def format_table(res: dict) -> str:
    rows = []
    for k, v in res.items():
        if k == "latency_by_url":
            for url, summ in v.items():
                rows.append(
                    (
                        f"latency {url}",
                        "p50 {} / p99 {} ms ({} samples)".format(
                            summ.get("latency_ms_p50", "–"),
                            summ.get("latency_ms_p99", "–"),
                            summ.get("latency_samples", 0),
                        ),
                    )
                )
            continue
        rows.append((k.replace("_", " "), _fmt_value(v)))
    w = max(len(k) for k, _ in rows)
    head = _headline(res)
    sep = "-" * max(40, w + 20)
    body = "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)
    return (
        (f"{res.get('scenario', '')}: " + "\n  ".join(head) + "\n" + sep + "\n" + body)
        if head
        else body
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n_def, r_def = DEFAULTS[args.scenario]
    try:
        cfg = Config(
            scenario=args.scenario,
            url=(args.url or ["ws://127.0.0.1:8787/websocket"])[0],
            urls=args.url or [],
            placement=args.placement,
            open_deadline=args.open_deadline,
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
            ca_file=args.ca_file or "",
            insecure=args.insecure,
            reader=args.reader,
            rooms=args.rooms,
        )
    except ValueError as e:
        print(f"wshub bench: {e}", file=sys.stderr)
        return 2
    if cfg.scenario in ("rate", "chat") and cfg.rate <= 0:
        print("wshub bench: --rate must be positive", file=sys.stderr)
        return 2
    if cfg.connections < 1 or cfg.inflight < 1 or cfg.duration <= 0 or cfg.warmup < 0:
        print(
            "wshub bench: --connections, --inflight, --duration must be positive", file=sys.stderr
        )
        return 2
    if args.engine != "native" and (
        args.reader != "peek" or (args.rooms and cfg.scenario != "idle")
    ):
        print(
            "wshub bench: --reader full, and --rooms for fanout, need --engine native",
            file=sys.stderr,
        )
        return 2
    if args.rooms < 0 or (args.rooms and cfg.scenario not in ("fanout", "idle")):
        print(
            "wshub bench: --rooms N (N > 0) is for the fanout and idle scenarios", file=sys.stderr
        )
        return 2
    if args.reader == "full" and cfg.size < 48:
        print("wshub bench: --reader full needs --content-size of at least 48", file=sys.stderr)
        return 2
    if args.engine == "native":
        from . import native

        if cfg.tls is not None:
            print("wshub bench: --engine native speaks ws:// only", file=sys.stderr)
            return 2
        if cfg.scenario not in native.SCENARIOS:
            print(
                f"wshub bench: --engine native runs {', '.join(native.SCENARIOS)}; "
                f"use --engine python for {cfg.scenario}",
                file=sys.stderr,
            )
            return 2

        def execute() -> dict:
            return native.run(cfg)
    else:
        runner = asyncio.run
        if not args.no_uvloop:
            try:
                import uvloop

                runner = uvloop.run
            except ImportError:
                pass

        def execute() -> dict:
            return runner(run(cfg))

    try:
        res = execute()
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a failed run still says why
        print(f"wshub bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return _report(res, args.json)


def _report(res: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table(res))
    ok = res.get("connections_open", 0) > 0 and not res.get("closed_early")
    if ok and res.get("scenario") in ("fanout", "rate", "chat") and res.get("deliveries") == 0:
        # A sender closed with 1008 by the server's rate limit keeps its socket
        # until the run ends, so nothing counts it as closed early: say so,
        # rather than report 0 deliveries/s as a measurement.
        print(
            "wshub bench: no message was delivered while measuring; against wshub, raise "
            "its limits (wshub serve --message-rate 0 --ip-connect-rate 0 "
            "--max-connections-per-ip 0)",
            file=sys.stderr,
        )
        ok = False
    return 0 if ok else 1
