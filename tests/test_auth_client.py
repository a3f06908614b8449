"""``wshub client --token`` against a real ``wshub serve --auth``: the real
client process, the server's view through another real client."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable

import jwt

from .conftest import TIMEOUT, Server
from .test_auth_server import AUTH, NO_LIMITS, bearer, token
from .test_client import ID, Piped, run_script


def test_token_flag_gives_the_user_id(make_server: Callable[..., Server]) -> None:
    """The token goes as the subprotocol; the welcome and the peer's view of
    every frame carry the user id; /refresh is answered ``refreshed``."""
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    peer = srv.client(**bearer(token("bob")))
    later = token("alice", ttl=600)
    result = run_script(
        srv.ws_url,
        ["hello", "/broadcast all", f"/refresh {later}"],
        "--token", token("alice"), "--json", "--wait", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["type"] for f in frames] == ["welcome", "broadcast", "refreshed"], frames
    assert frames[0]["userId"] == "alice" and frames[1]["userId"] == "alice"
    exp = jwt.decode(later, options={"verify_signature": False})["exp"]
    assert frames[2]["expiresAt"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(exp)))
    assert peer.recv_type("user_joined")["userId"] == "alice"
    got = peer.recv_type("message")
    assert (got["userId"], got["content"]) == ("alice", "hello")
    assert peer.recv_type("broadcast")["userId"] == "alice"
    assert peer.recv_type("user_left")["userId"] == "alice"


def test_token_from_the_environment_and_readable_output(
    make_server: Callable[..., Server],
) -> None:
    """WSHUB_TOKEN (out of the process list) works like --token; the readable
    output names each sender by user id and connection id."""
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS)
    peer = srv.client(**bearer(token("bob")))
    env = {**os.environ, "WSHUB_TOKEN": token("alice")}
    client = Piped(srv.ws_url, env=env)
    try:
        line = next_line(client, "welcome")
        welcome = rf"welcome: you are {ID} \(alice\) \(2 online, history \w+ at #\d+\)"
        assert re.search(welcome, line), line
        assert peer.recv_type("user_joined")["userId"] == "alice"
        peer.send({"type": "broadcast", "content": "hi"})
        line = next_line(client, "[broadcast]")
        assert re.search(rf"^\d\d:\d\d:\d\d #1 bob \({peer.id}\) \[broadcast\]: hi$", line), line
    finally:
        assert client.finish() == 0, "".join(client.stderr)


def next_line(client: Piped, marker: str) -> str:
    while True:
        line = client.lines.get(timeout=TIMEOUT)
        assert line is not None, "".join(client.stderr)
        if marker in line:
            return line


def test_refused_token_exits_1_and_says_why(make_server: Callable[..., Server]) -> None:
    srv = make_server("--auth", "required", *AUTH, *NO_LIMITS, "--max-connections-per-user", "1")
    for bad, code in (("garbage", "4401"), (token("eve", ttl=-5), "4401 token expired")):
        result = run_script(srv.ws_url, ["hello"], "--token", bad, "--wait", "0")
        assert result.returncode == 1, result.stdout
        assert f"connection closed by the server: {code}" in result.stderr, result.stderr
        assert "get a new one" in result.stderr
        assert "welcome" not in result.stdout
    holder = srv.client(**bearer(token("alice")))
    result = run_script(srv.ws_url, ["hello"], "--token", token("alice"), "--json", "--wait", "0")
    assert result.returncode == 1
    assert json.loads(result.stdout.splitlines()[0])["code"] == "too_many_connections"
    assert "4429" in result.stderr and "close one first" in result.stderr
    holder.roundtrip()  # nothing reached the holder: its next frame is its pong
    for bad in ("", "two tokens", "a,b"):
        usage = run_script(srv.ws_url, [], "--token", bad)
        assert usage.returncode == 2 and "--token" in usage.stderr
