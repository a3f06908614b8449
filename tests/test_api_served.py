"""The backend API served by a real ``wshub serve`` (decisions.md 14 and 19).

Every row of issue 14's item 2 over real sockets: httpx for what a backend
does, raw sockets for what a careful attacker does (announce a body and not
send it, pipeline, trickle a request), and WebSocket clients to see what the
room's members get.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import TIMEOUT, Client, Server, free_port, start_server
from .waiting import wait_until

KEY = "k-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")


@pytest.fixture(scope="module")
def api_server() -> Server:
    srv = start_server("--api-keys", f"{KEY},rotated-key-0123456789", *LIMITS)
    yield srv
    srv.stop()
    assert not [line for line in srv.stderr_lines if "Traceback" in line], "".join(srv.stderr_lines)


@pytest.fixture
def http(api_server: Server) -> httpx.Client:
    with httpx.Client(base_url=api_server.http_url, timeout=TIMEOUT) as client:
        yield client


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return str(body["error"]["code"])


def raw(srv: Server) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    return sock


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from *sock* (leftovers stay in *buffer*)."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise EOFError(bytes(buffer))
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise EOFError(rest)
        rest += data
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (EOF or reset) within TIMEOUT."""
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def publish_request(body: bytes, *, extra: str = "", key: str = KEY) -> bytes:
    return (
        f"POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


# -- Off, keys, statuses -------------------------------------------------------------


def test_the_api_is_off_without_a_key(make_server) -> None:
    srv = make_server()
    for path in ("/api/publish", "/api/rooms", "/api/rooms/", "/api/disconnect"):
        status, _, _ = srv.get(path, headers=AUTH)
        assert status == 404, path
    response = httpx.post(srv.http_url + "/api/publish", json={"content": "x"}, headers=AUTH)
    assert response.status_code == 404


def test_a_missing_or_wrong_key_is_401_with_www_authenticate(http: httpx.Client) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Bearer {KEY[:-1]}"},  # a prefix of the key
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"bearer{KEY}"},
    ):
        for method, path in (("POST", "/api/publish"), ("GET", "/api/rooms"), ("GET", "/api/x")):
            response = http.request(method, path, headers=headers, json={"content": "x"})
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert error_code(response) == "unauthorized"
    # Both keys open it (rotation).
    for key in (KEY, "rotated-key-0123456789"):
        response = http.get("/api/rooms", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200


def test_a_missing_and_a_wrong_key_cost_the_same_time(http: httpx.Client) -> None:
    """Interleaved over one kept-alive connection, the medians of a missing key,
    a near miss and a far miss stay close: nothing in the answer's timing tells
    them apart (the unit tests show one digest comparison per key each time)."""
    cases = {
        "missing": {},
        "near": {"Authorization": f"Bearer {KEY[:-1]}x"},
        "far": {"Authorization": "Bearer " + "z" * 200},
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(150):
        for name, headers in cases.items():
            start = time.perf_counter()
            assert http.get("/api/rooms", headers=headers).status_code == 401
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    assert max(medians.values()) < 2 * min(medians.values()), medians


def test_a_backend_cannot_pose_as_a_client(http: httpx.Client) -> None:
    for sender in ("ws-abc", "ws-", "a b", "x" * 65, "", 7, "é"):
        response = http.post(
            "/api/publish", headers=AUTH, json={"content": "x", "connectionId": sender}
        )
        assert response.status_code == 400, sender
        assert error_code(response) == "invalid_sender"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "invalid_request"),
        (b"[]", "invalid_request"),
        (b"", "invalid_request"),
        (b'{"content": "x", "content": "y"}', "invalid_request"),
        (b'{"content": NaN}', "invalid_request"),
        (b"\xff\xfe{}", "invalid_request"),
        (b'{"type": "shout", "content": "x"}', "invalid_request"),
        (b'{"type": 1, "content": "x"}', "invalid_request"),
        (b'{"room": 5, "content": "x"}', "invalid_request"),
        (b'{"room": "no room", "content": "x"}', "invalid_request"),
        (b'{"room": "%41", "content": "x"}', "invalid_request"),
        (b'{"type": "message", "content": "x", "exclude": 3}', "invalid_request"),
        (b"{}", "invalid_content"),
        (b'{"content": 5}', "invalid_content"),
        (b'{"content": ""}', "empty_content"),
        (b'{"content": "   "}', "empty_content"),
        (json.dumps({"content": "x" * 1001}).encode(), "content_too_long"),
    ],
)
def test_a_bad_publication_gets_a_clear_400(http: httpx.Client, body: bytes, code: str) -> None:
    response = http.post("/api/publish", headers=AUTH, content=body)
    assert response.status_code == 400
    assert error_code(response) == code
    assert http.get("/api/rooms", headers=AUTH).status_code == 200  # same connection, still served


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(http: httpx.Client) -> None:
    for path in ("/api/", "/api/publish/", "/api/nope", "/api/rooms/a/b"):
        response = http.get(path, headers=AUTH)
        assert response.status_code in (400, 404), path
    assert error_code(http.get("/api/nope", headers=AUTH)) == "not_found"
    for method, path, allow in (
        ("GET", "/api/publish", "POST"),
        ("PUT", "/api/publish", "POST"),
        ("POST", "/api/rooms", "GET, HEAD"),
        ("DELETE", "/api/rooms/x", "GET, HEAD"),
        ("GET", "/api/disconnect", "POST"),
    ):
        response = http.request(method, path, headers=AUTH)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allow
        assert error_code(response) == "method_not_allowed"
    response = http.get("/api/rooms/no%20room", headers=AUTH)
    assert response.status_code == 400 and error_code(response) == "invalid_request"


