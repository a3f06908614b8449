"""``wshub publish`` against a tiny local HTTP server that answers as the API would.

The server is the standard library's ``http.server`` in a thread, deciding
with :mod:`wshub.api` itself (keys, head, body, answer), so the command is
tested over a real socket with real HTTP. The tests against ``wshub serve``
come with the wiring of the API into the server.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wshub import api
from wshub.cli import main as cli_main
from wshub.http import Request
from wshub.publish import main, publish_url

KEY = "publish-test-key-0123"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeApi:
    url: str
    seen: list[Seen] = field(default_factory=list)
    plain_404: bool = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _answer(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", api.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _serve(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        fake.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
        if fake.plain_404:
            text = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        request = Request(
            self.command, self.path, tuple((k.lower(), v) for k, v in self.headers.items())
        )
        head = api.check_head(request, self.server.keys)
        command = head if isinstance(head, api.ApiError) else api.parse_command(head, body)
        if isinstance(command, api.ApiError):
            self._answer(command.status, api.encode_error(command), command.headers)
        else:
            assert isinstance(command, api.PublishRequest)
            self._answer(200, api.encode_published(command.room, len(fake.seen), "epoch-1"))


class _Server(ThreadingHTTPServer):
    fake: FakeApi
    keys: api.ApiKeys


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = FakeApi(f"http://127.0.0.1:{server.server_address[1]}")
    server.keys = api.ApiKeys([KEY])
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.fake
    server.shutdown()
    server.server_close()
    thread.join(5)


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    status = main(list(argv), environ={"WSHUB_API_KEY": KEY} if env is None else env)
    out, err = capsys.readouterr()
    return status, out, err


def test_publish_sends_the_body_and_prints_the_answer(fake_api: FakeApi, capsys) -> None:
    """Every option lands in the JSON body; the answer is printed as it came."""
    status, out, err = run(
        capsys,
        fake_api.url,
        'hello "world" \u00e9\U0001f600',
        "--room",
        "Lobby",
        "--type",
        "message",
        "--sender",
        "backend-1",
        "--exclude",
        "ws-1-abcdefghi",
    )
    assert (status, err) == (0, "")
    assert json.loads(out) == {"room": "Lobby", "offset": 1, "epoch": "epoch-1"}
    (seen,) = fake_api.seen
    assert (seen.method, seen.path) == ("POST", "/api/publish")
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {
        "type": "message",
        "content": 'hello "world" \u00e9\U0001f600',
        "room": "Lobby",
        "connectionId": "backend-1",
        "exclude": "ws-1-abcdefghi",
    }


def test_defaults_send_only_type_and_content(fake_api: FakeApi, capsys) -> None:
    status, out, _ = run(capsys, fake_api.url, "hi")
    assert status == 0 and json.loads(out)["room"] == ""
    assert json.loads(fake_api.seen[0].body) == {"type": "broadcast", "content": "hi"}


def test_flag_key_wins_over_environment(fake_api: FakeApi, capsys) -> None:
    status, _, err = run(capsys, fake_api.url, "hi", "--api-key", "wrong-key")
    assert status == 1 and "unauthorized (401)" in err
    status, _, _ = run(capsys, fake_api.url, "hi", "--api-key", KEY, env={})
    assert status == 0


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["x" * 1001], "content_too_long"),
        (["   "], "empty_content"),
        (["hi", "--sender", "ws-1-abcdefghi"], "invalid_sender"),
        (["hi", "--room", "no spaces"], "invalid_request"),
    ],
)
def test_refusal_prints_the_error_and_exits_1(
    fake_api: FakeApi, capsys, args: list[str], code: str
) -> None:
    """The server's error body on stdout, its code on stderr, exit status 1."""
    status, out, err = run(capsys, fake_api.url, *args)
    assert status == 1
    assert json.loads(out)["error"]["code"] == code
    assert f"refused: {code} (400)" in err


