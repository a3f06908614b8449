"""Attacks on shutdown and cleanup (decisions.md 1, 6, 9) found by the outside-tester audit."""

from __future__ import annotations

import signal
import time

from .conftest import TIMEOUT
from .rawws import RawClient
from .test_lifecycle import open_raw


def test_draining_node_answers_503_and_readyz_503(make_server) -> None:
    """While a node drains, an upgrade gets 503 and /readyz 503 (decisions.md 1;
    operations.md): the port still answers, so a load balancer sees the node
    leave rather than a refused connection; /healthz stays 200 (liveness)."""
    srv = make_server("--drain-timeout", str(3 * TIMEOUT), "--close-timeout", str(TIMEOUT))
    # A client that never answers the Close keeps the drain going.
    lingering, _ = open_raw(srv)
    srv.proc.send_signal(signal.SIGTERM)
    assert lingering.recv_close()[0] == 1001  # the drain has begun
    late, status, head = RawClient.open(srv.host, srv.port)
    late.close()
    assert status == 503, head
    assert b"Retry-After: 1" in head
    status, _, body = srv.get("/readyz")
    assert (status, body) == (503, b"draining: shutting down\n")
    assert srv.get("/healthz")[0] == 200
    start = time.monotonic()
    lingering.close()  # the drain ends with its last client
    assert srv.proc.wait(timeout=TIMEOUT) == 0
    assert time.monotonic() - start < TIMEOUT