def test_a_body_over_64_kib_is_413_before_it_is_sent(api_server: Server) -> None:
    """The head alone says too much: 413 comes back while the body is still
    unsent, and the connection is closed (the body is never read)."""
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Length: {64 * 1024 + 1}\r\n\r\n"
    ).encode()
    with raw(api_server) as sock:
        sock.sendall(head)
        status, _, body = read_response(sock, bytearray())
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert closed_by_server(sock)
    # Chunked: 413 at the chunk-size line that passes the limit, before its data.
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n8000\r\n"
    ).encode()
    with raw(api_server) as sock:
        sock.sendall(head + b"x" * 0x8000 + b"\r\n8001\r\n")
        status, _, body = read_response(sock, bytearray())
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert closed_by_server(sock)
    # Exactly 64 KiB is read (and refused for its content, not its size).
    big = json.dumps({"content": "x" * (64 * 1024 - 20)}).encode().ljust(64 * 1024)
    assert len(big) == 64 * 1024
    with raw(api_server) as sock:
        sock.sendall(publish_request(big))
        status, _, body = read_response(sock, bytearray())
        assert status == 400 and json.loads(body)["error"]["code"] == "content_too_long"


def test_a_401_with_an_unread_body_closes_the_connection(api_server: Server) -> None:
    """Answered from the head: the announced body is never read, so the
    connection can't go on (its bytes would be taken for a request)."""
    with raw(api_server) as sock:
        sock.sendall(publish_request(b'{"content": "x"}', key="wrong-key-0123456789")[:-5])
        status, headers, _ = read_response(sock, bytearray())
        assert status == 401 and headers["connection"] == "close"
        assert closed_by_server(sock)


def test_expect_100_continue_and_head(api_server: Server, http: httpx.Client) -> None:
    body = b'{"content": "after continue"}'
    with raw(api_server) as sock:
        head = publish_request(body, extra="Expect: 100-continue\r\n")[: -len(body)]
        sock.sendall(head)
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        assert buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del buffer[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        sock.sendall(body)
        status, _, answer = read_response(sock, buffer)
        assert status == 200 and json.loads(answer)["room"] == ""
    response = http.head("/api/rooms", headers=AUTH)
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["content-length"]) > 0


# -- What the room's members get -----------------------------------------------------


def test_a_publication_reaches_the_rooms_members_and_enters_its_history(
    api_server: Server, http: httpx.Client
) -> None:
    a, b = api_server.client("news"), api_server.client("news")
    other = api_server.client("elsewhere")
    a.recv_type("user_joined")
    response = http.post("/api/publish", headers=AUTH, json={"room": "news", "content": "hello"})
    assert response.status_code == 200
    answer = response.json()
    assert answer["room"] == "news" and answer["offset"] >= 1 and answer["epoch"]
    for client in (a, b):
        got = client.recv_type("broadcast")
        assert got["content"] == "hello" and got["connectionId"] == "server"
        assert got["offset"] == answer["offset"]
    # A message with exclude skips that member; a named sender is shown.
    response = http.post(
        "/api/publish",
        headers=AUTH,
        json={
            "type": "message",
            "room": "news",
            "content": "not for a",
            "exclude": a.id,
            "connectionId": "metrics",
        },
    )
    assert response.status_code == 200
    got = b.recv_type("message")
    assert got["content"] == "not for a" and got["connectionId"] == "metrics"
    a.roundtrip()  # the pong came first: nothing else was queued for a
    other.roundtrip()
    # The history holds both: a newcomer asking for two gets them replayed.
    late = api_server.client("news?history=2")
    replayed = [late.recv_type("broadcast", "message")["content"] for _ in range(2)]
    assert replayed == ["hello", "not for a"]
    # A room without members: accepted, and in its history.
    response = http.post("/api/publish", headers=AUTH, json={"room": "empty1", "content": "x"})
    assert response.status_code == 200 and response.json()["offset"] == 1
    for client in (a, b, other, late):
        client.close()


