"""A connection storm (decisions.md 18) against the at-accept handshake cap."""

from __future__ import annotations

import json
import socket

from .conftest import TIMEOUT, Server
from .test_audit_core_http import _healthz_answer
from .test_endpoints import raw_request
from .waiting import wait_until


def _connecting(server: Server) -> int:
    """Upgrades still on their way, as /stats says, or -1 if /stats was refused."""
    answer = raw_request(server, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    if not answer.startswith(b"HTTP/1.1 200 "):
        return -1
    return json.loads(answer.partition(b"\r\n\r\n")[2])["connections"]["connecting"]


def test_a_storm_of_max_connections_upgrades_leaves_room_for_healthz(make_server) -> None:
    """--max-handshakes defaults to --max-connections plus a tenth: while as many
    sockets as the node takes connections are all still upgrading, /healthz
    (refused at accept, before its path is read, once the cap is full) is 200."""
    srv = make_server("--max-connections", "20", "--handshake-timeout", str(6 * TIMEOUT))
    storm = [socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) for _ in range(20)]
    try:
        for sock in storm:
            sock.sendall(b"GET /websocket HTTP/1.1\r\n")  # an upgrade still on its way
        wait_until(lambda: _connecting(srv) == 20, "the 20 to be accepted")
        assert _healthz_answer(srv) == "HTTP/1.1 200 OK"
        # The cap is still a cap: 22 (20 + 2) then leave no room.
        storm += [socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) for _ in range(2)]
        wait_until(
            lambda: _healthz_answer(srv) == "HTTP/1.1 503 Service Unavailable", "the cap to fill"
        )
    finally:
        for sock in storm:
            sock.close()
