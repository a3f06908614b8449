"""The HTTP edge of decisions.md 1, 7 and 8: endpoints, refusals, status codes."""

from __future__ import annotations

import json
import socket
import time

import pytest
from websockets.exceptions import InvalidStatus

from .conftest import TIMEOUT, Server
from .rawws import RawClient
from .waiting import wait_until


def raw_request(server: Server, request: bytes) -> bytes:
    """Send raw bytes; return everything the server answers before closing."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_health_ready_metrics_stats(server: Server) -> None:
    """/healthz, /readyz, /metrics and /stats answer 200 with their formats."""
    assert server.get("/healthz")[0] == 200
    status, _, body = server.get("/readyz")
    assert status == 200 and body.strip() == b"ready"
    status, headers, body = server.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in (
        "wshub_connections",
        "wshub_messages_total",
        "wshub_closes_total",
        "wshub_event_loop_lag_seconds",
        "wshub_fanout_recipients_bucket",
    ):
        assert f"\n{name}" in "\n" + text, name
    status, headers, body = server.get("/stats")
    stats = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert set(stats["messages"]) == {"INCOMING", "VALIDATED", "ROUTED", "FAILED"}
    assert stats["connections"]["node"] == stats["connections"]["cluster"]
    assert stats["nodeId"] and stats["uptimeSeconds"] >= 0


def test_chat_page(server: Server) -> None:
    """/ serves an HTML page that opens /websocket."""
    status, headers, body = server.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/websocket" in body and b"<html" in body


def test_unknown_path_is_404(server: Server) -> None:
    assert server.get("/nothing-here")[0] == 404
    assert server.get("/websocketx")[0] == 404
    assert server.get("/websocket/extra")[0] == 426  # room "extra": see test_rooms.py


def test_websocket_without_upgrade_is_426(server: Server) -> None:
    """A plain GET on /websocket is told to upgrade."""
    status, headers, _ = server.get("/websocket")
    assert status == 426 and headers["Upgrade"] == "websocket"


def test_query_string_is_allowed(server: Server) -> None:
    """/websocket?anything upgrades like /websocket."""
    raw, status, _ = RawClient.open(server.host, server.port, path="/websocket?token=abc&x=1")
    assert status == 101
    raw.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /websocket HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 65536 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_requests(server: Server, request_bytes: bytes, status: int) -> None:
    """Malformed or unsupported requests get a clear status and nothing else."""
    assert status_of(raw_request(server, request_bytes)) == status


@pytest.mark.parametrize(
    ("request_bytes", "status", "marker"),
    [
        (b"GET /healthz HTTP/1.0\r\n\r\n", 200, b""),  # no Host: optional in 1.0
        (b"GET /healthz HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", 200, b""),
        (b"GET /stats HTTP/1.0\r\n\r\n", 200, b'"nodeId"'),
        (b"GET /metrics HTTP/1.0\r\n\r\n", 200, b"wshub_connections"),
        (b"HEAD / HTTP/1.0\r\n\r\n", 200, b""),
        (b"GET /nowhere HTTP/1.0\r\n\r\n", 404, b""),
    ],
)
def test_http_1_0_requests_are_served_then_closed(
    server: Server, request_bytes: bytes, status: int, marker: bytes
) -> None:
    """Health checkers and load balancers still speak HTTP/1.0: the plain
    endpoints answer it (Host optional there) and close the connection, even
    when it asks for keep-alive; raw_request reads to the server's EOF."""
    response = raw_request(server, request_bytes)
    assert status_of(response) == status
    head = response.partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head, head
    assert marker in response