def test_the_default_room_and_its_detail(api_server: Server, http: httpx.Client) -> None:
    member = api_server.client()
    response = http.post("/api/publish", headers=AUTH, json={"content": "to the lobby"})
    assert response.status_code == 200 and response.json()["room"] == ""
    assert member.recv_type("broadcast")["content"] == "to the lobby"
    detail = http.get("/api/rooms/", headers=AUTH).json()
    assert detail["room"] == "" and member.id in [c["connectionId"] for c in detail["connections"]]
    member.close()


def test_rooms_and_their_connections_are_listed(api_server: Server, http: httpx.Client) -> None:
    node = api_server.stats()["nodeId"]
    x, y = api_server.client("list-a"), api_server.client("list-a")
    z = api_server.client("list-b")
    rooms = {
        r["room"]: r["connectionCount"]
        for r in http.get("/api/rooms", headers=AUTH).json()["rooms"]
    }
    assert rooms["list-a"] == 2 and rooms["list-b"] == 1
    detail = http.get("/api/rooms/list-a", headers=AUTH).json()
    assert detail["room"] == "list-a" and detail["connectionCount"] == 2
    assert sorted(c["connectionId"] for c in detail["connections"]) == sorted([x.id, y.id])
    assert all(c["node"] == node and "userId" not in c for c in detail["connections"])
    # A room without members is 200 with no connections.
    empty = http.get("/api/rooms/nobody-here", headers=AUTH)
    assert empty.status_code == 200
    assert empty.json() == {"room": "nobody-here", "connectionCount": 0, "connections": []}
    z.close()
    wait_until(
        lambda: (
            "list-b"
            not in [r["room"] for r in http.get("/api/rooms", headers=AUTH).json()["rooms"]]
        ),
        "list-b to leave the listing",
    )
    x.close()
    y.close()


def test_a_disconnect_closes_the_connection_and_user_left_follows_once(
    api_server: Server, http: httpx.Client
) -> None:
    doomed, witness = api_server.client("kick"), api_server.client("kick")
    doomed.recv_type("user_joined")
    response = http.post(
        "/api/disconnect",
        headers=AUTH,
        json={"connectionId": doomed.id, "code": 4321, "reason": "bye now"},
    )
    assert response.status_code == 200
    assert response.json() == {"disconnected": 1, "connections": [doomed.id]}
    wait_until(lambda: doomed.ws.close_code is not None or _drained(doomed), "the close")
    assert doomed.ws.close_code == 4321 and doomed.ws.close_reason == "bye now"
    left = witness.recv_type("user_left")
    assert left["connectionId"] == doomed.id
    witness.roundtrip()  # and no second user_left before the pong
    # Gone now: 404. Default code 4000.
    again = http.post("/api/disconnect", headers=AUTH, json={"connectionId": doomed.id})
    assert again.status_code == 404 and error_code(again) == "not_found"
    unknown_user = http.post("/api/disconnect", headers=AUTH, json={"userId": "nobody"})
    assert unknown_user.status_code == 404
    other = api_server.client("kick")
    assert (
        http.post("/api/disconnect", headers=AUTH, json={"connectionId": other.id}).status_code
        == 200
    )
    wait_until(lambda: other.ws.close_code is not None or _drained(other), "the close")
    assert other.ws.close_code == 4000
    for bad in (
        {"connectionId": witness.id, "code": 1000},
        {"connectionId": witness.id, "userId": "u"},
        {},
    ):
        response = http.post("/api/disconnect", headers=AUTH, json=bad)
        assert response.status_code == 400 and error_code(response) == "invalid_request"
    witness.roundtrip()  # the refused disconnects left it alone
    witness.close()


def _drained(client: Client) -> bool:
    """Read what is left until the close (the client library records it)."""
    try:
        client.ws.recv(timeout=0.1)
    except TimeoutError:
        return False
    except Exception:
        return True
    return False


# -- Keep-alive, and its bounds --------------------------------------------------------


