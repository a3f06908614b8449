"""Attack round 4 (decisions.md 8 and 16): sockets to the TLS port that never
finish the TLS handshake count toward the pre-upgrade caps from the accept on;
a client may not renegotiate; a server name that is not ASCII is no traceback.

Before: asyncio wraps an accepted socket in TLS before the server's protocol
sees it, so the caps of issue 19.2 (``--max-handshakes-per-ip``,
``--max-handshakes``) only began once a TLS handshake was done. One address
could hold any number of sockets that sent nothing for the whole handshake
deadline (10 s by default), each a file descriptor and ~50 KB of memory: 1,000
from one address under a per-IP cap of 5 cost 50 MB, and 20,000 would have
taken every descriptor the process had.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable

from .conftest import TIMEOUT, Server
from .test_tls import (  # noqa: F401  (ca, files: fixtures)
    LOOSE,
    Files,
    TestCA,
    ca,
    files,
    https_get,
    wss_client,
)
from .waiting import wait_until


def _silent(source: str, server: Server) -> socket.socket:
    """A TCP socket from *source* that never sends a byte (no ClientHello)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((server.host, server.port))
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_silent_sockets_to_the_tls_port_are_capped_per_ip(
    make_server: Callable[..., Server],
    files: Files,  # noqa: F811
    ca: TestCA,  # noqa: F811
) -> None:
    """60 silent sockets from one address under a per-IP cap of 3: 3 are held
    (until the deadline, 30 s here), the other 57 are closed at once and counted
    as refused; a client from another address gets in meanwhile, and once the
    held ones go, the address may connect again."""
    server = make_server(
        *LOOSE[:2],  # no connect rate
        "--message-rate",
        "0",
        "--max-connections-per-ip",
        "3",
        "--handshake-timeout",
        "30",
        *files.flags,
    )
    socks = [_silent("127.0.0.2", server) for _ in range(60)]
    try:
        wait_until(
            lambda: sum(_closed_by_server(s) for s in socks if s.fileno() != -1) >= 57,
            "57 of 60 silent TLS sockets closed at accept",
        )
        held = [s for s in socks if not _closed_by_server(s)]
        assert len(held) == 3
        status, body = https_get(server, ca, "/metrics")
        assert status == 200
        assert b'wshub_connections_refused_total{reason="handshake_limit"} 57' in body
        other = wss_client(server, ca)  # 127.0.0.1: its own budget
        other.close()
        for sock in held:
            sock.close()

        # The held slots are given back when their sockets go: the address
        # gets in again (it is a TLS handshake begun, then finished).
        def one_from_the_address() -> bool:
            raw = socket.socket()
            raw.bind(("127.0.0.2", 0))
            raw.settimeout(TIMEOUT)
            try:
                raw.connect((server.host, server.port))
                with ca.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    return tls.recv(64).startswith(b"HTTP/1.1 200 ")
            except (OSError, ssl.SSLError):
                return False

        wait_until(one_from_the_address, "a TLS client from 127.0.0.2 served again")
    finally:
        for sock in socks:
            sock.close()


def test_the_server_context_refuses_renegotiation_whatever_the_openssl() -> None:
    """Client-initiated TLS 1.2 renegotiation (a handshake's cost to the server
    on demand, on a socket no cap counts again) is refused by the context
    itself: OpenSSL 3 refuses it by default, OpenSSL 1.1.1 allows it. (Checked
    by hand against a real server with ``openssl s_client -tls1_2`` and ``R``:
    "no renegotiation".)"""
    from wshub.tls import server_context

    assert server_context().options & ssl.OP_NO_RENEGOTIATION


def _client_hello_naming(server_name: bytes) -> bytes:
    """A TLS 1.2/1.3 ClientHello whose SNI holds *server_name* as raw bytes
    (Python's own client would IDNA-encode it): a real one, the name patched in."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    placeholder = b"x" * len(server_name)
    tls = ssl.create_default_context().wrap_bio(
        incoming, outgoing, server_hostname=placeholder.decode()
    )
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello.count(placeholder) == 1
    return hello.replace(placeholder, server_name)


def test_a_server_name_that_is_not_ascii_prints_no_traceback(
    make_server: Callable[..., Server],
    files: Files,  # noqa: F811
    ca: TestCA,  # noqa: F811
) -> None:
    """Python decodes the SNI as ASCII before any callback of ours: with an SNI
    hook set, a name such as ``caf\\xe9`` printed an "Exception ignored"
    traceback to stderr on every handshake (5 lines a socket, no rate limit).
    Such a name is no DNS name (RFC 6066 3: ASCII, IDNA for others): the
    handshake goes on (one certificate serves every name), nothing is printed,
    and others connect."""
    server = make_server(*LOOSE, *files.flags)
    for _ in range(3):
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
            sock.sendall(_client_hello_naming(b"caf\xe9\xff.example"))
            sock.settimeout(TIMEOUT)
            # The handshake goes on: a ServerHello (a handshake record, 0x16),
            # not an alert (0x15); the name means nothing to one certificate.
            assert sock.recv(1) == b"\x16"
    client = wss_client(server, ca)
    client.roundtrip()
    client.close()
    assert not [line for line in server.stderr_lines if "Traceback" in line or "ignored" in line]


def _hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_sockets_reset_halfway_through_the_tls_handshake_give_their_slots_back(
    make_server: Callable[..., Server],
    files: Files,  # noqa: F811
    ca: TestCA,  # noqa: F811
) -> None:
    """40 sockets from one address (per-IP cap 3) reset at every point of the
    TLS handshake (before the hello, halfway through it, after it, after the
    server's answer, after a record that is no hello): none keeps its slot, so
    the address can then hold 3 finished TLS handshakes at once, each served."""
    server = make_server(
        *LOOSE[:2], "--message-rate", "0", "--max-connections-per-ip", "3", *files.flags
    )
    hello = _hello()
    sends = [b"", hello[:50], hello, b"\x16\x03\x01\xff\xff" + b"x" * 100]
    for _ in range(10):
        for data in sends:
            sock = _silent("127.0.0.2", server)
            if data:
                sock.sendall(data)
            if data == hello:
                sock.settimeout(TIMEOUT)
                sock.recv(1)  # the server's first flight: it is mid-handshake
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
    context = ca.client_context()

    def finished_handshake() -> ssl.SSLSocket | None:
        raw = socket.socket()
        raw.bind(("127.0.0.2", 0))
        raw.settimeout(TIMEOUT)
        raw.connect((server.host, server.port))
        try:
            return context.wrap_socket(raw, server_hostname="127.0.0.1")
        except (OSError, ssl.SSLError):
            raw.close()
            return None

    held: list[ssl.SSLSocket | None] = []
    try:
        # The resets are processed in order of arrival, before these sockets.
        wait_until(
            lambda: held.append(finished_handshake()) or held[-1] is not None,
            "a first TLS handshake from 127.0.0.2",
        )
        held += [finished_handshake(), finished_handshake()]
        assert all(tls is not None for tls in held[-3:]), "a slot was kept by a reset socket"
        for tls in held[-3:]:
            assert tls is not None
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert tls.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        for tls in held:
            if tls is not None:
                tls.close()
