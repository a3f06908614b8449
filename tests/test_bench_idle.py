"""``wshub bench idle`` with rooms, against a real ``wshub serve``.

The scenario opens connections over several rooms, checks each is welcomed,
holds them, then sends one message in every room and measures it at every
member; it raises its own open-files limit. The checks hold the report to what
the server must have done: a room that leaked into another would deliver more
than the report's expected count, one that lost a member less.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from wshub.bench import main as bench_main

from .conftest import TIMEOUT

WSHUB_FLAGS = (
    "--message-rate",
    "0",
    "--ip-connect-rate",
    "0",
    "--max-connections-per-ip",
    "0",
    "--max-connections",
    "0",
    "--max-rooms",
    "0",
)


def _run_bench(args: list[str], capsys) -> tuple[int, dict]:
    rc = bench_main(["idle", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_idle_in_rooms_reports_every_member(make_server, capsys):
    srv = make_server(*WSHUB_FLAGS)
    rc, res = _run_bench(
        [
            "-n",
            "200",
            "--rooms",
            "20",
            "--duration",
            "1",
            "--settle",
            str(6 * TIMEOUT),
            "--source-ips",
            "4",
            "--url",
            srv.ws_url,
            "--server-pid",
            str(srv.proc.pid),
        ],
        capsys,
    )
    assert rc == 0, res
    assert res["rooms"] == 20
    assert res["connections_open"] == res["connections_welcomed"] == 200
    assert res["connections_held"] == 200 and res["closed_early"] == 0
    assert res["source_ips"] == 4
    # 20 rooms of 10: one sender each, nine recipients each, nothing more
    assert res["broadcast_rooms"] == 20
    assert res["broadcast_expected"] == 180
    assert res["broadcast_received"] == 180
    assert res["broadcast_missing"] == 0 and res["broadcast_extra"] == 0
    assert 0 < res["broadcast_ms_p50"] <= res["broadcast_ms_p99"] <= res["broadcast_ms_max"]
    assert res["broadcast_ms_max"] < 1000 * res["broadcast_s"] + 50
    # memory, and the server's loop lag seen from inside and from outside
    assert res["server_rss_after_kib"] > res["server_rss_before_kib"]
    assert 0 < res["rss_per_connection_kib"] < 64
    assert "event_loop_lag" not in res  # no error: /metrics answered
    assert 0 <= res["event_loop_lag_ms_hold_max"] < 1000
    assert res["ping_rtt_ms_hold_p50"] > 0 and "ping_rtt" not in res
    assert res["nofile_soft"] == res["nofile_hard"]
    # the server saw them all upgrade (and the ping probe's connection)
    assert srv.metric("wshub_connections_accepted_total") == 201


def _limited(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_raises_its_own_file_limit(make_server):
    # a soft limit of 128 could not hold 300 sockets: the benchmark raises it
    srv = make_server(*WSHUB_FLAGS)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = subprocess.run(
        [sys.executable, "-m", "wshub.bench", "idle", "-n", "300", "--rooms", "30"]
        + ["--duration", "0.5", "--url", srv.ws_url, "--json"],
        preexec_fn=lambda: _limited(128, hard),
        capture_output=True,
        text=True,
        timeout=30 * TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["nofile_soft"] == res["nofile_hard"] == hard
    assert res["connections_open"] == res["connections_welcomed"] == 300
    assert res["broadcast_received"] == res["broadcast_expected"] == 270


def test_idle_says_when_the_hard_limit_is_too_low(make_server):
    srv = make_server(*WSHUB_FLAGS)
    out = subprocess.run(
        [sys.executable, "-m", "wshub.bench", "idle", "-n", "200", "--rooms", "10"]
        + ["--duration", "0.5", "--settle", "1", "--url", srv.ws_url, "--json"],
        preexec_fn=lambda: _limited(100, 100),
        capture_output=True,
        text=True,
        timeout=30 * TIMEOUT,
    )
    res = json.loads(out.stdout)
    assert res["nofile_hard"] == 100
    assert "hard open-files limit (100) is below 200 connections" in res["nofile_too_low"]
    assert any("hard open-files limit" in e for e in res["errors"])
    # what could open did, and the report says how many failed
    assert 0 < res["connections_open"] < 100
    assert res["connect_failures"] == 200 - res["connections_open"]