def test_no_key_is_a_usage_error(fake_api: FakeApi, capsys) -> None:
    status, _, err = run(capsys, fake_api.url, "hi", env={})
    assert status == 2 and "WSHUB_API_KEY" in err
    status, _, err = run(capsys, fake_api.url, "hi", "--api-key", "two words", env={})
    assert status == 2 and "printable ASCII" in err
    assert fake_api.seen == []


@pytest.mark.parametrize("form", ["{host}", "{url}", "{url}/", "{url}/api/publish", "ws://{host}"])
def test_url_forms(fake_api: FakeApi, capsys, form: str) -> None:
    host = fake_api.url.removeprefix("http://")
    status, _, _ = run(capsys, form.format(url=fake_api.url, host=host), "hi")
    assert status == 0 and fake_api.seen[-1].path == "/api/publish"


def test_publish_url() -> None:
    assert publish_url("wss://hub.example.com/chat/") == (
        "https",
        "hub.example.com",
        None,
        "/chat/api/publish",
    )
    assert publish_url("[::1]:8788") == ("http", "::1", 8788, "/api/publish")
    for bad in ("ftp://h/", "http://", "http://h:port/"):
        with pytest.raises(ValueError):
            publish_url(bad)


def test_content_from_stdin(fake_api: FakeApi, capsys) -> None:
    status = main(
        [fake_api.url, "-"],
        environ={"WSHUB_API_KEY": KEY},
        stdin=io.StringIO("line one\nline two\n"),
    )
    assert status == 0
    assert json.loads(fake_api.seen[0].body)["content"] == "line one\nline two"


def test_api_off_is_explained(fake_api: FakeApi, capsys) -> None:
    fake_api.plain_404 = True
    status, out, err = run(capsys, fake_api.url, "hi")
    assert status == 1 and out == ""
    assert "HTTP 404" in err and "--api-keys" in err


def test_unreachable_server(capsys) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    status, _, err = run(capsys, f"http://127.0.0.1:{port}", "hi", "--timeout", "5")
    assert status == 1 and "cannot reach" in err


def test_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["http://h", "hi", "--type", "shout"])
    assert info.value.code == 2
    assert run(capsys, "ftp://h", "hi")[0] == 2
    assert run(capsys, "http://h", "hi", "--timeout", "0")[0] == 2


def test_through_the_wshub_command(fake_api: FakeApi, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WSHUB_API_KEY", KEY)
    assert cli_main(["publish", fake_api.url, "via cli"]) == 0
    assert json.loads(capsys.readouterr().out)["offset"] == 1
    result = subprocess.run(
        [sys.executable, "-m", "wshub", "publish", fake_api.url, "x" * 1001],
        capture_output=True,
        text=True,
        timeout=30,
        env={"WSHUB_API_KEY": KEY, "PATH": ""},
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["error"]["code"] == "content_too_long"


def test_a_websocket_url_publishes_beside_it_into_its_room(make_server, capsys) -> None:
    """The clients' address works as the URL: ``.../websocket/ROOM`` publishes
    into ROOM through the API beside it (it was posted to
    /websocket/ROOM/api/publish: 405), ``.../websocket`` into the default room,
    and --room wins over the URL's room."""
    srv = make_server("--api-keys", KEY)
    lobby, default = srv.client("lobby"), srv.client()
    base = f"ws://{srv.host}:{srv.port}/websocket"
    assert run(capsys, f"{base}/lobby", "to the lobby")[0] == 0
    assert lobby.recv_type("broadcast")["content"] == "to the lobby"
    assert run(capsys, base, "to the default room")[0] == 0
    assert default.recv_type("broadcast")["content"] == "to the default room"
    assert run(capsys, f"{base}/lobby/", "by flag", "--room", "other")[0] == 0
    assert run(capsys, f"{base}/lobby", "last")[0] == 0
    assert lobby.recv_type("broadcast")["content"] == "last"  # "by flag" went elsewhere
    default.send({"type": "ping"})
    assert default.recv()["type"] == "pong"  # nothing for the lobby reached the default room
    lobby.close()
    default.close()
