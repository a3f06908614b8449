"""``wshub client`` shows offsets and, with ``--recover``, reconnects with
since/previous (decisions.md 13): against real servers, the real client."""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Callable

from .conftest import TIMEOUT, RedisServer, Server, free_port, start_server
from .test_client import Piped, run_script

OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")
_names = itertools.count()


def first_json(client: Piped) -> dict:
    """The client's first line: a process starting on a busy machine may take
    longer than one TIMEOUT to get there."""
    line = client.lines.get(timeout=TIMEOUT * 4)
    assert line is not None, f"client exited: {''.join(client.stderr)}"
    return json.loads(line)


def test_offsets_are_shown(make_server: Callable[..., Server]) -> None:
    srv = make_server(*OPEN)
    result = run_script(f"{srv.ws_url}/shown", ["/broadcast hi", "/broadcast there"])
    assert result.returncode == 0, result.stderr
    assert "history " in result.stdout and "at #0" in result.stdout  # the welcome's position
    assert "#1 you [broadcast]: hi" in result.stdout
    assert "#2 you [broadcast]: there" in result.stdout


def test_recover_after_the_node_was_killed(redis_server: RedisServer) -> None:
    """The client's node is killed (SIGKILL) and comes back on the same
    port; meanwhile the room goes on on the other node. The client reconnects
    by itself with since and previous and gets exactly what it missed,
    replayed, then live traffic."""
    port = free_port()
    args = [*OPEN, "--redis-url", redis_server.url, "--cluster-name", f"cr{next(_names)}"]
    args += ["--node-ttl", "1"]
    a = start_server(*args, "--port", str(port))
    b = start_server(*args)
    room = "kept"
    client = Piped(f"ws://127.0.0.1:{port}/websocket/{room}", "--recover", "--json")
    try:
        welcome = first_json(client)
        sender = b.client(room)
        sender.send({"type": "message", "content": "m1"})
        assert client.next_of("message")["offset"] == 1
        a.stop(signal.SIGKILL)
        for i in (2, 3):
            sender.send({"type": "message", "content": f"m{i}"})
        sender.roundtrip()
        a = start_server(*args, "--port", str(port))
        again = client.next_of("welcome")
        assert again["recovered"] is True and again["missed"] == 2
        assert again["epoch"] == welcome["epoch"]
        replayed = [client.next_of("message") for _ in range(2)]
        assert [(m["offset"], m["content"], m.get("replayed")) for m in replayed] == [
            (2, "m2", True),
            (3, "m3", True),
        ]
        sender.send({"type": "message", "content": "m4"})
        live = client.next_of("message")
        assert (live["offset"], live["content"], "replayed" in live) == (4, "m4", False)
        reconnecting = [line for line in client.stderr if "reconnecting" in line]
        assert reconnecting and f"since={welcome['epoch']}:1" in reconnecting[-1]
        assert f"previous={welcome['connectionId']}" in reconnecting[-1]
        assert client.finish() == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
        for srv in (a, b):
            srv.stop()


def test_no_reconnect_without_recover(make_server: Callable[..., Server]) -> None:
    srv = make_server(*OPEN)
    client = Piped(f"{srv.ws_url}/gone", "--json")
    assert first_json(client)["type"] == "welcome"
    srv.stop(signal.SIGKILL)
    assert client.finish() == 1
    assert not [line for line in client.stderr if "reconnecting" in line]
