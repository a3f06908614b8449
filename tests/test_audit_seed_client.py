"""``wshub client`` as a person uses it against a restarting server."""

from __future__ import annotations

from .conftest import TIMEOUT, free_port, start_server
from .test_client import Piped, run_script
from .test_client_recover import OPEN, first_json
from .waiting import wait_until


def test_recover_says_once_that_the_connection_closed() -> None:
    """The server restarts: the client says once that the connection closed
    and that it is reconnecting, then that the server is not back yet, and
    comes back by itself; it does not repeat "connection closed (1001)" for
    every refused attempt, as if it had been closed again."""
    port = free_port()
    server = start_server(*OPEN, "--port", str(port))
    client = Piped(f"ws://127.0.0.1:{port}/websocket", "--recover", "--json", "--timeout", "30")
    try:
        first_json(client)
        assert server.stop() == 0  # SIGTERM: the client is closed with 1001
        wait_until(
            lambda: any("not back yet" in line for line in client.stderr),
            "a refused reconnect attempt",
            TIMEOUT * 2,
        )
        server = start_server(*OPEN, "--port", str(port))
        again = client.next_of("welcome")
        assert again["recovered"] is False  # a restarted single node lost its history
        closed = [line for line in client.stderr if "connection closed" in line]
        assert len(closed) == 1, client.stderr
        assert "(1001): reconnecting with since=" in closed[0]
        assert client.finish() == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
        server.stop()


def test_the_page_address_reaches_the_protocol(make_server) -> None:
    """``wshub client http://HOST:PORT/`` (the address of the page, as a person
    copies it from the browser) talks to /websocket: it was refused with the
    page's HTML as the reason ("the server answered 200 OK: <!doctype html>")."""
    server = make_server(*OPEN)
    result = run_script(f"{server.http_url}/", ["/info"])
    assert result.returncode == 0, result.stderr
    assert "user info: you are ws-" in result.stdout
