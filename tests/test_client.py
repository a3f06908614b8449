"""``wshub client``: the terminal client, run as a real process against a
real server, scripted (pipes) and interactive (a pseudo-terminal)."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from wshub.client import normalize_url, printable

from .conftest import TIMEOUT, Server

LOOSE = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0")
ID = r"ws-\d{13}-[a-z0-9]{9}"
CLIENT = [sys.executable, "-m", "wshub", "client"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def run_script(url: str, lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the client with *lines* on stdin; it must exit on its own."""
    return subprocess.run(
        [*CLIENT, url, *args],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )


class Piped:
    """The client with stdin held open, its output read line by line."""

    def __init__(self, url: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*CLIENT, url, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.pumps = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for pump in self.pumps:
            pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def next_json(self) -> dict:
        line = self.lines.get(timeout=TIMEOUT)
        assert line is not None, f"client exited: {''.join(self.stderr)}"
        return json.loads(line)

    def next_of(self, *types: str) -> dict:
        while (message := self.next_json())["type"] not in types:
            pass
        return message

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Close stdin; the exit status once the client has exited and all
        its output has been read."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            return self.proc.wait(timeout=TIMEOUT * 2)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for pump in self.pumps:
                pump.join(TIMEOUT)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


class Terminal:
    """The client on a pseudo-terminal, as a person would run it."""

    def __init__(self, url: str, *args: str) -> None:
        import pty  # POSIX only, like the rest of the suite's process handling

        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1"}
        self.proc = subprocess.Popen(
            [*CLIENT, url, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = ""
        self.pos = 0
        self.cond = threading.Condition()
        self.eof = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the client exited and closed the terminal
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.raw += data.decode("utf-8", "replace")
                self.cond.notify_all()

    def expect(self, pattern: str) -> re.Match[str]:
        """Wait for *pattern* in the output after the previous match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + TIMEOUT
        with self.cond:
            while True:
                clean = ANSI.sub("", self.raw)
                match = regex.search(clean, self.pos)
                if match:
                    self.pos = match.end()
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(f"no {pattern!r} in terminal output:\n{clean[self.pos :]}")
                self.cond.wait(left)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode() + b"\r")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT * 2)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


# -- Pure helpers ---------------------------------------------------------------


def test_normalize_url() -> None:
    assert normalize_url("127.0.0.1:8787") == "ws://127.0.0.1:8787/websocket"
    assert normalize_url("http://h:1") == "ws://h:1/websocket"
    assert normalize_url("http://h:1/") == "ws://h:1/websocket"
    assert normalize_url("https://h/", "r") == "wss://h/websocket/r"
    assert normalize_url("https://h/chat?x=1") == "wss://h/chat?x=1"
    assert normalize_url("ws://h:1/websocket") == "ws://h:1/websocket"
    assert normalize_url("h:1", "Lobby") == "ws://h:1/websocket/Lobby"
    assert normalize_url("ws://h:1/websocket?x=1", "a.b") == "ws://h:1/websocket/a.b?x=1"
    for bad in ("", "a b", "x" * 65, "%41"):
        with pytest.raises(ValueError):
            normalize_url("h:1", bad)
    with pytest.raises(ValueError):
        normalize_url("ws://h:1/chat", "lobby")


def test_printable_escapes_terminal_controls() -> None:
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("x\u202ey") == "x\\u202ey"
    assert printable("bell\x07 del\x7f c1\x9b") == "bell\\x07 del\\x7f c1\\x9b"
    assert printable("two\nlines") == "two\n    lines"
    assert printable("émoji 🎉 <b>") == "émoji 🎉 <b>"


# -- Scripted mode ----------------------------------------------------------------


def test_room_option_joins_the_room(make_server: Callable[..., Server]) -> None:
    """--room NAME talks in room NAME: a member there gets the message, the
    welcome says the room, a client in the default room gets nothing; a bad
    name is a usage error."""
    server = make_server(*LOOSE)
    member, outsider = server.client("lobby"), server.client()
    result = run_script(server.http_url, ["hello lobby"], "--room", "lobby", "--json")
    assert result.returncode == 0, result.stderr
    welcome = json.loads(result.stdout.splitlines()[0])
    assert welcome["type"] == "welcome" and welcome["room"] == "lobby"
    assert member.recv_type("message")["content"] == "hello lobby"
    outsider.roundtrip()  # its next frame is its own pong: nothing else came
    bad = run_script(server.http_url, [], "--room", "no spaces")
    assert bad.returncode == 2 and "room name" in bad.stderr
    member.close()
    outsider.close()


def test_scripted_json(make_server: Callable[..., Server]) -> None:
    """Lines and commands from stdin are sent; every answer is printed as one
    JSON line before the client exits 0; the end-of-input ping stays hidden."""
    server = make_server(*LOOSE)
    peer = server.client()
    result = run_script(
        server.ws_url,
        [
            "hello there",
            "",  # blank lines are skipped
            "/broadcast to all",
            "/info",
            "/ping",
            "x" * 1001,
            '/raw {"type":"nope"}',
            "/raw not json, plain text",
            "//starts with a slash",
        ],
        "--json",
        "--wait",
        "0",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    messages = [json.loads(line) for line in lines]
    assert [m["type"] for m in messages] == [
        "welcome",
        "broadcast",
        "user_info_response",
        "pong",
        "error",
        "error",
    ], lines
    me = messages[0]["connectionId"]
    assert re.fullmatch(ID, me)
    assert messages[0]["connectionCount"] == 2
    assert messages[1] == {**messages[1], "connectionId": me, "content": "to all"}
    assert messages[2]["connectionId"] == me and messages[2]["connectionCount"] == 2
    assert isinstance(messages[3]["timestamp"], int)
    assert [m["code"] for m in messages[4:]] == ["content_too_long", "unknown_type"]

    assert peer.recv_type("user_joined")["connectionId"] == me
    got = [peer.recv_type("message", "broadcast") for _ in range(4)]
    assert [(m["type"], m["content"]) for m in got] == [
        ("message", "hello there"),
        ("broadcast", "to all"),
        ("message", "not json, plain text"),
        ("message", "/starts with a slash"),
    ]
    assert all(m["connectionId"] == me for m in got)
    assert peer.recv_type("user_left")["connectionId"] == me


def test_scripted_raw_sends_lines_verbatim(make_server: Callable[..., Server]) -> None:
    server = make_server(*LOOSE)
    result = run_script(
        server.ws_url,
        [
            '{"type":"broadcast","content":"sent raw"}',
            "/info",  # not a command with --raw: plain text, relayed to nobody
            '{"type":"user_info"}',
        ],
        "--json",
        "--raw",
        "--wait",
        "0",
    )
    assert result.returncode == 0, result.stderr
    types = [json.loads(line)["type"] for line in result.stdout.splitlines()]
    assert types == ["welcome", "broadcast", "user_info_response"]
    assert server.stats()["messages"]["VALIDATED"] >= 3


def test_scripted_readable_output(make_server: Callable[..., Server]) -> None:
    server = make_server(*LOOSE)
    result = run_script(
        server.ws_url, ["/broadcast hi", "/info", "/ping", "", "x" * 1001], "--wait", "0"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    me = re.search(rf"welcome: you are ({ID}) \(1 online, history [0-9a-f]+ at #0\)", out)
    assert me, out
    assert re.search(r"^\d\d:\d\d:\d\d #1 you \[broadcast\]: hi$", out, re.M), out
    assert re.search(rf"user info: you are {me.group(1)}, 1 online", out), out
    assert re.search(r"^pong: round trip \d+\.\d ms$", out, re.M), out
    assert re.search(r"error \(content_too_long\): Message too long", out), out


def test_scripted_prints_incoming_and_answers_server_ping(
    make_server: Callable[..., Server],
) -> None:
    """While stdin stays open, messages from others are printed as they come,
    and the server's JSON ping is answered with a pong."""
    server = make_server(*LOOSE, "--heartbeat-interval", "0.2")
    client = Piped(server.ws_url, "--json")
    try:
        me = client.next_of("welcome")["connectionId"]
        peer = server.client()
        assert client.next_of("user_joined")["connectionId"] == peer.id
        peer.send({"type": "message", "content": "for the script"})
        got = client.next_of("message")
        assert got["content"] == "for the script" and got["connectionId"] == peer.id
        # The peer sent one data message and will send nothing more: any other
        # incoming message is the client's answer to the server's ping.
        client.next_of("ping")
        server.wait_for(lambda: server.stats()["messages"]["INCOMING"] > 1, "a JSON pong")
        client.send("/broadcast done")
        assert client.next_of("broadcast")["connectionId"] == me
        assert client.finish() == 0
    finally:
        client.finish()


def test_connection_failures_exit_non_zero(make_server: Callable[..., Server]) -> None:
    server = make_server("--max-connections-per-ip", "1")
    holder = server.client()  # the one connection this address may have

    refused = run_script(server.ws_url, ["hello"], "--json")
    assert refused.returncode == 1
    assert "429" in refused.stderr and refused.stdout == ""

    not_found = run_script(server.http_url + "/elsewhere", [], "--json")
    assert not_found.returncode == 1 and "404" in not_found.stderr

    holder.close()
    server.stop()
    gone = run_script(server.ws_url, ["hello"], "--json", "--timeout", str(TIMEOUT))
    assert gone.returncode == 1 and "cannot connect" in gone.stderr

    bad = run_script(server.ws_url, [], "--header", "no colon")
    assert bad.returncode == 2


def test_server_closing_exits_non_zero(make_server: Callable[..., Server]) -> None:
    server = make_server(*LOOSE)
    client = Piped(server.ws_url, "--json")
    try:
        client.next_of("welcome")
        server.stop()
        assert client.finish() == 1
        assert "connection closed by the server: 1001 server shutting down" in "".join(
            client.stderr
        )
    finally:
        client.finish()


# -- Interactive mode -------------------------------------------------------------


def test_interactive_session(make_server: Callable[..., Server]) -> None:
    server = make_server(*LOOSE)
    peer = server.client()
    term = Terminal(server.ws_url)
    try:
        me = term.expect(rf"welcome: you are ({ID}) \(2 online, history \w+ at #0\)").group(1)
        assert peer.recv_type("user_joined")["connectionId"] == me
        term.expect(r"> ")

        term.type("hello from a terminal")
        got = peer.recv_type("message")
        assert (got["connectionId"], got["content"]) == (me, "hello from a terminal")

        peer.send({"type": "message", "content": "hi, terminal"})
        term.expect(rf"\d\d:\d\d:\d\d #2 {peer.id}: hi, terminal")

        term.type("/broadcast to everyone")
        term.expect(r"\d\d:\d\d:\d\d #3 you \[broadcast\]: to everyone")
        assert peer.recv_type("broadcast")["content"] == "to everyone"

        term.type("/info")
        term.expect(rf"user info: you are {me}, 2 online")
        term.type("/ping")
        term.expect(r"pong: round trip \d+\.\d ms")
        term.type("/nonsense")
        term.expect(r"unknown command /nonsense \(try /help\)")
        term.type("/help")
        term.expect(r"/quit +close the connection")

        # Text that would drive the terminal is shown escaped, not obeyed.
        peer.send({"type": "message", "content": "clear\x1b[2J\u202eevil"})
        term.expect(r"clear\\x1b\[2J\\u202eevil")
        assert "\x1b[2J" not in term.raw and "\u202e" not in term.raw

        third = server.client()
        term.expect(rf"{third.id} joined \(3 online\)")
        third.close()
        term.expect(rf"{third.id} left \(2 online\)")

        term.type("/quit")
        assert term.wait() == 0
        while (left := peer.recv_type("user_left"))["connectionId"] != me:
            assert left["connectionId"] == third.id
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_interactive_end_of_input_and_server_close(make_server: Callable[..., Server]) -> None:
    """Ctrl-D ends a session with 0; the server going away ends one with 1."""
    server = make_server(*LOOSE)
    term = Terminal(server.ws_url)
    term.expect(rf"welcome: you are {ID}")
    term.expect(r"> ")  # the prompt: the client reads the terminal now
    os.write(term.master, b"\x04")  # Ctrl-D on an empty line
    assert term.wait() == 0

    term = Terminal(server.ws_url)
    try:
        term.expect(rf"welcome: you are {ID}")
        server.stop()
        term.expect(r"connection closed by the server: 1001 server shutting down")
        assert term.wait() == 1
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


@pytest.mark.parametrize("flag", ["--wait", "--timeout"])
def test_bad_durations_are_usage_errors(flag: str) -> None:
    result = subprocess.run(
        [*CLIENT, "ws://127.0.0.1:1", flag, "-1"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2 and flag in result.stderr