def test_an_upgrade_over_http_1_0_is_refused(server: Server) -> None:
    """RFC 6455 4.1: an upgrade needs HTTP/1.1 at least."""
    request = (
        b"GET /websocket HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert status_of(raw_request(server, request)) == 505
    client = server.client()  # and the server serves on
    client.roundtrip()
    client.close()


def test_upgrade_errors(server: Server) -> None:
    """Bad upgrade requests: wrong version 426, bad key 400, two Origins 400."""
    base = b"GET /websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    assert status_of(raw_request(server, base + key + b"Sec-WebSocket-Version: 8\r\n\r\n")) == 426
    assert (
        status_of(
            raw_request(
                server, base + b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
        )
        == 400
    )
    two_origins = b"Origin: http://a\r\nOrigin: http://b\r\n"
    answer = raw_request(
        server, base + key + b"Sec-WebSocket-Version: 13\r\n" + two_origins + b"\r\n"
    )
    assert status_of(answer) == 400


def test_origin_rules(server: Server) -> None:
    """No Origin and same-host Origin pass; any other Origin gets 403."""
    host = f"{server.host}:{server.port}"
    for origin, expected in [
        (None, 101),
        (f"http://{host}", 101),
        ("http://evil.example", 403),
        (f"http://{server.host}:1", 403),
        ("null", 403),
    ]:
        headers = {"Origin": origin} if origin else {}
        raw, status, _ = RawClient.open(server.host, server.port, headers=headers)
        assert status == expected, origin
        raw.close()


def test_origin_allow_list(make_server) -> None:
    """--allowed-origins takes exact origins and https://*.domain wildcards."""
    srv = make_server("--allowed-origins", "https://app.example.com,https://*.example.org")
    for origin, expected in [
        ("https://app.example.com", 101),
        ("https://APP.example.com", 101),
        ("http://app.example.com", 403),
        ("https://chat.example.org", 101),
        ("https://a.b.example.org", 101),
        ("https://example.org", 403),
        ("https://evil-example.org", 403),
    ]:
        raw, status, _ = RawClient.open(srv.host, srv.port, headers={"Origin": origin})
        assert status == expected, origin
        raw.close()
    everyone = make_server("--allowed-origins", "*")
    raw, status, _ = RawClient.open(everyone.host, everyone.port, headers={"Origin": "http://x"})
    assert status == 101
    raw.close()


def test_node_maximum_is_503(make_server) -> None:
    """Past --max-connections the upgrade is refused with 503; a slot frees up on close."""
    srv = make_server("--max-connections", "2")
    a, b = srv.client(), srv.client()
    with pytest.raises(InvalidStatus) as info:
        srv.connect()
    assert info.value.response.status_code == 503
    assert srv.get("/readyz")[0] == 503
    a.close()
    srv.wait_for(lambda: srv.stats()["connections"]["node"] == 1, "a slot to free up")
    c = srv.client()
    b.close()
    c.close()


def test_per_ip_concurrency_is_429(make_server) -> None:
    """Past --max-connections-per-ip from one address: 429."""
    srv = make_server("--max-connections-per-ip", "2", "--ip-connect-rate", "0")
    a, b = srv.client(), srv.client()
    with pytest.raises(InvalidStatus) as info:
        srv.connect()
    assert info.value.response.status_code == 429
    assert srv.metric("wshub_connections_refused_total", 'reason="ip_limit"') == 1
    a.close()
    b.close()


def test_per_ip_connect_rate_is_429(make_server) -> None:
    """Past --ip-connect-rate new connections per second from one address: 429."""
    srv = make_server("--ip-connect-rate", "3", "--max-connections-per-ip", "0")
    clients = []
    statuses = []
    for _ in range(6):
        raw, status, _ = RawClient.open(srv.host, srv.port)
        statuses.append(status)
        clients.append(raw)
    assert statuses.count(101) in (3, 4) and 429 in statuses  # 3 of burst, maybe 1 refilled
    for raw in clients:
        raw.close()


def test_forwarded_for_only_from_trusted_proxy(make_server) -> None:
    """X-Forwarded-For sets the client IP only when the peer is a trusted proxy."""
    trusting = make_server(
        "--max-connections-per-ip",
        "1",
        "--ip-connect-rate",
        "0",
        "--trusted-proxies",
        "127.0.0.0/8",
    )
    opened = []
    for forwarded in ("203.0.113.1", "203.0.113.2", "198.51.100.7, 203.0.113.3"):
        raw, status, _ = RawClient.open(
            trusting.host, trusting.port, headers={"X-Forwarded-For": forwarded}
        )
        assert status == 101, forwarded
        opened.append(raw)
    raw, status, _ = RawClient.open(
        trusting.host, trusting.port, headers={"X-Forwarded-For": "203.0.113.1"}
    )
    assert status == 429
    opened.append(raw)

    untrusting = make_server("--max-connections-per-ip", "1", "--ip-connect-rate", "0")
    first, status, _ = RawClient.open(
        untrusting.host, untrusting.port, headers={"X-Forwarded-For": "203.0.113.1"}
    )
    assert status == 101
    second, status, _ = RawClient.open(
        untrusting.host, untrusting.port, headers={"X-Forwarded-For": "203.0.113.2"}
    )
    assert status == 429  # the header is ignored: both come from 127.0.0.1
    for raw in [*opened, first, second]:
        raw.close()


def test_handshake_deadline_drops_silent_clients(make_server) -> None:
    """A client that never finishes its request is dropped at --handshake-timeout,
    and a real client still connects meanwhile."""
    srv = make_server("--handshake-timeout", "0.5")
    silent = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    slow = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    slow.sendall(b"GET /websocket HTTP/1.1\r\n")
    client = srv.client()
    start = time.monotonic()
    assert silent.recv(1) == b""
    assert slow.recv(1) == b""
    assert time.monotonic() - start < 0.5 + TIMEOUT / 2
    assert srv.metric("wshub_connections_refused_total", 'reason="handshake_timeout"') == 2
    client.roundtrip()
    client.close()
    silent.close()
    slow.close()


def test_every_metric_is_documented(server: Server) -> None:
    """docs/operations.md names every metric family /metrics exposes."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    _, _, body = server.get("/metrics")
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")}
    assert len(names) > 15
    missing = sorted(name for name in names if f"`{name}`" not in doc)
    assert not missing, f"undocumented metrics: {missing}"


def test_json_logs_carry_fields(make_server) -> None:
    """--log-format json writes one object per line with the event's fields."""
    srv = make_server("--log-format", "json", "--log-level", "info")
    client = srv.client()
    client.close()
    srv.wait_for(lambda: any('"event": "close"' in line for line in srv.stderr_lines), "close log")
    events = [json.loads(line) for line in srv.stderr_lines if line.startswith("{")]
    opened = next(e for e in events if e.get("event") == "open")
    closed = next(e for e in events if e.get("event") == "close")
    assert opened["id"] == client.id and opened["origin"] is None and opened["ip"] == "127.0.0.1"
    assert closed["code"] == 1000 and closed["id"] == client.id and closed["duration"] >= 0
    assert all("content" not in e for e in events)


def test_a_plain_http_request_is_not_a_connecting_connection(server: Server) -> None:
    """decisions.md 6: CONNECTING is a WebSocket state. /stats, /metrics and a
    kept-alive socket that asked for a page are not counted; an upgrade on its
    way is."""
    assert server.stats()["connections"]["connecting"] == 0
    assert server.metric("wshub_connections", 'state="connecting"') == 0
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as upgrading:
        upgrading.sendall(b"GET /websocket HTTP/1.1\r\n")  # its head not finished yet
        wait_until(lambda: server.stats()["connections"]["connecting"] == 1, "the upgrade")


def test_closed_connections_are_a_running_total(server: Server) -> None:
    """decisions.md 6 and 12: the CLOSED state, counted in /stats and /metrics."""
    before = server.stats()["connections"]["closed"]
    for _ in range(2):
        client = server.client()
        client.close()
    wait_until(lambda: server.stats()["connections"]["closed"] == before + 2, "two closes")
    assert server.metric("wshub_connections_closed_total") == before + 2