def test_many_requests_on_one_connection_and_pipelined(api_server: Server) -> None:
    member = api_server.client("pipe")
    body = b'{"room": "pipe", "content": "p"}'
    with raw(api_server) as sock:
        buffer = bytearray()
        for _ in range(20):  # one after another
            sock.sendall(publish_request(body))
            status, headers, _ = read_response(sock, buffer)
            assert status == 200 and headers["connection"] == "keep-alive"
        # 200 at once, in one write, with a bad one and a listing in the middle.
        batch = [publish_request(body) for _ in range(100)]
        batch.insert(50, publish_request(b"{"))
        batch.insert(
            70,
            f"GET /api/rooms HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode(),
        )
        sock.sendall(b"".join(batch))
        statuses = [read_response(sock, buffer)[0] for _ in batch]
        assert statuses == [400 if i == 50 else 200 for i in range(len(batch))]
    got = [member.recv_type("broadcast")["content"] for _ in range(120)]
    assert got == ["p"] * 120
    member.roundtrip()
    member.close()


def test_a_connection_serves_a_bounded_number_of_requests(api_server: Server) -> None:
    request = (
        f"GET /api/rooms/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    )
    with raw(api_server) as sock:
        sock.sendall(request * 1001)
        buffer = bytearray()
        connections = [read_response(sock, buffer)[1]["connection"] for _ in range(1000)]
        assert connections[:-1] == ["keep-alive"] * 999 and connections[-1] == "close"
        assert closed_by_server(sock)


def test_connection_close_is_honoured(api_server: Server) -> None:
    request = (
        f"GET /api/rooms HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with raw(api_server) as sock:
        sock.sendall(request)
        status, headers, _ = read_response(sock, bytearray())
        assert status == 200 and headers["connection"] == "close"
        assert closed_by_server(sock)


@pytest.mark.parametrize("slow_part", ["head", "body"])
def test_idle_and_trickling_connections_are_dropped(make_server, slow_part: str) -> None:
    """The handshake deadline runs from each answer to the next request
    whole: an idle kept-alive connection is closed, and a request whose head
    or body is sent a byte at a time (Slowloris) is dropped, while the server
    serves others."""
    srv = make_server("--api-keys", KEY, "--handshake-timeout", "1", *LIMITS)
    request = f"GET /api/rooms HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    slow = request
    if slow_part == "body":
        body = json.dumps({"content": "x" * 200}).encode()
        slow = publish_request(body)
    with raw(srv) as idle, raw(srv) as trickle:
        for sock in (idle, trickle):
            sock.sendall(request)
            assert read_response(sock, bytearray())[0] == 200
        if slow_part == "body":  # the head at once, then the body byte by byte
            trickle.sendall(slow[: len(slow) - 200])
            slow = slow[len(slow) - 200 :]
        start = time.monotonic()
        dropped = False
        for byte in slow[:-1]:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                dropped = True
                break
            if time.monotonic() - start > TIMEOUT:
                break
            trickle.settimeout(0.2)
            try:
                if trickle.recv(1) == b"":
                    dropped = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                dropped = True
                break
        assert dropped, "a trickled request outlived the deadline"
        assert time.monotonic() - start < 1 + TIMEOUT
        assert closed_by_server(idle)
    assert httpx.get(srv.http_url + "/api/rooms", headers=AUTH).status_code == 200


# -- Its own address, keys on SIGHUP ------------------------------------------------------


def test_api_listen_serves_the_api_on_its_own_address(make_server) -> None:
    port = free_port()
    srv = make_server("--api-keys", KEY, "--api-listen", f"127.0.0.1:{port}", *LIMITS)
    member = srv.client()
    public = httpx.post(srv.http_url + "/api/publish", headers=AUTH, json={"content": "x"})
    assert public.status_code == 404
    private = f"http://127.0.0.1:{port}"
    response = httpx.post(private + "/api/publish", headers=AUTH, json={"content": "private"})
    assert response.status_code == 200
    assert member.recv_type("broadcast")["content"] == "private"
    # The private address serves nothing but the API.
    assert httpx.get(private + "/websocket").status_code == 404
    assert httpx.get(private + "/").status_code == 404
    assert httpx.get(private + "/api/rooms").status_code == 401
    member.close()


def test_a_taken_address_is_named_in_the_refusal() -> None:
    """Exit 1 with the address that could not be bound: the public port's or
    --api-listen's (it named the public one for both)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        public = free_port()
        for args, named in (
            (["--port", str(busy)], f"127.0.0.1:{busy}"),
            (["--port", str(public), "--api-listen", f"127.0.0.1:{busy}"], f"127.0.0.1:{busy}"),
        ):
            result = subprocess.run(
                [sys.executable, "-m", "wshub", "serve", "--api-keys", KEY, *args],
                capture_output=True,
                text=True,
                timeout=TIMEOUT * 6,
            )
            assert result.returncode == 1, result.stderr
            assert f"cannot listen on {named}:" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr


def test_the_keys_file_is_read_again_on_sighup(make_server, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the first key\nfirst-key-0123456789\n")
    srv = make_server("--api-keys-file", str(keys), "--log-level", "info", *LIMITS)
    url = srv.http_url + "/api/rooms"

    def status(key: str) -> int:
        return httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code

    assert status("first-key-0123456789") == 200
    keys.write_text("second-key-0123456789\n\n")
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status("second-key-0123456789") == 200, "the new key")
    assert status("first-key-0123456789") == 401
    # A bad file keeps the keys in use and says so.
    keys.write_text("second-key-0123456789\nnot a key\n")
    os.utime(keys)
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: any("reload_failed" in line and "api_keys" in line for line in srv.stderr_lines),
        "the reload error in the log",
    )
    assert status("second-key-0123456789") == 200
    assert srv.proc.poll() is None
    assert not any("second-key-0123456789" in line for line in srv.stderr_lines)


def test_a_bad_keys_file_is_a_usage_error_at_start(tmp_path) -> None:
    import subprocess
    import sys

    keys = tmp_path / "keys"
    keys.write_text("not a key\n")
    done = subprocess.run(
        [sys.executable, "-m", "wshub", "serve", "--port", "0", "--api-keys-file", str(keys)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert done.returncode == 2 and "line 1" in done.stderr


# -- Arbitrary input ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_server() -> Server:
    """An API server whose handshake deadline is short: a request whose random
    headers announce a body that never comes costs a second, not ten."""
    srv = start_server("--api-keys", KEY, "--handshake-timeout", "1", *LIMITS)
    yield srv
    srv.stop()
    assert not [line for line in srv.stderr_lines if "Traceback" in line], "".join(srv.stderr_lines)


_header_names = st.sampled_from(
    ["content-type", "content-length", "transfer-encoding", "expect", "connection", "x-any"]
)
_header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=12), inner, max_size=5)
            ),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
        st.fixed_dictionaries(
            {"content": st.text(max_size=30)},
            optional={
                "type": st.sampled_from(["broadcast", "message", "x", ""]) | st.integers(),
                "room": st.text(max_size=70),
                "connectionId": st.text(max_size=70),
                "exclude": st.text(max_size=10) | st.none(),
            },
        ).map(lambda value: json.dumps(value).encode()),
    ),
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=3),
    framing=st.sampled_from(["length", "chunked", "none"]),
)
def test_arbitrary_bodies_and_headers_never_break_the_api(
    quick_server: Server, body: bytes, headers: list[tuple[str, str]], framing: str
) -> None:
    api_server = quick_server
    lines = [
        "POST /api/publish HTTP/1.1",
        "Host: t",
        f"Authorization: Bearer {KEY}",
        *[f"{name}: {value}" for name, value in headers],
    ]
    payload = body
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload = (
            (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
        )
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
    with raw(api_server) as sock:
        sock.sendall(data)
        sock.settimeout(TIMEOUT)
        buffer = bytearray()
        try:
            status, _, answer = read_response(sock, buffer)
        except (EOFError, ConnectionResetError):
            # A random Content-Length announced more than was sent: the
            # server waited for it and dropped the connection at the
            # deadline (a hang would have raised TimeoutError instead).
            status, answer = 0, b""
    assert status in (0, 200, 400, 413), (status, answer)
    if status in (413,) or (status == 400 and answer.startswith(b"{")):
        assert set(json.loads(answer)) == {"error"}
    check = httpx.get(api_server.http_url + "/api/rooms", headers=AUTH, timeout=TIMEOUT)
    assert check.status_code == 200


def test_wshub_publish_against_the_real_server(api_server: Server) -> None:
    import subprocess
    import sys

    member = api_server.client("cli")
    done = subprocess.run(
        [sys.executable, "-m", "wshub", "publish", f"127.0.0.1:{api_server.port}", "from the cli"]
        + ["--room", "cli", "--sender", "deploy-bot"],
        env={**os.environ, "WSHUB_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["room"] == "cli"
    got = member.recv_type("broadcast")
    assert got["content"] == "from the cli" and got["connectionId"] == "deploy-bot"
    refused = subprocess.run(
        [sys.executable, "-m", "wshub", "publish", f"127.0.0.1:{api_server.port}", " "],
        env={**os.environ, "WSHUB_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert refused.returncode == 1 and "empty_content" in refused.stderr
    member.close()
